"""Communication buffers: DDP gradient buckets, DeepSpeed reduce buckets, ZeRO-3 gathers."""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.memory.optimizer import BNB_8BIT_STATE
from zeroplan.memory.result import Term
from zeroplan.memory.weights import gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import BF16, FP32, TrainSetup, trainable_bytes, trainable_params


@dataclass(frozen=True)
class Buffers:
    """Buffer bytes by when they exist; ``term`` is their largest sum, for the table."""

    static: int  # allocated once, held throughout
    backward: int  # from the first gradient of a backward to the end of it
    gathered: int  # ZeRO-3 parameters gathered around the layer being computed
    term: Term


def frozen_base_held(setup: TrainSetup, world: int) -> bool:
    """Whether the ZeRO-3 term for LoRA under reentrant checkpointing applies (see
    comm_buffers): a bf16 LoRA base, reentrant checkpointing, several ranks."""
    return setup.reentrant_checkpointing and setup.method == "lora" and world > 1


def zero3_embedding_held(spec: ModelSpec, setup: TrainSetup, world: int) -> int:
    """What ZeRO-3 on several GPUs holds of the vocabulary matrices beyond the lm_head it
    gathers around the loss, from the forward through the backward:

    untied:  2 B · V·h   (one more gathered bf16 copy: the input embedding's)
    tied:    6 B · V·h   (three: the one weight serves two modules)

    Read off measurements, not traced in DeepSpeed: on two H200s
    (memory_2xh200_zero_loops.jsonl), LoRA under ZeRO-3 with and without checkpointing
    peaked 1.54 and 1.50 GiB (Llama-3.2-1B, tied, 2 B · V·h = 0.49 GiB), 0.75 and 0.79 GiB
    (Qwen2.5-0.5B, tied, 0.25 GiB) and 1.36 GiB (Llama-3.1-8B, untied, 0.98 GiB) above
    the estimate without this term; fitted on those LoRA rows, it took the full
    fine-tuning rows (two H100s, memory_2xh100_zero.jsonl) from −8.0% to −0.2% (1B) and
    −2.0% to −0.5% (8B). One GPU gathers nothing: 0 there.

    Example: V·h = 1,000: untied 2,000 B, tied 6,000 B.
    """
    if setup.zero != 3 or world == 1:
        return 0
    copies = 3 if spec.tie_word_embeddings else 1
    return copies * BF16 * spec.vocab_size * spec.hidden_size


def _largest_layer_params(spec: ModelSpec) -> int:
    return max(sum(lin.params for lin in linears) for linears, _ in spec.linears_by_layer_kind())


def comm_buffers(spec: ModelSpec, setup: TrainSetup, world: int) -> Buffers:
    """Buffers that exist only to communicate.

    one GPU, no DeepSpeed:  0
    DDP (N > 1):            a flat copy of the gradients in buckets (gradient_as_bucket_view
                            is off by default), held throughout: grad bytes · Ψ_t
    ZeRO-1/2:               the contiguous reduce buckets, each reduce_bucket_size elements
                            whatever Ψ_t is, allocated at a backward's first gradient and
                            freed before the step: (2 with overlap_comm, else 1) ×
                            (4 B at ZeRO-1, which stages fp32; 2 B at ZeRO-2) × reduce_bucket
    ZeRO-3:                 one bf16 reduce bucket 2 B · reduce_bucket, held throughout
                            (measured on one GPU); with N > 1 the gathered bf16 parameters
                            of the layer at work plus the prefetch bucket:
                            2 B · (largest layer + min(prefetch, largest layer)), and the
                            whole lm_head around the loss, and copies of the vocabulary
                            matrices (zero3_embedding_held); LoRA under reentrant checkpointing
                            (TrainSetup.reentrant_checkpointing) also holds, through the
                            backward, the other ranks' shares of the frozen bf16 base:
                            + 2 B · Ψ · (N − 1) / N
    The last term, traced for reentrant checkpointing on one H100 (benchmarks/edges.py reads
    DeepSpeed's own bookkeeping: the parameters it keeps AVAILABLE after each fetch and
    release, which at N ranks cost 2 B · (N − 1)/N each beyond their partition): through the
    backward the whole frozen base stays gathered, 7.505 of 7.505 G elements for
    Llama-3.1-8B and 1.236 of 1.236 G for Llama-3.2-1B, until the step ends
    (benchmarks/results/edges_h100.jsonl, edges_traces.md); a Llama-3.2-1B LoRA launched
    on 2×H100 peaked at 4.22-4.49 GiB per GPU against 3.07 GiB without it
    (launch_zero3_live_2xh100.jsonl). Non-reentrant checkpointing (a plain loop: transformers
    5's default) released all but DeepSpeed's reuse window there (stage3_max_reuse_distance,
    1e9 elements: 0.96 G held for the 8B, 0.99 G for the 1B), but a two-GPU run of that loop
    (issue 30: the 8B at 2 × 2048) peaked about 5 GiB above the window's 0.9 GiB; until a
    two-GPU trace says what else stays, the whole base is kept for it too (the safe side,
    up to 15% over).
    """
    n_t = trainable_params(spec, setup)
    if not setup.deepspeed:
        if world == 1:
            return Buffers(0, 0, 0, Term("buffers", 0, "none (one GPU, no DeepSpeed)"))
        width = trainable_bytes(setup)
        size = width * n_t
        return Buffers(
            size, 0, 0, Term("buffers", size, f"DDP buckets {width} B × {n_t:,} = {gib(size)}")
        )
    if setup.zero == 0:
        return Buffers(0, 0, 0, Term("buffers", 0, "none (ZeRO-0 all-reduces in place)"))
    if setup.zero in (1, 2):
        count = 2 if setup.overlap_comm else 1
        width = FP32 if setup.zero == 1 else BF16
        size = count * width * setup.reduce_bucket_elems
        formula = (
            f"{count} reduce buckets × {width} B × {setup.reduce_bucket_elems:,} (backward only)"
        )
        return Buffers(0, size, 0, Term("buffers", size, f"{formula} = {gib(size)}"))
    bucket = BF16 * setup.reduce_bucket_elems
    formula = f"reduce bucket 2 B × {setup.reduce_bucket_elems:,}"
    gathered = 0
    if world > 1:
        layer = _largest_layer_params(spec)
        gathered = BF16 * (layer + min(setup.stage3_prefetch_elems, layer))
        formula += f" + gathered layer and prefetch 2 B × {gathered // BF16:,}"
        held_vocab = zero3_embedding_held(spec, setup, world)
        gathered += held_vocab
        formula += f" + vocabulary copies held {gib(held_vocab)}"
        if frozen_base_held(setup, world):
            held = BF16 * spec.total_params * (world - 1) // world
            gathered += held
            formula += f" + frozen base held under reentrant checkpointing {gib(held)}"
    size = bucket + gathered
    return Buffers(bucket, 0, gathered, Term("buffers", size, f"{formula} = {gib(size)}"))


def offload_cpu_bytes(spec: ModelSpec, setup: TrainSetup, world: int, gpus_per_node: int) -> int:
    """CPU RAM per node for ZeRO-Offload / ZeRO-Infinity.

    optimizer:          (4 master + 8 Adam + 4 fp32 grad) B · Ψ_t / N per rank
    optimizer+params:   + 2 B · Ψ / N per rank (bf16 parameter partitions)
    × ranks on the node. Pinned staging buffers are small next to these and not counted.
    """
    if setup.offload == "none":
        return 0
    n_t = trainable_params(spec, setup)
    state = 2 * BNB_8BIT_STATE if setup.optim.endswith("8bit") else 2 * FP32
    per_rank = (FP32 + state + FP32) * n_t / world
    if setup.offload == "optimizer+params":
        per_rank += BF16 * spec.total_params / world
    return int(per_rank * gpus_per_node)
