"""A data set's token lengths, and what they mean for a plan (pure functions, no I/O).

``LengthProfile`` holds the length of every record as training renders it (chat template,
tokenizer: ``zeroplan.datatokens`` makes it). ``fit_to_cap`` applies the sequence cap and
the over-long rule exactly as ``zeroplan.launch.data.prepare`` will, then packs what is
kept into rows of ``cap`` tokens with the launch's own packing function: the rows, their
fill, and the real tokens per epoch are what the planner turns into steps, time and cost.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from zeroplan.errors import BadDataError
from zeroplan.packing import PackStats, pack_stats

PERCENTILES = (50, 90, 95, 99)
CAP_MULTIPLE = 64  # an automatic cap is rounded up to this: aligned shapes, a little room
_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")

# What to do with a record longer than the cap (fit_to_cap; launch's --overlong).
OVERLONG = ("drop", "truncate")


@dataclass(frozen=True)
class LengthProfile:
    """Tokens per record, rendered and tokenized as the training run will see them; 0 for a
    record with nothing to learn (an empty ``text``), which training drops."""

    source: str
    format: str
    tokenizer: str  # where the tokenizer came from
    lengths: tuple[int, ...]
    # packings already computed, "cap/overlong/capacity" -> [rows, tokens]; kept with the
    # cached lengths (zeroplan.datatokens.save_packs) so that re-planning packs nothing
    packs: dict[str, list[int]] = field(default_factory=dict, compare=False, repr=False)
    cache_file: str | None = field(default=None, compare=False, repr=False)  # where it is kept
    # how records were written before tokenizing: the chat template, plain text + EOS, or a
    # trainer's own prompt format (zeroplan.prompts)
    rendered: str = "the chat template"

    @property
    def records(self) -> int:
        return len(self.lengths)

    @property
    def untrained(self) -> int:
        """Records with nothing to learn (length 0), dropped as training drops them."""
        return self.lengths.count(0)

    @property
    def tokens_total(self) -> int:
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths) if self.lengths else 0

    @property
    def mean(self) -> float:
        return self.tokens_total / self.records if self.records else 0.0

    def percentile(self, q: float) -> int:
        """The smallest length at or above which lies no more than (100 − q)% of records
        (nearest rank: sorted[⌈q/100 · n⌉ − 1])."""
        if not self.lengths:
            return 0
        ordered = self._ordered
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]

    @functools.cached_property
    def _ordered(self) -> list[int]:
        return sorted(self.lengths)

    def histogram(self, bins: int = 8, top: int | None = None) -> list[tuple[int, int, int]]:
        """(low, high, records) for ``bins`` equal-width bins from 0 to ``top`` (the longest)."""
        top = top or self.longest
        if not self.lengths or top < 1:
            return []
        width = max(1, math.ceil(top / bins))
        counts = [0] * bins
        for n in self.lengths:
            counts[min(bins - 1, (n - 1) // width)] += 1
        return [(i * width + 1, min(top, (i + 1) * width), c) for i, c in enumerate(counts)]


def resolve_cap(
    profile: LengthProfile, seq_len: str | int | None, window: int | None
) -> tuple[int, str]:
    """The sequence cap and why: a number as given; ``pNN`` the NN-th percentile of the
    lengths; ``auto`` / None the longest record. Percentile and auto are rounded up to a
    multiple of 64 and held to the model's context ``window``."""
    if isinstance(seq_len, int):
        return seq_len, "given"
    text = (seq_len or "auto").strip().lower()
    if text.isdigit():
        return int(text), "given"
    reason = "the longest record"
    if text == "auto":
        raw = profile.longest
    else:
        m = _PERCENTILE.fullmatch(text)
        if m is None or not 0 < float(m.group(1)) <= 100:
            raise BadDataError(
                f"--seq-len {seq_len}: give a number of tokens, auto (the longest record) or a "
                "percentile of the data's lengths such as p99"
            )
        raw = profile.percentile(float(m.group(1)))
        reason = f"the {m.group(1)}th percentile"
    cap = max(CAP_MULTIPLE, math.ceil(raw / CAP_MULTIPLE) * CAP_MULTIPLE)
    if window is not None and cap > window:
        return window, "the model's context window"
    return cap, reason


@dataclass(frozen=True)
class DataFit:
    """The data at a sequence cap: what is kept, and how it packs into rows of ``cap``."""

    profile: LengthProfile
    cap: int
    overlong: str  # drop | truncate
    dropped: int
    truncated: int
    pack: PackStats
    cap_reason: str = (
        "given"  # given | the longest record | the NNth percentile | the model's context window
    )

    def pack_at(self, capacity: int) -> PackStats:
        """The kept samples packed into rows of ``capacity`` tokens (a micro-batch's token
        budget: micro-batch × cap when the launch packs one flat row per micro-batch)."""
        if capacity == self.cap:
            return self.pack
        return _packed(self.profile, self.cap, self.overlong, capacity, self.pack.samples)

    @property
    def kept(self) -> int:
        return self.pack.samples

    @property
    def train_tokens(self) -> int:
        """Real tokens of one epoch (after dropping or truncating)."""
        return self.pack.tokens

    def to_json(self) -> dict[str, Any]:
        p = self.profile
        return {
            "source": p.source,
            "format": p.format,
            "rendered": p.rendered,
            "tokenizer": p.tokenizer,
            "records": p.records,
            "tokens_total": p.tokens_total,
            "longest_tokens": p.longest,
            "mean_tokens": round(p.mean, 1),
            "percentiles": {f"p{q}": p.percentile(q) for q in PERCENTILES},
            "histogram": [list(b) for b in p.histogram()],
            "seq_len": self.cap,
            "seq_len_from": self.cap_reason,
            "overlong": self.overlong,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "kept": self.kept,
            "train_tokens": self.train_tokens,
            "batching": "packed",
            "rows": self.pack.rows,
            "fill": round(self.pack.fill, 4),
            "samples_per_row": round(self.pack.samples_per_row, 2),
        }


def fit_to_cap(
    profile: LengthProfile,
    cap: int,
    overlong: str = "drop",
    cap_reason: str = "given",
    window: int | None = None,
) -> DataFit:
    """Drop (or truncate to ``cap``) the records longer than ``cap``, then pack the rest.

    All records over the cap is a BadDataError naming their count, the longest, and the
    options that would keep them within the model's context ``window``.
    """
    if overlong not in ("drop", "truncate"):
        raise BadDataError(f"--overlong must be drop or truncate, got '{overlong}'")
    if cap < 1:
        raise BadDataError(f"--seq-len must be at least 1, got {cap}")
    over = sum(1 for n in profile.lengths if n > cap)
    empty = profile.untrained
    kept = profile.records - empty - (over if overlong == "drop" else 0)
    if empty and not kept:
        raise BadDataError(_nothing_to_learn(profile, cap, over, empty))
    if not kept:
        raise BadDataError(
            f"all {profile.records} records of {profile.source} are longer than --seq-len {cap} "
            f"tokens (the longest has {profile.longest}): use "
            f"{_keep_overlong(profile.longest, cap, cap_reason, window)}"
        )
    return DataFit(
        profile=profile,
        cap=cap,
        overlong=overlong,
        dropped=over if overlong == "drop" else 0,
        truncated=over if overlong == "truncate" else 0,
        pack=_packed(profile, cap, overlong, cap, kept),
        cap_reason=cap_reason,
    )


def _keep_overlong(longest: int, cap: int, cap_reason: str, window: int | None) -> str:
    """The options that keep records when all are longer than ``cap``. A --seq-len that
    holds the longest is offered only within the model's context ``window`` (past it the
    length is refused: a dead end); else the window, where longer than ``cap``, which keeps
    the records that fit it. Truncation keeps every record."""
    if window is None or longest <= window:
        # on auto or a percentile, cap < longest only where the window held it: auto is
        # offered to a length given
        auto = " (or auto)" if cap_reason == "given" else ""
        return f"--seq-len {longest}{auto}, or --overlong truncate"
    if cap < window:
        return f"--overlong truncate, or --seq-len {window} (the model's context window)"
    return f"--overlong truncate (the longest is past the model's {window:,}-token context window)"


def _nothing_to_learn(profile: LengthProfile, cap: int, over: int, empty: int) -> str:
    """Why no record is left where some are empty texts (the rest, if any, too long)."""
    if empty == profile.records:
        return (
            f"all {profile.records} records of {profile.source} are empty texts, with nothing "
            "to learn: give records with text"
        )
    return (
        f"no record of {profile.source} is left to train on: {empty} empty texts (nothing to "
        f"learn), {over} longer than --seq-len {cap} tokens (the longest has "
        f"{profile.longest}): raise --seq-len or use --overlong truncate"
    )


def kept_lengths(profile: LengthProfile, cap: int, overlong: str) -> list[int]:
    """The lengths training keeps at ``cap``: the longer ones dropped, or cut to ``cap``;
    records with nothing to learn (0) never."""
    if overlong == "drop":
        return [n for n in profile.lengths if 0 < n <= cap]
    return [min(n, cap) for n in profile.lengths if n]


def _packed(
    profile: LengthProfile, cap: int, overlong: str, capacity: int, samples: int
) -> PackStats:
    """The ``samples`` kept lengths packed into ``capacity``, from the profile's packings
    when known (the planner asks once per candidate: no pass over the lengths then)."""
    key = f"{cap}/{overlong}/{capacity}"
    hit = profile.packs.get(key)
    if hit is not None:
        return PackStats(capacity, samples, hit[0], hit[1])
    stats = pack_stats(kept_lengths(profile, cap, overlong), capacity)
    profile.packs[key] = [stats.rows, stats.tokens]
    return stats
