"""A plan written back as a recipe: the user's own file with the plan's values, or a fresh one.

``planned_files`` keeps the user's recipe as it is (keys, order, comments) and replaces
only the values the plan changes: micro-batch and accumulation (their product, the global
batch, is the user's), checkpointing, optimizer, fused loss, the DeepSpeed file (FSDP's keys
commented out beside it), the model when MODEL replaced the recipe's, and lora -> qlora only
when the plan was asked to choose (``--method auto``). ``emit_files`` writes
a fresh recipe for a planned job. Both write the DeepSpeed JSON the recipe points to in the
form the HF Trainer of all three trainers expects: batch and clipping keys "auto" (filled
from the recipe), every size that moves memory concrete (``dsconfig.preset_config``).

Keys are found through the trainer's own table (``Trainer.key_for`` / ``Trainer.edits``),
the same one the reader reads with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zeroplan.dsconfig import dumps, preset_config, quant_storage_dtype
from zeroplan.errors import BadRecipeError
from zeroplan.recipes import TRAINERS
from zeroplan.recipes.common import Recipe, Trainer
from zeroplan.recipes.edit import edit_json, edit_yaml, unified_diff
from zeroplan.trainsetup import TrainSetup

DS_FILE = "ds_config.json"
# FSDP's switches: the HF Trainer (trainer.py) and axolotl (check_fsdp_deepspeed) refuse them
# beside deepspeed, so a plan that writes a DeepSpeed file comments them out
FSDP_KEYS = ("fsdp", "fsdp_config")
# settings the plan may change, compared with the recipe's in this order
PLANNED = (
    "method",
    "micro_batch",
    "grad_accum",
    "grad_ckpt",
    "optim",
    "fused_loss",
    "seq_len",
    "lora_r",
    "lora_targets",
    "lora_dropout",
    "precision",
)
# a fresh recipe's settings, in the order they are written
EMITTED = (
    "model",
    "method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "seq_len",
    "micro_batch",
    "grad_accum",
    "grad_ckpt",
    "optim",
    "precision",
    "attn",
    "fused_loss",
)
EMIT_FORMATS = ("llamafactory", "axolotl", "trl")
# what a fresh recipe needs besides the job, for its trainer to run it: data and output
# placeholders to replace, named so that the trainer's parser accepts them as they are
_EMIT_BASE: dict[str, dict[str, Any]] = {
    "llamafactory": {
        "dataset": "identity",
        "template": "default",
        "learning_rate": 1.0e-4,
        "num_train_epochs": 1.0,
        "output_dir": "saves/zeroplan",
    },
    "axolotl": {
        "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
        "learning_rate": 2.0e-4,
        "num_epochs": 1,
        "output_dir": "./outputs/zeroplan",
    },
    "trl": {
        "dataset_name": "trl-lib/Capybara",
        "output_dir": "zeroplan-sft",
    },
}


def trainer_of(fmt: str) -> Trainer:
    for t in TRAINERS:
        if t.format == fmt:
            return t
    raise BadRecipeError(f"no recipe format {fmt}; one of {', '.join(EMIT_FORMATS)}")


def encode(trainer: Trainer, setting: str, value: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The recipe keys and raw values that say ``setting = value`` in this trainer."""
    if setting in trainer.edits:
        return trainer.edits[setting](value, data)
    key = trainer.key_for(setting, data)  # under the name the recipe uses, if it has one
    assert key.write is not None
    return {key.name: key.write(value)}


def _ds_edits(
    trainer: Trainer, setup: TrainSetup, ds_ref: str, had: bool, data: dict[str, Any]
) -> dict[str, Any]:
    if setup.zero is None:
        return encode(trainer, "deepspeed", None, data) if had else {}
    edits = encode(trainer, "deepspeed", ds_ref, data)
    edits.update({key: None for key in FSDP_KEYS if data.get(key)})
    storage = quant_storage_dtype(setup)
    if storage is not None and trainer.format in ("trl", "hf"):
        # ZeRO-3 shards the 4-bit weights only when they are stored in the 16-bit dtype;
        # LLaMA-Factory and axolotl set that themselves, TRL's ModelConfig takes it as a key
        edits["bnb_4bit_quant_storage"] = storage
    return edits


def plan_edits(recipe: Recipe, setup: TrainSetup, ds_ref: str) -> dict[str, Any]:
    """Recipe key -> new raw value for each setting where the plan's ``setup`` differs."""
    trainer = trainer_of(recipe.format)
    data = recipe.parsed.data if recipe.parsed is not None else {}
    edits: dict[str, Any] = {}
    for name in PLANNED:
        value = getattr(setup, name)
        if name in ("lora_r", "lora_targets", "lora_dropout") and not setup.is_lora:
            continue
        if name == "attn" and not value:
            continue  # unset: the model's default, which the trainer runs too
        if recipe.setup.get(name) != value:
            edits.update(encode(trainer, name, value, data))
    if recipe.model_override is not None:
        # planned for MODEL, not the recipe's model: the written recipe trains MODEL
        edits.update(encode(trainer, "model", recipe.model_override[1], data))
    edits.update(_ds_edits(trainer, setup, ds_ref, recipe.deepspeed is not None, data))
    return edits


def planned_files(recipe: Recipe, setup: TrainSetup, out_dir: Path) -> tuple[dict[str, str], str]:
    """(file name -> text to write into ``out_dir``, unified diff of the recipe)."""
    if recipe.parsed is None:
        raise BadRecipeError("the recipe's text is not at hand to write it back")
    ds_ref = str(out_dir / DS_FILE)
    edits = plan_edits(recipe, setup, ds_ref)
    old = recipe.parsed.text
    new = edit_json(old, edits) if recipe.parsed.syntax == "json" else edit_yaml(old, edits)
    name = recipe.path.name
    files = {name: new}
    if setup.zero is not None:
        files[DS_FILE] = dumps(preset_config(setup))
    return files, unified_diff(old, new, str(recipe.path), str(out_dir / name))


def emit_files(fmt: str, model: str, setup: TrainSetup, out_dir: Path) -> dict[str, str]:
    """A fresh recipe for ``fmt`` (``<fmt>.yaml``) and its DeepSpeed JSON."""
    if fmt not in EMIT_FORMATS:
        raise BadRecipeError(f"--emit {fmt}: one of {', '.join(EMIT_FORMATS)}")
    import yaml

    trainer = trainer_of(fmt)
    data: dict[str, Any] = {}
    values = {name: getattr(setup, name, None) for name in EMITTED}
    values["model"] = model
    values["lora_alpha"] = 2 * setup.lora_r
    for name in EMITTED:
        if name.startswith("lora_") and not setup.is_lora:
            continue
        if name == "attn" and not setup.attn:
            continue  # unset: the model's default, which the trainer runs too
        if name == "method" and setup.method == "full" and fmt == "llamafactory":
            data.update(stage="sft", do_train=True, finetuning_type="full")
            continue
        if name == "method" and fmt == "llamafactory":
            data.update(stage="sft", do_train=True, finetuning_type="lora")
        data.update(
            {k: v for k, v in encode(trainer, name, values[name], data).items() if v is not None}
        )
    if fmt == "axolotl" and setup.method == "full":
        data.pop("adapter", None)
    if fmt == "trl":
        data["dtype"] = "float16" if setup.fp16 else "bfloat16"  # TRL's default is float32
    ds_ref = str(out_dir / DS_FILE)
    data.update(_ds_edits(trainer, setup, ds_ref, False, data))
    data.update(_EMIT_BASE[fmt])
    header = (
        f"# {trainer.label} recipe written by zeroplan plan --emit {fmt}\n"
        "# Replace the dataset and output placeholders; every other value is the plan's.\n"
    )
    files = {f"{fmt}.yaml": header + yaml.safe_dump(data, sort_keys=False, width=1000)}
    if setup.zero is not None:
        files[DS_FILE] = dumps(preset_config(setup))
    return files
