"""What every trainer's recipe reader shares: the key table, the parsed file, the mapping.

A trainer module (``llamafactory``, ``axolotl``, ``trl``) holds one ``Trainer``: its keys
(``Key``: recipe key -> zeroplan setting, how a value is read and how the plan's value is
written back), the defaults it applies where a recipe is silent (``Default``, each with the
file of that trainer's source it comes from), and the keys zeroplan reads but does not model,
with why. Reading and writing use the same table, so a key cannot be read under one name and
written under another.

Settings are trainer-neutral names: ``model``, ``method``, ``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_targets``, ``micro_batch``, ``grad_accum``, ``seq_len``,
``grad_ckpt``, ``optim``, ``precision``, ``attn``, ``packing``, ``fused_loss``,
``deepspeed``; a trainer may read raw settings of its own (``quantization_bit``) that its
``derive`` turns into those.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zeroplan.errors import BadRecipeError, RecipeNotFoundError
from zeroplan.prompts import PromptFormat
from zeroplan.trainsetup import ALL_LINEAR, OPTIM_ALIASES, OPTIMIZERS

# what a recipe key's value is turned into: (key, raw value) -> setting value
Reader = Callable[[str, Any], Any]
# and the plan's value back into the recipe's: setting value -> raw value
Writer = Callable[[Any], Any]


def same(key: str, value: Any) -> Any:
    return value


def as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise BadRecipeError(f"{key}: {value!r} is not a whole number")
    return int(value)


def as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecipeError(f"{key}: {value!r} is not a number")
    return float(value)


def as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise BadRecipeError(f"{key}: {value!r} is not true or false")


def negated(key: str, value: Any) -> bool:
    return not as_bool(key, value)


def optional_bool(key: str, value: Any) -> bool | None:
    return None if value is None else as_bool(key, value)


def as_optim(key: str, value: Any) -> str:
    """An HF Trainer optimizer name zeroplan models (trainsetup.OPTIMIZERS and aliases)."""
    name = str(value)
    known = OPTIMIZERS + tuple(OPTIM_ALIASES)
    if name not in known:
        raise BadRecipeError(
            f"{key}: {name} is an optimizer zeroplan does not model; supported: {', '.join(known)}"
        )
    return OPTIM_ALIASES.get(name, name)


def as_targets(key: str, value: Any) -> tuple[str, ...] | None:
    """A module list (YAML list or comma string); 'all' / 'all-linear' -> all-linear."""
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    names = tuple(str(t).strip() for t in items if str(t).strip())
    if not names:
        raise BadRecipeError(f"{key} is empty: name modules such as q_proj,v_proj or all-linear")
    if names in (("all",), ("all-linear",), ("all_linear",)):
        return (ALL_LINEAR,)
    return names


def as_peft_targets(key: str, value: Any) -> tuple[str, ...] | None:
    """PEFT's ``target_modules`` as axolotl and TRL hand it over: a list of module names, or
    ``all-linear``; any other string PEFT matches as a regular expression against whole
    module paths (peft/tuners/tuners_utils.py, re.fullmatch), so "q_proj,v_proj" matches
    nothing: refused, as zeroplan does not model a pattern."""
    if isinstance(value, str) and value.strip() != ALL_LINEAR:
        raise BadRecipeError(
            f"{key}: {value!r} is a string, which PEFT matches as a regular expression "
            "against whole module paths; zeroplan does not model that: write a list of "
            "module names, or all-linear"
        )
    return as_targets(key, value)


def text(key: str, value: Any) -> str:
    return str(value)


def optional_int(key: str, value: Any) -> int | None:
    return None if value is None else as_int(key, value)


def precision_edits(precision: str, data: Any) -> dict[str, Any]:
    """The keys that make ``precision``: all three trainers (and TrainingArguments) name
    mixed precision by the two flags bf16 and fp16."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


@dataclass(frozen=True)
class Key:
    """One key of a recipe: the setting it feeds, how it is read, and (if the plan may change
    it) how the plan's value is written back."""

    name: str
    setting: str
    read: Reader = same
    write: Writer | None = None


@dataclass(frozen=True)
class Default:
    """What a trainer runs when its recipe leaves a setting out, and where that is decided."""

    value: Any
    source: str


@dataclass(frozen=True)
class Trainer:
    """One recipe format: its keys, defaults and ignored keys, and the function that turns
    its raw settings into zeroplan's (``derive``: settings, model type -> settings, notes)."""

    format: str
    label: str  # "LLaMA-Factory 0.9.5"
    keys: tuple[Key, ...]
    defaults: Mapping[str, Default]
    ignored: Mapping[str, str]  # key -> why zeroplan does not model it
    # keys only this format has: how detect() tells it from the others
    markers: frozenset[str]
    derive: Callable[[dict[str, Any], str], tuple[dict[str, Any], list[str]]]
    # settings that are written as more than one key (method: quantization keys; axolotl's
    # fused loss: its plugin list): setting -> (plan's value, recipe data) -> {key: raw value}
    edits: Mapping[str, Callable[[Any, Mapping[str, Any]], dict[str, Any]]] = field(
        default_factory=dict
    )

    def key_for(self, setting: str) -> Key:
        """The (first) key that feeds ``setting`` and that the plan may write."""
        for k in self.keys:
            if k.setting == setting and k.write is not None:
                return k
        raise KeyError(f"{self.label} has no writable key for {setting}")

    @property
    def known(self) -> frozenset[str]:
        return frozenset(k.name for k in self.keys) | frozenset(self.ignored)


@dataclass(frozen=True)
class Row:
    """One line of the mapping: recipe key (or '' for a default) -> setting = value, and
    where the value comes from ("recipe", "default of LLaMA-Factory 0.9.5", ...)."""

    key: str
    setting: str
    value: Any
    source: str

    def to_json(self) -> dict[str, Any]:
        value = ",".join(self.value) if isinstance(self.value, tuple) else self.value
        return {"key": self.key, "setting": self.setting, "value": value, "source": self.source}


@dataclass(frozen=True)
class Parsed:
    """A recipe file as read: its text, its top-level mapping, YAML or JSON."""

    path: Path
    text: str
    data: dict[str, Any]
    syntax: str  # "yaml" or "json"


def parse_file(path: str | Path) -> Parsed:
    """Read a YAML or JSON recipe; a file that does not parse is refused with its line."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeNotFoundError(f"--recipe {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRecipeError(f"--recipe {p}: cannot read it ({exc})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadRecipeError(f"{p}: not JSON: line {exc.lineno}: {exc.msg}") from None
        syntax = "json"
    else:
        import yaml

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise BadRecipeError(f"{p}: not YAML: {where}{problem}") from None
        syntax = "yaml"
    if not isinstance(data, dict):
        raise BadRecipeError(f"{p}: a recipe is a mapping of keys to values, this is not one")
    return Parsed(p, raw, data, syntax)


def read_keys(
    data: Mapping[str, Any], trainer: Trainer
) -> tuple[dict[str, Any], list[Row], list[tuple[str, str]]]:
    """The trainer's settings from ``data``: each key read through its table entry, every
    setting the recipe leaves out from the trainer's defaults. Returns (settings, rows,
    ignored keys with why)."""
    settings: dict[str, Any] = {}
    rows: list[Row] = []
    for k in trainer.keys:
        if k.name in data and k.setting not in settings:
            settings[k.setting] = k.read(k.name, data[k.name])
            rows.append(Row(k.name, k.setting, settings[k.setting], "recipe"))
    for setting, default in trainer.defaults.items():
        if setting not in settings:
            settings[setting] = default.value
            rows.append(Row("", setting, default.value, f"default of {trainer.label}"))
    ignored = [(key, why) for key, why in trainer.ignored.items() if key in data]
    return settings, rows, ignored


def detect(data: Mapping[str, Any], syntax: str, trainers: tuple[Trainer, ...]) -> Trainer:
    """The trainer whose own keys the recipe uses most; a JSON of TrainingArguments fields
    with no trainer's own keys is the ``hf`` format."""
    scores = {t.format: len(t.markers & data.keys()) for t in trainers}
    best = max(scores.values())
    top = [t for t in trainers if scores[t.format] == best]
    if best == 0:
        by_format = {t.format: t for t in trainers}
        hf = by_format.get("hf")
        if hf is not None and syntax == "json" and hf.known & data.keys():
            return hf
        looked = "; ".join(
            f"{t.label} ({', '.join(sorted(t.markers)[:4])}, ...)"
            if t.markers
            else f"{t.label} (a .json of its fields)"
            for t in trainers
        )
        raise BadRecipeError(f"no key of a known recipe format; looked for {looked}")
    if len(top) > 1:
        names = ", ".join(t.format for t in top)
        raise BadRecipeError(
            f"the recipe's keys fit {names} alike: give --recipe-format to say which"
        )
    return top[0]


@dataclass(frozen=True)
class Recipe:
    """A recipe read and resolved: the model, the TrainSetup fields, and how each came out."""

    path: Path
    format: str
    trainer: str  # label, with version
    model: str
    setup: dict[str, Any]  # TrainSetup keyword arguments
    rows: tuple[Row, ...]
    ignored: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()
    packing: bool = False
    deepspeed: dict[str, Any] | None = None  # {"given", "path", "config"} as found
    # without packing, the collator pads each micro-batch to its longest row rounded up to
    # this (LLaMA-Factory's SFT collator: 8; TRL's and axolotl's: 1)
    pad_multiple: int = 1
    # how the trainer writes a record before tokenizing it, where not the chat template
    # (zeroplan.prompts; None: the tokenizer's chat template, or plain text + EOS)
    prompt: PromptFormat | None = None
    # what the trainer does with a record longer than the sequence length: drop | truncate
    overlong: str = "drop"
    # how long the run is, for the share of micro-batches of a new padded shape: its epochs,
    # or its optimizer steps when max_steps > 0 (which then wins, as in the HF Trainer)
    epochs: float = 1.0
    max_steps: int | None = None
    parsed: Parsed | None = field(default=None, repr=False, compare=False)

    @property
    def global_batch_per_gpu(self) -> int:
        """Sequences per optimizer step on one GPU: micro-batch × accumulation."""
        return int(self.setup["micro_batch"]) * int(self.setup["grad_accum"])

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "trainer": self.trainer,
            "model": self.model,
            "packing": self.packing,
            "prompt": self.prompt.name if self.prompt is not None else None,
            "overlong": self.overlong,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "mapping": [r.to_json() for r in self.rows],
            "ignored": [{"key": k, "why": w} for k, w in self.ignored],
            "deepspeed": None
            if self.deepspeed is None
            else {"given": self.deepspeed["given"], "path": self.deepspeed["path"]},
            "notes": list(self.notes),
        }
