"""Packing variable-length samples into rows of a fixed token capacity (pure, no torch).

The plan and the launch use the same function, so the fill the plan predicts is the fill the
run gets: ``zeroplan plan --data`` packs the data's token lengths to count rows, steps and
real tokens per step; ``zeroplan launch`` packs the tokenized examples into the rows it trains.

Best-fit decreasing: samples sorted longest first, each placed in the open row whose free
space is the smallest that still holds it, else a new row. Near-optimal for bin packing
(at most 11/9·OPT + 1 rows) and, with many short samples to fill the gaps, rows come out
97–99% full on chat data (measured on the benchmark data sets, ``benchmarks/realdata_speed.py``).
Every row of a micro-batch is padded to the capacity, so every step has the same shape — the
shape the memory estimate and the speed model describe.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, each row's lengths summing to at most ``capacity``.

    Deterministic: ties are broken by the sample's index, rows come out in the order they
    were opened (the first rows hold the longest samples). A sample longer than the
    capacity is a ValueError: the caller drops or truncates over-long samples first.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # open rows as (free space, row number), kept sorted: the best fit is the first entry
    # whose free space is >= the sample's length
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        if n < 1:
            raise ValueError(f"sample {i} is empty")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            left = capacity - n
            row = len(rows) - 1
        else:
            left, row = free.pop(k)
            rows[row].append(i)
            left -= n
        if left > 0:
            bisect.insort(free, (left, row))
    return rows


@dataclass(frozen=True)
class PackStats:
    """How a data set fills rows of ``capacity`` tokens."""

    capacity: int
    samples: int
    rows: int
    tokens: int  # real tokens of all samples

    @property
    def fill(self) -> float:
        """Real tokens / token positions: tokens / (rows · capacity)."""
        return self.tokens / (self.rows * self.capacity) if self.rows else 0.0

    @property
    def samples_per_row(self) -> float:
        return self.samples / self.rows if self.rows else 0.0


def pack_stats(lengths: Sequence[int], capacity: int) -> PackStats:
    """Rows and fill of packing ``lengths`` (all ≤ capacity) with ``pack_best_fit``."""
    rows = pack_best_fit(lengths, capacity)
    return PackStats(capacity, len(lengths), len(rows), int(sum(lengths)))


def padded_fill(lengths: Sequence[int], micro_batch: int) -> float:
    """Real tokens / token positions when consecutive groups of ``micro_batch`` samples are
    padded to their longest (what a padding collator does on shuffled data, in expectation
    over the order given): Σ l / Σ_groups (micro_batch_g · max l in group)."""
    if not lengths:
        return 0.0
    slots = 0
    for start in range(0, len(lengths), micro_batch):
        group = lengths[start : start + micro_batch]
        slots += len(group) * max(group)
    return sum(lengths) / slots


@dataclass(frozen=True)
class PaddedBatches:
    """Micro-batches of ``micro_batch`` records padded to their longest, rounded up to
    ``multiple`` (LLaMA-Factory's collator: 8; TRL's and axolotl's: 1), in expectation over
    a shuffled order: their padded length, the share of real tokens, and how many distinct
    padded lengths ``micro_batches`` of them meet."""

    micro_batch: int
    multiple: int
    longest: float  # E[padded length of a micro-batch]
    peak: int  # the longest record, rounded up: the longest micro-batch the run can build
    fill: float  # mean record length / longest: real tokens per position
    micro_batches: int  # of the run (an epoch unless given)
    shapes: float  # E[distinct padded lengths among them]

    @property
    def new_shape_share(self) -> float:
        """The share of micro-batches whose padded length the run has not met before."""
        return self.shapes / self.micro_batches if self.micro_batches else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "batching": "padded",
            "pad_to_multiple_of": self.multiple,
            "padded_length": round(self.longest, 1),
            "padded_peak_length": self.peak,
            "fill": round(self.fill, 4),
            "micro_batches": self.micro_batches,
            "distinct_shapes": round(self.shapes, 1),
        }


def padded_batches(
    lengths: Sequence[int], micro_batch: int, multiple: int = 1, micro_batches: int | None = None
) -> PaddedBatches:
    """What a padding collator makes of ``lengths`` on shuffled data, each micro-batch's b
    records drawn independently from the lengths' distribution F (b ≪ records):

        P(padded length ≤ v) = F(v)^b, v = ⌈l / m⌉ · m over the records' lengths l
        longest  = Σ_v v · p_v,  p_v = F(v)^b − F(v⁻)^b;  peak = max v (the memory's shape)
        fill     = mean(l) / longest  (real tokens / positions, a ratio of expectations)
        shapes   = Σ_v 1 − (1 − p_v)^n  over n micro-batches (default: an epoch, ⌈N / b⌉)
    """
    if not lengths or micro_batch < 1:
        return PaddedBatches(micro_batch, multiple, 0.0, 0, 0.0, 0, 0.0)
    m = max(1, multiple)
    counts = Counter(-(-int(x) // m) * m for x in lengths)
    n_records = len(lengths)
    n = micro_batches if micro_batches is not None else -(-n_records // micro_batch)
    longest = shapes = 0.0
    peak = max(counts)
    below = 0
    for v in sorted(counts):
        p = ((below + counts[v]) / n_records) ** micro_batch - (below / n_records) ** micro_batch
        below += counts[v]
        longest += v * p
        shapes += 1 - (1 - p) ** n
    fill = (sum(lengths) / n_records) / longest
    return PaddedBatches(micro_batch, m, longest, peak, fill, n, shapes)


def run_micro_batches(
    records: int,
    micro_batch: int,
    grad_accum: int,
    ranks: int,
    epochs: float,
    max_steps: int | None = None,
) -> int:
    """Micro-batches one rank runs over a trainer's whole run (the HF Trainer's counting):

    max_steps · accumulation                          when max_steps > 0
    ⌈epochs · ⌈records / (micro-batch · ranks)⌉⌉      otherwise
    """
    if max_steps is not None and max_steps > 0:
        return max_steps * grad_accum
    per_epoch = math.ceil(records / max(1, micro_batch * ranks)) if records else 0
    return max(1, math.ceil(epochs * per_epoch)) if per_epoch else 0


def steps_per_epoch(rows: int, rows_per_step: int) -> int:
    """Optimizer steps to see every row once: ⌈rows / (micro-batch · accumulation · GPUs)⌉."""
    return math.ceil(rows / rows_per_step) if rows else 0
