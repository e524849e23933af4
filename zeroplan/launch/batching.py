"""How training examples become micro-batches: packed rows (the default) or padded samples.

``packed``: the examples are packed best-fit-decreasing (``zeroplan.packing``, the function
the plan counts with) into rows of ``seq_len`` tokens; a micro-batch is ``micro_batch``
rows, so every step has the shape the plan estimated and does the work it counted. Each
sample keeps its own positions (0, 1, … restarting per sample) and attends only to itself:

- ``varlen`` (CUDA, torch ≥ 2.9 with ``torch.nn.attention.varlen``): the micro-batch is one
  flat row of ``micro_batch · seq_len`` tokens with the samples' boundaries as cumulative
  lengths; flash attention skips everything between samples. Registered in transformers as
  the attention implementation ``zeroplan_varlen``.
- ``mask``: ``micro_batch`` rows of ``seq_len``; transformers finds the samples from the
  restarting position ids and builds a block-diagonal causal mask for SDPA.

The labels of each sample's first token are -100 (nothing before it in its row may predict
it), so each sample's loss is what it is unpacked. The rest of a row is padding (labels
-100), cut into segments of at most PAD_SEGMENT tokens (positions restarting at each), counted
as padding.

``padded``: ``micro_batch`` samples padded to the longest of them (TRL's collator), the
attention mask keeping padding out; ``grouped`` sorts samples of similar length together
first (fewer padding tokens, still variable shapes).

Imports torch only in the functions that build tensors; the attention function is
registered with transformers only when asked.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zeroplan.errors import BadSetupError
from zeroplan.packing import PackStats, pack_best_fit
from zeroplan.trainsetup import NO_SDPA_MODEL_TYPES, packed_attention, window_binds

BATCHING = ("packed", "padded", "grouped")
PACKED_ATTENTION = ("auto", "varlen", "mask")
VARLEN_IMPL = "zeroplan_varlen"  # the attention implementation name registered in transformers
IGNORE_INDEX = -100
# The longest segment a row's padding is cut into. Attention costs each segment its length
# squared: the epoch's last row, part-filled, would otherwise hold one padding "sample" of
# up to micro-batch × seq_len tokens under varlen attention (38,136 of a 1B plan's 49,152:
# that step took 1.6 s against 0.6 on an H100, host15_h100.jsonl). 128 is one tile of the
# flash kernels, so padding costs what a short sample does.
PAD_SEGMENT = 128

Example = dict[str, list[int]]


@dataclass(frozen=True)
class PackedRows:
    """Examples packed into rows: what the Trainer's data set holds in packed mode."""

    rows: list[Example]  # input_ids, labels, position_ids, each at most capacity long
    stats: PackStats  # capacity, samples, rows, real tokens: what the plan counted

    @property
    def fill(self) -> float:
        return self.stats.fill


def pack_examples(examples: Sequence[Example], capacity: int, seed: int = 0) -> PackedRows:
    """Rows of concatenated examples (best fit decreasing), in a seeded random order.

    Every example's first label becomes -100: in a row it follows another example's last
    token, which must not predict it. (Unpacked, a first token is never predicted either.)
    """
    lengths = [len(e["input_ids"]) for e in examples]
    bins = pack_best_fit(lengths, capacity)
    rows: list[Example] = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):
            ex = examples[i]
            ids.extend(ex["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(ex["labels"][1:])
            positions.extend(range(len(ex["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    random.Random(seed).shuffle(rows)
    return PackedRows(rows, PackStats(capacity, len(examples), len(rows), sum(lengths)))


def segment_lengths(positions: Sequence[int]) -> list[int]:
    """Lengths of the samples in a row from its restarting position ids: [0,1,2,0,1] → [3,2]."""
    out: list[int] = []
    for p in positions:
        if p == 0 or not out:
            out.append(1)
        else:
            out[-1] += 1
    return out


def padded_shape(row: Example, capacity: int) -> tuple[int, int]:
    """(segments, longest segment) of a packed row once padded to ``capacity``: its samples,
    then the padding's segments of PAD_SEGMENT tokens (padding_positions), the last shorter."""
    samples = segment_lengths(row["position_ids"])
    pad = capacity - len(row["input_ids"])
    return len(samples) + -(-pad // PAD_SEGMENT), max([*samples, min(PAD_SEGMENT, pad)])


def one_shape(rows: Sequence[Example], capacity: int, per_batch: int) -> tuple[int, int]:
    """(segments, longest segment) that every micro-batch of ``per_batch`` of these rows
    fits, in one walk over their positions (a Python loop over every token: 60 ms for 2,000
    records):

    * segments: the sum of the ``per_batch`` largest rows' counts (padded_shape). Any
      micro-batch the sampler draws fits it, so padding every one's boundaries to it gives
      them one shape.
    * longest segment: the longest sample of any row, or a padding segment (at most
      PAD_SEGMENT tokens). Flash's varlen grid has ceil(max_length / block) query blocks for
      every segment and head, so a fixed max length of the capacity (12,288 for the 8B
      16 × 768 plan) launches 16× the blocks that the records' own longest (768) does,
      nearly all of them idle."""
    shapes = [padded_shape(r, capacity) for r in rows]
    counts = sorted((n for n, _ in shapes), reverse=True)
    return max(1, sum(counts[:per_batch])), max([1, *(longest for _, longest in shapes)])


def padding_positions(pad: int) -> list[int]:
    """Position ids of ``pad`` padding tokens: segments of PAD_SEGMENT, each from 0."""
    return [i % PAD_SEGMENT for i in range(pad)]


class PackedCollator:
    """Rows → one micro-batch of fixed shape.

    ``layout="rows"``: input_ids / labels / position_ids of shape (rows, capacity), every row
    padded with segments of its own (padding_positions). ``layout="flat"``: the same rows
    laid end to end in one row of rows·capacity tokens, plus ``cu_seq_lens_q/k`` (int32
    boundaries of every segment, padding's short segments included) and ``max_length_q/k``
    for varlen attention.
    ``segments`` (flat only, for CUDA graphs, which replay one shape): the boundaries padded
    to that many segments with empty ones at the end, and ``max_length_q/k`` ``longest``
    (one_shape's longest segment; the capacity where not given), so that every micro-batch
    has one signature (one_shape gives the count; a batch with more segments, or a
    longer one, keeps its own and runs eager).
    Both add ``zp_real_tokens`` and ``zp_slots`` (popped before the forward) for tokens/s.
    """

    def __init__(
        self,
        pad_id: int,
        capacity: int,
        layout: str = "rows",
        segments: int | None = None,
        longest: int | None = None,
    ) -> None:
        if layout not in ("rows", "flat"):
            raise ValueError(f"layout must be rows or flat, got {layout}")
        if segments is not None and (layout != "flat" or segments < 1):
            raise ValueError("segments is a positive count, for the flat layout only")
        if longest is not None and (segments is None or not 1 <= longest <= capacity):
            raise ValueError("longest is a length of 1 to capacity, with segments only")
        self.pad_id = pad_id
        self.capacity = capacity
        self.layout = layout
        self.segments = segments
        self.longest = longest if longest is not None else capacity

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids: list[list[int]] = []
        labels: list[list[int]] = []
        positions: list[list[int]] = []
        real = 0
        for f in features:
            n = len(f["input_ids"])
            pad = self.capacity - n
            if pad < 0:
                raise ValueError(f"a packed row has {n} tokens, more than {self.capacity}")
            real += n
            ids.append(list(f["input_ids"]) + [self.pad_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            positions.append(list(f["position_ids"]) + padding_positions(pad))
        batch: dict[str, Any] = {}
        if self.layout == "rows":
            batch["input_ids"] = torch.tensor(ids, dtype=torch.long)
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            flat_pos = [p for row in positions for p in row]
            seqs = segment_lengths(flat_pos)
            cu = [0]
            for n in seqs:
                cu.append(cu[-1] + n)
            longest = max(seqs)
            if self.segments is not None and len(seqs) <= self.segments:
                cu += [cu[-1]] * (self.segments - len(seqs))
                # a longer segment keeps its own length: flash reads only max_length
                # tokens of each segment
                longest = max(longest, self.longest)
            batch["input_ids"] = torch.tensor([[t for row in ids for t in row]], dtype=torch.long)
            batch["labels"] = torch.tensor([[t for row in labels for t in row]], dtype=torch.long)
            batch["position_ids"] = torch.tensor([flat_pos], dtype=torch.long)
            cu_t = torch.tensor(cu, dtype=torch.int32)
            batch["cu_seq_lens_q"] = cu_t
            batch["cu_seq_lens_k"] = cu_t
            batch["max_length_q"] = longest
            batch["max_length_k"] = longest
        batch["zp_real_tokens"] = real
        batch["zp_slots"] = len(features) * self.capacity
        return batch


# --------------------------------------------------------------------------- varlen attention


def varlen_available() -> bool:
    """torch's flash varlen attention exists here and a GPU can run it."""
    try:
        import torch
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _segments_sdpa(
    q: Any, k: Any, v: Any, cu: list[int], scale: float | None, left: int = -1
) -> Any:
    """The reference: causal SDPA on each segment of (T, H, D) tensors (CPU, tests). ``left``
    ≥ 0: a query sees itself and at most ``left`` keys before it (a sliding window), as
    flash's ``window_size=(left, 0)``; -1: every key before it."""
    import torch
    import torch.nn.functional as F

    outs = []
    for a, b in itertools.pairwise(cu):
        if a == b:  # the empty segments a fixed boundary count pads with (PackedCollator)
            continue
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        if 0 <= left < b - a - 1:
            i = torch.arange(b - a, device=q.device)
            gap = i[:, None] - i[None, :]  # query index - key index
            mask = (gap >= 0) & (gap <= left)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale))
        else:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
    return torch.cat(outs, dim=1).transpose(0, 1)


def window_left(sliding_window: int | None) -> int:
    """transformers' ``sliding_window`` w as flash's left window: a query sees the w tokens
    ending at itself (masking_utils.sliding_window_overlay: key > query − w; its flash path
    passes w − 1), so w − 1 keys before it; -1 (no limit) for a full-attention layer."""
    return sliding_window - 1 if sliding_window else -1


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: (1, H, T, D) tensors of one flat row → (1, T, H, D).

    Uses ``cu_seq_lens_q`` / ``max_length_q`` from the batch (``PackedCollator(layout="flat")``).
    On CUDA torch's flash varlen kernel; elsewhere causal SDPA per segment (same result). A
    sliding layer (transformers passes ``sliding_window``: Gemma 2/3, Mistral, Qwen2 with
    use_sliding_window) keeps each query to its window (window_left), in both.
    """
    import torch

    left = window_left(kwargs.get("sliding_window"))
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None or query.shape[0] != 1:
        raise RuntimeError(
            "zeroplan_varlen attention needs one flat row with cu_seq_lens_q and max_length_q "
            "(zeroplan.launch.batching.PackedCollator(layout='flat'))"
        )
    # squeeze, not [0]: indexing's backward writes each gradient into a zeroed (1, H, T, D)
    # tensor (q, k and v of every layer: 6.4 ms a step of the 8B 16 × 704 plan on an H100),
    # and that copy's layout then made Liger's rope backward and v_proj's view copy again
    # (5.3 and 1.2 ms); squeeze's backward is a view
    q = query.squeeze(0).transpose(0, 1)  # (T, Hq, D)
    k = key.squeeze(0).transpose(0, 1)
    v = value.squeeze(0).transpose(0, 1)
    groups = q.shape[1] // k.shape[1]
    if query.is_cuda:
        out = _flash_varlen(
            q, k, v, cu.to(query.device, torch.int32), int(max_len), scaling, groups, left
        )
    else:
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = _segments_sdpa(q, k, v, [int(x) for x in cu.tolist()], scaling, left)
    return out.unsqueeze(0), None


@functools.cache
def _varlen_params() -> frozenset[str]:
    """varlen_attn's keyword names, read once (none without the kernel): the attention of
    every layer asks, and an inspect.signature a call is host time the packed step does not
    need."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_takes_window() -> bool:
    """Whether torch's varlen kernel takes a window (``window_size``: the GPU image's torch
    2.11.0 does, benchmarks/results/gemma_h100.jsonl; an older one has only ``is_causal``)."""
    return "window_size" in _varlen_params()


def _causal_kwargs(left: int = -1) -> dict[str, Any]:
    # with window_size: causal is a window of (left, 0), (-1, 0) unlimited; before, an is_causal
    # flag and no window: choose_packed_attention keeps a model whose window is shorter than
    # its records off that kernel before the run (not here: every record may fit the window
    # while the padding's segments, up to PAD_SEGMENT, do not)
    if varlen_takes_window():
        return {"window_size": (left, 0)}
    return {"is_causal": True}


@functools.cache
def gqa_native() -> bool:
    """Whether the varlen kernel takes fewer key/value heads than query heads (grouped-query
    attention) as they are. torch ≥ 2.12 says so (``enable_gqa``); before, the flash kernel
    under it accepts them without saying so — tried once, forward and backward. Otherwise
    keys and values are repeated to every query head, and those copies are kept for the
    backward: 2·(q_dim − kv_dim)·2 B per token per layer more than the estimate counts
    (measured 3 B per hidden element on Llama-3 8B and 3.2 1B, benchmarks/results)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    if "enable_gqa" in _varlen_params():
        return True
    try:
        q = torch.randn(16, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(16, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 9, 16], dtype=torch.int32, device="cuda")
        out: Any = varlen_attn(q, kv, kv, cu, cu, 9, 9, **_causal_kwargs())
        out.float().sum().backward()
        ref = _segments_sdpa(
            q, kv.repeat_interleave(4, 1), kv.repeat_interleave(4, 1), [0, 9, 16], None
        )
        return bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2))
    except (RuntimeError, ValueError, TypeError):
        return False


def _flash_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu: Any,
    max_len: int,
    scaling: float | None,
    groups: int,
    left: int = -1,
) -> Any:
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw = _causal_kwargs(left)
    if groups > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        elif not gqa_native():
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    if scaling is not None:
        if "scale" in params:
            kw["scale"] = scaling
        else:  # older signature: 1/sqrt(D) only; fold the model's scale into q
            q = q * (scaling * q.shape[-1] ** 0.5)
    return varlen_attn(
        q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **kw
    )


def register_varlen() -> str:
    """Register ``zeroplan_varlen`` with transformers (idempotent); returns the name.

    Registered as an attention function only, with no mask function: for such an
    implementation transformers' ``create_causal_mask`` returns at once (the boundaries
    travel as cu_seq_lens). With one, it first looked for packed rows in the position ids
    and read the answer on the host (``find_packed_sequence_indices``' ``.all()``): a wait
    for the GPU at the start of every forward (host5-host21's probes, transformers 5.17)."""
    import torch
    from transformers import AttentionInterface

    # under --compile the decoder layers compile around it: its boundaries are Python ints
    # (max_length_q) that would specialise the graph to every new longest sample (eager: no-op)
    eager_only = torch.compiler.disable(varlen_attention_forward)  # type: ignore[no-untyped-call]
    AttentionInterface.register(VARLEN_IMPL, eager_only)
    return VARLEN_IMPL


def choose_packed_attention(
    requested: str,
    cuda: bool,
    model_type: str = "",
    sliding_window: int | None = None,
    seq_len: int = 0,
) -> str:
    """``auto``: what the plan counted (trainsetup.packed_attention): ``varlen`` where it can
    run (measured faster on H200, benchmarks/realdata_speed.py), else the block mask. An
    explicit choice is kept (varlen on a CPU runs the reference), except a varlen kernel
    that would train another model, refused in one line before anything loads:

    - Gemma-2 (trainsetup.NO_SDPA_MODEL_TYPES): torch's varlen kernel has no soft-cap; its
      rows keep the plan's attention (eager) under the mask.
    - sliding layers whose window (``sliding_window``, tokens a query sees) is shorter than
      the records (``seq_len``) on a GPU whose torch's kernel takes no window; where it
      takes one (``window_size``) the kernel applies it (varlen_attention_forward)."""
    if requested not in PACKED_ATTENTION:
        raise ValueError(f"packed attention must be one of {', '.join(PACKED_ATTENTION)}")
    why = NO_SDPA_MODEL_TYPES.get(model_type)
    if why and requested == "varlen":
        raise BadSetupError(
            f"--packed-attention varlen: {why}, and torch's varlen kernel has no soft-cap: "
            "use --packed-attention mask (or auto)"
        )
    binds = window_binds(sliding_window, seq_len)
    if binds and requested == "varlen" and cuda and not varlen_takes_window():
        import torch

        raise BadSetupError(
            f"--packed-attention varlen: {model_type or 'the model'}'s sliding layers see "
            f"{sliding_window} tokens, fewer than --seq-len {seq_len}, and torch "
            f"{torch.__version__}'s varlen kernel takes no window (a newer torch's does), so "
            "longer records would attend to all of themselves: use --packed-attention mask "
            "(or auto)"
        )
    if requested != "auto":
        return requested
    if packed_attention(model_type, sliding_window, seq_len) == "mask":
        return "mask"
    return "varlen" if cuda and varlen_available() else "mask"
