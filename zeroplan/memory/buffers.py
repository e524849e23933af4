"""Communication buffers: DDP gradient buckets, DeepSpeed reduce buckets, ZeRO-3 gathers."""

from __future__ import annotations

from zeroplan.memory.optimizer import BNB_8BIT_STATE
from zeroplan.memory.result import Term
from zeroplan.memory.weights import BF16, FP32, gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup, trainable_params


def comm_buffers(spec: ModelSpec, setup: TrainSetup, world: int) -> Term:
    """Buffers that exist only to communicate.

    one GPU, no DeepSpeed:  0
    DDP (N > 1):            a flat copy of the gradients in buckets (gradient_as_bucket_view
                            is off by default): grad bytes · Ψ_t
    ZeRO-1/2:               the contiguous reduce bucket: 2 B · min(reduce_bucket_size, Ψ_t)
    ZeRO-3:                 reduce bucket as above + gathered bf16 parameters:
                            2 B · min(max_live_parameters + prefetch_bucket, Ψ)
    """
    n_t = trainable_params(spec, setup)
    if not setup.deepspeed:
        if world == 1:
            return Term("buffers", 0, "none (one GPU, no DeepSpeed)")
        width = BF16 if setup.method == "full" else FP32
        size = width * n_t
        return Term("buffers", size, f"DDP buckets {width} B × {n_t:,} = {gib(size)}")
    if setup.zero == 0:
        return Term("buffers", 0, "none (ZeRO-0 all-reduces in place)")
    bucket = BF16 * min(setup.reduce_bucket_elems, n_t)
    formula = f"reduce bucket 2 B × min({setup.reduce_bucket_elems:,}, {n_t:,})"
    size = bucket
    if setup.zero == 3:
        live = min(setup.stage3_max_live_elems + setup.stage3_prefetch_elems, spec.total_params)
        size += BF16 * live
        formula += f" + gathered 2 B × {live:,}"
    return Term("buffers", size, f"{formula} = {gib(size)}")


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
