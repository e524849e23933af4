"""The DeepSpeed config for a TrainSetup, and the presets in ``ds_configs/``.

Light core: no torch or deepspeed import, only dicts. Every number the memory estimate
depends on (ZeRO stage, offload, micro batch, reduce / all-gather bucket sizes, ZeRO-3
prefetch, live-parameter and persistence limits) is written out explicitly from the
TrainSetup, never left to DeepSpeed's defaults or to HF's ``"auto"``, so that the run
allocates what the estimate assumed.

There is no ``optimizer`` and no ``scheduler`` section: the HF Trainer (and so
``zeroplan launch``, which trains through TRL's SFTTrainer) builds the torch optimizer
named by ``--optim`` and its LR schedule and hands them to ``deepspeed.initialize``. A
DeepSpeed ``optimizer`` section would replace that optimizer with DeepSpeed's own and
make ``--optim`` a lie.

    python -m zeroplan.dsconfig --write-presets ds_configs
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zeroplan.errors import BadSetupError, ConfigWriteError
from zeroplan.outputs import write_atomic
from zeroplan.trainsetup import TrainSetup

# Optimizers DeepSpeed's ZeRO wrapper accepts without ``zero_allow_untested_optimizer``
# (deepspeed/runtime/zero/utils.py ZERO_SUPPORTED_OPTIMIZERS holds torch.optim.AdamW; the
# bitsandbytes optimizers and torch SGD are not on that list); fused or foreach, both are
# torch.optim.AdamW.
ZERO_TESTED_OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")

# The batch and clipping keys the HF Trainer fills from TrainingArguments when they say
# "auto" (transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig.trainer_config_process).
HF_AUTO_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)

# DeepSpeed fp16 with a dynamic loss scale (loss_scale 0): start at 2**16, halve on an
# overflow after `hysteresis` overflowing steps in a row, double after `loss_scale_window`
# clean steps, never below `min_loss_scale`. These are DeepSpeed's own defaults
# (deepspeed/runtime/fp16 config), written out so that the run does what the config says.
FP16_LOSS_SCALING = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}

# name -> setup of the presets written to ds_configs/<name>.json; only the DeepSpeed side
# of each setup matters (method and optimizer only change the JSON in the cases handled
# below, and the defaults here are adamw, which needs nothing extra).
PRESETS: dict[str, TrainSetup] = {
    "zero2": TrainSetup(zero=2),
    "zero3": TrainSetup(zero=3),
    "zero3_offload": TrainSetup(zero=3, offload="optimizer+params"),
    "qlora_zero3": TrainSetup(method="qlora", zero=3),
}


def ds_config(setup: TrainSetup, world_size: int, grad_clip: float = 1.0) -> dict[str, Any]:
    """The DeepSpeed JSON (as a dict) for ``setup`` on ``world_size`` data-parallel ranks.

    ``train_batch_size`` is written as micro × accumulation × world: DeepSpeed asserts that
    identity at start-up, so writing all three keeps a mistake here from surfacing only on
    the cluster. The precision section is the setup's: ``bf16`` (an unresolved precision
    counts as bf16), or for an fp16 setup ``fp16`` with dynamic loss scaling
    (FP16_LOSS_SCALING) and no ``bf16``; either way the estimate models 16-bit weights and
    DeepSpeed's fp32 master copy. Callers resolve the precision against the GPU first
    (trainsetup.resolve_precision), as the plan and ``zeroplan config`` do. ``contiguous_gradients`` is on at every ZeRO stage and ``overlap_comm`` as
    the setup says (on unless turned off; DeepSpeed's own default is on at stage 3 only:
    at stages 1-2 it doubles the reduce buckets, which the estimate counts); bucket sizes come
    from the setup, the same numbers the estimate's buffer term used.

    Stage 0 gets ``{"stage": 0}`` only: without ZeRO DeepSpeed ignores the bucket keys.
    ``allgather_bucket_size`` is a stage 1-2 setting (stage 3 gathers by prefetch bucket),
    so it is written for stages 1-2 only. Stage 3 also gets
    ``stage3_gather_16bit_weights_on_model_save`` so that saving the model (or the LoRA
    adapter) gathers real weights instead of empty partitions.

    Optimizer offload (``--offload optimizer``) moves the optimizer step to the CPU, and
    there DeepSpeed only runs its own CPU Adam: HF Accelerate swaps whatever torch
    optimizer the Trainer built for ``DeepSpeedCPUAdam`` (and DeepSpeed refuses any other
    unless told not to). An 8-bit or SGD ``--optim`` would silently become fp32 Adam, so
    offload is accepted with torch AdamW only (``adamw_torch_fused``, alias ``adamw``, or
    ``adamw_torch``); TrainSetup already refuses the bitsandbytes ones.
    """
    if setup.zero is None:
        raise BadSetupError("no DeepSpeed config for a run without --zero; pass --zero 0-3")
    if world_size < 1:
        raise BadSetupError(f"world size must be at least 1 GPU, got {world_size}")
    if not (math.isfinite(grad_clip) and grad_clip >= 0):
        raise BadSetupError(
            f"--grad-clip must be a norm >= 0 (0 turns clipping off), got {grad_clip}"
        )
    if setup.offload != "none" and setup.optim not in ZERO_TESTED_OPTIMIZERS:
        raise BadSetupError(
            f"--offload {setup.offload} runs the optimizer step on the CPU as DeepSpeed's "
            f"CPU Adam, so --optim {setup.optim} would silently become fp32 AdamW: "
            "use --optim adamw_torch_fused, or drop --offload"
        )

    zero: dict[str, Any] = {"stage": setup.zero}
    if setup.zero >= 1:
        zero.update(
            overlap_comm=setup.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=setup.reduce_bucket_elems,
        )
    if setup.zero in (1, 2):
        zero["allgather_bucket_size"] = setup.allgather_bucket_elems
    if setup.zero == 3:
        zero.update(
            stage3_prefetch_bucket_size=setup.stage3_prefetch_elems,
            stage3_max_live_parameters=setup.stage3_max_live_elems,
            stage3_param_persistence_threshold=setup.stage3_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if setup.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if setup.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    cfg: dict[str, Any] = {
        "train_batch_size": setup.micro_batch * setup.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": setup.micro_batch,
        "gradient_accumulation_steps": setup.grad_accum,
        "gradient_clipping": float(grad_clip),
        **precision_section(setup),
        "zero_optimization": zero,
    }
    if setup.zero >= 1 and setup.optim not in ZERO_TESTED_OPTIMIZERS:
        # DeepSpeed asserts at deepspeed.initialize on ZeRO with an optimizer outside its
        # tested list (bitsandbytes 8-bit, paged, torch SGD). HF's Trainer sets this flag
        # itself; written here so that the config also works with deepspeed.initialize.
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def precision_section(setup: TrainSetup) -> dict[str, Any]:
    """``{"fp16": {...}}`` with dynamic loss scaling for an fp16 setup, else ``{"bf16": ...}``."""
    if setup.fp16:
        return {"fp16": {"enabled": True, **FP16_LOSS_SCALING}}
    return {"bf16": {"enabled": True}}


def quant_storage_dtype(setup: TrainSetup) -> str | None:
    """``bnb_4bit_quant_storage`` the model must be loaded with: the 16-bit dtype ("bfloat16",
    "float16" for an fp16 setup) for QLoRA on ZeRO-3.

    ZeRO-3 flattens and shards every parameter of the model, and all-gathers them layer by
    layer, in the dtype of the bf16 parameters. bitsandbytes stores NF4 weights packed in
    uint8 by default, which ZeRO-3 cannot shard next to bf16 parameters. With
    ``BitsAndBytesConfig(bnb_4bit_quant_storage=torch.bfloat16)`` the same packed bytes are
    stored as a bf16 tensor (same memory: two 4-bit values per byte either way), and
    sharding works. Stages 0-2 leave parameters whole, so nothing is needed there (None).
    This is a model-side setting: DeepSpeed's JSON has no key for it.
    """
    if setup.method == "qlora" and setup.zero == 3:
        return "float16" if setup.fp16 else "bfloat16"
    return None


def preset_config(setup: TrainSetup) -> dict[str, Any]:
    """``ds_config`` with the batch and clipping keys set to "auto" for the HF Trainer.

    The Trainer fills those four from TrainingArguments (per-device batch, accumulation,
    world size, ``max_grad_norm``) and refuses a concrete value that disagrees with them,
    so a preset cannot know them. Everything the memory estimate depends on stays concrete:
    HF's "auto" for bucket sizes is derived from hidden_size, not what zeroplan estimated.
    """
    cfg = ds_config(setup, world_size=1)
    for key in HF_AUTO_KEYS:
        cfg[key] = "auto"
    return cfg


def dumps(cfg: dict[str, Any]) -> str:
    """The file text: 2-space JSON, keys in the order written, trailing newline."""
    return json.dumps(cfg, indent=2) + "\n"


def write_config(cfg: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` to ``path`` atomically and return the path.

    ``outputs.write_atomic`` writes it: an error or Ctrl-C leaves either the old file or
    the complete new one, never half a config that a launcher would read, and the file gets
    the usual umask permissions (readable to the group on a shared cluster). It is synced
    to the disk before the rename: a config is read again at launch, maybe after a crash.
    """
    target = Path(path)
    if not target.name:  # "" or "/": there is no file name to write (nor to put a temp beside)
        raise ConfigWriteError(f"cannot write the config to '{path}': give -o a file name")
    text = dumps(cfg)  # serialise first: a bad value fails before anything touches the disk
    try:
        write_atomic(target, text, fsync=True)
    except OSError as exc:
        raise ConfigWriteError(f"cannot write {target}: {exc.strerror}") from exc
    return target


def write_presets(directory: str | os.PathLike[str]) -> list[Path]:
    """Write every preset as ``<directory>/<name>.json``; the folder is created if missing."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_config(preset_config(s), folder / f"{name}.json") for name, s in PRESETS.items()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zeroplan.dsconfig --write-presets DIR``: regenerate ``ds_configs/``."""
    parser = argparse.ArgumentParser(
        prog="python -m zeroplan.dsconfig", description="Write zeroplan's DeepSpeed presets."
    )
    parser.add_argument("--write-presets", metavar="DIR", required=True, help="target folder")
    args = parser.parse_args(argv)
    for path in write_presets(args.write_presets):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
