"""What sits between PyTorch's allocated bytes and nvidia-smi: allocator slack, CUDA context.

Measured on H100 80GB, driver 580, torch 2.11 + CUDA 13 (benchmarks/results/memory_h100*.jsonl,
nvidia-smi's used minus the allocator's peak reserved, one process on the GPU).
"""

from __future__ import annotations

# Caching-allocator slack, reserved − allocated at the peak, as a fraction of allocated:
# the median of the measured rows. Checkpointing's recompute churns blocks of many sizes
# and leaves more (median 0.16, worst 0.29) than a plain step (median 0.07, worst 0.12).
# expandable_segments did not shrink it in the measured rows.
RESERVED_FRACTION = 0.07
RESERVED_FRACTION_CKPT = 0.16
# When the card is nearly full the allocator frees its cached blocks and retries before it
# reports OOM, so reserved never has to fit; what must fit is allocated plus the slack that
# splitting blocks leaves even then. 3% is an assumption, not yet measured under pressure.
PRESSURE_FRACTION = 0.03
# CUDA context + cuBLAS workspaces + loaded kernels: 1,247 MiB in every measured row.
CUDA_CONTEXT_BYTES = 1247 * 2**20
# torch.distributed with NCCL (every DeepSpeed run, DDP on 2+ GPUs): 566 MiB more, measured
# with one rank; NCCL's channel buffers grow with the number of peers.
NCCL_BYTES = 566 * 2**20


def reserved_from_allocated(allocated: int, grad_ckpt: bool) -> int:
    """peak_reserved ≈ peak_allocated · (1 + f), f = 0.16 with checkpointing, else 0.07."""
    fraction = RESERVED_FRACTION_CKPT if grad_ckpt else RESERVED_FRACTION
    return int(allocated * (1 + fraction))


def device_used(reserved: int, distributed: bool, outside_allocator: int) -> int:
    """nvidia-smi's view: reserved + CUDA context (+ NCCL) + managed memory (paged states)."""
    return reserved + CUDA_CONTEXT_BYTES + (NCCL_BYTES if distributed else 0) + outside_allocator


def required_bytes(allocated: int, distributed: bool, outside_allocator: int) -> int:
    """What the card must hold for the run not to OOM: allocated · (1 + 0.03) + context
    (+ NCCL) + managed memory. The fits verdict and the planner's margin are taken on this."""
    return device_used(int(allocated * (1 + PRESSURE_FRACTION)), distributed, outside_allocator)
