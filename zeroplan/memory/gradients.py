"""Gradients of the trainable parameters: what exists before backward, and at the step."""

from __future__ import annotations

from zeroplan.memory.precision import amp_fp32_model
from zeroplan.memory.result import Term
from zeroplan.memory.weights import gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import (
    BF16,
    DS_SUB_GROUP_ELEMS,
    FP32,
    TrainSetup,
    trainable_bytes,
    trainable_params,
)


def gradients(spec: ModelSpec, setup: TrainSetup, world: int) -> Term:
    """Gradient bytes at the optimizer step, where they are largest.

    no DeepSpeed:  the parameter's dtype: full 2 B · Ψ (bf16), LoRA 4 B · Ψ_t (fp32)
    ZeRO-0:        bf16 grads 2 B · Ψ_t + their flattened fp32 copy for the step 4 B · Ψ_t
                   (bf16 at stage 0 with DeepSpeed's default bf16 gradient accumulation runs
                   the fused mixed-precision optimizer, which builds that copy in step())
    ZeRO-1:        bf16 grads 2 B · Ψ_t + the flattened bf16 partition 2 B · Ψ_t / N + its
                   fp32 copy for the step 4 B · Ψ_t / N
    ZeRO-2:        bf16 partition 2 B · Ψ_t / N + flattened copy 2 B · Ψ_t / N + fp32 copy
                   4 B · Ψ_t / N
    ZeRO-3:        bf16 partition 2 B · Ψ_t / N (preallocated) + the fp32 copy of one
                   optimizer sub-group at a time: 4 B · min(Ψ_t / N, sub_group_size)
    optimizer offload keeps the fp32 copy on the CPU.

    Measured on one H100 (benchmarks/results/memory_h100_zero1gpu.jsonl): ZeRO-1 and
    ZeRO-2 full fine-tuning of Llama-3.2-1B peak at the step at static + 8 B · Ψ exactly;
    on two H200s (memory_2xh200_zero_loops.jsonl) ZeRO-0 at static (14 B · Ψ) + 6.05 B · Ψ.
    """
    n_t = trainable_params(spec, setup)
    fp32 = 0 if setup.offload != "none" else FP32
    size: float
    if not setup.deepspeed:
        width = trainable_bytes(setup)
        size = width * n_t
        formula = f"{width} B × {n_t:,} trainable"
    elif setup.zero == 0:
        size = (BF16 + FP32) * n_t
        formula = f"(2 + 4) B × {n_t:,} trainable (bf16 + the step's fp32 copy)"
    elif setup.zero == 1:
        size = BF16 * n_t + (BF16 + fp32) * n_t / world
        formula = f"2 B × {n_t:,} + (2 + {fp32}) B × {n_t:,} / {world}"
    elif setup.zero == 2:
        size = (BF16 + BF16 + fp32) * n_t / world
        formula = f"(2 + 2 + {fp32}) B × {n_t:,} / {world} GPUs"
    else:
        group = min(n_t / world, DS_SUB_GROUP_ELEMS)
        size = BF16 * n_t / world + fp32 * group
        formula = f"2 B × {n_t:,} / {world} + {fp32} B × {group:,.0f} (one sub-group)"
    return Term("gradients", int(size), f"{formula} = {gib(size)}")


def step_gradients(spec: ModelSpec, setup: TrainSetup, world: int) -> int:
    """Gradient bytes alive while the optimizer itself steps (its temporaries come on top).

    ZeRO-1/2:  the fp32 copy only, 4 B · Ψ_t / N: DeepSpeed's stage_1_and_2 ``step()``
               flattens the bf16 partition into it, then frees the bf16 gradients
               (``free_grad_in_param_list``, ``averaged_gradients[i] = None``) before
               ``_optimizer_step``; the flattening moment is gradients()'s
    otherwise: gradients()

    Measured on one H100 (benchmarks/results/edges_h100.jsonl): ZeRO-1 and ZeRO-2 full
    fine-tuning of Llama-3.2-1B with a client foreach AdamW peaked at 25.39 GiB, as with
    fused AdamW (static + 8 B · Ψ): the foreach step's 4 B · Ψ of temporaries replace the
    freed bf16 gradients (the estimate that kept both said 29.92, +17.9%).
    """
    if setup.deepspeed and setup.zero in (1, 2):
        return 0 if setup.offload != "none" else FP32 * trainable_params(spec, setup) // world
    return gradients(spec, setup, world).bytes


def resident_gradients(spec: ModelSpec, setup: TrainSetup, world: int) -> int:
    """Gradient bytes that already exist when a micro-batch's forward starts.

    no DeepSpeed:  0 with one micro-batch per step (``zero_grad(set_to_none=True)``);
                   with accumulation, the earlier micro-batches' gradients (param dtype)
    ZeRO-0:        accumulation: the bf16 grads 2 B · Ψ_t, else 0 (the step's fp32 copy is
                   freed with it; measured on two H200s: a full fine-tuning step's forward
                   starts at 14 B · Ψ, no gradient)
    ZeRO-1:        accumulation: the bf16 grads 2 B · Ψ_t, else 0
    ZeRO-2:        accumulation: the bf16 partition 2 B · Ψ_t / N, else 0
    ZeRO-3:        the preallocated bf16 partition 2 B · Ψ_t / N
    """
    n_t = trainable_params(spec, setup)
    accumulating = setup.grad_accum > 1
    if not setup.deepspeed:
        width = trainable_bytes(setup)
        return width * n_t if accumulating else 0
    if setup.zero in (0, 1):
        return BF16 * n_t if accumulating else 0
    if setup.zero == 2:
        return BF16 * n_t // world if accumulating else 0
    return BF16 * n_t // world


def tied_embedding_backward(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes beyond the gradients while a tied embedding's backward ends (full, no DeepSpeed).

    The embedding's backward makes a dense V·h gradient (aten embedding_dense_backward:
    ``at::zeros({V, h})`` in the gradient's dtype) that autograd sums with lm_head's, waiting
    in the shared weight's input buffer (torch/csrc/autograd/input_buffer.cpp, ``accumulate``:
    in place only into a tensor that holds its storage alone).

    bf16:  lm_head's gradient is a view (the transpose of its matmul's output), so the sum
           is made out of place: the dense gradient and the sum, 2 · 2 B · V·h (measured,
           Llama-3.2-1B/3B, benchmarks/results/memory_h100.jsonl)
    AMP:   lm_head's gradient comes out of the backward of autocast's fp16 → fp32 cast, a
           fresh fp32 tensor, and is summed in place: the dense gradient only, 1 · 4 B · V·h
           (measured, Llama-3.2-1B fp16 checkpointed, memory_2xh200_fp16.jsonl; its trace,
           memory_2xh200_fp16_trace.txt: two fp32 V·h tensors alive at the peak)
    untied: the embedding's gradient is its weight's only one and is kept as is: 0.

    Example: V·h = 1,000 → bf16 4,000 B, AMP 4,000 B.
    """
    if not spec.tie_word_embeddings or setup.method != "full" or setup.deepspeed:
        return 0
    copies = 1 if amp_fp32_model(setup) else 2
    return copies * trainable_bytes(setup) * spec.vocab_size * spec.hidden_size
