"""Model weights resident on each GPU (base model + LoRA adapters)."""

from __future__ import annotations

from zeroplan.memory.result import Term
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import BF16, FP32, TrainSetup, trainable_bytes, trainable_params

# bitsandbytes NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block
# of 64 weights, and one fp32 second-level absmax per 256 of those blocks
# (bitsandbytes.functional.quantize_4bit, blocksize=64; compress_statistics=True).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def base_weights(spec: ModelSpec, setup: TrainSetup, world: int) -> Term:
    """Frozen or trained base-model weights.

    lora / full:  2 B · Ψ (bf16, or fp16 on an fp16 setup)
    full, fp16, no DeepSpeed: 4 B · Ψ (AMP trains an fp32 model, precision.amp_fp32_model)
    qlora:        NF4_BYTES_PER_PARAM · Ψ_lin + 2 B · (Ψ − Ψ_lin), Ψ_lin = the decoder's
                  linear weights; embeddings, lm_head, norms and biases stay bf16 (fp16)
                  (4 B with ``upcast_non_quantized``, what prepare_model_for_kbit_training does)
    ZeRO-3:       the above / N (parameters are partitioned; qlora needs a bf16
                  quant_storage for that, which packs the same bytes)
    ZeRO-3 + offload optimizer+params: 0 on the GPU; the partitions live in CPU RAM
                  (buffers.offload_cpu_bytes) and are gathered into the buffers term
    """
    total = spec.total_params
    dtype = "fp16" if setup.fp16 else "bf16"
    if setup.method == "qlora":
        quant = spec.quantizable_params()
        other_bytes = FP32 if setup.upcast_non_quantized else BF16
        size = quant * NF4_BYTES_PER_PARAM + (total - quant) * other_bytes
        formula = f"{NF4_BYTES_PER_PARAM:.4f} B × {quant:,} NF4 + {other_bytes} B × {total - quant:,} {dtype}"
    elif setup.fp16 and setup.method == "full" and not setup.deepspeed:
        size = FP32 * total
        formula = f"4 B × {total:,} params (fp32, AMP)"
    else:
        size = BF16 * total
        formula = f"2 B × {total:,} params ({dtype})"
    if setup.zero == 3 and setup.offload == "optimizer+params":
        return Term("weights", 0, f"({formula}) / {world} GPUs, offloaded to CPU RAM")
    if setup.zero == 3:
        size /= world
        formula = f"({formula}) / {world} GPUs (ZeRO-3)"
    return Term("weights", int(size), f"{formula} = {gib(size)}")


def adapter_weights(spec: ModelSpec, setup: TrainSetup, world: int) -> Term:
    """LoRA A and B matrices: Ψ_t = Σ r·(in + out) over adapted linears.

    Without DeepSpeed PEFT keeps them in fp32 (``autocast_adapter_dtype=True``): 4 B · Ψ_t.
    DeepSpeed bf16 casts the whole module, adapters included: 2 B · Ψ_t. ZeRO-3 keeps
    tensors under ``stage3_param_persistence_threshold`` elements whole on every rank,
    which a LoRA matrix of r·d elements usually is; larger ones are split over N.
    """
    if not setup.is_lora:
        return Term("adapters", 0, "no adapters (full fine-tuning)")
    n_t = trainable_params(spec, setup)
    width = trainable_bytes(setup)
    size = float(width * n_t)
    formula = f"{width} B × {n_t:,} LoRA params"
    largest = max(setup.lora_r * lin.in_features for lin in spec.attention_linears())
    if setup.zero == 3 and largest >= setup.stage3_persistence_threshold:
        size /= world
        formula += f" / {world} GPUs (ZeRO-3)"
    return Term("adapters", int(size), f"{formula} = {gib(size)}")
