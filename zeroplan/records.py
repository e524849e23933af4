"""Training records: reading them (JSON, JSON Lines, parquet, a Hub data set) and their formats.

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
``dataset_text_field="instruction"`` trained on the questions only). Messages number records
(and a record's turns) from 1, as editors number lines: record N of a JSON Lines file
without blank lines is its line N (callers pass ``index`` so numbered).

Light module (core): no torch or transformers; ``datasets`` and ``pyarrow`` are imported only
for Hub data sets and parquet files. The plan (``zeroplan.lengths``) and the training side
(``zeroplan.launch.data``) read and convert records with these same functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zeroplan.errors import BadDataError, DataNotFoundError

FORMATS = ("messages", "sharegpt", "alpaca", "text")
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")

# What each format needs, for the error messages.
_NEEDED = {
    "messages": "'messages' (a list of {role, content})",
    "sharegpt": "'conversations' (a list of {from, value})",
    "alpaca": "'instruction' and 'output' (and optionally 'input')",
    "text": "'text'",
}
# the fields each needs, and what each must hold: text, or a non-empty list of turns
_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
_LISTS = ("messages", "conversations")
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# --------------------------------------------------------------------------- reading


def data_exists(source: str) -> bool:
    """True when ``source`` is a local file; Hub ids are only checked by ``read_records``."""
    return Path(source).expanduser().is_file()


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` or ``name``, not a path with a data-file suffix or a leading ./ or /."""
    if source.startswith((".", "/", "~")) or source.lower().endswith(FILE_SUFFIXES):
        return False
    return _HUB_ID.fullmatch(source) is not None


def check_file_type(source: str) -> str:
    """The suffix of a local data file, when it is one ``read_records`` reads; else a
    BadDataError (also where a cache would answer without reading the file)."""
    suffix = Path(source).expanduser().suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise BadDataError(
            f"{source}: unknown data file type '{suffix}'; use .json, .jsonl or .parquet"
        )
    return suffix


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
        suffix = check_file_type(source)
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        return _read_parquet(path)
    if not looks_like_hub_id(source):
        raise DataNotFoundError(f"no data file {source}")
    return _read_hub(source, split)


# utf-8-sig: UTF-8 with or without the byte-order mark that Windows editors (Notepad,
# PowerShell's Out-File) write at the start; json.loads refuses the mark itself
_ENCODING = "utf-8-sig"


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding=_ENCODING))
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
        with path.open(encoding=_ENCODING) as fh:
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
        raise BadDataError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
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
            f"be loaded: {first_line(exc)}"
        ) from None
    return _check_dicts(list(ds), source)


def _check_dicts(records: list[Any], source: str) -> list[dict[str, Any]]:
    if not records:
        raise BadDataError(f"{source} holds no records")
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise BadDataError(f"record {i} of {source} is a {type(rec).__name__}, not an object")
    return records


def first_line(exc: BaseException) -> str:
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
            f"record 1 looks like alpaca but has fields {fields_of(record)}: alpaca records need "
            f"{_NEEDED['alpaca']}; the output is what the model learns"
        )
    if "text" in keys:
        return "text"
    raise BadDataError(
        f"record 1 has fields {fields_of(record)}: zeroplan reads alpaca (instruction, input, output), "
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
            raise missingfields_of(record, fmt, index)
        if extra is not None and not isinstance(extra, str):
            raise BadDataError(f"record {index}: 'input' must be text, got {type(extra).__name__}")
        user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        own_system = record.get("system")
    elif fmt == "messages":
        raw = record.get("messages")
        if not isinstance(raw, list) or not raw:
            raise missingfields_of(record, fmt, index)
        messages = [_message(m, index, j, "role", "content", None) for j, m in enumerate(raw, 1)]
        own_system = None
    elif fmt == "sharegpt":
        raw = record.get("conversations")
        if not isinstance(raw, list) or not raw:
            raise missingfields_of(record, fmt, index)
        messages = [
            _message(m, index, j, "from", "value", _SHAREGPT_ROLES) for j, m in enumerate(raw, 1)
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
        found = fields_of(m) if isinstance(m, dict) else type(m).__name__
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


def missingfields_of(record: dict[str, Any], fmt: str, index: int) -> BadDataError:
    """The error for a record without what ``fmt`` needs: the fields it lacks, or, where it
    has them all, the one whose value is unusable (null, an empty list...)."""
    if all(key in record for key in _FIELDS[fmt]):
        for key in _FIELDS[fmt]:
            wrong = _unusable(key, record[key])
            if wrong is not None:
                return BadDataError(
                    f"record {index}: its '{key}' is {wrong}; {fmt} records need {_NEEDED[fmt]}"
                )
    return BadDataError(
        f"record {index}: {fmt} records need {_NEEDED[fmt]}; this one has {fields_of(record)}"
    )


def _unusable(key: str, value: Any) -> str | None:
    """What is wrong with a needed field's ``value``, in JSON's words; None: nothing."""
    if key in _LISTS:
        if isinstance(value, list):
            return "an empty list" if not value else None
        return f"{_json_kind(value)}, not a list"
    return None if isinstance(value, str) else f"{_json_kind(value)}, not text"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def fields_of(record: dict[str, Any]) -> str:
    return "[" + ", ".join(sorted(map(str, record))) + "]" if record else "no fields"


def text_of(record: dict[str, Any], index: int) -> str:
    """The ``text`` of a plain-text record."""
    text = record.get("text")
    if not isinstance(text, str):
        raise missingfields_of(record, "text", index)
    return text


def rendered(
    records: list[dict[str, Any]], fmt: str, system: str | None
) -> Iterator[str | list[dict[str, str]] | None]:
    """What training makes of each record before any token, in the records' order: a chat
    record's messages (to_messages: the system prompt added; a record
    without its format's fields or an assistant message refused), a text record's text, and
    None for a text that is empty or only whitespace (nothing to learn: an empty document
    is EOS alone, whose one token no position predicts; a micro-batch of them has a loss of
    0/0, NaN). ``fmt`` is resolved (not ``auto``). Records are numbered from 1 in messages.

    A generator, so that zeroplan.launch.data.prepare tokenizes each record as it comes and
    the first bad record is the one refused, whether rendering or tokenizing refuses it;
    preflight renders every record without a tokenizer, and datatokens.token_lengths
    renders them for the plan's lengths."""
    for i, rec in enumerate(records, 1):
        if fmt == "text":
            text = text_of(rec, i)
            yield text if text.strip() else None
        else:
            yield to_messages(rec, fmt, i, system)
