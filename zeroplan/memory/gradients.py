"""Gradients of the trainable parameters."""

from __future__ import annotations

from zeroplan.memory.result import Term
from zeroplan.memory.weights import BF16, FP32, gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup, trainable_params


def gradients(spec: ModelSpec, setup: TrainSetup, world: int) -> Term:
    """Gradient storage once backward is complete.

    no DeepSpeed:  grads have the parameter's dtype: full 2 B · Ψ (bf16), LoRA 4 B · Ψ_t (fp32)
    ZeRO-0:        bf16 grads 2 B · Ψ_t + fp32 accumulation buffer 4 B · Ψ_t (BF16_Optimizer)
    ZeRO-1:        bf16 grads 2 B · Ψ_t (all reduced at the boundary) + fp32 partition 4 B · Ψ_t / N
    ZeRO-2/3:      bf16 partition 2 B · Ψ_t / N + fp32 partition 4 B · Ψ_t / N
    optimizer offload moves the fp32 partition to CPU.
    """
    n_t = trainable_params(spec, setup)
    offload = setup.offload != "none"
    size: float
    if not setup.deepspeed:
        width = BF16 if setup.method == "full" else FP32
        size = width * n_t
        formula = f"{width} B × {n_t:,} trainable"
    elif setup.zero == 0:
        size = (BF16 + FP32) * n_t
        formula = f"(2 + 4) B × {n_t:,} trainable (bf16 + fp32 accumulation)"
    elif setup.zero == 1:
        size = BF16 * n_t + (0 if offload else FP32 * n_t / world)
        formula = f"2 B × {n_t:,} + 4 B × {n_t:,} / {world}" + (" (fp32 on CPU)" if offload else "")
    else:
        size = BF16 * n_t / world + (0 if offload else FP32 * n_t / world)
        formula = f"(2 + {0 if offload else 4}) B × {n_t:,} / {world} GPUs"
    return Term("gradients", int(size), f"{formula} = {gib(size)}")
