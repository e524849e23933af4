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
gradients and Adam states are fp32 (trainsetup.trainable_bytes: 4 B, and 2 × 4 B of Adam),
autocast caches fp16 copies of the weights it casts (amp_weight_copies; how many outlive
the forward: amp_copies_at_backward, amp_recompute_copies), the residual stream between
layers is fp32 (residual_bytes), so the norms save fp32 outputs (amp_norm_extra_per_token)
and every linear reading one saves its own fp16 cast of it (amp_input_casts_per_token).

Derived from the PyTorch / transformers / DeepSpeed sources named in each docstring. The
AMP terms were checked on one H200 (benchmarks/results/memory_2xh200_fp16.jsonl, three full
fine-tuning rows, and memory_2xh200_fp16_trace.txt, what is alive at their peaks); the
estimate still calls fp16 derived.
"""

from __future__ import annotations

from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup

FP16 = 2
FP32 = 4
# PyTorch's caching allocator rounds every allocation up to a 512-byte block
# (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize).
ALLOCATOR_BLOCK = 512
# The layers' linears autocast casts (ModelSpec.quantizable_params counts the same ones).
GROUPS = ("attn", "mlp")


def amp_fp32_model(setup: TrainSetup) -> bool:
    """Full fine-tuning in fp16 without DeepSpeed: AMP on an fp32 model."""
    return setup.fp16 and setup.method == "full" and not setup.deepspeed


def amp_weight_copies(spec: ModelSpec, setup: TrainSetup) -> int:
    """fp16 copies of the fp32 weights that autocast makes in the forward: all alive at its end.

    AMP on an fp32 model: autocast casts each linear's fp32 weight to fp16 and caches the
    copy until the outermost autocast context exits, at the end of the forward
    (torch/csrc/autograd/autocast_mode.cpp, ``cached_cast``: leaf tensors that require
    grad; torch/amp/autocast_mode.py, ``__exit__`` clears the cache at nesting 0):
    2 B · (Ψ_lin + V·h), Ψ_lin the decoder's linear weights, V·h lm_head (embeddings, norms
    and biases are not cast: embedding is not an autocast op, biases are small). 0 in every
    other setup (bf16; LoRA's fp32 adapters are activations.ActivationProfile.autocast_weights;
    DeepSpeed casts the model itself). Which of them outlive the forward:
    amp_copies_at_backward; which a checkpointed layer makes again: amp_recompute_copies.

    Measured (benchmarks/results/memory_2xh200_fp16_trace.txt, Llama-3.2-1B checkpointed, one
    H200): allocated falls by 2 B · Ψ_lin = 1.81 GiB when the forward's autocast exits.

    Example: Ψ_lin = 1,000, V·h = 200 → 2 × 1,200 = 2,400 B.
    """
    if not amp_fp32_model(setup):
        return 0
    return FP16 * (spec.quantizable_params() + spec.vocab_size * spec.hidden_size)


def amp_copies_at_backward(spec: ModelSpec, setup: TrainSetup) -> int:
    """The fp16 weight copies still alive when backward starts.

    Each copy is saved for backward by the matmul that used it (its input gradient needs
    the weight). Without checkpointing that holds every copy to its layer's backward: all of
    amp_weight_copies, 2 B · (Ψ_lin + V·h). Non-reentrant checkpointing drops what the
    layers save, so the autocast cache was their copies' only holder and they die when the
    forward's autocast exits; lm_head is not checkpointed and keeps its copy: 2 B · V·h.

    Example: Ψ_lin = 1,000, V·h = 200 → 2,400 B; checkpointed 400 B.
    """
    if not amp_fp32_model(setup):
        return 0
    if setup.grad_ckpt:
        return FP16 * spec.vocab_size * spec.hidden_size
    return amp_weight_copies(spec, setup)


def amp_recompute_copies(spec: ModelSpec, setup: TrainSetup) -> int:
    """fp16 weight copies alive while a checkpointed layer is recomputed and back-propagated.

    Non-reentrant checkpointing recomputes a layer under the autocast state recorded at its
    forward (torch/utils/checkpoint.py, ``recompute_fn``: ``torch.amp.autocast(**
    device_autocast_kwargs)``). In the backward thread that context is the outermost, so its
    cache is cleared when the recompute ends, but the recomputed matmuls have saved their
    copies: one layer's, 2 B · Ψ_layer (the largest layer's linear weights, counted as in
    amp_weight_copies), until that layer's backward. lm_head's copy died with lm_head's
    backward, before any layer's. 0 without checkpointing (amp_copies_at_backward holds
    them all) and outside AMP.

    Example: a layer of 4 × 16 × 16 linear weights → 2 × 1,024 = 2,048 B.
    """
    if not amp_fp32_model(setup) or not setup.grad_ckpt:
        return 0
    largest = max(
        sum(
            lin.count * lin.in_features * lin.out_features for lin in linears if lin.group in GROUPS
        )
        for linears, _ in spec.linears_by_layer_kind()
    )
    return FP16 * largest


def amp_norm_extra_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per token one norm on the fp32 residual saves beyond its bf16 figure, under AMP.

    transformers' RMSNorm is ``weight * (x.float() * rsqrt(mean(x²) + ε)).to(input_dtype)``.
    bf16 model: x.float() is a new fp32 tensor (4 B·h, saved by pow and mul) and the weight's
    gradient needs the normalised tensor cast back to bf16 (2 B·h). AMP: x is the fp32
    residual itself (4 B·h, the same bytes), ``.to(fp32)`` returns the normalised tensor
    unchanged, and ``weight * n`` saves it in fp32: 4 B·h instead of 2, so 2 B·h more. A
    layer's two pre-norms and the final norm read the residual; Gemma's norm multiplies in
    fp32 under bf16 too (activations._norm): 0. Measured (memory_2xh200_fp16_trace.txt):
    33 fp32 norm outputs of b·s·h alive in Llama-3.2-1B (2 per layer + the final norm).

    Example: h = 2,048 → 4,096 B per token.
    """
    if not amp_fp32_model(setup) or spec.gemma_norm:
        return 0
    return (FP32 - FP16) * spec.hidden_size


def amp_input_casts_per_token(spec: ModelSpec, setup: TrainSetup, moe_layer: bool = False) -> int:
    """Bytes per token a layer saves beyond bf16 because autocast casts every linear's input.

    A norm's output is fp32 under AMP (amp_norm_extra_per_token) and autocast casts it to
    fp16 once per linear that reads it: a cast of a non-leaf tensor is not cached
    (autocast_mode.cpp, ``cached_cast``), and each matmul saves its own copy. Under bf16 the
    one bf16 norm output is every such linear's saved input. So q, k and v save 3 copies of
    2 B·h where bf16 saves one, gate and up 2: 2 B·h · ((n_qkv − 1) + (n_gate_up − 1)) more;
    0 for a fused qkv_proj / gate_up_proj (Phi-3). MoE layers: the attention's only (the
    router and experts are not modelled here). Measured (memory_2xh200_fp16_trace.txt): 5
    fp16 b·s·h inputs per Llama-3.2-1B layer, from q, k, v, gate and up.

    Example: Llama (q, k, v; gate, up), h = 2,048 → 2 × 2,048 × (2 + 1) = 12,288 B per token.
    """
    if not amp_fp32_model(setup):
        return 0
    # every attention linear but o_proj reads the norm, every MLP linear but down_proj
    extra = sum(1 for lin in spec.attention_linears() if lin.name != "o_proj") - 1
    if not (moe_layer and spec.moe):
        extra += sum(1 for lin in spec.dense_mlp_linears() if lin.name != "down_proj") - 1
    return FP16 * spec.hidden_size * extra


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
