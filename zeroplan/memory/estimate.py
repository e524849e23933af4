"""estimate(): the per-GPU peak of one training step, from its terms and where the peak falls.

The step is: forward with the model's causal-LM loss, backward, gradient clipping,
optimizer step, ``zero_grad(set_to_none=True)``. Its peak falls on one of these moments,
and the estimate takes the largest (static = weights + adapters + optimizer states +
persistent buffers; from the second step on the optimizer states exist throughout):

    loss          static + resident grads + saved activations + logits      (start of backward)
    lm_head       static + resident grads + saved activations + lm_head grad + bf16 logits grad
    layer         static + resident grads + saved (or checkpoints + one recomputed layer)
                  + its backward transients + reduce buckets + ZeRO-3 gathered layer
    embedding     full fine-tuning without DeepSpeed: static + all gradients
                  + the tied embedding's sum (gradients.tied_embedding_backward)
    step          static + the gradients at the step (gradients.gradients)
                  + foreach AdamW's temporaries (optimizer.adamw_step_temporaries); under
                  ZeRO-1/2 those come after the bf16 gradients are freed
                  (gradients.step_gradients), the flattening before is its own moment

A loop that keeps the model's output (logits.kept_output) holds its bf16 logits through
every backward moment, and the whole output (logits + KV cache) through the step and the
next forward, until ``out`` is reassigned; and AMP under checkpointing holds every fp16
weight copy in autocast's cache to the forward's end, not beyond (precision.amp_*). Either
adds one moment:

    forward end   static + resident grads + saved activations (with the forward's weight
                  copies) + the loss inside cross-entropy (logits.loss_forward_bytes)
                  + the previous step's output

"resident grads" exist before backward (gradients.resident_gradients): earlier
micro-batches' under accumulation, DeepSpeed's persistent buffers. For full fine-tuning
under checkpointing the recompute of the *first* layer happens when every other layer's
gradient already exists.
"""

from __future__ import annotations

from zeroplan import liger, moe
from zeroplan.errors import BadSetupError
from zeroplan.hardware import Cluster
from zeroplan.memory.activations import activation_profile
from zeroplan.memory.buffers import (
    comm_buffers,
    frozen_base_held,
    offload_cpu_bytes,
    zero3_embedding_held,
)
from zeroplan.memory.gradients import (
    gradients,
    resident_gradients,
    step_gradients,
    tied_embedding_backward,
)
from zeroplan.memory.logits import kept_logits_bytes, kept_output, logits, loss_forward_bytes
from zeroplan.memory.optimizer import adamw_step_temporaries, optimizer_states
from zeroplan.memory.overhead import device_used, required_bytes, reserved_from_allocated
from zeroplan.memory.precision import loss_scaler_bytes, residual_bytes
from zeroplan.memory.result import MemoryEstimate, Term
from zeroplan.memory.weights import adapter_weights, base_weights, gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import (
    BF16,
    TrainSetup,
    attention_note,
    resolve_attention,
    resolve_precision,
    trainable_bytes,
    trainable_params,
    window_note,
)

# Families whose activations were measured on a GPU (benchmarks/results/); others are
# estimated from the same op-level model and flagged as not calibrated. The MoE families
# within 2.5% on the setups zeroplan.moe admits (moe_h100.jsonl, check_h200_moe.jsonl).
CALIBRATED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"})


def _check_supported(spec: ModelSpec, setup: TrainSetup) -> None:
    spec.check_seq_len(setup.seq_len)
    # mixture of experts: only what was measured (zeroplan.moe.MEASURED)
    moe.check(spec, setup)
    liger.check_kernels(spec.model_type, setup.kernels)
    if setup.method == "qlora" and setup.zero == 3 and setup.offload == "optimizer+params":
        raise BadSetupError(
            "--offload optimizer+params cannot offload 4-bit weights: use --offload optimizer"
        )


def estimate(spec: ModelSpec, cluster: Cluster, setup: TrainSetup) -> MemoryEstimate:
    """Per-GPU memory of ``setup`` for ``spec`` on ``cluster`` (worst-loaded rank).

    The setup's precision is resolved against the cluster's GPU first (bf16 where it has
    it, else fp16; trainsetup.resolve_precision) and its attention against the model (its
    default where unset, sdpa refused where transformers has none:
    trainsetup.resolve_attention); the result's ``setup`` holds both.
    """
    setup = resolve_attention(resolve_precision(setup, cluster.gpu.bf16, cluster.gpu.name), spec)
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
    temps = adamw_step_temporaries(spec, setup, world)
    step_grads = step_gradients(spec, setup, world)
    kept = kept_output(spec, setup)
    # while backward runs, a kept output adds its logits; its cache is the keys and values
    # attention saved anyway
    kept_in_backward = kept_logits_bytes(spec, setup)

    optim_alloc = optim.bytes if optim.in_allocator else 0
    resident = resident_gradients(spec, setup, world)
    full = setup.method == "full"
    v_h = spec.vocab_size * spec.hidden_size
    # a full fine-tuning gradient has its weight's width: 4 B for AMP's fp32 model
    grad_width = trainable_bytes(setup)
    lm_head_grad = grad_width * v_h if full else 0
    logits_grad_bf16 = BF16 * setup.tokens * spec.vocab_size if setup.full_logits else 0
    # ZeRO-3 on several GPUs gathers the whole lm_head around the loss, and holds copies
    # of the vocabulary matrices throughout
    head_gathered = BF16 * v_h if setup.zero == 3 and world > 1 else 0
    head_gathered += zero3_embedding_held(spec, setup, world)
    # the reduce buckets appear with a backward's first gradient: lm_head's when it trains
    head_buckets = buffers.backward if full else 0

    saved = act.checkpoints if setup.grad_ckpt else act.all_layers
    saved += act.head + act.autocast_weights
    # the first recomputed layer at its MLP's backward (activations.recompute_extra)
    recompute_act = act.checkpoints + act.one_layer + act.recompute_extra + act.recompute_weights
    # at the forward's end autocast's cache still holds every weight copy it made
    forward_saved = saved - act.autocast_weights + act.forward_weights
    # Full fine-tuning with checkpointing: recomputing layer 1 happens with the other
    # layers' gradients already allocated.
    late_grads = grads.bytes - grads.bytes // spec.num_layers if full and not setup.deepspeed else 0

    phases: dict[str, dict[str, int]] = {
        "loss (start of backward)": {
            "activations": saved,
            "logits": loss.bytes,
            "gradients": resident,
            "buffers": head_gathered,
            "kept_output": kept_in_backward,
        },
        "lm_head backward": {
            "activations": saved,
            "logits": logits_grad_bf16,
            "gradients": resident + lm_head_grad,
            "buffers": head_gathered + head_buckets,
            "kept_output": kept_in_backward,
        },
        "optimizer step": {
            "activations": 0,
            "logits": 0,
            "gradients": step_grads if temps.bytes else grads.bytes,
            "buffers": 0,
            "kept_output": kept.bytes,
            "optimizer_temporaries": temps.bytes,
        },
    }
    if temps.bytes and step_grads < grads.bytes:
        # ZeRO-1/2: the gradients peak while the fp32 copy is made, before the step
        phases["gradients flattened (before the step)"] = {
            "activations": 0,
            "logits": 0,
            "gradients": grads.bytes,
            "buffers": 0,
            "kept_output": kept.bytes,
        }
    if kept.bytes or forward_saved > saved:
        why = "previous output alive" if kept.bytes else "autocast's weight copies alive"
        phases[f"forward end ({why})"] = {
            "activations": forward_saved,
            "logits": loss_forward_bytes(spec, setup),
            "gradients": resident,
            "buffers": head_gathered,
            "kept_output": kept.bytes,
        }
    in_backward = buffers.backward + buffers.gathered
    if setup.grad_ckpt:
        phases["layer recompute (backward)"] = {
            "activations": recompute_act,
            "logits": 0,
            "gradients": max(resident, late_grads),
            "buffers": in_backward,
            "kept_output": kept_in_backward,
        }
    else:
        phases["layer backward"] = {
            "activations": saved + act.transient,
            "logits": 0,
            "gradients": resident,
            "buffers": in_backward,
            "kept_output": kept_in_backward,
        }
    if full and not setup.deepspeed:
        # The end of backward: every gradient exists, and a tied embedding's dense gradient
        # is computed and summed with lm_head's.
        phases["embedding backward (end of backward)"] = {
            "activations": act.checkpoints if setup.grad_ckpt else 0,
            "logits": 0,
            "gradients": grads.bytes + tied_embedding_backward(spec, setup),
            "buffers": 0,
            # the saved keys and values are gone from the graph, the output's cache holds them
            "kept_output": kept.bytes,
        }
    base = {
        "weights": weights.bytes + adapters.bytes,
        "optimizer": optim_alloc,
    }
    static_buffers = buffers.static + loss_scaler_bytes(setup)

    def total(parts: dict[str, int]) -> int:
        return sum(base.values()) + static_buffers + sum(parts.values())

    for parts in phases.values():
        parts.setdefault("kept_output", 0)
        parts.setdefault("optimizer_temporaries", 0)
    phase = max(phases, key=lambda name: total(phases[name]))
    at_peak = base | phases[phase]
    at_peak["buffers"] += static_buffers
    peak = total(phases[phase])
    reserved = reserved_from_allocated(peak, setup.grad_ckpt)
    outside = 0 if optim.in_allocator else optim.bytes
    distributed = setup.deepspeed or world > 1
    used = device_used(reserved, distributed, outside)
    required = required_bytes(peak, distributed, outside)

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
        "buffers": buffers.term,
        "kept_output": kept,
        "optimizer_temporaries": temps,
    }
    notes: list[str] = []
    calibrated = spec.model_type in CALIBRATED_FAMILIES and setup.attn != "flash_attention_2"
    if not calibrated:
        notes.append(f"{spec.model_type} / {setup.attn}: activations not yet calibrated on a GPU")
    attn_why = attention_note(spec, setup)
    if attn_why:
        notes.append(attn_why)
    window_why = window_note(spec, setup)
    if window_why:
        notes.append(window_why)
    if spec.vision_params:
        notes.append(
            f"includes the checkpoint's vision tower + projector ({spec.vision_params / 1e9:.2f} B "
            "params, which AutoModelForCausalLM loads) as bf16 weights; not counted: LoRA "
            "adapters that all-linear also puts on it, 4-bit quantization of its linears"
        )
    if setup.fp16:
        notes.append(fp16_note(setup))
    if frozen_base_held(setup, world):
        notes.append(
            "LoRA under ZeRO-3 with checkpointing: the whole frozen base held gathered through "
            "the backward is traced for reentrant checkpointing (DeepSpeed's own bookkeeping, "
            "one H100); non-reentrant checkpointing holds less there (DeepSpeed's reuse "
            "window, 1e9 elements) but was not traced on several GPUs: the term is kept, "
            "up to 15% over for a plain loop"
        )
    if setup.zero == 3 and setup.method == "lora":
        how = "inside zero.Init" if setup.zero_init else "before deepspeed.initialize (plain loop)"
        notes.append(
            "LoRA under ZeRO-3: what DeepSpeed's linear saves of the frozen layers' inputs is "
            f"read off measurements for a model built {how}, not traced"
        )
    if spec.moe and world > 1:
        notes.append(
            "mixture of experts: measured on one GPU; under DDP each GPU holds what one GPU "
            "does plus the adapters' gradient buckets, as on dense models"
        )
    notes.extend(cluster.notes)
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
            "spec": cluster.describe(times="x"),  # as --gpus takes it
            "p2p": cluster.gpu.p2p,
            "inter_node_gbs": cluster.inter_node_gbs,
            # None: unknown (the speed model then assumes DEFAULT_CPU_CORES_PER_GPU)
            "cpu_cores_per_node": cluster.cpu_cores_per_node,
            "cpu_threads_per_rank": cluster.cpu_threads_per_rank,
        },
        terms=terms,
        at_peak=at_peak,
        peak_phase=phase,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_used_bytes=used,
        required_bytes=required,
        gpu_memory_bytes=cluster.gpu.memory_bytes,
        cpu_bytes_per_node=offload_cpu_bytes(spec, setup, world, cluster.gpus_per_node),
        calibrated=calibrated,
        notes=tuple(notes),
    )


def fp16_note(setup: TrainSetup) -> str:
    """The one line that says how fp16 mixed precision runs and where it was measured."""
    if setup.method == "full" and not setup.deepspeed:
        how = "AMP on an fp32 model: fp32 weights, grads and Adam + autocast's fp16 copies"
    elif setup.deepspeed:
        how = "DeepSpeed fp16: as bf16, plus its loss scaler"
    else:
        how = "fp16 base, fp32 adapters, GradScaler: as bf16 LoRA"
    return (
        f"fp16 mixed precision ({how}): measured with fp16 forced on an H200, peaks within "
        "0.5% (benchmarks/results/memory_2xh200_fp16.jsonl)"
    )


def _activation_formula(
    spec: ModelSpec, setup: TrainSetup, ckpts: int, all_layers: int, one: int
) -> str:
    t = setup.tokens
    if setup.grad_ckpt:
        return (
            f"checkpoints {residual_bytes(setup)} B × {spec.hidden_size} × {t:,} tokens"
            f" × {spec.num_layers} layers = {gib(ckpts)}"
            f" + one recomputed layer {gib(one)}"
        )
    per_tok = all_layers / max(1, t * spec.num_layers)
    return f"{per_tok:,.0f} B/token/layer × {t:,} tokens × {spec.num_layers} layers = {gib(all_layers)}"
