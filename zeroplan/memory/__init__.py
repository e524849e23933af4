"""The memory model: one module per term, combined by ``estimate``.

weights.py      base weights (bf16 / NF4) and LoRA adapters
gradients.py    gradients of trainable parameters
optimizer.py    optimizer states and DeepSpeed fp32 master weights
activations.py  tensors saved for backward, per layer and per token
logits.py       the loss over the vocabulary
buffers.py      DDP / DeepSpeed communication buckets, ZeRO-3 gathers, CPU offload
precision.py    what fp16 mixed precision adds (AMP's fp32 model, loss scaler)
overhead.py     allocator slack and CUDA context (reserved, nvidia-smi)
estimate.py     where the peak falls, and the MemoryEstimate
"""

from zeroplan.memory.estimate import estimate
from zeroplan.memory.result import MemoryEstimate, Term

__all__ = ["MemoryEstimate", "Term", "estimate"]
