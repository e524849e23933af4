"""Recipes of the trainers people already run, read into a TrainSetup and written back.

``read_recipe(path)`` reads a LLaMA-Factory YAML, an axolotl YAML, a TRL ``trl sft
--config`` file or a JSON of HF TrainingArguments / SFTConfig fields, tells which from its
keys, fills what it leaves out with that trainer's defaults (one table per trainer, in its
module), reads the DeepSpeed JSON it names as the HF Trainer resolves it, and returns a
``Recipe``: the model, TrainSetup fields, and the mapping that explains each value.
``zeroplan.recipes.write`` does the reverse for a plan. Core: no torch, no trainer imports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from zeroplan.errors import BadRecipeError, BadSetupError
from zeroplan.lengths import DataFit, kept_lengths
from zeroplan.models import ModelSpec, load_model
from zeroplan.packing import PaddedBatches, padded_batches, run_micro_batches
from zeroplan.recipes import axolotl, llamafactory, trl
from zeroplan.recipes import deepspeed as ds
from zeroplan.recipes.common import (
    Parsed,
    Recipe,
    Row,
    Trainer,
    check_keys,
    detect,
    parse_file,
    read_keys,
)
from zeroplan.trainsetup import TrainSetup

TRAINERS: tuple[Trainer, ...] = (
    llamafactory.TRAINER,
    axolotl.TRAINER,
    trl.TRAINER,
    trl.HF_TRAINER,
)
FORMATS = tuple(t.format for t in TRAINERS)
MODEL_KEYS = {"llamafactory": "model_name_or_path", "axolotl": "base_model"}
# the TrainSetup fields a recipe sets (besides the DeepSpeed ones)
SETUP_SETTINGS = (
    "method",
    "micro_batch",
    "seq_len",
    "grad_accum",
    "grad_ckpt",
    "lora_r",
    "lora_targets",
    "lora_dropout",
    "optim",
    "attn",
    "fused_loss",
    "precision",
)
# what a full fine-tuning recipe leaves unset: no adapter, so TrainSetup's own (unused)
LORA_SETTINGS = ("lora_r", "lora_targets", "lora_dropout")
_DERIVED_FROM = {
    "llamafactory": {"method": "finetuning_type, quantization_bit", "precision": "bf16, fp16"},
    "axolotl": {"method": "adapter, load_in_4bit", "precision": "bf16, fp16"},
    "trl": {"method": "use_peft, load_in_4bit", "precision": "bf16, fp16"},
    "hf": {"method": "use_peft, load_in_4bit", "precision": "bf16, fp16"},
}


# One-off stalls of a second or more early in a padded run, per trainer ("trl": SFTTrainer,
# from trl sft or an SFTConfig JSON): the least and most seconds in all per run and the last
# step with one, over the runs of benchmarks/results/recipes_gpu_h100*.jsonl (one H100,
# step 1's start aside; fit_padded_speed.py prints them). LLaMA-Factory had none; what
# stalls TRL and axolotl is not separated (axolotl's with its LoRA kernels off too). Not in
# the rate: a run pays them once (not measured past 24 steps).
WARMUP_STALLS = {"trl": (4.8, 7.6, 8), "axolotl": (5.6, 6.3, 11)}


def trainer_for(parsed: Parsed, fmt: str | None) -> Trainer:
    """The trainer of ``fmt`` (``--recipe-format``), else the one detected from the keys."""
    if fmt is not None and fmt != "auto":
        by_format = {t.format: t for t in TRAINERS}
        if fmt not in by_format:
            raise BadRecipeError(f"--recipe-format {fmt}: one of {', '.join(FORMATS)}")
        trainer = by_format[fmt]
    else:
        trainer = detect(parsed.data, parsed.syntax, TRAINERS)
        if parsed.syntax == "json" and trainer.format == "trl":
            # trl sft --config reads YAML; a JSON of its fields is for your own script
            trainer = trl.HF_TRAINER
    if trainer.format == "hf" and trl.SFT_ONLY & parsed.data.keys():
        return trl.SFT_JSON_TRAINER
    return trainer


def read_recipe(
    path: str | Path, fmt: str | None = None, model: str | ModelSpec | None = None
) -> tuple[Recipe, ModelSpec]:
    """The recipe at ``path`` resolved for its model (or ``model``, which overrides it)."""
    parsed = parse_file(path)
    trainer = trainer_for(parsed, fmt)
    unknown = check_keys(parsed.data, trainer)
    settings, rows, ignored = read_keys(parsed.data, trainer)
    given = {r.setting for r in rows if r.source == "recipe"}
    settings["_given"] = given
    if isinstance(model, ModelSpec):
        spec = model
    else:
        name = model or settings.get("model")
        if not name:
            key = MODEL_KEYS.get(trainer.format, "model_name_or_path")
            raise BadRecipeError(
                f"{parsed.path}: no {key}: add it (estimate and plan also take it as MODEL)"
            )
        spec = load_model(str(name))
    override = _model_override(model, settings.get("model"), spec)
    settings, notes = trainer.derive(settings, spec.model_type)
    notes = unknown + notes
    setup: dict[str, Any] = {s: settings[s] for s in SETUP_SETTINGS}
    if setup["method"] == "full":
        # no adapter: the LoRA settings go unused; TrainSetup's own keep the setup whole
        setup.update({s: getattr(TrainSetup, s) for s in LORA_SETTINGS if setup[s] is None})
    rows = [dataclasses.replace(r, value=settings.get(r.setting, r.value)) for r in rows]
    if override is not None:
        rows = [
            Row("", "model", spec.name, f"MODEL (the recipe's: {override[0]})")
            if r.setting == "model"
            else r
            for r in rows
        ]
    derived = _DERIVED_FROM[trainer.format]
    rows[:0] = [Row("", s, settings[s], f"from {derived[s]}") for s in ("method", "precision")]

    deepspeed = None
    given_ds = settings.get("deepspeed")
    if given_ds:
        if isinstance(given_ds, dict):
            found, cfg = "(inline)", given_ds
        else:
            where = ds.find(str(given_ds), parsed.path.parent, trainer.format)
            found, cfg = str(where), ds.load(where)
        fields, ds_rows, ds_notes = ds.resolve(
            cfg, spec.hidden_size, setup["micro_batch"], setup["grad_accum"], setup["precision"]
        )
        setup.update(fields)
        rows += ds_rows
        notes += ds_notes
        deepspeed = {"given": given_ds, "path": found, "config": cfg}
    else:
        setup["zero"], setup["offload"] = None, "none"
    # Unless it packs, each trainer's collator pads a micro-batch to its longest row and
    # passes an attention mask: memory the sdpa path spends on it (--padding-mask), measured
    # on all three trainers (benchmarks/results/recipes_gpu.md)
    setup["padding_mask"] = not settings.get("packing")
    why = "no packing: padded rows + attention mask" if setup["padding_mask"] else "packing"
    rows.append(Row("", "padding_mask", setup["padding_mask"], why))
    if trainer.label.startswith("TRL"):
        # trl sft / SFTTrainer always scores its LM head in chunks (not a recipe key)
        setup["chunked_lm_head"] = True
        rows.append(Row("", "chunked_lm_head", True, f"{trainer.label} SFTTrainer"))
        if setup["method"] == "qlora":
            # SFTTrainer casts a quantized model's LoRA adapters to bf16
            setup["lora_bf16"] = True
            rows.append(Row("", "lora_bf16", True, f"{trainer.label} SFTTrainer (QLoRA)"))
    # how records are written and cut for --data (the lengths a padded loop pads)
    prompt = settings["prompt"]
    rows.append(
        Row("", "prompt", prompt.name if prompt else "chat template", settings["_prompt_why"])
    )
    rows.append(Row("", "overlong", settings["overlong"], settings["_overlong_why"]))
    if "lora_kernels" in settings:
        # axolotl's fused LoRA kernels (not one key: axolotl turns them on itself)
        setup["lora_kernels"] = settings["lora_kernels"]
        why = settings["_lora_kernels_why"]
        rows.append(Row("", "lora_kernels", setup["lora_kernels"], why))
    return (
        Recipe(
            path=parsed.path,
            format=trainer.format,
            trainer=trainer.label,
            model=spec.name,
            setup=setup,
            rows=tuple(rows),
            ignored=tuple(ignored),
            notes=tuple(notes),
            packing=bool(settings.get("packing")),
            deepspeed=deepspeed,
            pad_multiple=8 if trainer.format == "llamafactory" else 1,
            prompt=prompt,
            overlong=settings["overlong"],
            epochs=float(settings["epochs"]),
            max_steps=settings["max_steps"],
            parsed=parsed,
            model_override=override,
        ),
        spec,
    )


def _model_override(
    model: str | ModelSpec | None, named: Any, spec: ModelSpec
) -> tuple[str, str] | None:
    """(the recipe's model, MODEL as its trainer loads it: a local folder or the Hub id) when
    MODEL names another model than the recipe; None when the recipe's model is the job's."""
    if model is None or not named:
        return None
    given = model.name if isinstance(model, ModelSpec) else str(model)
    # Hub ids are case-insensitive
    if str(named).lower() in {n.lower() for n in (given, spec.name, spec.local_path) if n}:
        return None
    path = Path(str(named)).expanduser()
    if spec.local_path is not None and path.exists() and str(path.resolve()) == spec.local_path:
        return None  # the same folder, named another way
    return str(named), spec.local_path or spec.name


def padded_loop(
    recipe: Recipe, fit: DataFit, micro_batch: int, grad_accum: int, ranks: int
) -> PaddedBatches:
    """The micro-batches a recipe that does not pack builds from the data: its kept records
    padded to each micro-batch's longest (rounded to the trainer's multiple), with the share
    of new shapes taken over the recipe's whole run (its epochs or max_steps), not one epoch."""
    lengths = kept_lengths(fit.profile, fit.cap, fit.overlong)
    run = run_micro_batches(
        len(lengths), micro_batch, grad_accum, ranks, recipe.epochs, recipe.max_steps
    )
    return padded_batches(lengths, micro_batch, recipe.pad_multiple, run)


def run_notes(
    recipe: Recipe, fit: DataFit | None, padded: PaddedBatches | None, seq_len: int
) -> list[str]:
    """What the estimate of a recipe says about its speed beside the numbers: how a padded
    loop's tokens are counted, over which run the new shapes are priced, and the trainer's
    warm-up stalls, which the rate leaves out."""
    notes: list[str] = []
    if not recipe.setup.get("padding_mask"):
        return notes
    if fit is None:
        notes.append(
            f"{recipe.trainer} pads each micro-batch to its longest record: tokens/s counts "
            f"every position of {seq_len:,}-token rows; --data FILE counts real tokens at the "
            "data's padded lengths"
        )
    elif padded is not None:
        run = (
            f"max_steps {recipe.max_steps}"
            if recipe.max_steps is not None and recipe.max_steps > 0
            else f"{recipe.epochs:g} epochs"
        )
        notes.append(
            f"new padded shapes priced over the recipe's run ({run}: {padded.micro_batches:,} "
            f"micro-batches per GPU, {padded.shapes:,.0f} shapes)"
        )
    # TRL's loop is SFTTrainer's (its chunked head), whether from trl sft or an SFTConfig JSON
    stalls = WARMUP_STALLS.get("trl" if recipe.setup.get("chunked_lm_head") else recipe.format)
    if stalls is not None:
        low, high, last = stalls
        notes.append(
            f"{recipe.trainer}'s first steps (up to step {last} measured) include a one-off "
            f"warm-up of {low:g}-{high:g} s of stalls, not in the rate: steady steps are quoted"
        )
    return notes


def check_bf16(recipe: Recipe, gpu_bf16: bool, gpu_name: str) -> None:
    """A recipe that trains in bf16, refused on a card without bf16 in the recipe's own
    words: the key that asks for it (``bf16: true``, the DeepSpeed config's
    ``bf16.enabled``), or its trainer's default where it writes neither. The same refusal
    as trainsetup.resolve_precision's, whose "--precision bf16" a recipe user did not type;
    callers skip it where --precision replaced the recipe's precision."""
    if gpu_bf16 or recipe.setup.get("precision") != "bf16":
        return
    said: list[str] = []
    fixes: list[str] = []
    for row in recipe.rows:
        if row.key == "bf16.enabled":  # zeroplan.recipes.deepspeed's row
            given = recipe.deepspeed["path"] if recipe.deepspeed else "(inline)"
            config = "its inline DeepSpeed config" if given == "(inline)" else Path(given).name
            said.append(f"bf16.enabled in {config}")
            fixes.append(f"fp16.enabled in place of bf16.enabled in {config}")
        elif row.setting == "bf16" and row.value is True and row.key:
            said.append(f"{_true(recipe, row.key)} in {recipe.path.name}")
            fixes.append(f"{_true(recipe, 'fp16')} in place of {_true(recipe, row.key)}")
        elif row.setting == "bf16" and row.value is True:
            trainer = row.source.removeprefix("default of ")
            said.append(f"{recipe.path.name} sets no bf16, and {trainer} trains in bf16 by default")
            fixes.append(f"{_true(recipe, 'fp16')} in {recipe.path.name}")
    where = " and ".join(said) or f"{recipe.path.name} trains in bf16"
    fix = " and ".join(fixes) or f"{_true(recipe, 'fp16')} in it"
    raise BadSetupError(
        f"{where}: {gpu_name} has no bf16; train in fp16 ({fix}), or pass --precision fp16"
    )


def _true(recipe: Recipe, key: str) -> str:
    """``key`` set true as the recipe's syntax writes it."""
    return f'"{key}": true' if recipe.path.suffix == ".json" else f"{key}: true"


__all__ = [
    "FORMATS",
    "TRAINERS",
    "WARMUP_STALLS",
    "Recipe",
    "check_bf16",
    "padded_loop",
    "read_recipe",
    "run_notes",
]
