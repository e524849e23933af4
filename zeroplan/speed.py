"""Predicted step time: compute (FLOPs at a calibrated efficiency) plus communication.

All pure functions. The compute efficiency and the per-layer overhead are fitted on the
measured steps in benchmarks/results/ by ``benchmarks/fit_speed.py`` (the constants below
are its output; a test re-runs the fit and checks them).
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan.hardware import PCIE_EFFECTIVE_GBS, Cluster
from zeroplan.memory.weights import trainable_bytes
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup, lora_targets, resolve_precision, trainable_params

# Fraction of the card's dense bf16 peak that the matmuls reach, by method, and a fixed cost
# per decoder layer per micro-batch (kernel launches, norms, LoRA's small matmuls, bitsandbytes
# dequantization), in seconds, scaled by the H100's peak for other cards.
EFFICIENCY = {"lora": 0.315, "qlora": 0.359, "full": 0.344}
LAYER_OVERHEAD_S = {"lora": 0.98e-3, "qlora": 1.64e-3, "full": 2.59e-3}
H100_TFLOPS = 989.0
# ZeRO-3's per-parameter hooks (fetch, release, partition bookkeeping) cost this much per
# parameter tensor per micro-batch on the host, whatever its size: what makes ZeRO-3 slow
# for LoRA, whose adapters add two small tensors per adapted linear. Fitted on one H100.
ZERO3_SECONDS_PER_TENSOR = 1.56e-3
# Fraction of communication hidden behind compute (DeepSpeed overlap_comm, DDP buckets).
# Not measured yet (no multi-GPU machine): an assumption the planner's output says it uses.
OVERLAP = 0.5
# CPU Adam (DeepSpeed's optimizer offload) updates about this many parameters per second per
# rank; not measured yet.
CPU_ADAM_PARAMS_PER_S = 1.0e9


@dataclass(frozen=True)
class StepTime:
    """Seconds for one optimizer step (all micro-batches) on every rank."""

    compute_s: float
    comm_s: float
    offload_s: float
    total_s: float
    tokens_per_s: float  # whole cluster


def flops_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """Training FLOPs per token.

    forward   2·(Ψ_lin + V·h) + attention 2·s·q·L (causal half of 4·s·q per layer)
    backward  input gradients: 2·(Ψ_lin + V·h) + 2 × attention; weight gradients (full
              fine-tuning only; LoRA's are negligible): 2·(Ψ_lin + V·h)
    recompute (checkpointing): one more forward of the layers, 2·Ψ_lin + attention
    Ψ_lin counts the linears a token passes through (MoE: top-k experts, not all).
    """
    h, s, layers = spec.hidden_size, setup.seq_len, spec.num_layers
    head = spec.vocab_size * h
    linear = _active_linear_params(spec)
    attention = 2.0 * s * spec.q_dim * layers
    forward = 2.0 * (linear + head) + attention
    backward = 2.0 * (linear + head) + 2 * attention
    if setup.method == "full":
        backward += 2.0 * (linear + head)
    recompute = 2.0 * linear + attention if setup.grad_ckpt else 0.0
    return forward + backward + recompute


def _active_linear_params(spec: ModelSpec) -> float:
    total = 0.0
    for linears, n_layers in spec.linears_by_layer_kind():
        per_layer = 0.0
        for lin in linears:
            if lin.group == "expert" and spec.moe:
                per_layer += lin.params * spec.moe.top_k / max(1, lin.count)
            else:
                per_layer += lin.params
        total += per_layer * n_layers
    return total


def parameter_tensors(spec: ModelSpec, setup: TrainSetup) -> int:
    """nn.Parameter tensors: per layer its linears' weights and biases, norms (and q/k
    norms); embeddings, final norm, an untied lm_head; LoRA's A and B per adapted linear."""
    total = 3 if not spec.tie_word_embeddings else 2
    for linears, n_layers in spec.linears_by_layer_kind():
        per_layer = sum(1 + int(lin.bias) for lin in linears) + spec.norms_per_layer
        per_layer += 2 if spec.qk_norm else 0
        total += per_layer * n_layers
    if setup.is_lora:
        total += 2 * sum(n for _, n in lora_targets(spec, setup))
    return total


def compute_seconds(spec: ModelSpec, setup: TrainSetup, peak_tflops: float) -> float:
    """One micro-batch: FLOPs·T / (peak · efficiency) + layers · overhead · (H100 / peak)
    (+ ZeRO-3: parameter tensors · 1.56 ms)."""
    flops = flops_per_token(spec, setup) * setup.tokens
    scale = H100_TFLOPS / peak_tflops
    overhead = spec.num_layers * LAYER_OVERHEAD_S[setup.method] * scale
    if setup.zero == 3:
        overhead += parameter_tensors(spec, setup) * ZERO3_SECONDS_PER_TENSOR
    return flops / (peak_tflops * 1e12 * EFFICIENCY[setup.method]) + overhead


def comm_bytes_per_step(spec: ModelSpec, setup: TrainSetup, world: int) -> float:
    """Bytes each rank sends per optimizer step (ring collectives: (N−1)/N of the buffer).

    DDP / ZeRO-0:  all-reduce of the gradients, 2·(N−1)/N · g·Ψ_t (g = 4 B LoRA fp32 without
                   DeepSpeed, else 2 B)
    ZeRO-1/2:      reduce-scatter of bf16 gradients + all-gather of bf16 parameters:
                   2·(N−1)/N · 2 B·Ψ_t
    ZeRO-3:        per micro-batch: parameters gathered for forward and backward (and the
                   recompute under checkpointing), 2 B·Ψ each, plus the gradients'
                   reduce-scatter 2 B·Ψ_t: (N−1)/N of each
    """
    if world == 1:
        return 0.0
    ring = (world - 1) / world
    n_t = trainable_params(spec, setup)
    if not setup.deepspeed or setup.zero == 0:
        return 2 * ring * trainable_bytes(setup) * n_t
    if setup.zero in (1, 2):
        return 2 * ring * 2 * n_t
    gathers = 3 if setup.grad_ckpt else 2
    per_micro = ring * (gathers * 2 * spec.total_params + 2 * n_t)
    return per_micro * setup.grad_accum


# Between nodes when the user does not say (--inter-node-gbs): 100 Gb/s Ethernet per GPU.
DEFAULT_INTER_NODE_GBS = 12.5


def link_gbs(cluster: Cluster) -> float:
    """Per-GPU bandwidth for collectives: the node's link, halved without P2P (NCCL stages
    through host memory); across nodes the slower of that and the network.

    P2P is ``cluster.gpu.p2p`` (the catalog's, NVML's for this machine, or ``--p2p`` /
    ``--no-p2p``); the network is ``--inter-node-gbs``, else 12.5 GB/s per GPU."""
    gpu = cluster.gpu
    bw = gpu.link_bandwidth_gbs if gpu.p2p else gpu.link_bandwidth_gbs / 2
    if cluster.num_nodes > 1:
        bw = min(bw, cluster.inter_node_gbs or DEFAULT_INTER_NODE_GBS)
    return bw


def peak_tflops(setup: TrainSetup, cluster: Cluster) -> float:
    """The tensor-core peak of the setup's precision: the card's fp16 TFLOP/s for an fp16
    setup, else its bf16 (an unresolved setup: bf16 where the card has it, else fp16, as
    ``GPU.tensor_tflops``). The efficiencies were fitted on bf16 steps and are used for
    fp16 as they are (the same tensor cores at the same rate on every card that has both)."""
    setup = resolve_precision(setup, cluster.gpu.bf16, cluster.gpu.name)
    return cluster.gpu.fp16_tflops if setup.fp16 else cluster.gpu.bf16_tflops


def step_time(spec: ModelSpec, setup: TrainSetup, cluster: Cluster, fill: float = 1.0) -> StepTime:
    """compute·grad_accum + (1 − overlap)·comm + offloaded optimizer step.

    ``fill``: the share of token positions that hold real tokens (packed rows of real data,
    ``zeroplan.packing``); tokens/s counts real tokens, b·s·accum·N·fill per step.
    """
    world = cluster.world_size
    compute = compute_seconds(spec, setup, peak_tflops(setup, cluster)) * setup.grad_accum
    comm = comm_bytes_per_step(spec, setup, world) / (link_gbs(cluster) * 1e9)
    offload = 0.0
    if setup.offload != "none":
        n_t = trainable_params(spec, setup) / world
        pcie = PCIE_EFFECTIVE_GBS.get(cluster.gpu.pcie_gen, 25.0)
        # bf16 gradients down, bf16 parameters up, CPU Adam over the partition
        offload = 2 * 2 * n_t / (pcie * 1e9) + n_t / CPU_ADAM_PARAMS_PER_S
        if setup.offload == "optimizer+params":
            offload += 2 * 2 * spec.total_params / world * setup.grad_accum / (pcie * 1e9)
    total = compute + (1 - OVERLAP) * comm + offload
    tokens = setup.tokens * setup.grad_accum * world * fill
    return StepTime(compute, comm, offload, total, tokens / total)
