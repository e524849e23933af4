"""What fp16 mixed precision adds to the bf16 step: the terms that differ, one function each.

Where the two run alike the bf16 functions serve both, with the dtype's name changed only:

* LoRA / QLoRA without DeepSpeed: the frozen base is loaded in fp16 instead of bf16 (2 B
  either way; a 4-bit base computes in fp16), PEFT keeps the adapters in fp32 and autocast
  casts them to fp16 instead of bf16: every LoRA term of the bf16 estimate holds as is.
* DeepSpeed (any ZeRO stage): DeepSpeed fp16 keeps 2 B weights and gradients, an fp32 master
  copy (4 B) and fp32 Adam states (8 B), sharded by stage exactly as for bf16; only the
  loss scaler is added (loss_scaler_bytes).

Full fine-tuning without DeepSpeed is where fp16 differs: PyTorch AMP (what the HF Trainer
runs with ``fp16=True``) trains an fp32 model under fp16 autocast, because fp16 weights
cannot take small updates and GradScaler refuses to unscale fp16 gradients. So weights,
gradients and Adam states are fp32 (weights.trainable_bytes: 4 B, and 2 × 4 B of Adam),
autocast caches fp16 copies of the weights it casts (amp_weight_copies), and the residual
stream between layers is fp32 (residual_bytes).

Derived from the PyTorch / transformers / DeepSpeed sources named in each docstring; not
yet calibrated on a GPU (the estimate says so).
"""

from __future__ import annotations

from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup

FP16 = 2
FP32 = 4
# PyTorch's caching allocator rounds every allocation up to a 512-byte block
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize).
ALLOCATOR_BLOCK = 512


def amp_fp32_model(setup: TrainSetup) -> bool:
    """Full fine-tuning in fp16 without DeepSpeed: AMP on an fp32 model."""
    return setup.fp16 and setup.method == "full" and not setup.deepspeed


def amp_weight_copies(spec: ModelSpec, setup: TrainSetup) -> int:
    """fp16 copies of the fp32 weights that autocast makes in the forward, held to backward.

    AMP on an fp32 model: autocast casts each linear's fp32 weight to fp16 and caches the
    copy for the rest of the forward (torch/csrc/autograd/autocast_mode.cpp, ``cached_cast``:
    leaf tensors that require grad); the matmul saves it for backward, so every copy lives
    until its layer's backward: 2 B · (Ψ_lin + V·h), Ψ_lin the decoder's linear weights,
    V·h lm_head (embeddings, norms and biases are not cast: embedding is not an autocast
    op, and a bias is added in the matmul's dtype). Counted as held through backward: exact
    without checkpointing; with it an upper bound (the layers' copies die with the forward's
    autocast cache, recompute makes one layer's again). 0 in every other setup (bf16, LoRA's
    fp32 adapters are activations.ActivationProfile.autocast_weights, DeepSpeed casts the
    model itself).

    Example: Ψ_lin = 1,000, V·h = 200 → 2 × 1,200 = 2,400 B.
    """
    if not amp_fp32_model(setup):
        return 0
    return FP16 * (spec.quantizable_params() + spec.vocab_size * spec.hidden_size)


def residual_bytes(setup: TrainSetup) -> int:
    """Bytes per element of the hidden state between decoder layers.

    2 (bf16 / fp16 model). AMP on an fp32 model: the embedding returns fp32, and
    transformers' RMSNorm returns ``weight * x.to(input_dtype)`` in the input's fp32, so
    the residual stream stays fp32: 4. Gradient checkpointing keeps one of these per layer.
    """
    return FP32 if amp_fp32_model(setup) else FP16


def loss_scaler_bytes(setup: TrainSetup) -> int:
    """The loss scaler's state on the GPU; 0 under bf16, which needs no scaling.

    AMP without DeepSpeed: ``torch.amp.GradScaler`` holds its scale (fp32) and growth
    tracker (int32) as one-element CUDA tensors, and ``unscale_`` makes a found-inf tensor
    per device: 3 tensors, each one allocator block, 3 × 512 B = 1,536 B.
    DeepSpeed fp16: the scale is a Python float (``DynamicLossScaler.cur_scale``); the
    overflow check all-reduces a one-element tensor: 1 × 512 B.
    """
    if not setup.fp16:
        return 0
    tensors = 1 if setup.deepspeed else 3
    return tensors * ALLOCATOR_BLOCK
