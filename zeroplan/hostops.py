"""The tensor operations a training step dispatches, per decoder layer and per LoRA adapter,
by architecture: what the host clock of ``zeroplan.speed`` counts.

Counted, not fitted: ``benchmarks/count_host_ops.py`` runs each family's real modelling code
(transformers, PEFT) forward and backward under a dispatch counter and writes
``catalog/host_ops.json``; the ATen calls that make a new tensor count, views do not. The
count tells architectures apart where a layer count cannot: a Gemma 3 layer runs about
twice the operations of a Llama layer (six RMSNorms, each in float32 around a (1 + weight)
scale), a Qwen3 layer 1.4 times (its q/k norms).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

# Liger's kernels (``kernels="liger"``) in place of the model's own modules, per call of one
# forward and backward: (operations the model's module dispatches, what Liger's cost the
# host in operations). The model's are counted as the table is (``count_host_ops.py
# --liger``: Llama's RMSNorm with a frozen and with a trained weight, SiLU·mul, rotary on q
# and k). Liger's are timed on an H100 machine's host, where its Triton launches and the
# Python around them run (benchmarks/host_timing.py, host_timing_h100.jsonl; Liger 0.8.5,
# Triton 3.6), in the host clock's unit, its fitted seconds per operation
# (SpeedConstants.host_op_s, 25.8 µs): RMSNorm 233 µs, 9; SiLU·mul 146 µs, 6; RoPE 314 µs,
# 12; a trained weight adds three calls (the per-SM partial sums, their sum and the cast),
# not timed. Read off Liger's source, each Triton launch one call, they had been 4, 7, 3
# and 6, and the launched host-bound runs on Liger came out faster in the plan than
# measured, by about 7 points more than the same jobs on the model's own kernels
# (host_h100.jsonl, host4/6/8). Scaled instead by the micro-benchmark's own rate (Llama's
# RMSNorm: 22 calls in 205 µs) they would be 25, 16 and 16: Liger would cost the host more
# than the modules it replaces, and the plan would put host_h100's Liger runs 20-23% slow.
# Those launched rows chose between the two scalings: they are not held out for it.
LIGER_OPS = {
    "rms_norm": (22, 9),
    "rms_norm_trained": (24, 12),
    "swiglu": (5, 6),
    "rope": (24, 12),
}
# The architectures whose RMSNorm, gated MLP and rotary are Llama's modules (the ones
# counted above); others' Liger steps keep their own count on the host's clock.
LIGER_COUNTED = ("llama", "mistral", "qwen2", "qwen3")

# One LoRA adapter (Llama, dropout 0) per forward and backward on PEFT's layer and on
# zeroplan launch's fused LoRA linears (zeroplan.launch.loralinear), ``count_host_ops.py
# --fused-lora``. Counted (in-place calls included on both sides, a Llama layer's seven
# adapters): 19 and 7 calls, the fused ones dispatching the adapters' matmuls and in-place
# sums without PEFT's scaling, sum and the autograd nodes between, q/k/v and gate/up as one
# function each. Timed (one thread, a Llama layer's seven linears 64 wide on 4 tokens, so
# that only the host's work is left; each variant's fastest of 7 runs, the bare layer's
# time taken off, per adapter) on an H100 machine's host, CUDA tensors, as the launch runs
# them (benchmarks/host_timing.py, host_timing_h100.jsonl): bf16 adapters 269 and 194 µs,
# fp32 adapters under autocast 315 and 220, over NF4 bases under autocast 302 and 185
# (PEFT's 4-bit copy, bitsandbytes' module and autograd node gone: the fused function
# dequantizes through bitsandbytes' C functions and calls F.linear itself). On a CPU, where
# nothing launches, the same were 110 and 114-122, 139 and 138-146, 176-191 and 124-150:
# there the fused Python weighs more against PEFT's calls than where each call launches.
# The fused functions' forward and backward are Python (an autograd.Function, and the
# group's hand-over of outputs), which costs what many of the saved calls did: the host
# clock takes the timed ratio of the path, not the count's.
# (Timed one linear at a time, the first fused function, which called the base module and
# scaled two gradients apart, cost 1.10x, 0.96x and 0.69x PEFT's; with the count, 10/19,
# the plan said 7,977 tokens/s for the launched 8B QLoRA at 1 × 1,664 on one H100 where
# 6,504 ran, host4_h100.jsonl.)
FUSED_ADAPTER_OPS = (19, 7)
FUSED_ADAPTER_HOST_US = {"bf16": (269, 194), "autocast": (315, 220), "4bit": (302, 185)}


def fused_adapter_share(path: str) -> float:
    """What a fused LoRA linear's adapter asks of the host, as a share of PEFT's on the same
    ``path`` (FUSED_ADAPTER_HOST_US: "bf16" adapters, fp32 ones under "autocast", or over a
    "4bit" base): 0.72, 0.70, 0.61."""
    peft, fused = FUSED_ADAPTER_HOST_US[path]
    return fused / peft


# A decoder layer under ``--compile`` (each layer through torch.compile, inductor): the calls
# the host makes per forward and backward of one Llama layer with all-linear LoRA at dropout
# 0, eager and compiled, bf16 and with bitsandbytes' NF4 linears, as (eager bf16 layer,
# compiled layer): ATen and bitsandbytes calls made from Python or from the compiled graph's
# wrapper that return a new tensor, plus inductor's kernels, read off torch.profiler on the
# CPU (``count_host_ops.py --compile``; benchmarks/results/host_ops_compiled_cpu.txt). A
# TorchDispatchMode turns a compiled region back to eager, so these are not the table's
# unit: only their ratio is used (compiled_share). Under SDPA the layer traces as one graph,
# 4-bit linears included (torch._dynamo.explain: no graph break); the launch's varlen
# attention stays eager between two (zeroplan.launch.batching.register_varlen). Liger's
# kernels were not counted (they need a GPU).
COMPILED_LAYER = {"bf16": (140, 72), "4bit": (140, 100)}


def compiled_share(quantized: bool) -> float:
    """What a compiled layer asks of the host, as a share of the eager bf16 layer's calls
    (COMPILED_LAYER): 0.51 bf16, 0.71 with 4-bit linears (their dequantization stays a call
    of its own each way)."""
    eager, compiled = COMPILED_LAYER["4bit" if quantized else "bf16"]
    return compiled / eager


# A micro-batch whose decoder runs as CUDA graphs (``setup.cuda_graphs``,
# zeroplan.launch.graphs): what the host still dispatches, whatever the depth. Counted off
# the launch's path: the copies of the ids, positions and boundaries into the graph's
# inputs and its two replays (7), the gradients' one _foreach_add_, the Trainer's own calls
# around a micro-batch (its loss's detach and sum, about 10), and Liger's fused loss, which
# stays eager: its count of targets and about five calls per chunk of rows (logits, the
# loss kernel, the input's gradient; 26 chunks at 1 × 1,664 tokens of Llama-3's vocabulary,
# 22 at 16 × 704), so about 150 in all.
GRAPHED_MICRO_BATCH_OPS = 150


# Multimodal checkpoints whose text tower is another family's decoder.
_TEXT_TOWER = {"gemma3": "gemma3_text"}
# What an architecture without a count is taken for (the fitted rows' own).
FALLBACK = "llama"


@dataclass(frozen=True)
class HostOps:
    """Operations per forward and backward: ``layer_frozen`` a decoder layer gradients flow
    through without training it (LoRA's and QLoRA's base), ``layer_full`` one whose weights
    train, ``adapter`` one PEFT LoRA adapter with dropout, ``adapter_no_dropout`` without."""

    layer_frozen: int
    layer_full: int
    adapter: int
    adapter_no_dropout: int

    def per_layer(self, full: bool) -> int:
        return self.layer_full if full else self.layer_frozen

    def per_adapter(self, dropout: float) -> int:
        return self.adapter if dropout > 0 else self.adapter_no_dropout


@cache
def _table() -> dict[str, HostOps]:
    path = resources.files("zeroplan") / "catalog" / "host_ops.json"
    families = json.loads(path.read_text(encoding="utf-8"))["families"]
    return {
        model_type: HostOps(
            layer_frozen=c["layer_frozen"],
            layer_full=c["layer_full"],
            adapter=c["adapter"],
            adapter_no_dropout=c["adapter_no_dropout"],
        )
        for model_type, c in families.items()
    }


def counted(model_type: str) -> bool:
    """Whether the architecture's operations were counted (else it is taken for FALLBACK)."""
    return _TEXT_TOWER.get(model_type, model_type) in _table()


def host_ops(model_type: str) -> HostOps:
    """The architecture's counted operations; FALLBACK's for one not counted."""
    table = _table()
    return table.get(_TEXT_TOWER.get(model_type, model_type), table[FALLBACK])
