"""Training records → token ids and labels, rendered with the tokenizer's chat template.

Records are read and converted to messages by ``zeroplan.records`` (formats listed there).

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
no assistant token is then dropped and counted), and so is a ``text`` record that is empty
or only whitespace (nothing to learn). The counts are in ``DataSummary``.

Light module: no torch import; the tokenizer is whatever the caller passes (transformers').
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from zeroplan.errors import BadDataError, ChatTemplateError
from zeroplan.lengths import OVERLONG
from zeroplan.records import (
    FILE_SUFFIXES,
    FORMATS,
    data_exists,
    detect_format,
    first_line,
    looks_like_hub_id,
    read_records,
    rendered,
    to_messages,
)

IGNORE_INDEX = -100  # what transformers' causal-LM loss skips

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Example = dict[str, list[int]]
# what the training side used to define here and its callers import from it
__all__ = [
    "FILE_SUFFIXES",
    "FORMATS",
    "OVERLONG",
    "DataSummary",
    "PreparedData",
    "data_exists",
    "detect_format",
    "encode_messages",
    "encode_text",
    "first_line",
    "looks_like_hub_id",
    "prepare",
    "read_records",
    "rendered",
    "to_messages",
]  # {"input_ids": [...], "labels": [...]}


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
    dropped_no_target: int  # nothing to learn: no assistant token (left), or an empty text
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
            f"record {index}: the chat template refused it: {first_line(exc)}"
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


# --------------------------------------------------------------------------- records


# --------------------------------------------------------------------------- all together


def eval_count(examples: int, eval_fraction: float) -> int:
    """How many of ``examples`` are held out for evaluation (at least one when asked for
    any); a BadDataError when that leaves none to train on."""
    if eval_fraction <= 0:
        return 0
    n_eval = max(1, round(examples * eval_fraction))
    if n_eval >= examples:
        raise BadDataError(
            f"--eval-fraction {eval_fraction} of {examples} examples leaves none to train on"
        )
    return n_eval


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
    for i, item in enumerate(rendered(records, fmt, system), 1):
        msgs: list[dict[str, str]] = []
        if item is None:
            no_target += 1
            continue
        if isinstance(item, str):
            ids, labels = encode_text(tokenizer, item)
        else:
            msgs = item
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
            f"tokens (dropped), {no_target} with nothing to learn (no assistant token, or an "
            "empty text); raise the plan's --seq-len, use --overlong truncate, or fix the records"
        )
    order = list(range(len(examples)))
    n_eval = eval_count(len(examples), eval_fraction)
    if n_eval:
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
