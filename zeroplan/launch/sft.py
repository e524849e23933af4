"""The per-rank training program: apply a plan's chosen setup and run TRL's SFTTrainer.

    python -m zeroplan.launch.sft --plan RUN/plan.json --data DATA --out RUN [options]

torchrun or the deepspeed launcher start it on every rank (it reads RANK, LOCAL_RANK and
WORLD_SIZE); it also runs as one plain process, on a GPU or (fp32, for tests) on the CPU.

What the plan chose is what runs (DESIGN.md: whatever the estimate assumes, launch must do):

- ``method``: ``lora`` / ``qlora`` put a PEFT LoRA (r, alpha = 2·r unless ``--lora-alpha``,
  dropout, targets incl. ``all-linear``) on a bf16 base, or on a 4-bit NF4 base with double
  quantization and bf16 compute (``qlora``; under ZeRO-3 stored as bf16,
  ``dsconfig.quant_storage_dtype``); ``full`` trains every weight.
  ``peft.prepare_model_for_kbit_training`` is never called: it would upcast embeddings,
  lm_head and norms to fp32 (+2 GB on a 128k-vocab 8B model), which the estimate does not
  count. LoRA weights stay fp32 without DeepSpeed (PEFT's default, the estimate's 4 B/param);
  TRL casts them to bf16 on a 4-bit base, so they are put back.
- ``micro_batch``, ``grad_accum``, ``grad_ckpt`` (non-reentrant; TRL forces reentrant for
  PEFT under ZeRO-3, and applied.json says so), ``optim`` (HF ``optim`` names), ``attn``.
- The loss is the model's own causal-LM loss, the lean step the estimate measured: TRL's
  ``compute_loss`` (a chunked LM head that also computes per-token entropy and token
  accuracy for logging) is bypassed. ``fused_loss`` applies Liger's fused linear
  cross-entropy to the model, as the calibration runs did.
- ``--kernels`` (auto: Liger's RMSNorm, SwiGLU / GeGLU and RoPE where they run) and
  ``--compile`` (regional torch.compile of the decoder layers): ``zeroplan.launch.kernels``;
  the path taken is applied.json's ``kernels``, the compile's statistics result.json's.
- ``zero``: the DeepSpeed config from ``dsconfig.ds_config`` for the actual world size is
  written to RUN/ds_config.json and handed to the Trainer.

The run folder gets ``applied.json`` (every option used, library versions, the data
summary), ``metrics.jsonl`` (one line per logging step per rank, see ``MetricsWriter``),
``checkpoints/checkpoint-N`` (the Trainer's), ``final/`` (the adapter or the full weights,
the tokenizer with its chat template, ``zeroplan.json``) and ``result.json``.

SIGTERM / SIGINT: the run stops at the next optimizer-step boundary, saves a checkpoint and
exits with 128 + the signal number; a second signal ends it at once. ``--resume`` continues
from the newest checkpoint. A loss or gradient norm that turns NaN or infinite stops the run
at that step without saving it (``callbacks.StopOnDivergence``): result.json says
``diverged``, every rank exits with EXIT_DIVERGED.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan.dsconfig import ds_config, quant_storage_dtype, write_config
from zeroplan.errors import (
    BadPlanError,
    BadSetupError,
    DataNotFoundError,
    KernelsUnsupportedError,
    MissingDependencyError,
    ModelNotFoundError,
    ResumeError,
    ZeroplanError,
)
from zeroplan.launch import batching as zbatch
from zeroplan.launch import data as zdata
from zeroplan.launch import dequant, envcheck, hostloop, loralinear
from zeroplan.launch import graphs as zgraphs
from zeroplan.launch import kernels as zkernels
from zeroplan.launch.runstate import Counter, Divergence, StopFlag
from zeroplan.launch.trackers import TB_DIR, TRACKERS, check_tracker, tracker_env
from zeroplan.models import sliding_window_of
from zeroplan.outputs import read_json_object
from zeroplan.planfiles import model_location
from zeroplan.trainsetup import (
    ALL_LINEAR,
    BNB_OPTIMIZERS,
    TrainSetup,
    cpu_refusal,
    cuda_graphs_refusal,
    fused_lora_runs,
    packed_shape,
    parse_targets,
    refuse_cuda_graphs,
)
from zeroplan.watch.runlog import (
    APPLIED_FILE,
    METRICS_FILE,
    RESULT_FILE,
    json_safe,
)

# a rank's exit status when its training diverged (the loss or gradient norm went non-finite)
EXIT_DIVERGED = 3

# TrainSetup.optim -> TrainingArguments.optim (transformers.training_args.OptimizerNames).
# TrainSetup already holds HF's names (an old plan's "adamw" loads as adamw_torch_fused);
# the old names stay here for anything that bypasses TrainSetup. Fused AdamW runs on a GPU
# only: on the CPU, and under CPU offload (DeepSpeed's CPU Adam steps), adamw_torch.
HF_OPTIM = {
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_torch": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "sgd": "sgd",
    "adamw": "adamw_torch_fused",
    "paged_adamw": "paged_adamw_32bit",
}
CHECKPOINTS = "checkpoints"
FINAL = "final"
DS_CONFIG = "ds_config.json"
RUN_INFO = "zeroplan.json"  # in final/: what inference needs to rebuild the run's model
DEFAULT_LOGGING_STEPS = 10
# The newest checkpoints kept (the Trainer's save_total_limit; 0 keeps all). The Trainer
# deletes the oldest only after a newer save is complete, so --resume always finds one;
# three leave two to fall back on when the newest turns out bad (a loss spike that was
# not yet NaN), at three times one checkpoint's disk.
DEFAULT_SAVE_TOTAL_LIMIT = 3


@dataclass(frozen=True)
class PlannedRun:
    """What plan.json holds that the run needs."""

    path: Path
    model: str  # the Hub id, or a local folder when the plan was made from one
    setup: TrainSetup
    world_size: int


@dataclass(frozen=True)
class Options:
    plan: Path
    data: str
    out: Path
    model: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float | None = None
    eval_fraction: float = 0.0
    eval_steps: int | None = None
    resume: bool = False
    save_steps: int | None = None
    save_total_limit: int = DEFAULT_SAVE_TOTAL_LIMIT  # 0: keep every checkpoint
    logging_steps: int = DEFAULT_LOGGING_STEPS
    seed: int = 42
    format: str = "auto"
    system_prompt: str | None = None
    overlong: str = "drop"
    chat_template: Path | None = None
    lora_alpha: int | None = None
    split: str = "train"
    batching: str = "packed"
    packed_attention: str = "auto"
    report_to: str = "none"  # trackers.TRACKERS
    kernels: str = zkernels.DEFAULT_KERNELS
    compile: bool | None = None  # None: the plan's (setup.compile)
    cuda_graphs: bool | None = None  # None: the plan's (setup.cuda_graphs)


# --------------------------------------------------------------------------- plan, options


def read_plan(path: str | os.PathLike[str]) -> PlannedRun:
    """The model and the chosen TrainSetup of a plan.json written by ``zeroplan plan``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadPlanError(f"no plan file {p}: run `zeroplan plan ... -o RUN_DIR` first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadPlanError(f"cannot read {p}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadPlanError(f"{p} is not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or "best" not in data or "model" not in data:
        raise BadPlanError(f"{p} is not a zeroplan plan (no 'model' and 'best')")
    best = data["best"]
    if best is None:
        raise BadPlanError(f"{p}: the plan found no setup that fits, so there is nothing to run")
    raw = best.get("setup") if isinstance(best, dict) else None
    if not isinstance(raw, dict):
        raise BadPlanError(f"{p}: 'best' has no 'setup'")
    known = {f.name for f in dataclasses.fields(TrainSetup)}
    values = {k: v for k, v in raw.items() if k in known}
    if isinstance(values.get("lora_targets"), str):
        values["lora_targets"] = parse_targets(values["lora_targets"])
    elif isinstance(values.get("lora_targets"), list):
        values["lora_targets"] = tuple(values["lora_targets"])
    try:
        setup = TrainSetup(**values)
    except TypeError as exc:
        raise BadPlanError(f"{p}: bad setup ({exc})") from None
    if setup.keep_outputs:
        from zeroplan.launch.runner import KEEP_OUTPUTS_REFUSAL

        raise BadPlanError(f"{p}: {KEEP_OUTPUTS_REFUSAL}")
    model = model_location(data, near=p.parent)
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    world = data.get("world_size", 1)
    return PlannedRun(p, model, setup, int(world) if isinstance(world, int) else 1)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(
        prog="python -m zeroplan.launch.sft",
        description="Train the setup a zeroplan plan chose (one process per GPU).",
    )
    ap.add_argument("--plan", required=True, type=Path, help="plan.json from `zeroplan plan -o`")
    ap.add_argument(
        "--data", required=True, help=".json / .jsonl / .parquet file, or a Hub data set id"
    )
    ap.add_argument(
        "--out", required=True, type=Path, help="run folder (checkpoints, metrics, final)"
    )
    ap.add_argument("--model", help="model folder or Hub id (default: the plan's model)")
    ap.add_argument(
        "--epochs",
        type=float,
        help="passes over the data (default 1; with --resume and neither this nor "
        "--max-steps: the limits the run was started with)",
    )
    ap.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    ap.add_argument("--lr", type=float, help="learning rate (default 2e-4 LoRA/QLoRA, 2e-5 full)")
    ap.add_argument("--eval-fraction", type=float, default=0.0, help="held-out share (default 0)")
    ap.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: each epoch)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ap.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: each epoch)")
    ap.add_argument("--save-total-limit", type=int,
                    help=f"keep only the newest N checkpoints (default {DEFAULT_SAVE_TOTAL_LIMIT}; "
                    "0 keeps all)")  # fmt: skip
    ap.add_argument("--logging-steps", type=int,
                    help=f"metrics line every N steps (default {DEFAULT_LOGGING_STEPS})")  # fmt: skip
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--format", default="auto", choices=("auto", *zdata.FORMATS))
    ap.add_argument("--system-prompt", help="system message added to records that have none")
    ap.add_argument("--overlong", default="drop", choices=zdata.OVERLONG,
                    help="samples longer than the plan's --seq-len: drop (default) or truncate")  # fmt: skip
    ap.add_argument("--chat-template", type=Path, help="a .jinja chat template for the tokenizer")
    ap.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2 × the plan's r)")
    ap.add_argument("--split", default="train", help="split of a Hub data set (default train)")
    ap.add_argument("--batching", default="packed", choices=zbatch.BATCHING,
                    help="packed rows of --seq-len tokens (default), padded samples, or padded "
                    "samples grouped by length")  # fmt: skip
    ap.add_argument("--packed-attention", default="auto", choices=zbatch.PACKED_ATTENTION,
                    help="packed rows: varlen flash attention (auto on a GPU) or an SDPA "
                    "block-diagonal mask (auto for Gemma-2 and sliding windows shorter than "
                    "--seq-len)")  # fmt: skip
    ap.add_argument("--report-to", default="none", choices=TRACKERS,
                    help="experiment tracker the Trainer logs to, in the run folder "
                    "(tensorboard: OUT/tb)")  # fmt: skip
    ap.add_argument("--kernels", default=zkernels.DEFAULT_KERNELS, choices=zkernels.KERNELS,
                    help="Liger's RMSNorm/SwiGLU/RoPE: auto (where they run), liger, none")  # fmt: skip
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile each decoder layer (eager again if it fails); "
                    "default: the plan's choice")  # fmt: skip
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="the decoder's forward and backward as two CUDA graphs (eager again "
                    "if the capture fails); default: the plan's choice")  # fmt: skip
    a = ap.parse_args(argv)
    if a.resume:
        a.epochs, a.max_steps = resume_limits(a.out, a.epochs, a.max_steps)
        for name, value in recorded_cadence(a.out).items():
            if getattr(a, name) is None:  # given again: the new value holds
                setattr(a, name, value)
    a.epochs = 1.0 if a.epochs is None else a.epochs
    for name in ("max_steps", "eval_steps", "save_steps", "logging_steps"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise BadSetupError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if a.save_total_limit is not None and a.save_total_limit < 0:
        raise BadSetupError(
            f"--save-total-limit must be 0 (keep all) or more, got {a.save_total_limit}"
        )
    if a.save_total_limit is None:
        a.save_total_limit = DEFAULT_SAVE_TOTAL_LIMIT
    a.logging_steps = a.logging_steps or DEFAULT_LOGGING_STEPS
    if not (math.isfinite(a.epochs) and a.epochs > 0):
        raise BadSetupError(f"--epochs must be positive, got {a.epochs}")
    if a.lr is not None and not (math.isfinite(a.lr) and a.lr > 0):
        raise BadSetupError(f"--lr must be positive, got {a.lr}")
    if a.lora_alpha is not None and a.lora_alpha < 1:
        raise BadSetupError(f"--lora-alpha must be at least 1, got {a.lora_alpha}")
    return Options(
        plan=a.plan,
        data=a.data,
        out=a.out,
        model=a.model,
        epochs=a.epochs,
        max_steps=a.max_steps,
        lr=a.lr,
        eval_fraction=a.eval_fraction,
        eval_steps=a.eval_steps,
        resume=a.resume,
        save_steps=a.save_steps,
        save_total_limit=a.save_total_limit,
        logging_steps=a.logging_steps,
        seed=a.seed,
        format=a.format,
        system_prompt=a.system_prompt,
        overlong=a.overlong,
        chat_template=a.chat_template,
        lora_alpha=a.lora_alpha,
        split=a.split,
        batching=a.batching,
        packed_attention=a.packed_attention,
        report_to=a.report_to,
        kernels=a.kernels,
        compile=a.compile,
        cuda_graphs=a.cuda_graphs,
    )


# --------------------------------------------------------------------------- what is applied


def lora_kwargs(setup: TrainSetup, alpha: int | None = None) -> dict[str, Any] | None:
    """``peft.LoraConfig`` arguments for the setup; None for full fine-tuning."""
    if not setup.is_lora:
        return None
    targets: str | list[str] = (
        ALL_LINEAR if ALL_LINEAR in setup.lora_targets else list(setup.lora_targets)
    )
    return {
        "r": setup.lora_r,
        "lora_alpha": alpha if alpha is not None else 2 * setup.lora_r,
        "lora_dropout": setup.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def quantization_kwargs(setup: TrainSetup) -> dict[str, Any] | None:
    """``BitsAndBytesConfig`` arguments (dtypes by name) for QLoRA; None otherwise."""
    if setup.method != "qlora":
        return None
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float16" if setup.fp16 else "bfloat16",
        "bnb_4bit_quant_storage": quant_storage_dtype(setup) or "uint8",
    }


def training_kwargs(
    setup: TrainSetup,
    opts: Options,
    cuda: bool,
    ds_path: Path | None,
    has_eval: bool,
    fields: set[str] | None = None,
) -> dict[str, Any]:
    """The SFTConfig (TrainingArguments) of the run: every knob written out, none left default.

    ``fields``: the names SFTConfig has here (transformers renamed some: checkpointing,
    length-grouped sampling); None means the newest names.
    """
    lr = opts.lr if opts.lr is not None else (2e-4 if setup.is_lora else 2e-5)
    new_names = fields is None or "activation_checkpointing" in fields
    ckpt = "activation_checkpointing" if new_names else "gradient_checkpointing"
    kw: dict[str, Any] = {
        "output_dir": str(opts.out / CHECKPOINTS),
        "per_device_train_batch_size": setup.micro_batch,
        "per_device_eval_batch_size": setup.micro_batch,
        "gradient_accumulation_steps": setup.grad_accum,
        ckpt: setup.grad_ckpt,
        f"{ckpt}_kwargs": (
            {"use_reentrant": setup.reentrant_checkpointing} if setup.grad_ckpt else None
        ),
        "optim": HF_OPTIM[setup.optim],
        "learning_rate": lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,  # = dsconfig's gradient_clipping
        "num_train_epochs": opts.epochs,
        "max_steps": opts.max_steps if opts.max_steps is not None else -1,
        # bf16 / fp16 autocast (the plan's --autocast and --precision; fp16 adds the Trainer's
        # GradScaler); under DeepSpeed it means DeepSpeed bf16 / fp16 (the config's section)
        "bf16": cuda and not setup.fp16 and (setup.deepspeed or bool(setup.autocast)),
        "fp16": cuda and setup.fp16 and (setup.deepspeed or bool(setup.autocast)),
        "use_cpu": not cuda,
        "logging_strategy": "steps",
        "logging_steps": opts.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if opts.save_steps else "epoch",
        "save_steps": opts.save_steps or 500,
        "save_total_limit": opts.save_total_limit or None,  # 0: keep all
        "save_only_model": False,  # optimizer, scheduler and RNG too: --resume continues exactly
        "eval_strategy": ("steps" if opts.eval_steps else "epoch") if has_eval else "no",
        "eval_steps": opts.eval_steps,
        "prediction_loss_only": True,  # no logits kept across evaluation batches
        # the tracker's own integration, pointed into the run folder (trackers.tracker_env;
        # transformers 4 reads logging_dir, 5 the environment)
        "report_to": opts.report_to,
        "disable_tqdm": True,
        "seed": opts.seed,
        "data_seed": opts.seed,
        "deepspeed": str(ds_path) if ds_path is not None else None,
        "ddp_find_unused_parameters": False,
        "use_liger_kernel": False,  # Liger's FLCE is applied to the model itself (fused_loss)
        # no wait for the GPU inside a step: non-blocking batch copies, no NaN filter's read
        **hostloop.sync_free_kwargs(cuda),
        # the data are tokenized and masked by zeroplan.launch.data: TRL must not re-tokenize,
        # truncate or pack them
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "max_length": setup.seq_len,
        "packing": False,
        "padding_free": False,
        # packed rows carry position_ids, which TRL would otherwise drop as an unknown column
        "remove_unused_columns": opts.batching != "packed",
    }
    if fields is None or "router_aux_loss_coef" in fields:
        # the loss the plan estimates is the model's causal-LM loss alone. TRL 1.x adds a
        # mixture of experts' load-balancing loss by default (output_router_logits switched on
        # against the model's config) over every token of a row, the packing's padding
        # segments included: their gradient, seeded there, grew 750-4,400x a layer through the
        # RMSNorms of a random model's all-zero padding states and was inf by 16 layers, so
        # every LoRA gradient became NaN (issue 29; benchmarks/moe_nan.py, tests/test_moe_launch.py)
        kw["router_aux_loss_coef"] = 0.0
    if opts.report_to == "tensorboard" and fields is not None and "logging_dir" in fields:
        kw["logging_dir"] = str(opts.out / TB_DIR)
    if opts.batching == "grouped":
        if fields is None or "train_sampling_strategy" in fields:
            kw["train_sampling_strategy"] = "group_by_length"
        else:
            kw["group_by_length"] = True
    if kw["optim"] == "adamw_torch_fused" and (not cuda or setup.offload != "none"):
        kw["optim"] = "adamw_torch"
    return kw


def model_kwargs(setup: TrainSetup, cuda: bool, local_rank: int) -> dict[str, Any]:
    """``from_pretrained`` arguments (dtypes by name): bf16 on a GPU, fp32 on the CPU.

    fp16 setups load fp16, except full fine-tuning without DeepSpeed: AMP trains an fp32
    model (GradScaler refuses fp16 gradients), as memory/precision.py assumes.
    """
    dtype = "float32"
    if cuda:
        dtype = "float16" if setup.fp16 else "bfloat16"
        if setup.fp16 and setup.method == "full" and not setup.deepspeed:
            dtype = "float32"
    kw: dict[str, Any] = {
        "dtype": dtype,
        # unset (a setup no plan resolved): transformers' default, which is the model's
        "attn_implementation": setup.attn or None,
    }
    quant = quantization_kwargs(setup)
    if quant is not None:
        kw["quantization_config"] = quant
    # without DeepSpeed the weights go straight to this rank's GPU; DeepSpeed places them
    # itself (ZeRO-3 partitions them while loading), except 4-bit weights, which bitsandbytes
    # quantizes on the GPU they load to
    if cuda and (setup.zero is None or (quant is not None and setup.zero != 3)):
        kw["device_map"] = {"": local_rank}
    return kw


def preflight(setup: TrainSetup, cuda: bool) -> None:
    """Refuse, before any model work, what this machine cannot run as planned (the launcher's
    preflight makes the same CPU check before it starts any rank)."""
    refusal = None if cuda else cpu_refusal(setup)
    if refusal is not None:
        raise MissingDependencyError(refusal)
    if setup.method == "qlora":
        _need("bitsandbytes", "--method qlora (4-bit NF4 base)", "bitsandbytes")
    if setup.optim in BNB_OPTIMIZERS:
        _need("bitsandbytes", f"--optim {setup.optim}", "bitsandbytes")
    if setup.fused_loss:
        _need("liger_kernel", "the fused loss (Liger fused linear cross-entropy)", "liger-kernel")
    if setup.attn == "flash_attention_2":
        _need("flash_attn", "--attn flash_attention_2", "flash-attn")
    if setup.zero is not None:
        _need("deepspeed", f"--zero {setup.zero}", "deepspeed")


def _need(module: str, what: str, package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"the plan uses {what}, but {package} is not installed: pip install {package}, "
            "or plan again without it"
        )


def resume_limits(
    out: Path, epochs: float | None, max_steps: int | None
) -> tuple[float | None, int | None]:
    """The limits a ``--resume`` trains to: those given (either one replaces both), else
    the ones the run was started with (:func:`original_limits`)."""
    if epochs is None and max_steps is None:
        return original_limits(out)
    return epochs, max_steps


# applied.json's TrainingArguments -> the option a resume keeps, and when it applies
_CADENCE = {
    "logging_steps": None,
    "save_steps": ("save_strategy", "steps"),
    "eval_steps": ("eval_strategy", "steps"),
    "save_total_limit": None,
}


def recorded_cadence(out: Path) -> dict[str, int]:
    """How often the run in ``out`` logged, saved and evaluated, and how many checkpoints
    it kept, as its last session applied them (applied.json's ``training``): a
    ``--resume`` that does not give them again keeps them. (The Trainer restores these
    from the checkpoint's state only to warn that they differ, then uses the new ones: a
    run logged every 5 steps went on every 10.)"""
    training = (read_json_object(out / APPLIED_FILE) or {}).get("training")
    if not isinstance(training, dict):
        return {}
    kept: dict[str, int] = {}
    for name, when in _CADENCE.items():
        value = training.get(name)
        if when is not None and training.get(when[0]) != when[1]:
            continue  # saved (evaluated) each epoch: no step count to keep
        if name == "save_total_limit" and value is None:
            value = 0  # the Trainer's None: every checkpoint kept
        if isinstance(value, int) and not isinstance(value, bool):
            kept[name] = value
    return kept


def original_limits(out: Path) -> tuple[float | None, int | None]:
    """``(--epochs, --max-steps)`` the run in ``out`` was started with, for a ``--resume``
    that gives neither: the job continues as it was started.

    From result.json (written when a session ends, also on a signal), else from the argv
    that applied.json keeps (a session killed before it could write its result), else
    ``(None, None)``: the defaults.
    """
    result = read_json_object(out / RESULT_FILE)
    if result is not None:
        epochs, steps = result.get("epochs"), result.get("max_steps_given")
        return (
            float(epochs) if isinstance(epochs, (int, float)) else None,
            steps if isinstance(steps, int) else None,
        )
    try:
        argv = (read_json_object(out / APPLIED_FILE) or {})["argv"]
        ap = argparse.ArgumentParser(add_help=False)
        ap.add_argument("--epochs", type=float)
        ap.add_argument("--max-steps", type=int)
        known, _ = ap.parse_known_args([str(x) for x in argv])
        return known.epochs, known.max_steps
    except (ValueError, KeyError, TypeError, SystemExit):
        return None, None


def last_checkpoint(out: Path, before: int | None = None) -> Path | None:
    """The newest ``checkpoints/checkpoint-N`` that holds a finished save, or None; by step
    number (checkpoint-11 is newer than checkpoint-6). ``before``: only steps below it."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return None
    done: dict[int, Path] = {}
    for p in folder.iterdir():
        step = checkpoint_step(p)
        if step is None or (before is not None and step >= before):
            continue
        if (p / "trainer_state.json").is_file():  # written last by Trainer._save_checkpoint
            done[step] = p
    return done[max(done)] if done else None


def checkpoint_step(path: Path) -> int | None:
    """N of a ``checkpoint-N`` folder, else None."""
    digits = path.name.removeprefix("checkpoint-")
    return int(digits) if path.name.startswith("checkpoint-") and digits.isdigit() else None


def checkpoint_world_size(ckpt: Path) -> int | None:
    """How many processes saved ``ckpt``, from the random-number state each leaves in it
    (transformers' Trainer._save_rng_state: ``rng_state.pth`` from a run of one process,
    ``rng_state_{rank}.pth`` from each rank of a run of several); None where it holds
    neither."""
    ranks = [
        int(digits)
        for f in ckpt.glob("rng_state_*.pth")
        if (digits := f.name.removeprefix("rng_state_").removesuffix(".pth")).isdigit()
    ]
    if ranks:
        return max(ranks) + 1
    return 1 if (ckpt / "rng_state.pth").is_file() else None


def completed_step(out: Path, max_steps: int | None, epochs: float) -> int | None:
    """The step a completed run ended at, if ``--resume`` would have nothing left to train.

    Something is left when result.json does not say ``completed``, when ``--max-steps`` asks
    for more steps than were run, or, without ``--max-steps``, when ``--epochs`` asks for
    more passes than the completed run made or that run was cut short by its own
    ``--max-steps``. (transformers, resumed from a checkpoint at its last step, trains one
    step beyond it, so this is decided here, before the Trainer.)
    """
    result = read_json_object(out / RESULT_FILE)
    if result is None:
        return None
    try:
        done = int(result["global_step"]) if result.get("status") == "completed" else None
    except (ValueError, KeyError, TypeError):
        return None
    if done is None:
        return None
    if max_steps is not None:
        return done if max_steps <= done else None
    if epochs > float(result.get("epochs", epochs)) or result.get("max_steps_given") is not None:
        return None
    return done


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "zeroplan",
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "deepspeed",
        "bitsandbytes",
        "liger-kernel",
        "flash-attn",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# --------------------------------------------------------------------------- the run


def main(argv: Sequence[str] | None = None) -> int:
    flag = StopFlag()
    flag.install()
    envcheck.quiet_import_noise()
    try:
        opts = parse_args(argv)
        code = run(opts, flag, list(sys.argv if argv is None else argv))
    except ZeroplanError as exc:
        print(f"zeroplan: error: {exc}", file=sys.stderr)
        return 2
    release_gloo()
    return code


def release_gloo() -> None:
    """Destroy a gloo process group before the interpreter exits. Left to the interpreter's
    teardown, gloo's worker threads can still hold tensors whose release then needs the GIL
    of an interpreter going away, and the rank aborts ("terminate called without an active
    exception", SIGABRT) after its run ended: twice in CI, a rank of a two-node CPU run
    stopped by Ctrl-C. destroy_process_group only drops torch's own references: the group
    lives on while anything holds it, and the Trainer's reference cycles hold its DDP
    wrapper, whose reducer holds the group (the abort came back once with the destroy alone,
    session 19's CI), so a collection follows while the interpreter is whole. NCCL's groups
    are left to torch (its teardown warns, it does not abort), until a GPU run has checked
    destroying them at exit."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        dist.destroy_process_group()
        gc.collect()


def run(opts: Options, flag: StopFlag, argv: list[str]) -> int:
    started = time.time()
    planned = read_plan(opts.plan)
    setup = planned.setup
    # absolute paths in every file the run leaves: merge / generate run from elsewhere
    opts = dataclasses.replace(opts, out=opts.out.expanduser().resolve())
    if opts.model is not None and Path(opts.model).expanduser().exists():
        opts = dataclasses.replace(opts, model=str(Path(opts.model).expanduser().resolve()))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_id = opts.model or planned.model

    # ---- everything that can be refused without torch
    if not zdata.data_exists(opts.data) and not zdata.looks_like_hub_id(opts.data):
        raise DataNotFoundError(f"no data file {opts.data}")
    if opts.chat_template is not None and not opts.chat_template.is_file():
        raise DataNotFoundError(f"no chat template file {opts.chat_template}")
    resume_from = last_checkpoint(opts.out)
    if opts.resume and resume_from is None:
        raise ResumeError(f"--resume: no checkpoint in {opts.out / CHECKPOINTS} to continue from")
    if not opts.resume and resume_from is not None:
        raise ResumeError(
            f"{opts.out} already holds checkpoints ({resume_from.name}): pass --resume to "
            "continue that run, or give a new --out"
        )
    check_tracker(opts.report_to, login=rank == 0)
    done = completed_step(opts.out, opts.max_steps, opts.epochs) if opts.resume else None
    if done is not None:
        if rank == 0:
            _say(
                f"nothing to resume: the run completed at step {done} (weights in "
                f"{opts.out / FINAL}); pass a larger --max-steps or --epochs to train on"
            )
        return 0

    import torch

    cuda = torch.cuda.is_available()
    preflight(setup, cuda)
    if cuda:
        torch.cuda.set_device(local_rank)

    # ---- tokenizer and data (clear errors before the model is loaded)
    tokenizer = _load_tokenizer(model_id, opts)
    model_type, sliding_window = _model_type_and_window(model_id)
    kernel_path = _kernel_path(model_type, opts, setup, cuda)
    prepared = zdata.prepare(
        opts.data,
        tokenizer,
        max_seq_len=setup.seq_len,
        fmt=opts.format,
        system=opts.system_prompt,
        overlong=opts.overlong,
        eval_fraction=opts.eval_fraction,
        seed=opts.seed,
        split=opts.split,
    )
    summary = prepared.summary
    notes: list[str] = []
    if world != planned.world_size:
        notes.append(
            f"planned for {_gpus(planned.world_size)}, running on {world} processes: the global "
            "batch and the per-GPU memory of ZeRO differ from the plan"
        )
    opts.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _say(
            f"data: {summary.records} {summary.format} records -> {summary.train_examples} train"
            f" / {summary.eval_examples} eval; {summary.dropped_too_long} dropped and "
            f"{summary.truncated} truncated (longer than {summary.max_seq_len} tokens), "
            f"{summary.dropped_no_target} with nothing to learn (no assistant token, empty text)"
        )
        for note in notes:
            _say(note)

    # ---- DeepSpeed config, then the TrainingArguments (before the model: ZeRO-3 partitions
    # the weights while from_pretrained loads them)
    # Every rank writes it (atomically, the same text): no rank waits for another's file, and
    # nodes that do not share RUN_DIR each get their copy.
    # ---- batches first: packed micro-batches of the plan's shape, or padded samples
    graphs_off = _graphs_why_not(opts, setup, cuda, world, kernel_path.compile)
    batching = _batching(
        opts, setup, prepared, tokenizer, cuda, model_type, sliding_window, graphs_off is None
    )
    if rank == 0:
        _say(batching.describe())

    ds_path: Path | None = None
    if setup.zero is not None:
        ds_path = write_config(ds_config(batching.rows_setup(setup), world), opts.out / DS_CONFIG)

    from datasets import Dataset
    from trl.trainer.sft_config import SFTConfig

    os.environ.update(tracker_env(opts.report_to, opts.out, os.environ))
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    tkw = training_kwargs(setup, opts, cuda, ds_path, bool(prepared.eval), fields)
    # varlen packs a whole micro-batch into one row of micro_batch × seq_len tokens
    tkw["per_device_train_batch_size"] = tkw["per_device_eval_batch_size"] = batching.per_device
    targs = SFTConfig(**tkw)

    model, dtype_name = _load_model(model_id, setup, cuda, local_rank, batching.attn_impl)
    # before PEFT wraps the linears: Liger's modules call them by name, LoRA layers included
    kernel_path = zkernels.apply(model, kernel_path)
    if rank == 0:
        why = f" ({kernel_path.why_plain})" if kernel_path.why_plain else ""
        _say(f"kernels: {kernel_path.label}{why}")

    peft_config = None
    lkw = lora_kwargs(setup, opts.lora_alpha)
    if lkw is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(**lkw)

    from zeroplan.launch.callbacks import (
        MetricsWriter,
        StopOnDivergence,
        StopOnSignal,
        any_rank,
    )

    counter = Counter()
    label = f"{batching.label}, {kernel_path.label}"
    if graphs_off is None:
        label += ", CUDA graphs"  # the capture's outcome goes to the log and result.json
    divergence = StopOnDivergence(fp16=bool(targs.fp16))
    callbacks = [
        MetricsWriter(opts.out / METRICS_FILE, counter, label),
        StopOnSignal(flag),
        divergence,
    ]
    trainer_cls = lean_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=targs,
        train_dataset=Dataset.from_list(batching.train),
        eval_dataset=Dataset.from_list(batching.eval) if batching.eval else None,
        processing_class=tokenizer,
        data_collator=batching.collator,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.zp_tokens = counter
    adapter_dtype = _restore_adapter_dtype(trainer.model, setup)
    if kernel_path.fused_lora:
        # after PEFT built its layers and the adapters have their dtype (fp32 / DeepSpeed's bf16)
        # siblings on one input run together, except inside compiled layers (the group's
        # hand-over of outputs is Python state that dynamo would trace or break on)
        # ZEROPLAN_LORA_GROUP=0: each linear alone (for measuring what the groups do)
        group = not kernel_path.compile and os.environ.get("ZEROPLAN_LORA_GROUP") != "0"
        fused = loralinear.install(trainer.model, group=group)
        trainer.zp_lora = fused
        if rank == 0:
            _say(
                f"LoRA: {fused.layers} fused linears"
                + (f" ({fused.grouped} with siblings on one input)" if fused.grouped else "")
                + (f", {fused.kept} PEFT layers ({fused.why_kept})" if fused.kept else "")
            )
    if not trainer.is_deepspeed_enabled:
        # DeepSpeed's engine keeps its own gradient buffers and clips them itself
        trainer.zp_trainable = hostloop.trainable(trainer.model)
        trainer.zp_walks = hostloop.LeanWalks(trainer.zp_trainable)
        trainer.zp_walks.install(trainer.model)
    if graphs_off is None:
        # after PEFT and the fused linears: the graphs hold what the decoder runs
        graphed = zgraphs.GraphedDecoder(warn=_say if rank == 0 else lambda _: None)
        decoder = zgraphs.decoder_module(trainer.model)
        graphed.install(decoder, hostloop.trainable(decoder))
        trainer.zp_graphs = graphed
        if trainer.zp_walks is not None:
            # the graph adds into each gradient: zero them in place (one call), not to None
            trainer.zp_walks.in_place = True
    if kernel_path.compile:
        # after PEFT: the compiled layers hold the adapters
        regional = zkernels.RegionalCompile(warn=_say if rank == 0 else lambda _: None)
        regional.wrap(zkernels.decoder_layers(trainer.model))
        trainer.zp_compile = regional
    ckpt_kwargs = targs.gradient_checkpointing_kwargs
    reentrant = isinstance(ckpt_kwargs, dict) and ckpt_kwargs.get("use_reentrant")
    if setup.grad_ckpt and reentrant:
        notes.append("reentrant checkpointing: TRL requires it for PEFT under DeepSpeed ZeRO-3")

    if rank == 0:
        applied = _applied(
            planned, opts, targs, trainer, summary, dtype_name, adapter_dtype, lkw, world, cuda
        )
        applied["batching"] = batching.to_dict()
        applied["kernels"] = kernel_path.to_dict()
        applied["cuda_graphs"] = {"on": graphs_off is None, "why_off": graphs_off}
        # what the Trainer's loop was spared each step (hostloop): its waits and walks
        applied["host_loop"] = {
            **hostloop.sync_free_kwargs(cuda),
            "lean_walks": trainer.zp_trainable is not None,
        }
        if batching.attn_impl != setup.attn:
            applied["attn_implementation"] = batching.attn_impl
        applied.update(
            argv=argv,
            started=_iso(started),
            resumed_from=str(resume_from) if opts.resume else None,
            notes=notes,
        )
        (opts.out / APPLIED_FILE).write_text(json.dumps(applied, indent=2) + "\n")

    if any_rank(flag.signalled):  # stopped while loading: nothing trained, nothing to save
        return _finish(opts, trainer, rank, "interrupted", flag, None)
    hostloop.freeze_heap()  # no full collection of the data and model inside a step
    trainer.train(resume_from_checkpoint=str(resume_from) if opts.resume else None)
    if divergence.diverged is not None:
        # the weights are non-finite from here on: neither this step nor final/ is saved
        return _finish(opts, trainer, rank, "diverged", flag, None, divergence.diverged)
    if trainer.state.global_step < trainer.state.max_steps:
        # StopOnSignal ended it: the checkpoint of this step is saved, final/ is not written
        return _finish(opts, trainer, rank, "interrupted", flag, None)

    # final/ is complete once result.json says "completed"
    final = opts.out / FINAL
    trainer.save_model(str(final))  # every rank: ZeRO-3 gathers the weights collectively
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
        info = {
            "base_model": model_id,
            "method": setup.method,
            "format": summary.format,
            "system_prompt": summary.system_prompt,
            "seq_len": setup.seq_len,
            "dtype": dtype_name,
        }
        (final / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return _finish(opts, trainer, rank, "completed", flag, final)


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _say(text: str) -> None:
    print(f"zeroplan: {text}", file=sys.stderr, flush=True)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).isoformat()


def _load_tokenizer(model_id: str, opts: Options) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load the tokenizer of '{model_id}': {zdata.first_line(exc)}; "
            "pass --model with a local model folder or a Hub id"
        ) from None
    if opts.chat_template is not None:
        tok.chat_template = opts.chat_template.read_text(encoding="utf-8")
    return tok


def bnb_config(setup: TrainSetup) -> Any:
    """The ``transformers.BitsAndBytesConfig`` of a QLoRA setup (None otherwise)."""
    import torch
    from transformers import BitsAndBytesConfig

    q = quantization_kwargs(setup)
    if q is None:
        return None
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        q[key] = getattr(torch, q[key])
    return BitsAndBytesConfig(**q)  # type: ignore[no-untyped-call]


def _model_type_and_window(model_id: str) -> tuple[str, int | None]:
    """The model's ``model_type`` and the window of its sliding layers (None: none slide;
    models.sliding_window_of on the text config as transformers fills it in, the rule the
    plan used) from its config, before the weights are loaded."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_id)
        text = cfg.get_text_config()
        window = sliding_window_of(
            text.to_dict(), str(text.model_type), int(getattr(text, "num_hidden_layers", 0))
        )
        return str(cfg.model_type), window
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load the config of '{model_id}': {zdata.first_line(exc)}; "
            "pass --model with a local model folder or a Hub id"
        ) from None


def _kernel_path(
    model_type: str, opts: Options, setup: TrainSetup, cuda: bool
) -> zkernels.KernelPath:
    """The kernels this rank runs (``--kernels liger`` / ``--compile`` refused where they
    cannot run, before the model is loaded)."""
    supported: frozenset[str] | None = None
    # liger-kernel imports Triton: only where a kernel of it may run
    # auto runs Liger's kernels where the plan chose them (setup.kernels)
    planned = setup.kernels == "liger"
    wants_liger = opts.kernels == "liger" or (opts.kernels == "auto" and planned)
    if setup.fused_loss or wants_liger:
        try:
            supported = zkernels.liger_model_types()
        except ImportError as exc:
            if setup.fused_loss or wants_liger:
                raise MissingDependencyError(
                    f"liger-kernel does not import here ({zdata.first_line(exc)}): "
                    f"{zkernels.LIGER_FIX}"
                ) from None
    if setup.fused_loss and (supported is None or model_type not in supported):
        raise KernelsUnsupportedError(
            f"the plan uses Liger's fused loss, which has no kernel for '{model_type}': plan "
            "again with --no-fused-loss"
        )
    # unset: what the plan's setup says (setup.compile)
    compile_layers = setup.compile if opts.compile is None else opts.compile
    if compile_layers:
        zkernels.check_compiler(cuda)
    return zkernels.choose(
        opts.kernels,
        model_type,
        cuda,
        supported,
        setup.fused_loss,
        compile_layers,
        planned,
        _fused_lora_why_not(setup),
    )


def _fused_lora_why_not(setup: TrainSetup) -> str | None:
    """Why the LoRA linears keep PEFT's layers (None: the fused ones run, as planned)."""
    if not setup.fused_lora:
        return "the plan chose PEFT's layers" if setup.is_lora else "no adapters"
    if not fused_lora_runs(setup):
        return "fp32 adapters without autocast: PEFT computes them in fp32"
    return None


def _load_model(
    model_id: str, setup: TrainSetup, cuda: bool, local_rank: int, attn_impl: str | None = None
) -> tuple[Any, str]:
    import torch
    from transformers import AutoModelForCausalLM

    kw = model_kwargs(setup, cuda, local_rank)
    if attn_impl is not None:
        kw["attn_implementation"] = attn_impl
    dtype_name = kw["dtype"]
    kw["dtype"] = getattr(torch, dtype_name)
    if "quantization_config" in kw:
        kw["quantization_config"] = bnb_config(setup)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kw)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load the weights of '{model_id}': {zdata.first_line(exc)}; "
            "pass --model with a local model folder or a Hub id"
        ) from None
    model.config.use_cache = False
    return model, dtype_name


def _restore_adapter_dtype(model: Any, setup: TrainSetup) -> str | None:
    """LoRA weights back to fp32 where TRL cast them to bf16 (4-bit base, no DeepSpeed).

    PEFT keeps adapters in fp32 (the estimate's 4 B weight + 4 B gradient + 8 B Adam per
    LoRA parameter); TRL 1.x casts them to bf16 on a quantized base. DeepSpeed casts the
    whole module to bf16 itself, so under ZeRO nothing is changed here.
    """
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not setup.is_lora or not trainable:
        return None
    if setup.zero is None:
        for p in trainable:
            if p.dtype != torch.float32:
                p.data = p.data.float()
    return str(trainable[0].dtype).removeprefix("torch.")


def _applied(
    planned: PlannedRun,
    opts: Options,
    targs: Any,
    trainer: Any,
    summary: zdata.DataSummary,
    dtype_name: str,
    adapter_dtype: str | None,
    lkw: dict[str, Any] | None,
    world: int,
    cuda: bool,
) -> dict[str, Any]:
    setup = planned.setup
    params = list(trainer.model.parameters())

    def numel(p: Any) -> int:
        return int(getattr(p, "ds_numel", 0) or p.numel())

    keys = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "optim",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "router_aux_loss_coef",
        "num_train_epochs",
        "max_steps",
        "bf16",
        "fp16",
        "seed",
        "logging_steps",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "eval_strategy",
        "eval_steps",
        "deepspeed",
        "report_to",
        "output_dir",
    )
    training = {k: _plain(getattr(targs, k, None)) for k in keys}
    return {
        "plan": str(planned.path.resolve()),
        "model": opts.model or planned.model,
        "planned_setup": setup.to_dict(),
        "planned_world_size": planned.world_size,
        "world_size": world,
        "global_batch": setup.micro_batch * setup.grad_accum * world,
        "device": "cuda" if cuda else "cpu",
        "dtype": dtype_name,
        # the mixed precision the run trains in (the CPU computes in fp32)
        "precision": (setup.precision or "bf16") if cuda else "fp32",
        "attn_implementation": setup.attn,
        "method": setup.method,
        "quantization": quantization_kwargs(setup),
        "prepare_model_for_kbit_training": False,
        "lora": lkw,
        "adapter_dtype": adapter_dtype,
        "trainable_params": sum(numel(p) for p in params if p.requires_grad),
        "total_params": sum(numel(p) for p in params),
        "loss": (
            "Liger fused linear cross-entropy"
            if setup.fused_loss
            else "the model's causal-LM loss (full logits)"
        ),
        "trl_logging_extras": "off (per-token entropy and token accuracy are not computed)",
        "training": training,
        "data": summary.to_dict(),
        "versions": library_versions(),
        "gpu_memory_after_load": _loaded_memory() if cuda else None,
    }


def _loaded_memory() -> dict[str, int]:
    """This rank's allocator once the model is loaded (and, under ZeRO-3, partitioned),
    before the first step: ``peak`` above the training peak means loading, not training,
    sets the run's high-water mark."""
    import torch

    return {
        "allocated_bytes": int(torch.cuda.memory_allocated()),
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "reserved_bytes": int(torch.cuda.memory_reserved()),
    }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "value"):  # enums
        return _plain(value.value)
    return str(value)


def _finish(
    opts: Options,
    trainer: Any,
    rank: int,
    status: str,
    flag: StopFlag,
    final: Path | None,
    diverged: Divergence | None = None,
) -> int:
    # a diverged run names the newest checkpoint from before the step that diverged (no
    # later one is saved: callbacks.StopOnDivergence)
    ckpt = last_checkpoint(opts.out, before=diverged.step if diverged is not None else None)
    if diverged is not None:
        # every rank says it: the launcher shows the failed rank's last log lines
        _say(diverged_message(diverged, ckpt))
    if rank == 0:
        result = {
            "status": status,
            "global_step": int(trainer.state.global_step),
            # the Trainer's count is 0 when stopped before training began: --max-steps then
            "max_steps": int(trainer.state.max_steps) or opts.max_steps,
            # what was asked, for a later --resume to tell whether more is asked now
            "epochs": opts.epochs,
            "max_steps_given": opts.max_steps,
            "last_checkpoint": str(ckpt) if ckpt else None,
            "final": str(final) if final else None,
            "signal": signal.Signals(flag.signum).name if flag.signum is not None else None,
            "diverged": dataclasses.asdict(diverged) if diverged else None,
            "finished": _iso(time.time()),
            # how the fused LoRA linears dequantized 4-bit weights (launch/dequant.py)
            "dequantization": dequant.path(),
        }
        lora = getattr(trainer, "zp_lora", None)
        if lora is not None:
            # which LoRA linears ran fused and which with their siblings (loralinear)
            result["lora_linears"] = dataclasses.asdict(lora)
        regional = getattr(trainer, "zp_compile", None)
        if regional is not None:
            result["compile"] = regional.stats()
        graphed = getattr(trainer, "zp_graphs", None)
        if graphed is not None:
            # captured or why not, replays and the calls that ran eager (launch/graphs.py)
            result["cuda_graphs"] = graphed.stats()
        # a diverged loss is NaN: null in the file, which stays strict JSON
        text = json.dumps(json_safe(result), indent=2, allow_nan=False)
        (opts.out / RESULT_FILE).write_text(text + "\n")
        _say(
            f"{status} at step {result['global_step']}" + (f"; weights in {final}" if final else "")
        )
    if status == "interrupted":
        # a rank stopped because another one got the signal reports it too: every rank of a
        # stopped run exits non-zero, as the launcher expects of a stopped run
        return 128 + (flag.signum if flag.signum is not None else signal.SIGTERM)
    return EXIT_DIVERGED if status == "diverged" else 0


def diverged_message(d: Divergence, checkpoint: Path | None) -> str:
    """One line: where training went non-finite, what was kept, what to try."""
    kept = (
        f"the last checkpoint, {checkpoint}, is from before it. Lower --lr, or check the "
        "records and the model for the cause; --resume continues from that checkpoint"
        if checkpoint
        else "no checkpoint was saved before it. Lower --lr, or check the records and the "
        "model for the cause, and start again in a new folder (-o NEW_DIR)"
    )
    return (
        f"error: training diverged at step {d.step} (loss {d.loss}, gradient norm "
        f"{d.grad_norm}): stopped without saving its weights; {kept}"
    )


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batching:
    """What the Trainer gets: its data sets, the collator, the attention implementation."""

    mode: str  # packed | padded | grouped
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    collator: Any  # None: TRL's padding collator
    attn_impl: str | None  # None: the plan's (sdpa)
    packed_attention: str | None  # varlen | mask (packed mode)
    capacity: int  # tokens a packed row holds
    per_device: int  # rows per micro-batch (the Trainer's per-device batch size)
    samples: int
    rows: int
    fill: float | None  # real tokens / token positions of the packed rows
    gqa_native: bool | None = None  # varlen: keys/values not repeated to every query head

    def rows_setup(self, setup: TrainSetup) -> TrainSetup:
        """``setup`` as the Trainer (and so DeepSpeed, which refuses a micro-batch other than
        the Trainer's) counts its batch: in rows — under varlen one row holds the planned
        micro-batch of micro_batch × seq_len tokens."""
        return dataclasses.replace(setup, micro_batch=self.per_device)

    @property
    def label(self) -> str:
        """A few words for the dashboard: how batches are made."""
        if self.mode != "packed":
            return self.mode
        kernel = "varlen attention" if self.packed_attention == "varlen" else "SDPA mask"
        return f"packed, {kernel}"

    def describe(self) -> str:
        if self.mode != "packed":
            how = "grouped by length, " if self.mode == "grouped" else ""
            return f"batches: {self.samples} samples padded to the longest of each micro-batch ({how}{self.mode})"
        kernel = (
            "varlen flash attention" if self.packed_attention == "varlen" else "SDPA block mask"
        )
        return (
            f"batches: {self.samples} samples packed into {self.rows} rows of {self.capacity} "
            f"tokens, {self.per_device} a micro-batch ({self.fill:.1%} real tokens), attention "
            f"inside each sample ({kernel})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "packed_attention": self.packed_attention,
            "attn_implementation": self.attn_impl,
            "row_tokens": self.capacity,
            "rows_per_micro_batch": self.per_device,
            "gqa_native": self.gqa_native,
            "samples": self.samples,
            "rows": self.rows,
            "fill": self.fill,
        }


def _graphs_why_not(
    opts: Options, setup: TrainSetup, cuda: bool, world: int, compiled: bool
) -> str | None:
    """Why the decoder runs eager (None: as CUDA graphs, launch/graphs.py): not asked
    (``--no-cuda-graphs``, or the plan's choice), or it cannot here; asked for with
    ``--cuda-graphs`` where it cannot: refused in one line."""
    wanted = setup.cuda_graphs if opts.cuda_graphs is None else opts.cuda_graphs
    if not wanted:
        return "--no-cuda-graphs" if opts.cuda_graphs is False else "the plan leaves them off"
    if opts.cuda_graphs:  # asked for on the command line: refused where it cannot run
        refuse_cuda_graphs(setup, world, cuda, compiled)
        return None
    return cuda_graphs_refusal(setup, world, cuda, compiled)


def _batching(
    opts: Options,
    setup: TrainSetup,
    prepared: zdata.PreparedData,
    tokenizer: Any,
    cuda: bool,
    model_type: str = "",
    sliding_window: int | None = None,
    one_shape: bool = False,
) -> Batching:
    """The micro-batches; ``one_shape`` (CUDA graphs): a flat row's segment boundaries
    padded to the most any micro-batch of its rows holds, and its max length the longest
    segment of any (batching.one_shape)."""
    n = len(prepared.train)
    if opts.batching != "packed":
        return Batching(opts.batching, prepared.train, prepared.eval, None, None, None,
                        setup.seq_len, setup.micro_batch, n, n, None)  # fmt: skip
    kernel = zbatch.choose_packed_attention(
        opts.packed_attention, cuda, model_type, sliding_window, setup.seq_len
    )
    attn_impl = zbatch.register_varlen() if kernel == "varlen" else setup.attn
    capacity, per_device = packed_shape(kernel, setup.seq_len, setup.micro_batch)
    train = zbatch.pack_examples(prepared.train, capacity, seed=opts.seed)
    evals = zbatch.pack_examples(prepared.eval, capacity, seed=opts.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layout = "flat" if kernel == "varlen" else "rows"
    segments = longest = None
    if one_shape and layout == "flat":
        segments, longest = zbatch.one_shape(train.rows, capacity, per_device)
    collator = zbatch.PackedCollator(int(pad or 0), capacity, layout, segments, longest)
    gqa = zbatch.gqa_native() if kernel == "varlen" and cuda else None
    return Batching("packed", train.rows, evals.rows, collator, attn_impl, kernel,
                    capacity, per_device, n, len(train.rows), train.fill, gqa)  # fmt: skip


# --------------------------------------------------------------------------- trainer pieces


def lean_trainer_class() -> Any:
    """SFTTrainer whose loss is the model's own (the lean step the estimate measures).

    TRL's ``compute_loss`` runs a chunked LM head that also computes per-token entropy and
    token accuracy for its logs; ``Trainer.compute_loss`` is the plain forward with labels
    (Liger's fused loss when applied to the model). The non-padding tokens of each
    micro-batch are counted on the device for ``tokens_per_s``.
    """
    from transformers import Trainer
    from trl.trainer.sft_trainer import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        zp_tokens: Counter | None = None
        zp_compile: zkernels.RegionalCompile | None = None
        zp_graphs: zgraphs.GraphedDecoder | None = None
        zp_walks: hostloop.LeanWalks | None = None
        zp_trainable: list[Any] | None = None  # hostloop.trainable, without DeepSpeed
        zp_params: int | None = None

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            """Trainer's count, 6 · tokens · non-embedding parameters, with the parameters
            counted once: the Trainer counts them again every micro-batch, a walk over every
            module and parameter (hostloop)."""
            model: Any = self.model
            main = getattr(model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(model, "num_parameters"):
                return 0
            if self.zp_params is None:
                self.zp_params = int(model.num_parameters(exclude_embeddings=True))
            return 6 * int(inputs[main].numel()) * self.zp_params

        def _clip_grad_norm(self, model: Any) -> Any:
            """Clip over the parameters that train (frozen ones hold no gradient): the
            same norm and the same scaling, without a walk over every parameter."""
            if self.zp_trainable is None or self.is_fsdp_enabled:
                parent: Any = super()._clip_grad_norm  # transformers' is untyped
                return parent(model)
            return self.accelerator.clip_grad_norm_(self.zp_trainable, self.args.max_grad_norm)

        def training_step(
            self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> Any:
            """A compile that fails in the backward (compiled lazily, at the first one) or
            in a forward the layers' own fallback did not see: eager from here, this
            micro-batch again. Without DeepSpeed only (its engine holds the gradients in
            its own buffers); an error that is not the compiler's comes back in eager."""
            step: Any = super().training_step  # TRL's is untyped
            regional = self.zp_compile
            if regional is None or regional.failed is not None or self.is_deepspeed_enabled:
                return step(model, inputs, num_items_in_batch)
            again = dict(inputs)  # compute_loss pops zeroplan's token counts
            import torch

            try:
                return step(model, inputs, num_items_in_batch)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                regional.fail(exc)
                # the compiled backward failed before any layer's gradient was written
                # (the layers share its graph); what the head may have added goes too
                model.zero_grad(set_to_none=True)
                return step(model, again, num_items_in_batch)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            real = inputs.pop("zp_real_tokens", None)
            slots = inputs.pop("zp_slots", None)
            if self.zp_tokens is not None and model.training:
                if real is not None:
                    self.zp_tokens.add(int(real), int(slots or 0))
                elif "attention_mask" in inputs:
                    mask = inputs["attention_mask"]
                    self.zp_tokens.add(mask.sum().detach(), mask.numel())
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(
                self,
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )

    return LeanSFTTrainer


if __name__ == "__main__":
    raise SystemExit(main())
