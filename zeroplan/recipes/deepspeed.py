"""The DeepSpeed JSON a recipe names: found, read, and resolved as the HF Trainer resolves it.

All three trainers hand the file to transformers' Trainer, whose DeepSpeed integration
(transformers/integrations/deepspeed.py, ``HfTrainerDeepSpeedConfig``) fills "auto":

- batch keys from the recipe: ``train_micro_batch_size_per_gpu`` = per-device batch,
  ``gradient_accumulation_steps``, ``train_batch_size`` = world × both (a concrete value
  that disagrees is an error there, so it is here);
- ``bf16.enabled`` / ``fp16.enabled`` from the recipe's precision;
- from the model's hidden size h (``trainer_config_finalize``):
  ``reduce_bucket_size`` = h², and at ZeRO-3 ``stage3_prefetch_bucket_size`` = ⌊0.9·h²⌋
  and ``stage3_param_persistence_threshold`` = 10·h.

A key the file leaves out takes DeepSpeed's own default (deepspeed/runtime/zero/config.py,
0.19.8): reduce and all-gather buckets 5e8, prefetch 5e7, max live parameters 1e9,
persistence threshold 1e5, ``overlap_comm`` on at stage 3 only. DeepSpeed accepts the
ZeRO-3 keys with or without their ``stage3_`` prefix (pydantic aliases); so does this.

Where the file is looked for: as given (absolute, or relative to the current folder, where
the trainer runs), beside the recipe, then among the example configs that trainer ships,
by file name (copies of their values in ``recipes/data/deepspeed/<format>/``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from zeroplan.errors import BadRecipeError, RecipeNotFoundError
from zeroplan.recipes.common import Row, unquoted
from zeroplan.trainsetup import (
    DS_ALLGATHER_BUCKET_ELEMS,
    DS_REDUCE_BUCKET_ELEMS,
    DS_STAGE3_MAX_LIVE_ELEMS,
    DS_STAGE3_PERSISTENCE_THRESHOLD,
    DS_STAGE3_PREFETCH_ELEMS,
)

SHIPPED = Path(__file__).parent / "data" / "deepspeed"
SOURCE = "deepspeed file"
HF_AUTO = "HF auto"
DS_DEFAULT = "default of DeepSpeed 0.19.8"

# setting -> (the key's names in zero_optimization, DeepSpeed's default, HF's auto rule as a
# function of the hidden size or None where HF fills no auto)
_ZERO_KEYS: dict[str, tuple[tuple[str, ...], int, Any]] = {
    "reduce_bucket_elems": (("reduce_bucket_size",), DS_REDUCE_BUCKET_ELEMS, lambda h: h * h),
    "allgather_bucket_elems": (("allgather_bucket_size",), DS_ALLGATHER_BUCKET_ELEMS, None),
    "stage3_prefetch_elems": (
        ("stage3_prefetch_bucket_size", "prefetch_bucket_size"),
        DS_STAGE3_PREFETCH_ELEMS,
        lambda h: int(0.9 * h * h),
    ),
    "stage3_max_live_elems": (
        ("stage3_max_live_parameters", "max_live_parameters"),
        DS_STAGE3_MAX_LIVE_ELEMS,
        None,
    ),
    "stage3_persistence_threshold": (
        ("stage3_param_persistence_threshold", "param_persistence_threshold"),
        DS_STAGE3_PERSISTENCE_THRESHOLD,
        lambda h: 10 * h,
    ),
}


def find(given: str, recipe_dir: Path, fmt: str) -> Path:
    """The file a recipe's ``deepspeed`` value names (see the module docstring for where)."""
    name = Path(given)
    looked = [name] if name.is_absolute() else [name, recipe_dir / name]
    looked.append(SHIPPED / fmt / name.name)
    for p in looked:
        if p.is_file():
            return p
    places = ", ".join(str(p) for p in looked[:-1])
    raise RecipeNotFoundError(
        f"deepspeed: {given} not found; looked at {places}, and among the {fmt} example "
        f"configs zeroplan knows ({', '.join(shipped_names(fmt)) or 'none'})"
    )


def shipped_names(fmt: str) -> list[str]:
    folder = SHIPPED / fmt
    return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def load(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadRecipeError(f"{path}: not JSON: line {exc.lineno}: {exc.msg}") from None
    except OSError as exc:
        raise RecipeNotFoundError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(cfg, dict):
        raise BadRecipeError(f"{path}: a DeepSpeed config is a JSON object, this is not one")
    return cfg


# what each section of keys looks like, for the error when one is written as something else
_SECTION_EXAMPLES = {
    "zero_optimization": '{"stage": 2}',
    "offload_optimizer": '{"device": "cpu"}',
    "offload_param": '{"device": "cpu"}',
    "optimizer": '{"type": "AdamW", "params": {...}}',
    "bf16": '{"enabled": true}',
    "fp16": '{"enabled": true}',
}


def _section(cfg: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    """``cfg[key]``, a section of keys ({} when absent or null); any other value (a string,
    a number) is refused, naming the key, as DeepSpeed's own config refuses it."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRecipeError(
            f"deepspeed {where}{key}: {value!r} is not a section of keys: write it as "
            f"{key}: {_SECTION_EXAMPLES.get(key, '{...}')}"
        )
    return value


def _enabled(cfg: dict[str, Any], section: str) -> bool | None:
    """True / False as written, None for "auto" or absent (the recipe decides)."""
    value = _section(cfg, section).get("enabled")
    if value is None or value == "auto":
        return None
    return bool(value)


def _number(key: str, value: Any) -> int:
    value = unquoted(value)  # DeepSpeed's pydantic config reads "4" as 4
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRecipeError(f"deepspeed {key}: {value!r} is not a number")
    return int(value)


def resolve(
    cfg: dict[str, Any],
    hidden_size: int,
    micro_batch: int,
    grad_accum: int,
    precision: str,
) -> tuple[dict[str, Any], list[Row], list[str]]:
    """TrainSetup fields from a DeepSpeed config, as the HF Trainer runs it.

    Returns (fields, mapping rows, notes). ``precision`` is the recipe's ("bf16", "fp16",
    or "" when it sets neither).
    """
    zero_cfg = _section(cfg, "zero_optimization")
    rows: list[Row] = []
    notes: list[str] = []
    stage = unquoted(zero_cfg.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise BadRecipeError(f"deepspeed zero_optimization.stage {stage!r}: must be 0-3")
    out: dict[str, Any] = {"zero": stage}
    rows.append(Row("zero_optimization.stage", "zero", stage, SOURCE))

    devices = {
        part: (_section(zero_cfg, f"offload_{part}", "zero_optimization.").get("device") or "none")
        for part in ("optimizer", "param")
    }
    for part, device in devices.items():
        if device not in ("none", "cpu"):
            raise BadRecipeError(
                f"deepspeed offload_{part}.device {device}: zeroplan models CPU offload only"
            )
    if devices["param"] == "cpu" and devices["optimizer"] != "cpu":
        raise BadRecipeError(
            "deepspeed offload_param without offload_optimizer: zeroplan models optimizer "
            "offload, or optimizer and parameters (ZeRO-Infinity) together"
        )
    offload = {
        ("none", "none"): "none",
        ("cpu", "none"): "optimizer",
        ("cpu", "cpu"): "optimizer+params",
    }[(devices["optimizer"], devices["param"])]
    out["offload"] = offload
    rows.append(Row("zero_optimization.offload_*", "offload", offload, SOURCE))

    for setting, (names, ds_default, auto) in _ZERO_KEYS.items():
        name = next((n for n in names if n in zero_cfg), names[0])
        value = zero_cfg.get(name)
        if value == "auto":
            if auto is None or (setting.startswith("stage3") and stage != 3):
                value, source = ds_default, DS_DEFAULT
            else:
                value, source = auto(hidden_size), f"{HF_AUTO} (hidden {hidden_size})"
        elif value is None:
            value, source = ds_default, DS_DEFAULT
        else:
            value, source = _number(name, value), SOURCE
        if setting == "stage3_max_live_elems" and value < 1:
            # 0 releases every gathered layer as soon as it is used: one layer's worth live,
            # which zeroplan's smallest limit (1 element) also means
            notes.append(f"deepspeed {name} {value}: modelled as 1 (one layer live at a time)")
            value = 1
        out[setting] = value
        rows.append(Row(f"zero_optimization.{name}", setting, value, source))

    overlap = zero_cfg.get("overlap_comm")
    if overlap is None or overlap == "auto":
        out["overlap_comm"], source = stage == 3, DS_DEFAULT
    else:
        out["overlap_comm"], source = bool(overlap), SOURCE
    rows.append(Row("zero_optimization.overlap_comm", "overlap_comm", out["overlap_comm"], source))

    bf16, fp16 = _enabled(cfg, "bf16"), _enabled(cfg, "fp16")
    if bf16 and fp16:
        raise BadRecipeError("deepspeed: bf16 and fp16 both enabled")
    if bf16 or fp16:
        written = "bf16" if bf16 else "fp16"
        if precision and precision != written:
            raise BadRecipeError(
                f"deepspeed {written}.enabled true, but the recipe trains in {precision}: "
                "the HF Trainer refuses the mismatch"
            )
        out["precision"] = written
        rows.append(Row(f"{written}.enabled", "precision", written, SOURCE))

    for key, want in (
        ("train_micro_batch_size_per_gpu", micro_batch),
        ("gradient_accumulation_steps", grad_accum),
    ):
        value = cfg.get(key, "auto")
        if value != "auto" and _number(key, value) != want:
            raise BadRecipeError(
                f"deepspeed {key} is {value}, the recipe says {want}: the HF Trainer refuses "
                'the mismatch; write "auto"'
            )
    optimizer = _section(cfg, "optimizer")
    if optimizer:
        kind = str(optimizer.get("type", "")).lower()
        if kind not in ("adam", "adamw", "fusedadam"):
            raise BadRecipeError(
                f"deepspeed optimizer {optimizer.get('type')}: zeroplan models DeepSpeed's Adam "
                "/ AdamW or the trainer's optimizer (drop the optimizer section)"
            )
        out["optim"] = "adamw_torch_fused"
        rows.append(Row("optimizer.type", "optim", "adamw_torch_fused", SOURCE))
        notes.append(
            "the DeepSpeed file's optimizer section replaces the recipe's optimizer: "
            "DeepSpeed's Adam, modelled as fused AdamW"
        )
    return out, rows, notes
