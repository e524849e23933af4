"""``zeroplan merge``, ``generate`` and ``chat``: use a finished run with its own chat template."""

from __future__ import annotations

from pathlib import Path

import click

from zeroplan.commands.params import FiniteFloat, OutPath

_RUN = click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))


def _sampling(f: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(
        [
            click.option("--max-new-tokens", type=int, default=256, show_default=True),
            click.option(
                "--temperature",
                type=FiniteFloat(min=0),
                default=0.7,
                show_default=True,
                help="0: greedy.",
            ),
            click.option(
                "--top-p",
                type=FiniteFloat(min=0, min_open=True, max=1),
                default=0.9,
                show_default=True,
            ),
            click.option(
                "--repetition-penalty",
                type=FiniteFloat(min=0, min_open=True),
                default=1.1,
                show_default=True,
            ),
            click.option("--seed", type=int, default=None, help="Reproducible sampling."),
        ]
    ):
        f = option(f)
    return f


@click.command()
@_RUN
@click.option(
    "-o",
    "--out",
    type=OutPath(file_okay=False),
    required=True,
    help="New folder for the merged model (weights + tokenizer).",
)
def merge(run: Path, out: Path) -> None:
    """Merge RUN's LoRA adapter into the base weights (bf16) and save a plain model.

    \b
    zeroplan merge runs/ruozhiba -o runs/ruozhiba-merged
    """
    from zeroplan.launch.infer import merge_adapter

    click.echo(f"merged into {merge_adapter(run, out)}")


@click.command()
@_RUN
@click.option("--prompt", "-p", required=True, help="The user's message.")
@_sampling
def generate(
    run: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
) -> None:
    """Answer one PROMPT with RUN's model, rendered with the chat template used in training.

    \b
    zeroplan generate runs/ruozhiba --prompt "只剩一个心脏了还能活吗？"
    zeroplan generate runs/ruozhiba-merged -p "Hello" --temperature 0
    """
    from zeroplan.launch.infer import generate as run_generate

    click.echo(
        run_generate(
            run,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
    )


@click.command()
@_RUN
@_sampling
def chat(
    run: Path,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
) -> None:
    """Talk to RUN's model in the terminal (the training chat template; empty line or
    Ctrl-D ends, /reset forgets the conversation).

    \b
    zeroplan chat runs/ruozhiba
    zeroplan chat runs/ruozhiba-merged --temperature 0   # greedy: the same reply each time
    """
    from zeroplan.launch.infer import generate as run_generate
    from zeroplan.launch.infer import load

    loaded = load(run)
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            click.echo()
            return
        if not text:
            return
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        reply = run_generate(
            loaded,
            messages=history,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        history.append({"role": "assistant", "content": reply})
        click.echo(f"model> {reply}")
