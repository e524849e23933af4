"""What sits between PyTorch's allocated bytes and nvidia-smi: allocator slack, CUDA context."""

from __future__ import annotations

# Caching-allocator slack: reserved grows past allocated because blocks are rounded and
# split. Fitted on the measured rows (benchmarks/results/): reserved ≈ allocated × (1 + f) + c.
RESERVED_FRACTION = 0.03
RESERVED_CONSTANT = 64 * 2**20
# CUDA context + cuBLAS workspaces + kernels loaded: nvidia-smi's used minus the allocator's
# reserved, measured on H100 (torch 2.11, CUDA 13).
CUDA_CONTEXT_BYTES = 512 * 2**20
# NCCL's own buffers (cudaMalloc outside PyTorch's allocator), per process with 2+ ranks.
NCCL_BYTES = 256 * 2**20


def reserved_from_allocated(allocated: int) -> int:
    """peak_reserved ≈ peak_allocated · (1 + f) + c."""
    return int(allocated * (1 + RESERVED_FRACTION) + RESERVED_CONSTANT)


def device_used(reserved: int, world: int, outside_allocator: int) -> int:
    """nvidia-smi's view: reserved + CUDA context (+ NCCL) + managed memory (paged states)."""
    return reserved + CUDA_CONTEXT_BYTES + (NCCL_BYTES if world > 1 else 0) + outside_allocator
