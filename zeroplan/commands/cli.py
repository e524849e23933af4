"""The ``zeroplan`` command: parse options, call the core, render. No maths here."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from zeroplan.commands import printing
from zeroplan.commands.job import (
    PRECISION_HELP,
    check_recipe_card,
    data_options,
    default_seq_len,
    estimate_data_options,
    given,
    job_options,
    job_request,
    kernel_options,
    link_options,
    recipe_answer,
    recipe_job,
    recipe_options,
    recipe_over,
    refuse_adapter_options,
    say,
    with_data,
)
from zeroplan.commands.params import FINITE, FiniteFloat, OutPath
from zeroplan.errors import ZeroplanError
from zeroplan.launch import envcheck
from zeroplan.liger import KERNEL_CHOICES
from zeroplan.trainsetup import ATTENTIONS, LOOPS, METHODS, OFFLOADS, PRECISIONS, TrainSetup

if TYPE_CHECKING:
    from zeroplan.hardware import Cluster
    from zeroplan.models import ModelSpec
    from zeroplan.recipes.common import Recipe

DEFAULT_GPUS = "1xH100"

F = TypeVar("F", bound=Callable[..., Any])


@click.group(
    cls=printing.Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="zeroplan")
def cli() -> None:
    """Plan LLM fine-tuning before paying for GPUs.

    \b
    zeroplan estimate llama-3.1-8b-instruct --gpus 7x4090 --method lora --micro-batch 4 --seq-len 2048
    zeroplan estimate Qwen/Qwen2.5-7B --method qlora --grad-ckpt --json
    zeroplan config llama-3.1-8b-instruct --gpus 8xH100 --zero 3 -o ds_config.json
    zeroplan plan llama-3.1-8b-instruct --gpus 7x4090 --global-batch 112 -o runs/plan
    zeroplan launch runs/plan --data train.jsonl -o runs/r1   # every GPU, supervised
    zeroplan watch runs/r1   # live GPUs + training vs the plan; zeroplan report runs/r1
    zeroplan generate runs/r1 -p "Hello"   # the training chat template; also chat, merge
    zeroplan env             # GPUs, driver, library versions, known problems
    zeroplan models          # the built-in catalog (works offline)
    zeroplan gpus            # the GPU catalog
    """


# The options that describe a training setup, shared by every command that takes one
# (estimate, config) so that their names, defaults and help never drift apart.
_SETUP_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--gpus",
        default=None,
        metavar="SPEC",
        help=f"Cluster: 1xH100, 7x4090, 2x8xH100, 8xA100-80GB. Default: the GPUs on this machine, else {DEFAULT_GPUS}.",
    ),
    click.option(
        "--method",
        type=click.Choice(METHODS),
        default="lora",
        show_default=True,
        help="lora: bf16 base + LoRA; qlora: NF4 4-bit base + LoRA; full: all weights train.",
    ),
    click.option(
        "--zero",
        type=int,
        default=None,
        metavar="0-3",
        # shared by estimate and config: config needs a stage (a DeepSpeed config has one)
        help="DeepSpeed ZeRO stage (config needs one). Left out: plain PyTorch, DDP across GPUs.",
    ),
    click.option(
        "--offload",
        type=click.Choice(OFFLOADS),
        default="none",
        show_default=True,
        help="ZeRO-Offload of optimizer states (and parameters, ZeRO-3) to CPU RAM.",
    ),
    click.option(
        "--micro-batch",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Sequences per GPU per step.",
    ),
    click.option(
        "--seq-len",
        type=click.IntRange(min=1),
        default=None,
        help="Tokens per sequence (default 2048, or the model's context window where shorter).",
    ),
    click.option(
        "--grad-accum",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Gradient accumulation: micro-batches per optimizer step (gradients stay resident between them).",
    ),
    click.option(
        "--grad-ckpt/--no-grad-ckpt",
        default=False,
        show_default=True,
        help="Gradient (activation) checkpointing: keep one hidden state per layer, recompute the rest.",
    ),
    click.option(
        "--lora-r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank."
    ),
    click.option(
        "--lora-targets",
        default="all-linear",
        show_default=True,
        help="Comma list of module names (q_proj,v_proj,...) or all-linear.",
    ),
    click.option(
        "--lora-dropout",
        type=FiniteFloat(min=0, max=1, max_open=True),
        default=TrainSetup.lora_dropout,
        show_default=True,
        help="LoRA dropout; above 0 it keeps a mask per adapted input.",
    ),
    click.option(
        "--loop",
        type=click.Choice(tuple(LOOPS)),
        default="trainer",
        show_default=True,
        help="The training loop: trainer (HF Trainer, TRL, zeroplan launch: fused AdamW, "
        "autocast, outputs dropped) or plain (out = model(...); out.loss.backward(); "
        "torch AdamW with defaults; no autocast). The switches below override it.",
    ),
    click.option(
        "--optim",
        default=None,
        metavar="NAME",
        help="HF Trainer's names: adamw_torch_fused (alias adamw), adamw_torch (foreach: "
        "parameter-sized temporaries at the step), adamw_8bit, paged_adamw_8bit, "
        "paged_adamw_32bit, sgd. Default: the --loop's.",
    ),
    click.option(
        "--autocast/--no-autocast",
        default=None,
        help="Whether the forward runs under bf16 / fp16 autocast (HF Trainer: yes; a plain "
        "loop on a bf16 model and DeepSpeed: no). Default: the --loop's.",
    ),
    click.option(
        "--keep-outputs/--drop-outputs",
        default=None,
        help="Whether the model's output (its batch × seq × vocab logits) stays alive through "
        "backward, as in out = model(...); out.loss.backward(). Default: the --loop's.",
    ),
    click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default=None,
        help=PRECISION_HELP,
    ),
    click.option(
        "--attn",
        type=click.Choice(ATTENTIONS),
        default=None,
        help="Attention implementation; eager materialises heads × seq² scores per layer. "
        "Default: the model's in transformers (sdpa; eager for Gemma-2, which has no sdpa).",
    ),
    click.option(
        "--fused-loss/--no-fused-loss",
        default=False,
        show_default=True,
        help="Liger fused linear-cross-entropy: never materialises batch × seq × vocab logits.",
    ),
    click.option(
        "--padding-mask/--no-padding-mask",
        default=False,
        show_default=True,
        help="Batches padded to their longest row with an attention mask (LLaMA-Factory, TRL, "
        "axolotl without packing): under sdpa each layer saves k, v repeated to every head "
        "and its own copy of the mask.",
    ),
    click.option(
        "--chunked-lm-head/--no-chunked-lm-head",
        default=False,
        show_default=True,
        help="TRL's SFTTrainer LM head: log-probs in tiles, no batch × seq × vocab logits "
        "(TRL >= 1.x always runs it; --recipe of a TRL recipe sets it).",
    ),
    click.option(
        "--lora-bf16/--no-lora-bf16",
        default=False,
        show_default=True,
        help="LoRA adapters in bf16, not PEFT's fp32 (TRL's SFTTrainer does this under QLoRA; "
        "--recipe of a TRL QLoRA recipe sets it).",
    ),
    click.option(
        "--lora-kernels/--no-lora-kernels",
        default=False,
        show_default=True,
        help="axolotl's fused LoRA functions (LoRA_QKV, LoRA_O, LoRA_MLP): one shared input "
        "and dropout mask per group, act(gate) recomputed (axolotl turns them on for LoRA; "
        "--recipe of an axolotl recipe sets it).",
    ),
    click.option(
        "--fused-lora/--no-fused-lora",
        default=False,
        show_default=True,
        help="zeroplan launch's fused LoRA linears (base matmul, adapter and sum in one "
        "function; LoRA dropout 0, not ZeRO-3): the same memory as PEFT's layers, fewer "
        "passes over each output. Plans turn it on where it can run.",
    ),
    click.option(
        "--cuda-graphs/--no-cuda-graphs",
        default=False,
        show_default=True,
        help="zeroplan launch's decoder as CUDA graphs (one GPU, LoRA or QLoRA, no DeepSpeed): "
        "the host dispatches two replays a micro-batch instead of every operation, so it no "
        "longer sets the pace of small steps. Plans turn it on where it can run.",
    ),
    click.option(
        "--kernels",
        type=click.Choice(KERNEL_CHOICES),
        default="none",
        show_default=True,
        help="The elementwise kernels around the linears: none (the model's own modules) or "
        "liger (Liger's RMSNorm, SwiGLU/GeGLU and RoPE: fewer activations kept, less memory "
        "traffic; the architectures liger-kernel patches).",
    ),
    click.option(
        "--upcast-non-quantized",
        is_flag=True,
        help="qlora: model prepare_model_for_kbit_training's fp32 upcast of embeddings, norms, lm_head.",
    ),
]


def setup_options(f: F) -> F:
    """Decorate a command with the setup options (``--gpus`` ... ``--upcast-non-quantized``).

    Applied last-first so that ``--help`` lists them in the order declared above.
    """
    for option in reversed(_SETUP_OPTIONS):
        f = option(f)
    return f


@cli.command()
@click.argument("model", required=False)
@recipe_options
@setup_options
@link_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (the estimate contract)."
)
@click.option("--explain", is_flag=True, help="Show each term's formula with this run's numbers.")
@estimate_data_options
def estimate(
    model: str | None,
    recipe_path: str | None,
    recipe_format: str,
    gpus: str | None,
    p2p: bool | None,
    inter_node_gbs: float | None,
    cpu_cores_per_node: int | None,
    as_json: bool,
    explain: bool,
    data: str | None,
    tokenizer: str | None,
    chat_template: str | None,
    data_format: str | None,
    system_prompt: str | None,
    overlong: str | None,
    **options: Any,
) -> None:
    """Per-GPU memory of fine-tuning MODEL: every term, the peak, and whether it fits;
    then the step's predicted speed.

    MODEL is a Hub id (meta-llama/Llama-3.1-8B-Instruct), an alias from `zeroplan models`
    (llama-3.1-8b-instruct), or a path to a config.json or a model folder. The built-in
    catalog answers without network; other Hub ids are read from the local HF cache or
    the Hub. Numbers are for the worst-loaded GPU, in GiB (2^30 bytes).

    The speed is the launched trainer's step on full-length sequences (--data: on your
    records, packed), with how close 9 in 10 predictions like it came to the measured
    speed on runs no fit saw (docs/speed.md).

    --recipe reads the job from a LLaMA-Factory, axolotl or TRL recipe (docs/recipes.md).
    """
    from zeroplan.api import estimate as run_estimate
    from zeroplan.api import resolve_cluster
    from zeroplan.models import load_model

    recipe = None
    overridden: dict[str, str] = {}
    if recipe_path is not None:
        from zeroplan.recipes import read_recipe

        recipe, spec = read_recipe(recipe_path, recipe_format, model)
        options, overridden = recipe_over(recipe.setup, options)
        check_recipe_card(recipe, overridden, resolve_cluster(gpus).gpu)
    elif model is None:
        raise click.UsageError("Missing argument 'MODEL' (or give --recipe FILE)")
    else:
        spec = load_model(model)
    refuse_adapter_options(str(options["method"]))
    if as_json and explain:
        say("note: --explain writes its formulas into the table, which --json replaces")
    fit = None
    if data is not None:
        # the sequence length is the data's longest record unless --seq-len (or the
        # recipe) gives it; a micro-batch is micro-batch × seq-len tokens of packed records.
        # A recipe's records are written and cut as its trainer does (--overlong overrides)
        explicit = given("seq_len") or recipe is not None
        fields = with_data(
            spec, {"seq_len": str(options["seq_len"]) if explicit else None}, data, tokenizer,
            chat_template, data_format, system_prompt,
            overlong or (recipe.overlong if recipe is not None else None),
            progress=None if as_json else say,
            prompt=recipe.prompt if recipe is not None else None,
        )  # fmt: skip
        options["seq_len"] = fields["seq_len"]
        fit = fields["data"]
    seq_note = None
    if options["seq_len"] is None:
        options["seq_len"], seq_note = default_seq_len(spec)
    # packed real data: the speed counts real tokens, the micro-batch's fill of them; a
    # recipe that does not pack pads each micro-batch to its longest record instead
    padded = None
    fill = 1.0
    if fit is not None and recipe is not None and options.get("padding_mask"):
        from zeroplan.api import resolve_cluster
        from zeroplan.recipes import padded_loop

        ranks = resolve_cluster(gpus, p2p, inter_node_gbs, cpu_cores_per_node).world_size
        padded = padded_loop(recipe, fit, options["micro_batch"], options["grad_accum"], ranks)
        fill = padded.fill
        # no micro-batch is longer than its longest record: the peak's shape (measured:
        # TRL 1.16 at micro-batch 8, +1.5%, recipes_gpu.md); --seq-len still sets it
        if not given("seq_len"):
            options["seq_len"] = min(options["seq_len"], padded.peak)
    elif fit is not None:
        # zeroplan launch's rows (trainsetup.packed_attention, packed_shape): one row of the
        # micro-batch's tokens, or micro-batch rows of seq_len under the block mask; a
        # recipe's packing is its trainer's, padding-free over the micro-batch (one row)
        from zeroplan.trainsetup import packed_attention, packed_shape

        path = packed_attention(spec.model_type, spec.sliding_window, fit.cap)
        kernel = "varlen" if recipe is not None else path
        row = packed_shape(kernel, fit.cap, options["micro_batch"])[0]
        fill = fit.pack_at(row).fill
    est = run_estimate(
        spec,
        gpus=gpus,
        p2p=p2p,
        inter_node_gbs=inter_node_gbs,
        cpu_cores_per_node=cpu_cores_per_node,
        fill=fill,
        padded=padded,
        **options,
    )
    if seq_note is not None:
        est = dataclasses.replace(est, notes=(seq_note, *est.notes))
    if recipe is not None:
        from zeroplan.recipes import run_notes

        more = run_notes(recipe, fit, padded, int(options["seq_len"]))
        est = dataclasses.replace(est, notes=(*est.notes, *more))
    answer = est.to_json()
    if fit is not None:
        answer["data"] = fit.to_json()
        answer["data"]["micro_batch_fill"] = fill
        if padded is not None:
            for packed_only in ("rows", "samples_per_row"):
                answer["data"].pop(packed_only)
            answer["data"].update(padded.to_json())
    if recipe is not None:
        answer["recipe"] = recipe_answer(recipe, overridden, options)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    from rich.console import Console

    from zeroplan.commands.render import render_data, render_estimate, render_recipe

    console = Console()
    if recipe is not None:
        render_recipe(answer["recipe"], console)
    if fit is not None:
        render_data(answer["data"], console)
    render_estimate(est, console, explain=explain)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def models(as_json: bool) -> None:
    """The built-in model catalog (usable offline by Hub id or alias)."""
    from zeroplan.models import catalog_models, load_model

    rows = [(m, (s := load_model(m)).model_type, s.total_params) for m in catalog_models()]
    if as_json:
        click.echo(
            json.dumps(
                [{"name": n, "model_type": t, "total_params": p} for n, t, p in rows], indent=2
            )
        )
        return
    from rich.console import Console

    from zeroplan.commands.render import render_models

    render_models(rows, Console())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def gpus(as_json: bool) -> None:
    """The GPU catalog behind --gpus (memory, bf16/fp16 TFLOP/s, bandwidth, interconnect)."""
    from dataclasses import asdict

    from zeroplan.hardware import GPU_CATALOG

    catalog = list(GPU_CATALOG.values())
    if as_json:
        click.echo(json.dumps([asdict(g) for g in catalog], indent=2))
        return
    from rich.console import Console

    from zeroplan.commands.render import render_gpus

    render_gpus(catalog, Console())


@cli.command()
@click.argument("model")
@setup_options
@click.option(
    "--grad-clip",
    type=FINITE,
    default=1.0,
    show_default=True,
    help="Clip the global gradient norm to this; 0 turns clipping off.",
)
@click.option(
    "-o",
    "--output",
    # --out as plan and launch spell it; --output stays for the scripts that use it
    "--out",
    "output",
    type=OutPath(dir_okay=False),
    default=None,
    help="Write the config to this file (atomically). Default: print it to stdout.",
)
def config(
    model: str,
    gpus: str | None,
    grad_clip: float,
    output: Path | None,
    **options: Any,
) -> None:
    """The DeepSpeed config (JSON) for fine-tuning MODEL with these settings.

    Takes the options of `zeroplan estimate` (--zero is required) and checks the model and
    setup the same way; a setup the estimate says does not fit still gets its config, with
    a warning on stderr. train_batch_size = micro batch x accumulation x GPUs. There is no
    optimizer section: the HF Trainer builds the --optim optimizer.
    """
    from zeroplan.api import estimate as run_estimate
    from zeroplan.api import make_setup, resolve_cluster
    from zeroplan.dsconfig import ds_config, dumps, quant_storage_dtype, write_config
    from zeroplan.memory.weights import gib
    from zeroplan.models import load_model
    from zeroplan.trainsetup import resolve_precision

    cluster = resolve_cluster(gpus)
    spec = load_model(model)
    refuse_adapter_options(str(options["method"]))
    if options["seq_len"] is None:
        # the config holds no sequence length: the default's only use is the fit warning
        options["seq_len"] = default_seq_len(spec)[0]
    setup = resolve_precision(make_setup(**options), cluster.gpu.bf16, cluster.gpu.name)
    cfg = ds_config(setup, cluster.world_size, grad_clip=grad_clip)
    est = run_estimate(spec, gpus=cluster, setup=setup)
    # output first: if writing fails, its error is the only line on stderr
    if output is None:
        click.echo(dumps(cfg), nl=False)
    else:
        write_config(cfg, output)
    if not est.fits:
        click.echo(
            f"zeroplan: warning: the estimate says this does not fit: {gib(est.device_used_bytes)}"
            f" per GPU on a {gib(est.gpu_memory_bytes)} GPU (see zeroplan estimate)",
            err=True,
        )
    storage = quant_storage_dtype(setup)
    if storage is not None:
        click.echo(
            "zeroplan: note: ZeRO-3 shards the 4-bit weights: load the model with "
            f"BitsAndBytesConfig(bnb_4bit_quant_storage=torch.{storage})",
            err=True,
        )


def _count(text: str | None, option: str) -> int | None:
    """'50M' -> 50_000_000; '1.5B', '200k', '123456' too."""
    if text is None:
        return None
    units = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
    t = text.strip().lower().replace("_", "")
    scale = units.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    # float() reads nan and inf (and 1e999 as inf): none of them is a count
    if not math.isfinite(value):
        raise click.BadParameter(f"'{text}' is not a count such as 50M or 1.2B", param_hint=option)
    if value < 1:
        raise click.BadParameter(f"'{text}' must be at least 1", param_hint=option)
    return int(value)


@cli.command()
@click.argument("model", required=False)
@click.option(
    "--gpus",
    default=None,
    help="Cluster: 7x4090, 2x8xH100, 1xA100-80GB (default: this machine's GPUs, else 1xH100).",
)
@recipe_options
@click.option(
    "--emit",
    type=click.Choice(("llamafactory", "axolotl", "trl")),
    default=None,
    help="With -o: also write a fresh recipe for this trainer (DIR/<trainer>.yaml) and the "
    "DeepSpeed JSON it names.",
)
@job_options
@link_options
@data_options
@click.option(
    "--dataset-tokens",
    default=None,
    help="Tokens to train on (50M, 1.2B): prints the time (and cost) to finish.",
)
@click.option(
    "--objective",
    type=click.Choice(["time", "cost", "memory"]),
    default="time",
    show_default=True,
    help="time and cost rank alike on one cluster; memory picks the smallest footprint.",
)
@click.option(
    "--margin",
    type=FiniteFloat(min=0, max=1, max_open=True),
    default=0.05,
    show_default=True,
    help="Fraction of each GPU's memory kept free.",
)
@click.option(
    "--price-per-gpu-hour",
    type=FiniteFloat(min=0),
    default=None,
    help="Price of one GPU-hour for the cost to finish --dataset-tokens "
    "(default: a typical on-demand price, dated, where zeroplan has one for the GPU).",
)
@click.option(
    "--cpu-ram-per-node",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    metavar="GIB",
    help="Host RAM per node (GiB): CPU-offload plans must fit in it too.",
)
@kernel_options
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=True,
    show_default=True,
    help="Plan zeroplan launch's decoder as CUDA graphs where it can run them (one GPU, LoRA or "
    "QLoRA, no DeepSpeed, no checkpointing): the host no longer sets the pace of small steps "
    "(H100s: 1.4-4.2x host-bound steps, 1.00-1.02x GPU-bound plans).",
)
@click.option("--top", type=int, default=8, show_default=True, help="Alternatives to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.option(
    "-o",
    "--out",
    type=OutPath(file_okay=False),
    default=None,
    help="Write plan.json, ds_config.json, launch.sh (and for several nodes a hostfile and "
    "launch.sbatch for SLURM) into this folder; with --recipe: plan.json, the recipe "
    "planned and its DeepSpeed JSON.",
)
def plan(
    model: str | None,
    gpus: str | None,
    recipe_path: str | None,
    recipe_format: str,
    emit: str | None,
    p2p: bool | None,
    inter_node_gbs: float | None,
    cpu_cores_per_node: int | None,
    dataset_tokens: str | None,
    objective: str,
    margin: float,
    price_per_gpu_hour: float | None,
    cpu_ram_per_node: float | None,
    no_fused_loss: bool,
    no_liger: bool,
    no_fused_lora: bool,
    cuda_graphs: bool,
    top: int,
    as_json: bool,
    out: Path | None,
    data: str | None,
    tokenizer: str | None,
    chat_template: str | None,
    data_format: str | None,
    system_prompt: str | None,
    overlong: str | None,
    epochs: float | None,
    **job: Any,
) -> None:
    """The fastest setup that fits MODEL on the cluster: ZeRO stage, offload, micro-batch,
    accumulation, checkpointing, optimizer and fused loss.

    The method stays the one asked for: lora keeps the bf16 base when any bf16 setup fits
    and prints the fastest 4-bit setup beside it; --method auto picks lora or qlora.

    \b
    zeroplan plan ./my-model --data train.jsonl --gpus 1x4090 --epochs 3   # from the data
    zeroplan plan llama-3.1-8b-instruct --gpus 7x4090 --seq-len 2048 --global-batch 112 --dataset-tokens 50M
    zeroplan plan llama-3.1-8b-instruct --gpus 1x4090 --method qlora --seq-len 768 --global-batch 8
    zeroplan plan llama-3.1-70b --gpus 8xH100 --method full -o runs/plan70b

    With --data the records are rendered with the model's chat template and tokenized
    (no GPU, no torch; cached), the sequence length is the longest record's (or --seq-len
    pNN), samples are packed into rows of that length as `zeroplan launch` packs them, and
    tokens/s, steps and time count the data's real tokens.

    Memory comes from the same estimate as `zeroplan estimate`; speed from zeroplan.speed,
    fitted on measured H100 and H200 steps: the GPU's FLOPs and memory traffic, the host's
    cost per dispatched operation, ZeRO's communication over the cluster's links (PCIe
    without P2P on RTX 4090s) and a CPU-offloaded optimizer at the node's cores. Nothing
    fits: it says which cluster or change would.
    """
    from zeroplan.api import resolve_cluster
    from zeroplan.models import load_model
    from zeroplan.planner import PlanRequest, plan_json
    from zeroplan.planner import plan as make_plan

    if emit is not None and out is None:
        raise click.UsageError("--emit writes a recipe: give -o DIR")
    cluster = resolve_cluster(gpus, p2p, inter_node_gbs, cpu_cores_per_node)
    recipe = None
    overridden: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if recipe_path is not None:
        from zeroplan.recipes import read_recipe

        recipe, spec = read_recipe(recipe_path, recipe_format, model)
        job, overridden, extra = recipe_job(recipe, job, cluster.world_size)
        check_recipe_card(recipe, overridden, cluster.gpu)
    elif model is None:
        raise click.UsageError("Missing argument 'MODEL' (or give --recipe FILE)")
    else:
        spec = load_model(model)
    refuse_adapter_options(str(job["method"]))
    fields = with_data(
        spec, job_request(**job), data, tokenizer, chat_template, data_format, system_prompt,
        overlong, epochs, progress=None if as_json else say,
    )  # fmt: skip
    # a recipe's plan keeps the model's own kernels (recipe_job says why)
    extra = {
        "allow_kernels": not no_liger,
        "allow_fused_lora": not no_fused_lora,
        "allow_cuda_graphs": cuda_graphs,
        **extra,
    }
    if emit is not None:
        extra["launched"] = False  # another trainer runs it (planner.complexity)
    req = PlanRequest(
        spec=spec,
        cluster=cluster,
        **fields,
        **extra,
        dataset_tokens=_count(dataset_tokens, "--dataset-tokens"),
        margin=margin,
        objective=objective,
        price_per_gpu_hour=price_per_gpu_hour,
        allow_fused_loss=not no_fused_loss,
        cpu_ram_per_node=int(cpu_ram_per_node * 2**30) if cpu_ram_per_node is not None else None,
    )
    result = make_plan(req)
    answer = plan_json(result, top=top)
    if recipe is not None:
        answer["recipe"] = recipe_answer(recipe, overridden, job)
        answer["recipe"]["as_written"] = as_written(spec, cluster, recipe)
    if req.data is not None:
        from zeroplan.datatokens import save_packs

        save_packs(req.data.profile)
    diff = ""
    if out is not None and result.best is not None:
        from zeroplan.planfiles import write_plan, write_recipe_plan

        told = None if as_json else say  # which files of an earlier plan there were removed
        if recipe is None and emit is None:
            written = write_plan(result, out, top=top, say=told)
        else:
            written, diff = write_recipe_plan(result, out, top, recipe, emit, say=told)
            answer["written"] = {"files": [str(p) for p in written], "recipe_diff": diff}
        if not as_json:
            click.echo("wrote " + ", ".join(str(p) for p in written), err=True)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        from rich.console import Console

        from zeroplan.commands.render import render_as_written, render_plan, render_recipe

        console = Console()
        if recipe is not None:
            render_recipe(answer["recipe"], console)
            render_as_written(answer["recipe"]["as_written"], console)
        render_plan(answer, console)
        if diff:
            click.echo(diff, nl=False)
    if result.best is None:
        sys.exit(1)


def as_written(spec: ModelSpec, cluster: Cluster, recipe: Recipe) -> dict[str, Any]:
    """The recipe's own setup on the cluster: does it fit, how fast (or why it is refused)."""
    from zeroplan.api import estimate as run_estimate
    from zeroplan.api import make_setup
    from zeroplan.planner import describe, family_of
    from zeroplan.trainsetup import resolve_precision

    try:
        check_recipe_card(recipe, {}, cluster.gpu)  # as written: its own precision
        setup = resolve_precision(make_setup(**recipe.setup), cluster.gpu.bf16, cluster.gpu.name)
        est = run_estimate(spec, gpus=cluster, setup=setup)
    except ZeroplanError as exc:
        return {"error": str(exc)}
    return {
        "family": family_of(setup, cluster.world_size),
        "describe": describe(setup),
        "fits": est.fits,
        "required_bytes": est.required_bytes,
        "device_used_bytes": est.device_used_bytes,
        "gpu_memory_bytes": est.gpu_memory_bytes,
        "tokens_per_s": est.speed.tokens_per_s if est.speed is not None else None,
    }


# Commands that live in their own modules register here, one line each:
# from zeroplan.<module> import <command>; cli.add_command(<command>)
from zeroplan.commands.watch import report, watch  # noqa: E402

cli.add_command(watch)
cli.add_command(report)
from zeroplan.commands.launch import env, launch  # noqa: E402

cli.add_command(launch)
cli.add_command(env)
from zeroplan.commands.infer import chat, generate, merge  # noqa: E402

cli.add_command(merge)
cli.add_command(generate)
cli.add_command(chat)
# -- more commands register here --


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit status 2."""
    envcheck.quiet_import_noise()
    try:
        cli.main(args=argv, prog_name="zeroplan", standalone_mode=False)
        printing.flush()
    except click.exceptions.UsageError as exc:
        hint = f" (see 'zeroplan {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
        click.echo(f"zeroplan: error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except ZeroplanError as exc:
        click.echo(f"zeroplan: error: {exc}", err=True)
        sys.exit(2)
    except printing.StdoutFailed as exc:
        sys.exit(printing.exit_status(exc))
    except click.exceptions.Abort:
        click.echo("zeroplan: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"zeroplan: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
