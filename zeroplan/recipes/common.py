"""What every trainer's recipe reader shares: the key table, the parsed file, the mapping.

A trainer module (``llamafactory``, ``axolotl``, ``trl``) holds one ``Trainer``: its keys
(``Key``: recipe key -> zeroplan setting, how a value is read and how the plan's value is
written back), the defaults it applies where a recipe is silent (``Default``, each with the
file of that trainer's source it comes from), and the keys zeroplan reads but does not model,
with why. Reading and writing use the same table, so a key cannot be read under one name and
written under another. Every key the trainer takes is listed in ``data/keys/`` (read from its
released wheel): a key in none of them, a typo, is refused or noted (``check_keys``).

Settings are trainer-neutral names: ``model``, ``method``, ``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_targets``, ``micro_batch``, ``grad_accum``, ``seq_len``,
``grad_ckpt``, ``optim``, ``precision``, ``attn``, ``packing``, ``fused_loss``,
``deepspeed``; a trainer may read raw settings of its own (``quantization_bit``) that its
``derive`` turns into those.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
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


def _number(value: Any) -> bool:
    """An int or a finite float (YAML's .nan and .inf are floats too), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def as_int(key: str, value: Any) -> int:
    if not _number(value) or int(value) != value:
        raise BadRecipeError(f"{key}: {value!r} is not a whole number")
    return int(value)


def as_float(key: str, value: Any) -> float:
    if not _number(value):
        raise BadRecipeError(f"{key}: {value!r} is not a number")
    return float(value)


def unquoted(value: Any, kind: Callable[[str], Any] = int) -> Any:
    """A quoted number as ``kind`` parses it ("2048" with int, "2e-4" with float, as
    argparse's type does), anything else as it is."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return value
    return value


# axolotl (pydantic) and trl sft (argparse, which runs a string default through the
# option's type) turn a quoted number into the number; LLaMA-Factory's
# HfArgumentParser.parse_dict does not (quantization_bit: "4" stays a string there), so its
# keys keep as_int / as_float.
def quoted_int(key: str, value: Any) -> int:
    return as_int(key, unquoted(value))


def quoted_float(key: str, value: Any) -> float:
    return as_float(key, unquoted(value, float))


def optional_quoted_int(key: str, value: Any) -> int | None:
    return None if value is None else quoted_int(key, value)


def at_least_one(read: Reader) -> Reader:
    """``read``, refusing a value below 1 (a batch, an accumulation, a length, a rank) under
    the recipe's key, before it reaches the option it becomes (--micro-batch, ...)."""

    def checked(key: str, value: Any) -> Any:
        out = read(key, value)
        if out is not None and out < 1:
            raise BadRecipeError(f"{key}: {value!r} must be at least 1")
        return out

    return checked


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
    # every top-level key the trainer takes: files of data/keys/ (check_keys), besides known
    key_lists: tuple[str, ...] = ()
    # a key in none of them: refused (None) where the trainer refuses it too, else noted
    # with this reason (a trainer that ignores such keys, or a list that cannot be complete)
    unknown_note: str | None = None

    def key_for(self, setting: str, data: Mapping[str, Any] | None = None) -> Key:
        """The key that feeds ``setting`` and that the plan may write: the one ``data`` (the
        recipe) already uses, else the first (the trainer's current name)."""
        writable = [k for k in self.keys if k.setting == setting and k.write is not None]
        if not writable:
            raise KeyError(f"{self.label} has no writable key for {setting}")
        used = [k for k in writable if data is not None and k.name in data]
        return (used or writable)[0]

    @property
    def known(self) -> frozenset[str]:
        return frozenset(k.name for k in self.keys) | frozenset(self.ignored)

    def accepted(self) -> frozenset[str]:
        """Every top-level key the trainer takes: its lists, and the keys zeroplan reads."""
        lists = (key_list(name) for name in self.key_lists)
        return self.known.union(*lists)


KEY_LISTS = Path(__file__).parent / "data" / "keys"


@functools.cache
def key_list(name: str) -> frozenset[str]:
    """The keys in ``data/keys/<name>`` (one a line, ``#`` comments)."""
    lines = (KEY_LISTS / name).read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def check_keys(data: Mapping[str, Any], trainer: Trainer) -> list[str]:
    """Top-level keys the trainer does not take, with the nearest it does: refused in one
    line where the trainer refuses them, else returned as notes (``unknown_note``). A
    typo would otherwise leave the trainer's default in place without a word."""
    accepted = trainer.accepted()
    unknown = [str(k) for k in data if k not in accepted]
    if not unknown:
        return []
    named = [_with_guess(k, accepted) for k in unknown]
    if trainer.unknown_note is None:
        these = "this key" if len(named) == 1 else "these keys"
        raise BadRecipeError(
            f"{'; '.join(named)}: not {'a key' if len(named) == 1 else 'keys'} of "
            f"{trainer.label}, which refuses the file: correct or remove {these}"
        )
    return [
        f"unknown {'key' if len(named) == 1 else 'keys'} {'; '.join(named)}: {trainer.unknown_note}"
    ]


def _with_guess(key: str, accepted: frozenset[str]) -> str:
    guess = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.75)
    return f"{key} (did you mean {guess[0]}?)" if guess else key


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
            data = _load_yaml(p, raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise BadRecipeError(f"{p}: not YAML: {where}{problem}") from None
        syntax = "yaml"
    if not isinstance(data, dict):
        raise BadRecipeError(f"{p}: a recipe is a mapping of keys to values, this is not one")
    return Parsed(p, raw, data, syntax)


def _load_yaml(path: Path, raw: str) -> Any:
    """``yaml.safe_load``, refusing a top-level key given twice: YAML keeps the last, the
    line editor (``edit.py``) would change the first, and the writer could not say which
    one the trainer runs."""
    import yaml

    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag.endswith(":merge"):
                    continue  # `<<: *anchor` merges, it names no key
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise BadRecipeError(
                        f"{path}: {key.value} is given twice (lines {seen[key.value]} and "
                        f"{line}); YAML keeps the last: delete one"
                    )
                seen[key.value] = line
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def read_keys(
    data: Mapping[str, Any], trainer: Trainer
) -> tuple[dict[str, Any], list[Row], list[tuple[str, str]]]:
    """The trainer's settings from ``data``: each key read through its table entry, every
    setting the recipe leaves out from the trainer's defaults. Returns (settings, rows,
    ignored keys with why)."""
    settings: dict[str, Any] = {}
    rows: list[Row] = []
    for k in trainer.keys:
        # the first key of a setting wins, unless it read as unset (None): then a later one
        # may set it (axolotl's flash_attention: false beside eager_attention: true)
        if k.name in data and settings.get(k.setting) is None:
            value = k.read(k.name, data[k.name])
            if k.setting in settings and value is None:
                continue
            rows = [r for r in rows if r.setting != k.setting]
            settings[k.setting] = value
            rows.append(Row(k.name, k.setting, value, "recipe"))
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
        # a typo'd marker key is the likeliest reason none was found
        markers = sorted(frozenset().union(*(t.markers for t in trainers)))
        anyones = frozenset().union(*(t.accepted() for t in trainers))
        typos = [
            f"{k}: did you mean {near[0]}?"
            for k in map(str, data)
            if k not in anyones
            and (near := difflib.get_close_matches(k, markers, n=1, cutoff=0.75))
        ]
        hint = f" ({'; '.join(typos)})" if typos else ""
        raise BadRecipeError(f"no key of a known recipe format{hint}; looked for {looked}")
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
    # MODEL given beside a recipe that names another model: (the recipe's model, MODEL as
    # the trainer loads it), which the written recipe's model key takes; None: the recipe's
    model_override: tuple[str, str] | None = None

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
