"""The job a plan is made for, as command-line options: declared once for every command
that plans (``zeroplan plan``, and ``zeroplan launch MODEL`` which plans before it runs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from zeroplan.commands.params import FINITE, FiniteFloat
from zeroplan.errors import BadSetupError
from zeroplan.lengths import OVERLONG
from zeroplan.models import ModelSpec
from zeroplan.records import FORMATS
from zeroplan.trainsetup import METHODS, PRECISIONS, TrainSetup, parse_targets
from zeroplan.wholenumbers import whole_number

if TYPE_CHECKING:
    from zeroplan.hardware import GPU
    from zeroplan.prompts import PromptFormat
    from zeroplan.recipes.common import Recipe

F = TypeVar("F", bound=Callable[..., Any])

# the keyword arguments job_options adds to a command
JOB_OPTIONS = (
    "method",
    "seq_len",
    "global_batch",
    "lora_r",
    "lora_targets",
    "lora_dropout",
    "no_quantization",
    "precision",
)
PRECISION_HELP = (
    "Mixed precision: bf16, or fp16 (with loss scaling). Default: bf16 where the GPU has it, "
    "fp16 on cards without (T4, V100, RTX 20xx)."
)
# and data_options
DATA_OPTIONS = (
    "data",
    "tokenizer",
    "chat_template",
    "data_format",
    "system_prompt",
    "overlong",
    "epochs",
)


def job_options(fn: F) -> F:
    """--method, --seq-len, --global-batch, --lora-r, --lora-targets, --lora-dropout,
    --no-quantization, --precision."""
    options = [
        click.option(
            "--method",
            type=click.Choice((*METHODS, "auto")),
            default="lora",
            show_default=True,
            help="lora keeps the bf16 base when it fits (else a 4-bit base, said so); auto: "
            "lora or qlora, whichever is predicted faster.",
        ),
        click.option(
            "--seq-len",
            default=None,
            metavar="N|auto|pNN",
            help="Tokens per sequence (default 2048, or the model's context window where "
            "shorter). With --data: auto (default: the longest record), a percentile such as "
            "p99 (longer records follow --overlong), or N.",
        ),
        click.option(
            "--global-batch",
            type=click.IntRange(min=1),
            default=None,
            help="Sequences per optimizer step over all GPUs, kept exactly (micro-batch × "
            "accumulation × GPUs).",
        ),
        click.option(
            "--lora-r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank."
        ),
        click.option(
            "--lora-targets",
            default="all-linear",
            show_default=True,
            help="Module names (q_proj,v_proj) or all-linear.",
        ),
        click.option(
            "--lora-dropout",
            type=FiniteFloat(min=0, max=1, max_open=True),
            default=TrainSetup.lora_dropout,
            show_default=True,
            help="LoRA dropout. 0 (PEFT's, LLaMA-Factory's, axolotl's and Unsloth's default) "
            "lets the adapters keep one input per shared tensor; 0.05 (TRL's examples) keeps "
            "a copy and a mask per adapted input and runs slower.",
        ),
        click.option(
            "--no-quantization",
            is_flag=True,
            help="Never a 4-bit base for lora, not even when the bf16 base does not fit.",
        ),
        click.option(
            "--precision", type=click.Choice(PRECISIONS), default=None, help=PRECISION_HELP
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# the keyword arguments link_options adds to a command
LINK_OPTIONS = ("p2p", "inter_node_gbs", "cpu_cores_per_node")


def link_options(fn: F) -> F:
    """--p2p/--no-p2p, --inter-node-gbs and --cpu-cores-per-node: what the cluster's links
    and hosts are, for the speed model (estimate, plan, launch MODEL)."""
    options = [
        click.option(
            "--p2p/--no-p2p",
            default=None,
            help="Whether the GPUs of a node reach each other peer-to-peer (without it NCCL "
            "goes through host memory at half the link's bandwidth). Default: what NVML reads "
            "for this machine's GPUs, else the GPU catalog's (zeroplan gpus).",
        ),
        click.option(
            "--inter-node-gbs",
            type=FINITE,
            default=None,
            metavar="GB/S",
            help="Network bandwidth between nodes per GPU, GB/s (default 12.5: 100 Gb/s "
            "Ethernet per GPU).",
        ),
        click.option(
            "--cpu-cores-per-node",
            type=int,
            default=None,
            metavar="N",
            help="CPU cores of a node, shared by its GPUs' ranks: how fast a CPU-offloaded "
            "optimizer steps (zeroplan launch gives each rank cores / GPUs threads). "
            "Default: this machine's for its own GPUs, else 8 per GPU.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# the keyword arguments kernel_options adds to a command
KERNEL_OPTIONS = ("no_fused_loss", "no_liger", "no_fused_lora")


def kernel_options(fn: F) -> F:
    """--no-fused-loss, --no-liger, --no-fused-lora: what the planner may not choose (plan,
    and launch MODEL, which plans: the advice a refusal gives must work on both)."""
    options = [
        click.option(
            "--no-fused-loss",
            is_flag=True,
            help="Leave out Liger's fused loss (launching it needs pip install 'zeroplan[fused]').",
        ),
        click.option(
            "--no-liger",
            is_flag=True,
            help="Leave out Liger's RMSNorm, SwiGLU/GeGLU and RoPE kernels (launching them needs "
            "pip install liger-kernel and a CUDA GPU); the plan then keeps the model's own modules.",
        ),
        click.option(
            "--no-fused-lora",
            is_flag=True,
            help="Plan PEFT's own LoRA layers instead of zeroplan launch's fused LoRA linears "
            "(same memory; the fused ones skip PEFT's passes over each output).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def kernel_request(no_fused_loss: bool, no_liger: bool, no_fused_lora: bool) -> dict[str, bool]:
    """kernel_options as ``PlanRequest`` fields."""
    return {
        "allow_fused_loss": not no_fused_loss,
        "allow_kernels": not no_liger,
        "allow_fused_lora": not no_fused_lora,
    }


def data_options(fn: F) -> F:
    """--data, --tokenizer, --chat-template, --format, --system-prompt, --overlong, --epochs:
    plan from the data's own token lengths."""
    return _data_options(fn, epochs=True)


def estimate_data_options(fn: F) -> F:
    """The data options of ``zeroplan estimate``: all but --epochs (an estimate has no time)."""
    return _data_options(fn, epochs=False)


def _data_options(fn: F, epochs: bool) -> F:
    options = [
        click.option(
            "--data",
            default=None,
            metavar="PATH",
            help="Training records (.json / .jsonl / .parquet): plan from their token lengths, "
            "rendered with the model's chat template as training renders them.",
        ),
        tokenizer_option(
            "Folder with tokenizer.json (default: the model's folder, the HF cache, the Hub)."
        ),
        click.option(
            "--chat-template", default=None, metavar="FILE", help="A .jinja chat template to use."
        ),
        format_option(),
        system_prompt_option(),
        overlong_option(),
    ]
    if epochs:
        options.append(epochs_option("Passes over --data for the time and cost (default 1)."))
    for option in reversed(options):
        fn = option(fn)
    return fn


# The record options that plan, estimate and launch share, one definition each (launch
# words --tokenizer and --epochs for what they do there).


def tokenizer_option(help: str) -> Callable[[F], F]:
    return click.option("--tokenizer", default=None, metavar="DIR", help=help)


def format_option() -> Callable[[F], F]:
    return click.option(
        "--format",
        "data_format",
        type=click.Choice(("auto", *FORMATS)),
        default=None,
        help="Record format (default: detected; a record that does not match is an error).",
    )


def system_prompt_option() -> Callable[[F], F]:
    return click.option(
        "--system-prompt", default=None, help="System message for records without one."
    )


def overlong_option() -> Callable[[F], F]:
    return click.option(
        "--overlong",
        type=click.Choice(OVERLONG),
        default=None,
        help="Records longer than --seq-len: drop them (default) or truncate them.",
    )


def epochs_option(help: str) -> Callable[[F], F]:
    return click.option("--epochs", type=FiniteFloat(min=0, min_open=True), default=None, help=help)


def job_request(
    method: str,
    seq_len: str | None,
    global_batch: int | None,
    lora_r: int,
    lora_targets: str,
    no_quantization: bool,
    precision: str | None = None,
    lora_dropout: float = TrainSetup.lora_dropout,
) -> dict[str, Any]:
    """The job options as ``PlanRequest`` fields (``seq_len`` as typed: see ``with_data``)."""
    return {
        "method": method,
        "seq_len": seq_len,
        "global_batch": global_batch,
        "lora_r": lora_r,
        "lora_targets": parse_targets(lora_targets),
        "lora_dropout": lora_dropout,
        "allow_quantization": not no_quantization,
        "precision": precision or "",
    }


DEFAULT_SEQ_LEN = 2048


def say(text: str) -> None:
    """A ``zeroplan: …`` line on stderr: progress and notes, kept off a --json answer."""
    click.echo(f"zeroplan: {text}", err=True)


def with_data(
    spec: ModelSpec,
    request: dict[str, Any],
    data: str | None,
    tokenizer: str | None = None,
    chat_template: str | None = None,
    fmt: str | None = None,
    system: str | None = None,
    overlong: str | None = None,
    epochs: float | None = None,
    progress: Callable[[str], None] | None = None,
    prompt: PromptFormat | None = None,
) -> dict[str, Any]:
    """``request`` with its sequence length resolved: a number as given (by default 2048, or
    the model's shorter context window, which ``notes`` then says); with a data file, from
    the data's token lengths (``auto``: the longest record; ``pNN``), and the data's fit at
    that length (``data``) and ``epochs`` added. ``prompt``: how a recipe's trainer writes
    the records (zeroplan.prompts), where not the chat template."""
    raw = request.get("seq_len")
    out = dict(request)
    number = seq_len_number(raw)
    if number is not None:
        # before any tokenizing: too short, or past the window, is refused
        spec.check_seq_len(check_seq_len(number))
    if data is None:
        if raw is not None and number is None:
            raise BadSetupError(
                f"--seq-len {raw}: auto and percentiles need --data; give a number of tokens"
            )
        if number is None:
            number, note = default_seq_len(spec)
            if note is not None:
                out["notes"] = (note,)
        out["seq_len"] = number
        return out
    from zeroplan.datatokens import profile_data
    from zeroplan.lengths import fit_to_cap, resolve_cap

    profile, _ = profile_data(
        data,
        spec.source if spec.local_path is not None else spec.name,
        spec.name,
        tokenizer=tokenizer,
        chat_template=chat_template,
        fmt=fmt or "auto",
        system=system,
        progress=progress,
        prompt=prompt,
    )
    window = spec.max_position_embeddings
    cap, reason = resolve_cap(profile, raw, window)
    out["seq_len"] = check_seq_len(cap)
    out["data"] = fit_to_cap(profile, cap, overlong or "drop", reason, window)
    if epochs is not None:
        out["epochs"] = epochs
    return out


def seq_len_number(raw: str | int | None) -> int | None:
    """--seq-len as a number of tokens (signed, so that -1 is told it is below 1 rather
    than that it is not auto); None for auto, a percentile, or none given."""
    if isinstance(raw, int):
        return raw
    return None if raw is None else whole_number(raw)


def default_seq_len(spec: ModelSpec) -> tuple[int, str | None]:
    """The sequence length when --seq-len is not given: 2048 tokens, or the model's context
    window where that is shorter (a default must not be refused), with a note saying so."""
    window = spec.max_position_embeddings
    if window is None or window >= DEFAULT_SEQ_LEN:
        return DEFAULT_SEQ_LEN, None
    return window, (
        f"sequences of {window:,} tokens, {spec.name}'s context window: --seq-len's default "
        f"of {DEFAULT_SEQ_LEN:,} is longer (give --seq-len to choose)"
    )


def check_seq_len(n: int) -> int:
    if n < 1:
        raise BadSetupError(f"--seq-len must be at least 1, got {n}")
    return n


# -- --recipe: a LLaMA-Factory / axolotl / TRL recipe as the job ----------------------------


def recipe_options(fn: F) -> F:
    """--recipe and --recipe-format (estimate, plan: MODEL overrides the recipe's)."""
    return recipe_options_with("MODEL, if given, overrides its model.")(fn)


def recipe_options_with(model_help: str) -> Callable[[F], F]:
    """--recipe and --recipe-format, saying what the command's model argument does beside
    --recipe (``model_help``)."""
    from zeroplan.recipes import FORMATS as RECIPE_FORMATS

    options = [
        click.option(
            "--recipe",
            "recipe_path",
            default=None,
            metavar="FILE",
            help="A LLaMA-Factory or axolotl YAML, a TRL `trl sft --config` file, or a JSON of "
            "HF TrainingArguments / SFTConfig fields: the job as that trainer would run it "
            "(its defaults where the recipe is silent). Options given beside it override it; "
            + model_help,
        ),
        click.option(
            "--recipe-format",
            type=click.Choice(("auto", *RECIPE_FORMATS)),
            default="auto",
            show_default=True,
            help="The recipe's trainer; auto: told from its keys.",
        ),
    ]

    def add(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return add


def given(name: str) -> bool:
    """Whether option ``name`` was given on the command line (or by environment), not left
    at its default."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


# The options that describe LoRA adapters, of the commands that have them: given beside
# --method full (which has none) each is refused, as TrainSetup refuses --fused-lora there,
# rather than dropped without a word. A flag turned off (--no-lora-bf16) asks for nothing.
ADAPTER_OPTIONS = (
    "lora_r",
    "lora_targets",
    "lora_dropout",
    "lora_bf16",
    "lora_kernels",
    "upcast_non_quantized",
)


def refuse_adapter_options(method: str) -> None:
    """Refuse a LoRA option given on the command line that ``method`` has no use for: any
    of them with full fine-tuning, --upcast-non-quantized without a 4-bit base (qlora)."""
    params = click.get_current_context().params
    for name in ADAPTER_OPTIONS:
        if not given(name) or params.get(name) is False:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "upcast_non_quantized" and method in ("lora", "full"):
            raise BadSetupError(
                f"{flag} models QLoRA's fp32 upcast of the weights left unquantized, and "
                f"--method {method} quantizes none; drop it, or use --method qlora"
            )
        if method == "full":
            raise BadSetupError(
                f"{flag}: full fine-tuning has no adapters; drop it, or use --method lora"
            )


def recipe_over(
    recipe_setup: dict[str, Any], options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The recipe's setup with every option given on the command line over it; returns
    (options, {setting: the option that overrode the recipe})."""
    merged = dict(recipe_setup)
    overridden: dict[str, str] = {}
    for name, value in options.items():
        if name not in recipe_setup:
            merged[name] = value
        elif given(name):
            merged[name] = value
            overridden[name] = "--" + name.replace("_", "-")
    return merged, overridden


def check_recipe_card(recipe: Recipe, overridden: dict[str, str], gpu: GPU) -> None:
    """The recipe's precision on ``gpu``, refused in the recipe's words (its ``bf16: true``
    on a card without bf16: zeroplan.recipes.check_bf16) unless --precision replaced it;
    before the estimate or plan would refuse it naming --precision."""
    from zeroplan.recipes import check_bf16

    if "precision" not in overridden:
        check_bf16(recipe, gpu.bf16, gpu.name)


def recipe_answer(
    recipe: Recipe, overridden: dict[str, str], values: dict[str, Any]
) -> dict[str, Any]:
    """The ``recipe`` section of a --json answer: the mapping, an overridden setting with
    the option's value and the recipe's beside it (MODEL's row: read_recipe's)."""
    out: dict[str, Any] = recipe.to_json()
    out["overridden"] = dict(overridden)
    for row in out["mapping"]:
        if row["setting"] in overridden:
            was = row["value"]
            row["value"] = values[row["setting"]]
            row["source"] = f"{overridden[row['setting']]} (the recipe's: {was})"
            row["key"] = ""
    if recipe.model_override is not None:
        out["overridden"]["model"] = "MODEL"
    return out


def recipe_job(
    recipe: Recipe, job: dict[str, Any], world_size: int
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """The job options with the recipe's values where none was given: its method (a LoRA
    recipe stays on its bf16 base unless --method auto), sequence length, global batch
    (micro-batch × accumulation × GPUs), LoRA rank, targets and dropout, precision.
    Returns (job options, {setting: overriding option}, extra PlanRequest fields)."""
    setup = recipe.setup
    from_recipe = {
        "method": setup["method"],
        "seq_len": str(setup["seq_len"]),
        "global_batch": recipe.global_batch_per_gpu * world_size,
        "precision": setup["precision"] or None,
    }
    if setup["method"] != "full":
        # a full fine-tuning recipe has no adapter: the LoRA options keep their own values
        from_recipe["lora_r"] = setup["lora_r"]
        from_recipe["lora_targets"] = ",".join(setup["lora_targets"])
        from_recipe["lora_dropout"] = setup["lora_dropout"]
    merged, overridden = recipe_over(from_recipe, job)
    if not given("method") and setup["method"] == "lora":
        merged["no_quantization"] = True  # 4-bit only when the plan may choose (--method auto)
    # the recipe's trainer runs its own kernels (LLaMA-Factory's enable_liger_kernel and TRL's
    # use_liger_kernel turn Liger's on with the fused loss, which the recipe writer does not
    # split): its plan assumes the model's own modules, an upper bound on its memory
    return merged, overridden, {"allow_kernels": False, "allow_fused_lora": False}
