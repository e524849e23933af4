"""Optimizer states (and DeepSpeed's fp32 master weights)."""

from __future__ import annotations

from zeroplan.memory.result import Term
from zeroplan.memory.weights import gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import (
    DS_SUB_GROUP_ELEMS,
    FP32,
    TrainSetup,
    lora_targets,
    trainable_bytes,
    trainable_params,
)

# bitsandbytes 8-bit optimizers keep 1 byte per state plus one fp32 absmax per block of 256
# (bitsandbytes.optim.optimizer, blockwise=True); tensors under min_8bit_size = 4096
# elements keep 32-bit states.
BNB_8BIT_STATE = 1 + 4 / 256
BNB_MIN_8BIT_SIZE = 4096


def _adam_state_bytes(optim: str, param_bytes: int) -> float:
    """Bytes of optimizer state per trainable parameter of a large tensor."""
    if optim == "sgd":
        return 0.0  # torch SGD without momentum keeps no state
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * BNB_8BIT_STATE
    if optim == "paged_adamw_32bit":
        return 2 * FP32
    return 2.0 * param_bytes  # torch AdamW: exp_avg and exp_avg_sq like the parameter


def optimizer_states(spec: ModelSpec, setup: TrainSetup, world: int) -> Term:
    """Optimizer states per GPU.

    no DeepSpeed:  torch AdamW 2 × (param bytes) · Ψ_t  (full bf16: 4 B, LoRA fp32: 8 B);
                   8-bit AdamW 2 × (1 + 4/256) B · Ψ_t; SGD 0
    DeepSpeed:     fp32 master 4 B · Ψ_t + states (fp32 Adam 8 B, 8-bit 2.03 B) per param,
                   / N for ZeRO ≥ 1; on CPU with optimizer offload (0 here)
    paged optimizers put their states in CUDA managed memory: nvidia-smi sees them,
    ``torch.cuda.max_memory_allocated`` does not.
    """
    n_t = trainable_params(spec, setup)
    paged = setup.optim.startswith("paged")
    if setup.deepspeed:
        if setup.offload != "none":
            return Term("optimizer", 0, f"fp32 master + states of {n_t:,} params on CPU (offload)")
        per_param = FP32 + _adam_state_bytes(setup.optim, FP32)
        shard = world if setup.zero and setup.zero >= 1 else 1
        size = per_param * n_t / shard
        formula = f"(4 master + {per_param - 4:g} states) B × {n_t:,} / {shard}"
        return Term("optimizer", int(size), f"{formula} = {gib(size)}", in_allocator=not paged)
    param_bytes = trainable_bytes(setup)
    per_param = _adam_state_bytes(setup.optim, param_bytes)
    size = per_param * n_t
    if setup.optim in ("adamw_8bit", "paged_adamw_8bit") and setup.is_lora:
        # bitsandbytes decides per tensor: a LoRA A (r·f·in) or B (out·r·f) matrix under
        # min_8bit_size elements keeps fp32 states.
        small = 0
        for lin, n in lora_targets(spec, setup):
            rank = setup.lora_r * lin.lora_rank_factor
            for width in (lin.in_features, lin.out_features):
                if rank * width * lin.count < BNB_MIN_8BIT_SIZE:
                    small += n * rank * width * lin.count
        size += small * (2 * FP32 - per_param)
    formula = f"{per_param:g} B × {n_t:,} trainable ({setup.optim})"
    return Term("optimizer", int(size), f"{formula} = {gib(size)}", in_allocator=not paged)


def adamw_step_temporaries(spec: ModelSpec, setup: TrainSetup, world: int) -> Term:
    """Parameter-sized temporaries of torch AdamW's default (foreach) step, at its peak.

    torch.optim.adam._multi_tensor_adam (torch 2.13; AdamW calls it with decoupled weight
    decay) updates exp_avg, exp_avg_sq and the weight decay in place, then allocates
    ``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)``, one tensor like every parameter,
    in the states' dtype (= the parameter's), for the whole list of one param group on one
    device and dtype. The list is dropped only when the next dtype's replaces it, so with
    two dtypes both exist at once (counted on the CPU, tests/test_loop_cpu.py). So the step
    peaks at

        static + gradients + (param bytes) · Ψ_group

    one temporary per element, not per tensor. A loop's ``AdamW(model.parameters())`` is
    one group: Ψ_group = Ψ_t (HF Trainer's adamw_torch puts biases and norms in a second,
    small group; counted as one here). Without DeepSpeed: full bf16 2 B · Ψ_t, LoRA fp32
    4 B · Ψ_t. Under DeepSpeed the optimizer steps the fp32 master partition:
    4 B · Ψ_t / N for ZeRO ≥ 1 (Ψ_t for ZeRO-0), ZeRO-3 one sub-group at a time
    (4 B · min(Ψ_t / N, sub_group_size)). Fused AdamW (``fused=True``), bitsandbytes and
    SGD without momentum allocate none; under CPU offload DeepSpeed's CPU Adam steps.
    Derived from the source; not yet calibrated on a GPU.
    """
    if not setup.foreach_adamw:
        return Term("optimizer step temporaries", 0, f"none ({setup.optim})")
    n_t = trainable_params(spec, setup)
    if setup.deepspeed:
        shard = world if setup.zero and setup.zero >= 1 else 1
        group = n_t / shard
        formula = f"4 B × {n_t:,} / {shard} (fp32 master partition)"
        if setup.zero == 3:
            group = min(group, DS_SUB_GROUP_ELEMS)
            formula = f"4 B × min({n_t:,} / {shard}, {DS_SUB_GROUP_ELEMS:,}) (one sub-group)"
        size = FP32 * group
    else:
        width = trainable_bytes(setup)
        size = width * n_t
        formula = f"{width} B × {n_t:,} trainable (foreach sqrt of exp_avg_sq)"
    return Term("optimizer step temporaries", int(size), f"{formula} = {gib(size)}")
