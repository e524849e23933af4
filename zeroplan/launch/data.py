"""Training records → token ids and labels, rendered with the tokenizer's chat template.

Formats, detected from the first record's fields in this order (or named with ``fmt``):

============  ==========================================  =====================================
format        fields                                      rendered as
============  ==========================================  =====================================
``messages``  ``messages``: [{role, content}] (OpenAI)     the conversation as it is
``sharegpt``  ``conversations``: [{from, value}]           human/user → user, gpt → assistant
``alpaca``    ``instruction``, ``output`` (+ ``input``)   user: instruction + "\\n\\n" + input;
                                                          assistant: output
``text``      ``text``                                    plain text + EOS, every token trained
============  ==========================================  =====================================

A record that lacks its format's fields is an error naming the record and the fields it has:
never a silent fallback to another field (the QLoRA story's
``dataset_text_field="instruction"`` trained on the questions only).

Chat formats (all but ``text``) are rendered with ``tokenizer.apply_chat_template``, the
same call inference makes with ``add_generation_prompt=True``, and the labels are -100
everywhere except on the assistant's tokens (its content and the end-of-turn tokens the
template writes after it, so the model learns to stop). The assistant spans come from the
template's ``{% generation %}`` markers when it has them (transformers'
``return_assistant_tokens_mask``), otherwise from rendering the conversation up to each
assistant turn: the text of ``messages[:i]`` with the generation prompt is where turn ``i``
starts, the text of ``messages[:i + 1]`` where it ends. A template that renders earlier
turns differently once later turns follow (it breaks that prefix rule) is refused rather
than masked approximately. The full text is tokenized once; a token is labelled when its
characters overlap an assistant span.

Over-long samples (more than ``max_seq_len`` tokens) are dropped and counted by default;
``overlong="truncate"`` keeps their first ``max_seq_len`` tokens instead (a sample left with
no assistant token is then dropped and counted). The counts are in ``DataSummary``.

Light module: no torch import; ``datasets`` and ``pyarrow`` are imported only for Hub data
sets and parquet files.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zeroplan.errors import BadDataError, ChatTemplateError, DataNotFoundError

FORMATS = ("messages", "sharegpt", "alpaca", "text")
OVERLONG = ("drop", "truncate")
IGNORE_INDEX = -100  # what transformers' causal-LM loss skips
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")

# What each format needs, for the error messages.
_NEEDED = {
    "messages": "'messages' (a list of {role, content})",
    "sharegpt": "'conversations' (a list of {from, value})",
    "alpaca": "'instruction' and 'output' (and optionally 'input')",
    "text": "'text'",
}
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]}


@dataclass(frozen=True)
class DataSummary:
    """What became of the records: the counts ``zeroplan launch`` reports and applied.json keeps."""

    source: str
    format: str
    records: int
    train_examples: int
    eval_examples: int
    max_seq_len: int
    overlong: str  # "drop" | "truncate"
    dropped_too_long: int  # over max_seq_len, dropped (overlong="drop")
    truncated: int  # over max_seq_len, cut to max_seq_len (overlong="truncate")
    dropped_no_target: int  # no assistant token left to learn from (after truncation)
    longest_tokens: int  # the longest rendered record, before dropping or truncating
    train_tokens: int  # tokens of the training examples
    train_target_tokens: int  # of which labelled (the loss is taken on these)
    mask_method: str  # "generation-markers" | "prefix-render" | "all-tokens"
    system_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    eval: list[Example]
    summary: DataSummary
    # the conversation of each training example, for tests and --dry-run style checks
    messages: list[list[dict[str, str]]] = field(default_factory=list, repr=False)


# --------------------------------------------------------------------------- reading


def data_exists(source: str) -> bool:
    """True when ``source`` is a local file; Hub ids are only checked by ``read_records``."""
    return Path(source).expanduser().is_file()


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` or ``name``, not a path with a data-file suffix or a leading ./ or /."""
    if source.startswith((".", "/", "~")) or source.lower().endswith(FILE_SUFFIXES):
        return False
    return _HUB_ID.fullmatch(source) is not None


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """The records of a local .json / .jsonl / .parquet file, or of a ``datasets`` Hub id.

    JSON files hold a list of records or ``{"data": [...]}``; JSON Lines one record a line.
    A Hub id is tried only when no such file exists (``datasets.load_dataset(id, split)``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataNotFoundError(
            f"{source} is a folder: give a .json, .jsonl or .parquet file, or a Hub data set id"
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        raise BadDataError(
            f"{source}: unknown data file type '{suffix}'; use .json, .jsonl or .parquet"
        )
    if not looks_like_hub_id(source):
        raise DataNotFoundError(f"no data file {source}")
    return _read_hub(source, split)


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadDataError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BadDataError(f"{path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise BadDataError(f'{path}: expected a list of records or {{"data": [...]}}')
    return _check_dicts(data, str(path))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[Any] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BadDataError(f"{path}: line {lineno} is not JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadDataError(f"{path}: cannot read it ({exc})") from None
    return _check_dicts(records, str(path))


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise BadDataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    return _check_dicts(rows, str(path))


def _read_hub(source: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataNotFoundError(
            f"no data file {source}, and loading it as a Hub data set needs the datasets package"
        ) from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # offline, unknown id, gated, no such split: all one answer
        raise DataNotFoundError(
            f"no data file {source}, and the Hub data set '{source}' (split {split}) could not "
            f"be loaded: {_first_line(exc)}"
        ) from None
    return _check_dicts(list(ds), source)


def _check_dicts(records: list[Any], source: str) -> list[dict[str, Any]]:
    if not records:
        raise BadDataError(f"{source} holds no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BadDataError(f"record {i} of {source} is a {type(rec).__name__}, not an object")
    return records


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- formats


def detect_format(record: dict[str, Any]) -> str:
    """The format of a record from its fields (see the module docstring for the order)."""
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys or "output" in keys:
        if {"instruction", "output"} <= keys:
            return "alpaca"
        raise BadDataError(
            f"record 0 looks like alpaca but has fields {_fields(record)}: alpaca records need "
            f"{_NEEDED['alpaca']}; the output is what the model learns"
        )
    if "text" in keys:
        return "text"
    raise BadDataError(
        f"record 0 has fields {_fields(record)}: zeroplan reads alpaca (instruction, input, output), "
        "chat (messages), ShareGPT (conversations) or plain text (text) records"
    )


def to_messages(
    record: dict[str, Any], fmt: str, index: int, system: str | None = None
) -> list[dict[str, str]]:
    """A chat record as OpenAI-style messages; ``system`` is added when the record has none."""
    if fmt == "alpaca":
        instruction, output = record.get("instruction"), record.get("output")
        extra = record.get("input")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise _missing(record, fmt, index)
        if extra is not None and not isinstance(extra, str):
            raise BadDataError(f"record {index}: 'input' must be text, got {type(extra).__name__}")
        user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        own_system = record.get("system")
    elif fmt == "messages":
        raw = record.get("messages")
        if not isinstance(raw, list) or not raw:
            raise _missing(record, fmt, index)
        messages = [_message(m, index, j, "role", "content", None) for j, m in enumerate(raw)]
        own_system = None
    elif fmt == "sharegpt":
        raw = record.get("conversations")
        if not isinstance(raw, list) or not raw:
            raise _missing(record, fmt, index)
        messages = [
            _message(m, index, j, "from", "value", _SHAREGPT_ROLES) for j, m in enumerate(raw)
        ]
        own_system = record.get("system")
    else:
        raise BadDataError(f"record {index}: format {fmt} has no messages")
    if isinstance(own_system, str) and own_system.strip():
        system = own_system
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadDataError(
            f"record {index} has no assistant message: nothing to learn (roles: "
            f"{', '.join(m['role'] for m in messages)})"
        )
    return messages


def _message(
    m: Any, index: int, j: int, role_key: str, content_key: str, roles: dict[str, str] | None
) -> dict[str, str]:
    if not isinstance(m, dict) or role_key not in m or content_key not in m:
        found = _fields(m) if isinstance(m, dict) else type(m).__name__
        raise BadDataError(
            f"record {index}, message {j}: needs '{role_key}' and '{content_key}', has {found}"
        )
    role, content = m[role_key], m[content_key]
    allowed = tuple(roles) if roles is not None else _ROLES
    if role not in allowed:
        raise BadDataError(
            f"record {index}, message {j}: role '{role}' is not one of {', '.join(allowed)}"
        )
    if not isinstance(content, str):
        raise BadDataError(
            f"record {index}, message {j}: content must be text, got {type(content).__name__}"
        )
    return {"role": roles[role] if roles is not None else role, "content": content}


def _missing(record: dict[str, Any], fmt: str, index: int) -> BadDataError:
    return BadDataError(
        f"record {index}: {fmt} records need {_NEEDED[fmt]}; this one has {_fields(record)}"
    )


def _fields(record: dict[str, Any]) -> str:
    return "[" + ", ".join(sorted(map(str, record))) + "]" if record else "no fields"


# --------------------------------------------------------------------------- tokens


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and _GENERATION_TAG.search(template or "") is not None


def check_chat_template(tokenizer: Any, what: str = "chat records") -> str:
    """The tokenizer's chat template; a ChatTemplateError if it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is trained
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ChatTemplateError(
            f"{name} has no chat template, and {what} are rendered with one: use the tokenizer of "
            "an instruct model, pass --chat-template FILE.jinja, or give plain text records"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            "the loss mask needs a fast tokenizer (character offsets); this one is a slow one"
        )
    return str(template)


def encode_messages(
    tokenizer: Any, messages: list[dict[str, str]], index: int = 0
) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, mask method) of one conversation; labels -100 off the assistant."""
    template = check_chat_template(tokenizer)
    try:
        if has_generation_markers(template):
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = list(out["input_ids"])
            mask = list(out["assistant_masks"])
            method = "generation-markers"
        else:
            ids, mask = _prefix_render_mask(tokenizer, messages, index)
            method = "prefix-render"
    except (BadDataError, ChatTemplateError):
        raise
    except Exception as exc:  # jinja2's TemplateError (e.g. "roles must alternate") and kin
        raise BadDataError(
            f"record {index}: the chat template refused it: {_first_line(exc)}"
        ) from None
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return ids, labels, method


def _prefix_render_mask(
    tokenizer: Any, messages: list[dict[str, str]], index: int
) -> tuple[list[int], list[int]]:
    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(messages[:i], True) if i else ""
        end_text = render(messages[: i + 1], False)
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise ChatTemplateError(
                f"record {index}: the chat template renders earlier turns differently once later "
                "turns follow, so the assistant's tokens cannot be found exactly; use a template "
                "with {% generation %} markers (--chat-template)"
            )
        # whitespace the template writes between turns (after the end-of-turn token) is
        # layout, not something the assistant says: Jinja's trim_blocks drops it from the
        # {% generation %} spans too
        spans.append((len(start_text), max(len(start_text), len(end_text.rstrip()))))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [
        int(any(s < b and e > a for a, b in spans) if e > s else _inside(s, spans))
        for s, e in enc["offset_mapping"]
    ]
    return ids, mask


def _inside(pos: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(a <= pos < b for a, b in spans)


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Plain text: the tokenizer's own special tokens, then EOS; every token is trained."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(int(eos))
    return ids, list(ids)


# --------------------------------------------------------------------------- all together


def prepare(
    source: str,
    tokenizer: Any,
    max_seq_len: int,
    fmt: str = "auto",
    system: str | None = None,
    overlong: str = "drop",
    eval_fraction: float = 0.0,
    seed: int = 42,
    split: str = "train",
    records: list[dict[str, Any]] | None = None,
) -> PreparedData:
    """Read, render, mask, filter and split; every rank that calls this gets the same result."""
    if fmt != "auto" and fmt not in FORMATS:
        raise BadDataError(f"--format must be auto or one of {', '.join(FORMATS)}; got '{fmt}'")
    if overlong not in OVERLONG:
        raise BadDataError(f"--overlong must be one of {', '.join(OVERLONG)}; got '{overlong}'")
    if max_seq_len < 1:
        raise BadDataError(f"max sequence length must be at least 1, got {max_seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise BadDataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if records is None:
        records = read_records(source, split)
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    if fmt != "text":
        check_chat_template(tokenizer, f"{fmt} records")

    examples: list[Example] = []
    kept_messages: list[list[dict[str, str]]] = []
    too_long = truncated = no_target = longest = 0
    method = "all-tokens"
    for i, rec in enumerate(records):
        msgs: list[dict[str, str]] = []
        if fmt == "text":
            text = rec.get("text")
            if not isinstance(text, str):
                raise _missing(rec, fmt, i)
            ids, labels = encode_text(tokenizer, text)
        else:
            msgs = to_messages(rec, fmt, i, system)
            ids, labels, method = encode_messages(tokenizer, msgs, i)
        longest = max(longest, len(ids))
        if len(ids) > max_seq_len:
            if overlong == "drop":
                too_long += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        if all(t == IGNORE_INDEX for t in labels):
            no_target += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
        kept_messages.append(msgs)

    if not examples:
        raise BadDataError(
            f"no record of {source} is left to train on: {too_long} longer than {max_seq_len} "
            f"tokens (dropped), {no_target} without an assistant token; raise the plan's "
            "--seq-len or use --overlong truncate"
        )
    order = list(range(len(examples)))
    n_eval = 0
    if eval_fraction > 0:
        n_eval = max(1, round(len(examples) * eval_fraction))
        if n_eval >= len(examples):
            raise BadDataError(
                f"--eval-fraction {eval_fraction} of {len(examples)} examples leaves none to train on"
            )
        random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    train = [examples[i] for i in train_idx]
    summary = DataSummary(
        source=source,
        format=fmt,
        records=len(records),
        train_examples=len(train),
        eval_examples=n_eval,
        max_seq_len=max_seq_len,
        overlong=overlong,
        dropped_too_long=too_long,
        truncated=truncated,
        dropped_no_target=no_target,
        longest_tokens=longest,
        train_tokens=sum(len(e["input_ids"]) for e in train),
        train_target_tokens=sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in train),
        mask_method=method,
        system_prompt=system if fmt != "text" else None,
    )
    return PreparedData(
        train=train,
        eval=[examples[i] for i in eval_idx],
        summary=summary,
        messages=[kept_messages[i] for i in train_idx],
    )
