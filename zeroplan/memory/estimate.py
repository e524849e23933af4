"""estimate(): the per-GPU peak of one training step, from its terms and where the peak falls.

The step is: forward with the model's causal-LM loss, backward, gradient clipping,
optimizer step, ``zero_grad(set_to_none=True)``. Its peak falls on one of these moments,
and the estimate takes the largest (static = weights + adapters + optimizer states +
persistent buffers; from the second step on the optimizer states exist throughout):

    loss          static + resident grads + saved activations + logits      (start of backward)
    lm_head       static + resident grads + saved activations + lm_head grad + bf16 logits grad
    recompute     static + resident grads + checkpoints + one layer + its backward transients
    step          static + all gradients + ZeRO's fp32 gradient partition

"resident grads" are gradients that exist before backward: DeepSpeed's accumulation
buffers; without DeepSpeed none (``set_to_none``), except that for full fine-tuning
under checkpointing the recompute of the *first* layer happens when every other layer's
gradient already exists.
"""

from __future__ import annotations

from zeroplan.errors import BadSetupError, UnsupportedModelError
from zeroplan.hardware import Cluster
from zeroplan.memory.activations import activation_profile
from zeroplan.memory.buffers import comm_buffers, offload_cpu_bytes
from zeroplan.memory.gradients import gradients
from zeroplan.memory.logits import logits
from zeroplan.memory.optimizer import optimizer_states
from zeroplan.memory.overhead import device_used, reserved_from_allocated
from zeroplan.memory.result import MemoryEstimate, Term
from zeroplan.memory.weights import BF16, adapter_weights, base_weights, gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup, trainable_params

# Families whose activations were measured on a GPU (benchmarks/results/); others are
# estimated from the same op-level model and flagged as not calibrated.
CALIBRATED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _check_supported(spec: ModelSpec, setup: TrainSetup) -> None:
    if spec.moe and setup.method == "qlora":
        raise UnsupportedModelError(
            f"{spec.name}: QLoRA of mixture-of-experts models is not modelled (how bitsandbytes "
            "treats fused expert tensors depends on the transformers version); use --method lora"
        )
    if setup.method == "qlora" and setup.zero == 3 and setup.offload == "optimizer+params":
        raise BadSetupError(
            "--offload optimizer+params cannot offload 4-bit weights: use --offload optimizer"
        )


def estimate(spec: ModelSpec, cluster: Cluster, setup: TrainSetup) -> MemoryEstimate:
    """Per-GPU memory of ``setup`` for ``spec`` on ``cluster`` (worst-loaded rank)."""
    _check_supported(spec, setup)
    world = cluster.world_size
    n_t = trainable_params(spec, setup)

    weights = base_weights(spec, setup, world)
    adapters = adapter_weights(spec, setup, world)
    grads = gradients(spec, setup, world)
    optim = optimizer_states(spec, setup, world)
    buffers = comm_buffers(spec, setup, world)
    loss = logits(spec, setup)
    act = activation_profile(spec, setup, n_t)

    optim_alloc = optim.bytes if optim.in_allocator else 0
    # DeepSpeed keeps gradient buffers across the step; plain PyTorch frees them (set_to_none).
    resident = grads.bytes if setup.deepspeed else 0
    full = setup.method == "full"
    lm_head_grad = BF16 * spec.vocab_size * spec.hidden_size if full else 0
    logits_grad_bf16 = BF16 * setup.tokens * spec.vocab_size if not setup.fused_loss else 0

    saved = act.checkpoints if setup.grad_ckpt else act.all_layers
    saved += act.head + act.autocast_weights
    recompute_act = (
        act.checkpoints + act.one_layer + act.transient + act.head + act.autocast_weights
    )
    # Full fine-tuning with checkpointing: recomputing layer 1 happens with the other
    # layers' gradients already allocated.
    late_grads = grads.bytes - grads.bytes // spec.num_layers if full and not setup.deepspeed else 0

    phases: dict[str, dict[str, int]] = {
        "loss (start of backward)": {
            "activations": saved,
            "logits": loss.bytes,
            "gradients": resident,
        },
        "lm_head backward": {
            "activations": saved,
            "logits": logits_grad_bf16,
            "gradients": resident + lm_head_grad,
        },
        "optimizer step": {"activations": 0, "logits": 0, "gradients": grads.bytes},
    }
    if setup.grad_ckpt:
        phases["layer recompute (backward)"] = {
            "activations": recompute_act,
            "logits": 0,
            "gradients": resident + late_grads,
        }
    else:
        phases["layer backward"] = {
            "activations": saved + act.transient,
            "logits": 0,
            "gradients": resident,
        }
    base = {
        "weights": weights.bytes + adapters.bytes,
        "optimizer": optim_alloc,
        "buffers": buffers.bytes,
    }

    def total(parts: dict[str, int]) -> int:
        return sum(base.values()) + sum(parts.values())

    phase = max(phases, key=lambda name: total(phases[name]))
    at_peak = base | phases[phase]
    peak = total(phases[phase])
    reserved = reserved_from_allocated(peak)
    outside = 0 if optim.in_allocator else optim.bytes
    used = device_used(reserved, world, outside)

    activations_term = Term(
        "activations",
        saved + (act.one_layer + act.transient if setup.grad_ckpt else act.transient),
        _activation_formula(spec, setup, act.checkpoints, act.all_layers, act.one_layer),
    )
    weights_term = Term(
        "weights",
        weights.bytes + adapters.bytes,
        f"{weights.formula}; adapters: {adapters.formula}",
    )
    terms = {
        "weights": weights_term,
        "gradients": grads,
        "optimizer": optim,
        "activations": activations_term,
        "logits": loss,
        "buffers": buffers,
    }
    notes: list[str] = []
    calibrated = spec.model_type in CALIBRATED_FAMILIES and setup.attn != "flash_attention_2"
    if not calibrated:
        notes.append(f"{spec.model_type} / {setup.attn}: activations not yet calibrated on a GPU")
    if setup.optim.startswith("paged"):
        notes.append(
            "paged optimizer states live in CUDA managed memory: in nvidia-smi, not in allocated"
        )
    return MemoryEstimate(
        model={
            "name": spec.name,
            "model_type": spec.model_type,
            "source": spec.source,
            "total_params": spec.total_params,
            "trainable_params": n_t,
        },
        setup=setup.to_dict(),
        cluster={
            "gpu": cluster.gpu.name,
            "gpus_per_node": cluster.gpus_per_node,
            "num_nodes": cluster.num_nodes,
            "world_size": world,
        },
        terms=terms,
        at_peak=at_peak,
        peak_phase=phase,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_used_bytes=used,
        gpu_memory_bytes=cluster.gpu.memory_bytes,
        cpu_bytes_per_node=offload_cpu_bytes(spec, setup, world, cluster.gpus_per_node),
        calibrated=calibrated,
        notes=tuple(notes),
    )


def _activation_formula(
    spec: ModelSpec, setup: TrainSetup, ckpts: int, all_layers: int, one: int
) -> str:
    t = setup.tokens
    if setup.grad_ckpt:
        return (
            f"checkpoints 2 B × {spec.hidden_size} × {t:,} tokens × {spec.num_layers} layers = {gib(ckpts)}"
            f" + one recomputed layer {gib(one)}"
        )
    per_tok = all_layers / max(1, t * spec.num_layers)
    return f"{per_tok:,.0f} B/token/layer × {t:,} tokens × {spec.num_layers} layers = {gib(all_layers)}"
