"""Predicted step time: what the GPU does, what the host does, and what the links carry.

One micro-batch takes about the longer of two clocks, because the host queues kernels ahead
of the GPU and mostly the slower of the two sets the pace ((gpu^p + host^p)^(1/p), p fitted):

* the GPU's: the matmul FLOPs at a fitted fraction of the card's peak, plus the memory
  traffic that does no matmul work (the elementwise ops around every linear, the float32
  RMSNorms, LoRA's input casts and dropout, the loss's fp32 logits or the fused loss's
  chunks, 4-bit dequantization) at the card's memory bandwidth;
* the host's: Python, autograd and kernel launches, a fixed cost per tensor operation the
  step dispatches (counted per decoder layer and per LoRA adapter for each architecture:
  ``zeroplan.hostops``) and per 4-bit linear, whatever the batch (more under checkpointing,
  whose recompute runs the forward again). This is what makes micro-batch 1 slow:
  measured on one H200, a Llama-3.2-1B LoRA step takes 80 ms at 512 tokens and at 4,096
  alike, and a Gemma 3 1B one, whose layers run twice the operations, about 250 ms.

ZeRO-3 adds its per-tensor hooks (fetch, release) to every micro-batch; the optimizer step
streams the trainable state once per step, and DeepSpeed's engine adds a fixed cost to it;
communication is hidden behind the backward where the runtime overlaps it (DDP's buckets,
DeepSpeed's ``overlap_comm``) and exposed where it does not; optimizer offload adds the
PCIe trips and DeepSpeed's CPU Adam at the rank's CPU threads.

All pure functions. The constants are ``FITTED``: the fitted ones are the output of
``benchmarks/fit_speed.py`` on the measured steps in benchmarks/results/ (a test re-runs
the fit and fails when they drift), the measured ones are read off named rows there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from zeroplan import liger
from zeroplan.hardware import GPU, PCIE_EFFECTIVE_GBS, Cluster
from zeroplan.hostops import (
    GRAPHED_MICRO_BATCH_OPS,
    LIGER_COUNTED,
    LIGER_OPS,
    compiled_share,
    fused_adapter_share,
    host_ops,
)
from zeroplan.models import SHARED_INPUT, ModelSpec
from zeroplan.packing import PaddedBatches
from zeroplan.trainsetup import (
    TrainSetup,
    fused_lora_runs,
    lora_targets,
    resolve_precision,
    trainable_bytes,
    trainable_params,
)


@dataclass(frozen=True)
class SpeedConstants:
    """The step-time model's constants.

    Fitted by least squares on relative error (``benchmarks/fit_speed.py``), one point per
    one-GPU shape, the median of the processes that measured it:
        efficiency_*: fraction of the card's dense peak the matmuls reach, by method.
        act_bytes: bytes moved per token per activation feature (every linear's output:
            what activations, rotary, residual adds and casts read and write around it;
            the RMSNorms' traffic is counted apart, NORM_BYTES · norm_features).
        overlap_p: how the host's and the GPU's clocks combine, (gpu^p + host^p)^(1/p):
            ∞ would be the longer of the two; the fit says how much the queue hides.
        host_op_s / host_4bit_s: host seconds per micro-batch per tensor operation the
            forward and backward dispatch (host_operations: counted per layer and adapter
            by architecture, not fitted), per 4-bit linear. Fitted with one cost per layer
            operation and another per adapter operation, the two come out 28 and 24 µs:
            one cost per operation is the simpler model, and it carries over to
            architectures no row was fitted on (host-bound Gemma 3 1B shapes went from up
            to +73% too fast, per layer and adapter, to within 22%).
        host_recompute: what gradient checkpointing adds to them, as a share: the
            recompute runs every layer's forward again (its Python modules and hooks, the
            larger part of the host's step: the backward's autograd runs in C++), and the
            checkpoint wrapper stashes and restores the RNG state per layer.
        optimizer_8bit_bytes: what bitsandbytes' 8-bit AdamW step costs per trainable
            parameter, as bytes at the card's bandwidth (block-wise (de)quantization of
            both moments makes it slower than its 8-bit states say; AdamW: ADAMW_BYTES).
        optimizer_8bit_tensor_s: what it costs per parameter tensor besides: bitsandbytes
            steps one tensor at a time from Python (its 8-bit kernels, and the 32-bit one
            the Trainer gives embeddings), where fused AdamW steps them in groups; a
            0.5B model with 24 layers of biased attention pays it for ~290 tensors.
    Counted, not fitted:
        logits_bytes: bytes moved per logit (token × vocabulary) by the unfused loss
            outside its matmul: the bf16 logits written (2), their fp32 upcast (read 2,
            write 4), log-softmax (two reads and a write of 4 B), then backward the NLL's
            dense gradient (4), log-softmax's backward (three reads and a write of 4 B),
            the cast back to bf16 (read 4, write 2): 2 + 6 + 12 + 4 + 16 + 6 = 46 B. On
            one GPU with 128k-152k vocabularies a fitted value traded against act_bytes
            (118-189 B came out) and mispredicted a 320-token vocabulary by 17-22%.
    Measured on named rows (``benchmarks/fit_speed.py`` reads them again):
        lora_bytes: bytes moved per token per adapted feature (a linear's in + out) by
            LoRA's elementwise work: PEFT casts the input to the fp32 adapter's dtype,
            drops it out, autocast casts it back, and the backward retraces each; from
            DDP steps against their DeepSpeed twins (bf16 adapters: lora_share) on two
            H200s, because on one GPU it trades against the efficiencies.
        fused_chunk_s: what the fused loss (Liger) costs instead of logits_bytes, per
            chunk beyond its matmul: it never holds all the logits but computes them chunk
            by chunk, each chunk's softmax and gradient in one kernel, and there are about
            V/h chunks whatever the micro-batch (liger_chunks), so at small micro-batches
            it would cost more per token. From twins that differ only in the fused loss,
            timed in the same process (one and two H200s): fitted on the shapes' medians
            it wandered between 0.2 and 0.5 ms with each refit, enough to flip a plan.
        zero3_tensor_s: ZeRO-3's hooks, host seconds per parameter tensor per micro-batch
            (host_seconds), from every ZeRO-3 step on two H200s: the value that predicts
            each exactly, their median (Llama-3.2-1B full and Llama-3.1-8B LoRA, 512 to
            16k tokens per micro-batch, with and without checkpointing).
        host_staged_gbs: NCCL's per-GPU bandwidth without P2P (``NCCL_P2P_DISABLE=1``:
            transfers staged through host memory), from ZeRO-2's exposed traffic on two
            H200s.
        deepspeed_step_s: what DeepSpeed's engine adds to an optimizer step beyond the
            plain loop's (its bf16 optimizer's flat fp32 buffers, the overflow and norm
            checks that wait on the GPU), from one-GPU ZeRO-0 steps against their plain
            twins on one H200, LoRA and full fine-tuning, with and without accumulation.
        cpu_adam_serial_s / cpu_adam_thread_s: DeepSpeed's compiled CPU Adam, seconds per
            parameter of the rank's partition: serial_s + thread_s / threads (the part
            OpenMP does not spread over the rank's threads, and the part it does), from
            optimizer offload on one H200's 16-core host at 1-16 threads
            (OMP_NUM_THREADS); the two-H200 offload rows (torchrun's 1 thread per rank)
            and launched two-H200 offload runs at 1, 8 and 16 threads are the check, with
            the node's ranks sharing the serial part (cpu_adam_seconds).
        launch_step_s: what a launched step (HF Trainer, its callbacks and logging) adds
            to the lean step, from the same shapes run both ways on one H200.
        graph_token_s: what a launched step adds with the decoder as CUDA graphs
            (``setup.cuda_graphs``), per token position, instead of launch_step_s
            (graphed_launch_seconds): at the step's end the Trainer reads the loss on the
            host, and the GPU waits while the host collates and copies the next micro-batch,
            whose Python runs per token (the DataLoader took 6 ms a step at 12,288). From
            graphed launches on H100s (graphs*.jsonl): the median step less the profiler's
            GPU-busy seconds, least squares through 0 (benchmarks/fit_speed.py,
            graph_token_s). A term per counted operation (the graphs' launches) came out
            near 0: the host launches them while the GPU still runs the step's earlier work.
        norm_loop_s / norm_loop_element_s: Liger's RMSNorm backward, seconds per turn of
            its row loop and per element a turn handles (liger_norm_seconds): from the
            profiled kernels of launches on H100s and an H200 (every probe in
            benchmarks/results; fit_speed.py, norm_loops), least squares on the relative
            error over one reading per shape.
    """

    efficiency_lora: float
    efficiency_qlora: float
    efficiency_full: float
    act_bytes: float
    lora_bytes: float
    logits_bytes: float
    fused_chunk_s: float
    overlap_p: float
    host_op_s: float
    host_4bit_s: float
    host_recompute: float
    optimizer_8bit_bytes: float
    optimizer_8bit_tensor_s: float
    zero3_tensor_s: float
    host_staged_gbs: float
    deepspeed_step_s: float
    cpu_adam_serial_s: float
    cpu_adam_thread_s: float
    launch_step_s: float
    graph_token_s: float
    norm_loop_s: float
    norm_loop_element_s: float

    def efficiency(self, method: str) -> float:
        return {
            "lora": self.efficiency_lora,
            "qlora": self.efficiency_qlora,
            "full": self.efficiency_full,
        }[method]


FITTED = SpeedConstants(
    efficiency_lora=0.5929,
    efficiency_qlora=0.7364,
    efficiency_full=0.6806,
    act_bytes=68.73,
    lora_bytes=28.16,
    logits_bytes=46.0,
    fused_chunk_s=0.0001787,
    overlap_p=3.839,
    host_op_s=2.579e-05,
    host_4bit_s=0.0002473,
    host_recompute=1.036,
    optimizer_8bit_bytes=113.2,
    optimizer_8bit_tensor_s=0.0001117,
    zero3_tensor_s=0.001434,
    host_staged_gbs=20.63,
    deepspeed_step_s=0.0353,
    cpu_adam_serial_s=2.691e-10,
    cpu_adam_thread_s=2.308e-09,
    launch_step_s=0.03035,
    graph_token_s=7.326e-07,
    norm_loop_s=5.810e-07,
    norm_loop_element_s=2.003e-10,
)

# The fused AdamW step streams each trainable parameter's state once: it reads and writes
# the parameter and both moments and reads the gradient (bf16: 2·2 + 2·2·2 + 2), and
# gradient clipping reads the gradient again: 16 B per parameter.
ADAMW_BYTES = 16.0
# torch AdamW's default (foreach) step, the plain loop's ``adamw_torch``: one pass over the
# tensor lists per operation (torch/optim/adam.py, _multi_tensor_adam, not capturable):
# weight decay multiplies p in place (read + write: 2 accesses), lerp_ moves m toward g
# (3), mul_ scales v (2), addcmul_ adds g·g to v (4: v, g, g, v), sqrt writes a new
# tensor from v (2), div_ and add_ (eps) rework it in place (2 + 2), addcdiv_ steps p by
# m over it (4): 21 accesses of a parameter-sized element, where the fused kernel makes 7.
# Counted, not fitted: 16 B + 2 B × (21 − 7) = 44 B per parameter. No fitted row ran it
# (speed_*.jsonl are trainer-loop steps, fused AdamW); the one-H100 steps of
# benchmarks/results/edges_h100.jsonl timed it (docs/speed.md).
FOREACH_ADAMW_BYTES = ADAMW_BYTES + 2.0 * (21 - 7)
# Under DeepSpeed bf16 the adapters are bf16 and nothing is autocast: PEFT's input no longer
# goes bf16 → fp32 (read 2, write 4), through dropout in fp32 (4 + 4 + mask) and back to
# bf16 for the matmul (4 + 2), 21 B per element, but only through dropout in bf16 (2 + 2 +
# mask), 5 B: about a quarter of the traffic (lora_share). Measured on two H200s: an 8B
# LoRA step under ZeRO-0 and ZeRO-2 ran 10-12% faster than DDP's autocast step.
BF16_LORA_SHARE = 0.25
# Bytes an RMSNorm moves per element it normalises (counted, not fitted: transformers' norm
# runs in float32): forward the upcast (read 2, write 4), the square (4 + 4), the mean's
# read (4), the scaling (4 + 4), the cast back (4 + 2) and the weight's multiply (2 + 2),
# 36 B; backward the weight's multiply (2 + 2), the upcast (2 + 4), the scaling's two
# gradients (4 + 4 + 4, and 4 + 4 + 4 for its reduction), the square's (4 + 4 + 4), their
# sum (4 + 4 + 4) and the cast back (4 + 2), 64 B: 100 B.
NORM_BYTES = 100.0
# What an RMSNorm moves per element under Liger's kernel (``kernels="liger"``; counted, not
# fitted): one Triton kernel each way, so only its tensors cross memory: forward the input
# read (2) and the output written (2), backward the output's gradient and the input read
# (2 + 2) and the input's gradient written (2, in place of the output's); the per-row rstd
# (4 B a row) and the weight are negligible: 10 B against NORM_BYTES' 100.
LIGER_NORM_BYTES = 10.0
# Its forward's share of them (the input read, the output written): the backward's time is
# its row loop's where that is longer (liger_norm_seconds).
LIGER_NORM_FORWARD_BYTES = 4.0
# Liger's RMSNorm backward (liger_kernel/ops/rms_norm.py, 0.8): a kernel that takes 16 rows a
# turn where a row fits 256 elements and there are at least 32,768 rows, else one row a turn.
LIGER_NORM_BLOCK_ROWS = 16
LIGER_NORM_BLOCK_MAX_COLUMNS = 256
LIGER_NORM_BLOCK_MIN_ROWS = 32768
# What Liger's SwiGLU / GeGLU and RoPE kernels save per token per feature they touch (the
# gate and up outputs of a dense MLP, the rotated q and k: liger_features), as bytes at the
# card's bandwidth. The mechanism: the model's SiLU·mul is two kernels forward and three
# backward over i-wide tensors, its rotary about ten (q·cos, the halves' slices, negation
# and concatenation, ·sin, the add, for q and for k, then each one's backward), where Liger
# runs one kernel each way that reads and writes each tensor once. Fitted on one shape
# (benchmarks/results/kernels_h100.jsonl: Llama-3.1-8B bf16 LoRA, 8 × 704 packed tokens,
# ZeRO-0, one H100, --kernels none and liger launched from the same plan): the value that
# gives the measured ratio of the two real tokens/s, 1.188 (8,694 → 10,327); the norms'
# share of it is counted (liger_norm_seconds), and so is what the host no longer dispatches
# (liger_host_saving), this is the rest. Checked on no other shape.
LIGER_ACT_BYTES = 31.21
# Bytes a 4-bit weight costs each time it is used: bitsandbytes reads 0.5 B (+ its
# double-quantized statistics, ~0.03 B) and writes a 2 B bf16 copy for the matmul.
DEQUANT_BYTES = 2.5
# How far apart the same host-bound shape has measured in separate processes (the slowest
# reading over the fastest, one GPU of an H200 host, nothing else running: fit_speed.py
# prints it as the repeat spread). A host-bound prediction cannot be held closer than this.
HOST_BOUND_REPEAT_SPREAD = 2.03
# How close a prediction lands, as measured where no fit could adjust to it: of every
# predicted tokens/s fit_speed.py scores on steps its fit did not see (the held-out folds,
# the multi-GPU and offload rows, the never-fitted dense architectures; mixture-of-experts
# models apart, family_note), 9 in 10 were within this fraction of the measured speed,
# GPU-bound and host-bound steps counted apart. fit_speed.py --check fails when they drift.
HELD_OUT_P90_GPU_BOUND = 0.090
HELD_OUT_P90_HOST_BOUND = 0.196
# The same for whole launched runs on real records against their plan's real tokens/s
# (benchmarks/realdata_predict.py; its --check fails when they drift), host-bound and
# GPU-bound steps apart: 49 runs of GPU-bound steps (12 jobs on one and two H200s; on one
# H100 the 1B and 8B LoRA plans' choices and the setups each ranked below them, five a plan,
# host2-3, host14-17 and host19_h100.jsonl, and hostc's compiled plain step) and 54 of
# host-bound ones (micro-batches of 2-4 × 704 tokens and Qwen2.5-0.5B LoRA at 16 on one
# H200, ZeRO-3 on two, Gemma 3 1B; on one H100 8B QLoRA at 1 × 1,664 over 20 runs and 1B
# LoRA at 4 × 704 and 1 × 1,664 through this launch loop, host_h100.jsonl, host4-13,
# host17-18, host20 and hostc). They hold what a step timed alone leaves out: the trainer's
# own cost, the records' lengths and packing, the launch's threads and DeepSpeed; the rows'
# rates keep the epoch's part-filled row, which a ten-step run weighs. The host-bound band
# is wide because the host's speed is not the card's: the 8B QLoRA job at 1 × 1,664 ran
# 4,108-9,009 real tokens/s on H100 machines of one kind (slow hosts, hostc and host17-18,
# at 4,108-4,884), and small Qwen2.5 models' launched LoRA and QLoRA runs were predicted a
# median 20% too fast.
LAUNCHED_P90_GPU_BOUND = 0.198
LAUNCHED_P90_HOST_BOUND = 0.341
# What estimate and plan say instead of a band where none was measured (StepTime.calibrated).
UNCALIBRATED = (
    "This speed is not calibrated: no error band was measured for steps like this one "
    "(mixture of experts; see the speed note)."
)
# A padded trainer loop (a LLaMA-Factory, TRL or axolotl recipe that does not pack) meets a
# new micro-batch shape at most steps early in a run: such a step takes this much longer
# than one of a shape met before (the caching allocator's blocks of new sizes, the kernels'
# first calls at that size). The median over the new-shape steps of the LLaMA-Factory and
# TRL runs on one H100 (benchmarks/fit_padded_speed.py, which checks it on axolotl's);
# steps of a shape met before came within a few hundredths of a second of step_time.
NEW_SHAPE_S = 0.095
# How close the padded loops' real tokens/s came to padded_step_time's on the trainers' own
# runs (fit_padded_speed.py: each run's timed steps, the trainers' warm-up stalls of a
# second or more left out): the widest gap of those runs.
PADDED_LOOP_ERROR = 0.16
# The architectures (config model_type → the name users know) whose steps the constants
# were fitted on; fit_speed.py --check fails when its rows' families differ. Outside them
# the host's clock still counts each architecture's own operations (hostops) and the GPU's
# efficiency is the fitted families'; family_note says what that was checked against
# (benchmarks/results/check_*.jsonl and the launched realdata_* runs).
# PEFT wraps these MoE linears as parameters (lora.ParamWrapper), not as adapted modules.
WRAPPED_AS_PARAMETERS = ("router", "expert")
FITTED_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2.5", "qwen3": "Qwen3"}
# Between nodes when the user does not say (--inter-node-gbs): 100 Gb/s Ethernet per GPU.
DEFAULT_INTER_NODE_GBS = 12.5


@dataclass(frozen=True)
class MoESpeedConstants:
    """What a mixture-of-experts layer adds to the step as transformers 5 runs it (router,
    top-k, a sort of the routed copies, grouped_mm over the fused expert banks, the copies
    put back in order and summed): constants fitted by ``benchmarks/fit_moe_speed.py`` on
    cut models of 16, 64 and 128 experts (benchmarks/results/moe_speed_h100.jsonl; for the
    host also moe_h100.jsonl's 8-layer Qwen3-30B-A3B and moe_speed3_h100.jsonl's
    Qwen3-30B-A3B-shaped cut at 2, 4 and 8 layers; one H100; 8 and 32 experts, 16 layers
    and the Mixtral-8x7B shape held out), apart from the dense fit, which they do not move
    (0 for a dense model). Shipped (MOE_FITTED) with bands of their own, measured on the rows
    the fit did not see (MOE_HELD_OUT_P90_*, MOE_LAUNCHED_P90; docs/moe.md, "Speed"):
        host_layer_s: host seconds per MoE layer per forward and backward beyond
            host_op_s for each operation hostops counts (the count is already the GPU's
            grouped_mm path: routing, sort, histc, cumsum, gathers, grouped_mm; so this is
            what those operations cost the host beyond an average one), repeated by the
            recompute as the layer's other operations are;
        host_step_s: host seconds per micro-batch that the recompute does not repeat. Both
            fitted on the host's own clock (the seconds until a step was queued,
            ``dispatch_seconds``) of steps at 2, 4 and 8 layers timed in one process
            (benchmarks/moe_depth.py), which tell the two apart, and of the 2-layer cuts,
            and on the older 8-layer rows whose wall is the host's. The depths put the
            cost per layer, not per step (0.0 ms per step).
        copy_bytes: bytes per routed copy and hidden feature (T · k · h a micro-batch)
            that the dispatch moves besides the experts' own activations: the gather of
            each token's copies in expert order, the routing weight's multiply, the gather
            back and the sum over k, and their backward (index_put with accumulation);
            fitted on the GPU's busy time (torch.profiler) of attention-only steps.
        bank_bytes: bytes per expert-bank element that LoRA on the banks (all-linear)
            moves per micro-batch at the card's bandwidth: PEFT's ParamWrapper builds
            W' = W + s·B·A as large as the bank in every forward (a batched B·A added to W:
            baddbmm and copies in the profile) and its backward reduces grouped_mm's
            bank-sized gradient of W' into A's and B's (bmm); fitted on the GPU's busy time
            of all-linear steps.
        bank_recompute: the share of bank_bytes that checkpointing's recompute moves again
            (it rebuilds W'); fitted on the wall of checkpointed all-linear steps, which
            ran unprofiled.
        host_recompute: what checkpointing adds to an MoE model's host clock, as a share
            (in place of SpeedConstants.host_recompute; None: the dense share). The
            recompute repeats a layer's forward only: on the GPU's own path it adds 43% to
            the operations an MoE layer dispatches (moe_depth.py's counts, 285 -> 407 a
            Qwen3-MoE layer), and the dense share, 1.036, prices the forward's Python
            modules as nearly the whole host step; fitted on the host clock of the
            checkpointed depth rows.
        launch_step_s: what a launched MoE step (HF Trainer, its callbacks and logging) adds
            to the lean step, in place of SpeedConstants.launch_step_s (None: the dense
            one): the median, over the launched MoE runs with finite losses, of the step
            beyond the predicted lean step (10.8-19.2 ms, where the dense runs' is 30 ms;
            the launches since, with the Trainer's per-step waits and walks taken out
            (launch/hostloop.py), took -9 to +11 ms).
    """

    host_layer_s: float
    bank_bytes: float
    copy_bytes: float = 0.0
    bank_recompute: float = 0.5
    host_step_s: float = 0.0
    host_recompute: float | None = None
    launch_step_s: float | None = None


# The fit (benchmarks/fit_moe_speed.py --check holds it to the fit). Outside the dense models'
# bands on the rows it did not see (GPU-bound 10.4% against HELD_OUT_P90_GPU_BOUND's 9.0%,
# host-bound 30.2% against 19.6%, launched 27.9% against 18.9%), it ships with the MoE
# bands below rather than with none: its misses are a fraction of a dense model's on the
# same steps (up to 2.1x too fast on attention LoRA, 6.2x on all-linear).
MOE_CANDIDATE = MoESpeedConstants(
    host_layer_s=0.001415,
    bank_bytes=29.95,
    copy_bytes=213.9,
    bank_recompute=0.8199,
    host_step_s=0.0,
    host_recompute=0.823,
    launch_step_s=0.0126,
)
MOE_FITTED: MoESpeedConstants | None = MOE_CANDIDATE
# What an MoE step is predicted with: the shipped constants (else the candidate, unquoted).
MOE_IN_USE: MoESpeedConstants = MOE_FITTED or MOE_CANDIDATE
# The MoE step's own bands, wider than the dense models' (HELD_OUT_P90_*, LAUNCHED_P90_*):
# of the predicted tokens/s that benchmarks/fit_moe_speed.py scores on rows its fit did not
# see, 9 in 10 were within this fraction of the measured speed. Held out (one H100 unless
# said): the 8 and 32 expert shapes, the older Mixtral-8x7B grid, moe_depth.py's 16-layer
# Qwen3-30B-A3B cut and every Mixtral-shaped depth, the full Qwen3-30B-A3B on the H100 and
# on one H200, GPU-bound and host-bound steps apart; host-bound ones are wide because the
# Mixtral shape's host cost per operation is not the Qwen3 shape's and the same step repeats
# only within 1.5x between processes. Launched: the runs of zeroplan launch that the MoE
# launch cost (launch_step_s, the median of the earlier launches') was not fitted on:
# Qwen3-30B-A3B cut to 8, 12 and 24 layers, Mixtral-8x7B to 4; attention, attention + router,
# QLoRA on attention, all-linear with and without checkpointing; four host-bound; all
# predicted too slow, one H100 (launch_moe4/5/6_h100.jsonl; the last five were predicted
# before they ran, against the 24.2% these nine gave, and one host-bound Mixtral step missed
# its 30.2% by 0.2 points). fit_moe_speed.py --check fails when one is a point off its rows.
MOE_HELD_OUT_P90_GPU_BOUND = 0.104
MOE_HELD_OUT_P90_HOST_BOUND = 0.302
MOE_LAUNCHED_P90 = 0.279


@dataclass(frozen=True)
class StepTime:
    """Seconds for one optimizer step (all micro-batches) on every rank.

    ``compute_s``: the micro-batches and the optimizer step; ``comm_s``: the collectives'
    time on the link, of which ``comm_exposed_s`` is not hidden behind compute;
    ``offload_s``: optimizer offload's PCIe traffic and CPU Adam; ``launch_s``: the
    launched trainer's own per-step cost (0 for the lean step). ``gpu_micro_s`` and
    ``host_micro_s``: one micro-batch's two clocks (gpu_seconds, host_seconds), the longer
    of which sets its pace. ``calibrated``: False where no error band was measured for the
    step's kind (a mixture of experts predicted without MOE_FITTED): the JSON then gives no
    band (None) and says so, instead of quoting the dense models' band. ``moe``: a mixture
    of experts' step, which quotes the MoE bands (MOE_HELD_OUT_P90_*, MOE_LAUNCHED_P90).
    """

    compute_s: float
    comm_s: float
    comm_exposed_s: float
    offload_s: float
    launch_s: float
    total_s: float
    tokens_per_s: float  # whole cluster
    gpu_micro_s: float = 0.0
    host_micro_s: float = 0.0
    calibrated: bool = True
    # a padded loop's new micro-batch shapes, per step on average (padded_step_time; in
    # compute_s and total_s)
    new_shape_s: float = 0.0
    # priced as a padded trainer loop on real data (padded_step_time): quoted with its band
    padded: bool = False
    moe: bool = False

    @property
    def host_bound(self) -> bool:
        """The host's clock (Python, autograd, kernel launches) is the longer: a larger
        micro-batch costs little more, and the step repeats least exactly (the same
        host-bound shape up to HOST_BOUND_REPEAT_SPREAD apart between processes)."""
        return self.host_micro_s > self.gpu_micro_s

    @property
    def step_error_p90(self) -> float:
        """The fraction of the measured tokens/s that 9 in 10 held-out predictions of steps
        like this one (host-bound or not), timed alone, came within."""
        if self.moe:
            return MOE_HELD_OUT_P90_HOST_BOUND if self.host_bound else MOE_HELD_OUT_P90_GPU_BOUND
        return HELD_OUT_P90_HOST_BOUND if self.host_bound else HELD_OUT_P90_GPU_BOUND

    @property
    def error_p90(self) -> float:
        """What to expect of this prediction: step_error_p90, and for a launched step (what
        estimate and plan quote) the wider of that and launched_error_p90, since a launched
        run adds its own misses to the step's."""
        if self.padded:
            return max(self.step_error_p90, PADDED_LOOP_ERROR)
        if self.launch_s > 0:
            return max(self.step_error_p90, self.launched_error_p90)
        return self.step_error_p90

    @property
    def launched_error_p90(self) -> float:
        """The fraction of their plan's real tokens/s that 9 in 10 launched runs of steps
        like this one (host-bound or not) came within: for a mixture of experts one band,
        MOE_LAUNCHED_P90 (of 14 launched MoE steps four were host-bound, too few for a band
        of their own; a host-bound step quotes the wider held-out band anyway)."""
        if self.moe:
            return MOE_LAUNCHED_P90
        return LAUNCHED_P90_HOST_BOUND if self.host_bound else LAUNCHED_P90_GPU_BOUND

    def to_json(self) -> dict[str, Any]:
        """The step's JSON keys, as ``zeroplan estimate --json`` and plan.json name them (the
        bands None, ``speed_calibrated`` False, where the step is not calibrated)."""
        bands = (self.error_p90, self.step_error_p90, self.launched_error_p90)
        error, step, launched = bands if self.calibrated else (None, None, None)
        return {
            "step_seconds": self.total_s,
            "compute_seconds": self.compute_s,
            "comm_seconds": self.comm_s,
            "comm_exposed_seconds": self.comm_exposed_s,
            "offload_seconds": self.offload_s,
            "launch_seconds": self.launch_s,
            "new_shape_seconds": self.new_shape_s,
            "padded_loop": self.padded,
            "tokens_per_s": self.tokens_per_s,
            "host_bound": self.host_bound,
            "speed_calibrated": self.calibrated,
            "error_p90": error,
            "step_error_p90": step,
            "launched_error_p90": launched,
        }


# The cards every timed step the constants and the bands come from ran on.
MEASURED_GPUS = ("H100-SXM-80GB", "H200-SXM-141GB")


def gpu_note(gpu: str) -> str | None:
    """What to tell the user when no step on their card backs the speed model."""
    if gpu in MEASURED_GPUS:
        return None
    return (
        f"speed: no step was timed on this card ({gpu}); the prediction scales the H100/H200 "
        "fit by the card's catalogued peak and bandwidth, and its error band was measured on "
        f"{' and '.join(MEASURED_GPUS)} only"
    )


def family_note(spec: ModelSpec) -> str | None:
    """What to tell the user when the speed model never saw the model's architecture."""
    if spec.model_type in FITTED_FAMILIES:
        return None
    # MoE: the lean steps of benchmarks/fit_moe_speed.py (tests/test_moe.py holds the figures)
    moe = (
        " Mixture of experts: the speed comes from a model of the MoE step (grouped_mm's "
        "expert weight reads, the routed copies' traffic, routing's host work, the banks' "
        "W + B·A) fitted on cut models of 16, 64 and 128 experts. Its band is its own and "
        "wider than a dense model's: on steps no fit saw (8 and 32 experts, unseen depths, "
        f"the Mixtral-8x7B shape, full-depth Qwen3-30B-A3B) 9 in 10 came within "
        f"{MOE_HELD_OUT_P90_GPU_BOUND:.0%} (GPU-bound) and {MOE_HELD_OUT_P90_HOST_BOUND:.0%} "
        f"(host-bound), launched runs within {MOE_LAUNCHED_P90:.0%} (all predicted too slow). "
        "Predicted as a dense model, the same cut models of 8-128 experts (one H100; "
        "benchmarks/results/moe_speed_h100.jsonl) had been from 3% too slow to 2.1 times too "
        "fast for LoRA on attention and from 40% too slow to 6.2 times too fast for "
        "all-linear LoRA (benchmarks/fit_moe_speed.py)."
        if spec.moe
        else ""
    )
    return (
        f"speed: {spec.model_type} is not among the architectures the speed model was fitted "
        f"on ({', '.join(FITTED_FAMILIES.values())}); its host time is counted from its own "
        "operations, its GPU efficiency taken from those (checked on one H200 with Gemma 2 "
        f"and 3, Phi-3 and small Qwen3: within 22% host-bound, up to 20% too fast launched).{moe}"
    )


def flops_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """Training FLOPs per token.

    forward   2·(Ψ_lin + V·h) + attention 2·s·q·L (causal half of 4·s·q per layer)
    backward  input gradients: 2·(Ψ_lin + V·h) + 2 × attention; weight gradients (full
              fine-tuning only; LoRA's are negligible): 2·(Ψ_lin + V·h)
    recompute (checkpointing): one more forward of the layers, 2·Ψ_lin + attention
    TRL's chunked LM head: its backward computes each tile's logits again (it keeps only
              the hidden states, trl/kernels/chunked_logprob.py): one more 2·V·h
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
    if setup.chunked_lm_head:
        recompute += 2.0 * head
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


def trainable_tensors(spec: ModelSpec, setup: TrainSetup) -> int:
    """Trainable nn.Parameter tensors: LoRA's A and B per adapter, or every tensor of full
    fine-tuning (parameter_tensors)."""
    return 2 * adapters(spec, setup) if setup.is_lora else parameter_tensors(spec, setup)


def adapters(spec: ModelSpec, setup: TrainSetup) -> int:
    """LoRA adapters (one A·B pair per adapted linear and layer); 0 without LoRA."""
    return sum(lin.count * n for lin, n in lora_targets(spec, setup))


def adapted_features(spec: ModelSpec, setup: TrainSetup) -> int:
    """Σ over adapted linears and layers of in + out features: the elements per token that
    LoRA's elementwise work touches (an input it casts and drops out, an output it adds to)."""
    return sum(
        lin.count * (lin.in_features + lin.out_features) * n for lin, n in lora_targets(spec, setup)
    )


def wrapped_features(spec: ModelSpec, setup: TrainSetup) -> int:
    """The part of adapted_features that an MoE router and expert banks contribute
    (E·(in + out) per bank and layer). PEFT wraps them as parameters: no dropout, no
    per-token cast, so the MoE step (moe_gpu_seconds) takes them out of LoRA's per-token
    traffic and counts the banks' W + B·A per micro-batch instead."""
    return sum(
        lin.count * (lin.in_features + lin.out_features) * n
        for lin, n in lora_targets(spec, setup)
        if lin.group in WRAPPED_AS_PARAMETERS
    )


# What the launch's fused LoRA linears (``setup.fused_lora``, zeroplan.launch.loralinear)
# no longer move, per token, per adapted linear's output feature (OUT) and input feature
# (IN), forward and backward (counted, not fitted; bf16 elements of 2 B):
#   forward, out: PEFT's adapter output written (2), its · scaling (read 2, write 2) and the
#     sum with the base output (read 4, write 2) = 12 B, where cuBLAS's addmm adds into the
#     base output in place (read 2, write 2 = 4): 8 B;
#   backward, out: the · scaling of the output's gradient (read 2, write 2): 4 B;
#   backward, in: the input's two gradients written (2 + 2) and summed (read 4, write 2) =
#     10 B, where addmm adds the adapter's into the base's (2 + read 2 + write 2 = 6): 4 B;
#   4-bit layers (QLoRA), forward, out: PEFT's defensive copy of the base output (2 + 2)
#     (where QLoRA is not priced as bf16 LoRA plus dequantization: MoE, fused_4bit_as_bf16);
#   (bf16 LoRA with fp32 adapters under autocast: PEFT's casts of each adapter's input and
#     of its gradient are gone too, the whole of lora_bytes: lora_share is 0 there.)
#   siblings that read one input (models.SHARED_INPUT: q/k/v, gate/up), k of them adapted,
#     run together (loralinear.LoRAGroup), per input feature, for each sibling past the
#     first: the input read for its A matmul (2) in each forward; in the backward, the input
#     read for its A gradient (2) and its input gradient not written (2), not added into in
#     place (read 2, write 2) and not summed by autograd (read 4, write 2), against its
#     base gradient's addmm into the shared buffer (read 2, write 2) = 10 B. Not in
#     compiled layers (the launch keeps each linear alone there).
FUSED_OUT_FORWARD = 8.0
FUSED_OUT_BACKWARD = 4.0
FUSED_IN_BACKWARD = 4.0
FUSED_OUT_4BIT_FORWARD = 4.0
GROUP_IN_FORWARD = 2.0
GROUP_IN_BACKWARD = 10.0


def fused_lora_path(setup: TrainSetup) -> str:
    """Which of hostops.FUSED_ADAPTER_HOST_US a setup's LoRA linears run: "4bit" (QLoRA),
    "bf16" adapters (DeepSpeed bf16, lora_bf16) or fp32 ones under "autocast"."""
    if setup.method == "qlora":
        return "4bit"
    return "bf16" if setup.deepspeed or setup.lora_bf16 else "autocast"


def fused_lora_saved_bytes(spec: ModelSpec, setup: TrainSetup) -> float:
    """Bytes per token the fused LoRA linears take off the step (0 where they do not run):

    Σ over adapted linears (not MoE banks) of
        (FUSED_OUT_FORWARD · out + [4-bit] FUSED_OUT_4BIT_FORWARD · out) · (1 + checkpointing)
        + FUSED_OUT_BACKWARD · out + FUSED_IN_BACKWARD · in

        + Σ over layers and sibling sets (models.SHARED_INPUT) with k ≥ 2 adapted members
          of (k − 1) · in · (GROUP_IN_FORWARD · (1 + checkpointing) + GROUP_IN_BACKWARD)
          [not compiled]

    Checkpointing's recompute runs the forward, and its savings, again. (What PEFT's fp32
    adapters under autocast cast is lora_share's, 0 on this path.)"""
    if not fused_lora_runs(setup):
        return 0.0
    quantized = fused_lora_path(setup) == "4bit"
    forwards = 1 + int(setup.grad_ckpt)
    total = 0.0
    adapted: set[str] = set()
    for lin, n in lora_targets(spec, setup):
        if lin.group in WRAPPED_AS_PARAMETERS:
            continue
        adapted.add(lin.name)
        out, inp = lin.out_features, lin.in_features
        fwd = (FUSED_OUT_FORWARD + FUSED_OUT_4BIT_FORWARD * quantized) * out
        bwd = FUSED_OUT_BACKWARD * out + FUSED_IN_BACKWARD * inp
        total += lin.count * n * (fwd * forwards + bwd)
    if setup.compile:
        return total
    for linears, n_layers in spec.linears_by_layer_kind():
        by_name = {lin.name: lin for lin in linears if lin.group not in WRAPPED_AS_PARAMETERS}
        for siblings in SHARED_INPUT:
            members = [by_name[name] for name in siblings if name in by_name and name in adapted]
            if len(members) > 1:
                per_input = GROUP_IN_FORWARD * forwards + GROUP_IN_BACKWARD
                total += n_layers * (len(members) - 1) * members[0].in_features * per_input
    return total


def activation_features(spec: ModelSpec) -> float:
    """Σ over layers of every linear's out features (MoE: the top-k experts a token meets):
    the activation elements per token that the elementwise work between matmuls (rotary,
    SiLU·mul, residual adds, casts) reads and writes; the norms' are norm_features."""
    total = 0.0
    for linears, n_layers in spec.linears_by_layer_kind():
        per_layer = 0.0
        for lin in linears:
            if lin.group == "expert" and spec.moe:
                per_layer += lin.out_features * spec.moe.top_k
            else:
                per_layer += lin.count * lin.out_features
        total += per_layer * n_layers
    return total


def norm_features(spec: ModelSpec) -> int:
    """Elements per token the RMSNorms normalise: per layer norms_per_layer · h, and the
    q/k norms' q_dim + kv_dim where the architecture has them; the final norm's h."""
    per_layer = spec.norms_per_layer * spec.hidden_size
    if spec.qk_norm:
        per_layer += spec.q_dim + spec.kv_dim
    return spec.num_layers * per_layer + spec.hidden_size


def quantized_linears(spec: ModelSpec, setup: TrainSetup) -> int:
    """4-bit linears a QLoRA micro-batch dequantizes (every decoder linear); else 0."""
    if setup.method != "qlora":
        return 0
    return sum(len(linears) * n for linears, n in spec.linears_by_layer_kind())


def peak_tflops(setup: TrainSetup, gpu: GPU) -> float:
    """The tensor-core peak of the setup's precision: the card's fp16 TFLOP/s for an fp16
    setup, else its bf16 (an unresolved setup: bf16 where the card has it, else fp16, as
    ``GPU.tensor_tflops``). The efficiencies were fitted on bf16 steps and are used for
    fp16 as they are (the same tensor cores at the same rate on every card that has both)."""
    setup = resolve_precision(setup, gpu.bf16, gpu.name)
    return gpu.fp16_tflops if setup.fp16 else gpu.bf16_tflops


def lora_share(setup: TrainSetup) -> float:
    """The share of lora_bytes a micro-batch moves: BF16_LORA_SHARE for bf16 LoRA under
    DeepSpeed (bf16 adapters: PEFT has nothing to cast), and 0 there with dropout 0 (that
    share is the dropout's pass over each adapter's input; at p = 0 PEFT's dropout is an
    identity); else 1: bf16 LoRA with fp32 adapters casts every adapter's input, and QLoRA's
    4-bit layer does its own elementwise work (a defensive copy of each output, the casts
    around it) with or without DeepSpeed: measured on two H200s, an 8B QLoRA step ran at the
    same speed under ZeRO-0 and DDP.

    Dropout 0 counted, not fitted: on one H100, Llama-3.2-3B LoRA, ZeRO-0, Liger, 16 × 704
    packed tokens, it measured 1.075× the tokens/s of dropout 0.05 (22,164 → 23,816), where
    this predicts 1.081× (benchmarks/results/kernels_heldout_h100.jsonl).

    QLoRA at dropout 0: 1 − BF16_LORA_SHARE, counted, not fitted: PEFT's 4-bit layer casts
    nothing under autocast (``requires_conversion`` is false) and under DeepSpeed its
    adapters are bf16, so its dropout runs on the bf16 input, the same pass DeepSpeed's bf16
    adapters make (BF16_LORA_SHARE); at p = 0 that pass is gone and the rest (the layer's
    defensive copy of its output, ...) stays.

    bf16 LoRA on the launch's fused LoRA linears (fused_lora_runs; they run at dropout 0
    only, fused_lora_refusal), fp32 adapters under autocast: 0, as under DeepSpeed. The
    fused function runs the adapters' matmuls on the bf16 input itself (autocast casts the
    r-wide adapters, weight-sized, not the input) and saves that input once per group
    (memory.activations.shares_inputs): no pass over an adapter's input is left, the GPU's
    work is DeepSpeed bf16's."""
    if setup.deepspeed and setup.method == "lora":
        return BF16_LORA_SHARE if setup.lora_dropout > 0 else 0.0
    if setup.method == "lora" and fused_lora_runs(setup):
        return 0.0
    if setup.method == "qlora" and setup.lora_dropout == 0:
        return 1.0 - BF16_LORA_SHARE
    return 1.0


def liger_chunks(tokens: int, vocab: int, hidden: int) -> int:
    """The chunks Liger's fused linear cross-entropy computes a micro-batch's T tokens in:
    it aims at chunks of T / ⌈V/h⌉ tokens (a chunk's logits no bigger than the input),
    rounded up to a power of two, so ⌈T / 2^⌈log2(T / ⌈V/h⌉)⌉⌉ chunks: about V/h (32 for
    Llama-3 at h = 4096, 32-63 at h = 2048) whatever the micro-batch."""
    aim = -(-tokens // -(-vocab // hidden))
    chunk = 1 << max(0, (aim - 1).bit_length())
    return -(-tokens // chunk)


def loss_seconds(spec: ModelSpec, setup: TrainSetup, gpu: GPU, k: SpeedConstants) -> float:
    """The loss's time outside its matmuls (whose FLOPs flops_per_token counts either way):

    unfused:  T · V · logits_bytes / bandwidth
    fused:    chunks · fused_chunk_s + head_read_seconds (and the head gradient's passes
              in fixed_bytes)"""
    if not setup.fused_loss:
        return setup.tokens * spec.vocab_size * k.logits_bytes / (gpu.memory_bandwidth_gbs * 1e9)
    chunks = liger_chunks(setup.tokens, spec.vocab_size, spec.hidden_size)
    return chunks * k.fused_chunk_s + head_read_seconds(spec, setup, gpu, k)


def head_read_seconds(spec: ModelSpec, setup: TrainSetup, gpu: GPU, k: SpeedConstants) -> float:
    """What the fused loss's chunked matmuls take beyond their FLOPs, where reading the
    output head's weight is the longer part:

    chunks · 2 · max(0, W / bandwidth − 2·c·V·h / (peak · efficiency)),  W = V·h·2 B

    Each chunk of c = ⌈T / chunks⌉ tokens computes its logits (c × h by h × V) and the
    input's gradient (c × V by V × h), and each of the two reads all of the bf16 head; a
    matmul takes the longer of its FLOPs and its reads (a roofline). Liger keeps about V/h
    chunks at any micro-batch (liger_chunks), so a small one has chunks of 32-64 tokens
    that wait on the weight: counted, not fitted. Llama-3.2-1B at 1 × 1,664 tokens on an
    H100: 52 chunks, 104 reads of 525 MB, 16 ms of a 41 ms step (benchmarks/results/
    graphs3.jsonl: the profiled matmuls took 32.9 ms where their FLOPs at the fitted
    efficiency say 14.9); at 12,288 tokens the 8B's chunks of 512 are compute-bound (0)."""
    chunks = liger_chunks(setup.tokens, spec.vocab_size, spec.hidden_size)
    per_chunk = -(-setup.tokens // chunks)
    head = spec.vocab_size * spec.hidden_size
    read = head * 2 / (gpu.memory_bandwidth_gbs * 1e9)
    compute = 2 * per_chunk * head / (peak_tflops(setup, gpu) * 1e12 * k.efficiency(setup.method))
    return chunks * 2 * max(0.0, read - compute)


def rms_norms(spec: ModelSpec, tokens: int) -> list[tuple[int, int, int]]:
    """(how many, rows, elements a row) of each RMSNorm a micro-batch of T tokens runs:
    norms_per_layer a layer over h (T rows), the q and k norms per head where the
    architecture has them (T·heads and T·kv_heads rows of head_dim), the final norm."""
    out = [(spec.num_layers * spec.norms_per_layer, tokens, spec.hidden_size)]
    if spec.qk_norm:
        out.append((spec.num_layers, tokens * spec.num_heads, spec.head_dim))
        out.append((spec.num_layers, tokens * spec.num_kv_heads, spec.head_dim))
    out.append((1, tokens, spec.hidden_size))
    return out


def norm_turns(rows: int, columns: int, multiprocessors: int) -> tuple[int, int]:
    """(turns, elements a turn) of Liger's RMSNorm backward over ``rows`` rows: it starts
    one program per SM, each taking ⌈rows / SMs⌉ rows in turn, one at a time, or g = 16 at
    a time where a row's power-of-two block is at most 256 elements and there are at least
    32,768 rows (its block kernel): ⌈rows / (SMs · g)⌉ turns of g · columns elements."""
    block = 1 << max(0, (columns - 1).bit_length())
    g = (
        LIGER_NORM_BLOCK_ROWS
        if block <= LIGER_NORM_BLOCK_MAX_COLUMNS and rows >= LIGER_NORM_BLOCK_MIN_ROWS
        else 1
    )
    return -(-rows // (multiprocessors * g)), g * columns


def liger_norm_seconds(spec: ModelSpec, setup: TrainSetup, gpu: GPU, k: SpeedConstants) -> float:
    """Liger's RMSNorms over one micro-batch of T tokens: the forward's bytes, and the
    backward's row loop or its bytes, the longer:

    Σ_norms n · (4 B · rows · c · (1 + checkpointing) / bandwidth
                 + max(6 B · rows · c / bandwidth,
                       turns · (norm_loop_s + norm_loop_element_s · elements a turn)))

    over rms_norms (n norms of rows × c elements) and norm_turns. The backward's programs
    walk their rows in turn, so its time is the walk's, not its bytes': profiled on H100s,
    the 8B's norms at 12,288 tokens took 151 µs a call where their bytes take 90, and
    Qwen3-1.7B's q and k norms at 1,664 tokens (26,624 and 13,312 rows of 128, one a turn)
    89 µs a call where their bytes take 3: 5 ms of a 61 ms step."""
    bandwidth = gpu.memory_bandwidth_gbs * 1e9
    total = 0.0
    for n, rows, columns in rms_norms(spec, setup.tokens):
        elements = rows * columns
        turns, per_turn = norm_turns(rows, columns, gpu.multiprocessors)
        loop = turns * (k.norm_loop_s + k.norm_loop_element_s * per_turn)
        forward = LIGER_NORM_FORWARD_BYTES * elements * (1 + int(setup.grad_ckpt)) / bandwidth
        backward = (LIGER_NORM_BYTES - LIGER_NORM_FORWARD_BYTES) * elements / bandwidth
        total += n * (forward + max(backward, loop))
    return total


def elementwise_passes(setup: TrainSetup) -> float:
    """1 + ⅓ · checkpointing: the elementwise work is a third forward, two thirds backward,
    and checkpointing's recompute adds a forward."""
    return 1 + int(setup.grad_ckpt) / 3


def fixed_bytes(spec: ModelSpec, setup: TrainSetup) -> float:
    """A micro-batch's memory traffic that no constant scales:

    QLoRA:                  DEQUANT_BYTES · Ψ_4bit · (2 + checkpointing) (a 4-bit weight is
                            dequantized for the forward, the backward and the recompute)
    fused loss, full:       chunks · 2 · g · V·h (each chunk adds its share into the output
                            head's g-byte gradient, reading and writing all of it)"""
    total = 0.0
    if setup.method == "qlora":
        total += DEQUANT_BYTES * spec.quantizable_params() * (2 + int(setup.grad_ckpt))
    if setup.fused_loss and setup.method == "full":
        chunks = liger_chunks(setup.tokens, spec.vocab_size, spec.hidden_size)
        total += chunks * 2 * trainable_bytes(setup) * spec.vocab_size * spec.hidden_size
    return total


def gpu_seconds(
    spec: ModelSpec,
    setup: TrainSetup,
    gpu: GPU,
    k: SpeedConstants = FITTED,
    m: MoESpeedConstants | None = MOE_IN_USE,
) -> float:
    """The GPU's time for one micro-batch of T = b·s tokens:

    FLOPs/token · T / (peak · efficiency)
      + (T · (act_bytes · A − LIGER_ACT_BYTES · G + norm_bytes · N
              + lora_bytes · Σ(in + out) · lora_share) · elementwise_passes
         − T · fused_lora_saved_bytes + fixed_bytes) / bandwidth
      + loss_seconds [+ liger_norm_seconds] [+ moe_gpu_seconds]

    A = activation_features, N = norm_features, Σ(in + out) = adapted_features; under
    Liger's kernels (``setup.kernels``) the norms are liger_norm_seconds instead of
    NORM_BYTES' traffic and G = liger_features (else 0); the operations Liger no longer
    dispatches come off the host's clock (liger_host_saving). With MoE constants ``m``
    (MOE_FITTED by default) the MoE step's terms are added and the router's and banks'
    features (wrapped_features) leave Σ(in + out). Compiled layers (``setup.compile``) are
    priced as Liger's path: inductor fuses the same norms, gated activation and rotary into
    kernels of its own (gpu_setup), its norms at LIGER_NORM_BYTES a normalised element. A
    dense model's QLoRA on the fused LoRA linears is bf16 LoRA's time on them +
    fixed_bytes / bandwidth (fused_4bit_as_bf16)."""
    setup = gpu_setup(setup)
    if fused_4bit_as_bf16(spec, setup):
        bf16 = gpu_seconds(spec, replace(setup, method="lora"), gpu, k, m)
        return bf16 + fixed_bytes(spec, setup) / (gpu.memory_bandwidth_gbs * 1e9)
    flops = flops_per_token(spec, setup) * setup.tokens
    matmul = flops / (peak_tflops(setup, gpu) * 1e12 * k.efficiency(setup.method))
    features = adapted_features(spec, setup) - (wrapped_features(spec, setup) if m else 0)
    lora = k.lora_bytes * features * lora_share(setup)
    # Liger's own norms are timed apart (their backward walks rows); compiled layers'
    # norms are inductor's, priced as Liger's bytes (gpu_setup)
    liger_norms = liger.runs(spec.model_type, setup.kernels, "rms_norm")
    walked = liger_norms and not setup.compile
    norm = 0.0 if walked else LIGER_NORM_BYTES if liger_norms else NORM_BYTES
    act = k.act_bytes * activation_features(spec) - LIGER_ACT_BYTES * liger_features(spec, setup)
    per_token = act + norm * norm_features(spec) + lora
    traffic = setup.tokens * per_token * elementwise_passes(setup) + fixed_bytes(spec, setup)
    traffic -= setup.tokens * fused_lora_saved_bytes(spec, setup)
    seconds = (
        matmul + traffic / (gpu.memory_bandwidth_gbs * 1e9) + loss_seconds(spec, setup, gpu, k)
    )
    if walked:
        seconds += liger_norm_seconds(spec, setup, gpu, k)
    return seconds + (moe_gpu_seconds(spec, setup, gpu, m, k) if m else 0.0)


def fused_4bit_as_bf16(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Whether a QLoRA micro-batch's GPU time is priced as bf16 LoRA's on the same fused
    linears plus its dequantization (fixed_bytes): a dense model's QLoRA on the launch's
    fused LoRA linears (MoE banks stay PEFT's). Each 4-bit linear there is a bf16 one
    behind bitsandbytes' dequantization kernels: the same matmuls on the same bf16 input,
    the adapters cast r-wide under autocast, none of PEFT's 4-bit layer's copies or casts.

    Not fitted. Started from PEFT's 4-bit step (efficiency_qlora, lora_share) less what the
    fused linears save, the ten launched 8B QLoRA plans at 16 × 704 on one H100
    (kernels5-14) ran 9.3-14.2% faster than predicted (median 12.1%), while the bf16 LoRA
    plan beside them ran 6.4-6.9% faster; priced this way they run 3.1-8.3% faster (median
    6.0%), as measured they run at bf16 LoRA's speed (15,782 against 15,742, kernels14)."""
    return setup.method == "qlora" and spec.moe is None and fused_lora_runs(setup)


def bank_elements(spec: ModelSpec) -> int:
    """Elements of one MoE layer's expert banks, E·2i·h + E·h·i (0 for a dense model)."""
    if spec.moe is None:
        return 0
    return sum(lin.params for lin in spec.moe_linears() if lin.group == "expert")


def banks_adapted(spec: ModelSpec, setup: TrainSetup) -> bool:
    """LoRA reaches the expert banks (``all-linear`` on an MoE model)."""
    return setup.is_lora and any(lin.group == "expert" for lin, _ in lora_targets(spec, setup))


def moe_gpu_seconds(
    spec: ModelSpec,
    setup: TrainSetup,
    gpu: GPU,
    m: MoESpeedConstants,
    k: SpeedConstants = FITTED,
) -> float:
    """What the MoE layers add to the GPU's clock (0 for a dense model), per micro-batch:

    L_moe · (p · (2 B · N_b / bandwidth + F_r / peak) − (2 + c) · F_r / (peak · efficiency)
             + banks · bank_bytes · (1 + c · bank_recompute) · N_b / bandwidth)
      + copy_bytes · T · k · h · L_moe · passes / bandwidth
      + banks · 6 · r · N_b · L_moe / (peak · efficiency)

    N_b = bank_elements, L_moe the MoE layers, c = 1 under checkpointing, banks = 1 when
    LoRA trains the banks (all-linear), p = 2 + c + banks the grouped_mm passes over a
    layer's banks (forward, the backward's input gradient, the recompute, the gradient of
    W'), F_r = 2 · T · (k/E) · N_b the routed tokens' FLOPs of one pass, r the LoRA rank,
    passes = elementwise_passes. A grouped_mm pass reads every expert's weights however few
    tokens each gets, and then runs its FLOPs near the card's peak: measured on one H100
    (torch.profiler, benchmarks/results/moe_speed_h100.jsonl), the grouped_mm kernels of
    8-128 experts at 32-1,024 routed copies per expert took 0.97-1.28 times
    2 B · N_b / bandwidth + F_r / peak per pass. flops_per_token charges the routed FLOPs of
    the forward, backward and recompute at the dense efficiency instead, which is taken back
    here. The routed copies' traffic is ``copy_bytes`` per copy and hidden feature. The bank
    adapter's traffic is ``bank_bytes`` (fitted), of which the recompute, rebuilding W',
    moves ``bank_recompute`` again; B·A's product and its two gradients are counted as
    FLOPs."""
    if spec.moe is None or not spec.moe.num_moe_layers:
        return 0.0
    layers, n_b, c = spec.moe.num_moe_layers, bank_elements(spec), int(setup.grad_ckpt)
    banks = int(banks_adapted(spec, setup))
    bandwidth = gpu.memory_bandwidth_gbs * 1e9
    peak = peak_tflops(setup, gpu) * 1e12
    rate = peak * k.efficiency(setup.method)
    routed = 2.0 * setup.tokens * spec.moe.top_k / spec.moe.num_experts * n_b
    grouped = (2 + c + banks) * (2.0 * n_b / bandwidth + routed / peak) - (2 + c) * routed / rate
    adapter = banks * m.bank_bytes * (1 + c * m.bank_recompute) * n_b / bandwidth
    copies = m.copy_bytes * setup.tokens * spec.moe.top_k * spec.hidden_size
    lora = banks * 6.0 * setup.lora_r * n_b / rate
    return layers * (grouped + adapter + lora + copies * elementwise_passes(setup) / bandwidth)


def liger_features(spec: ModelSpec, setup: TrainSetup) -> int:
    """Elements per token that Liger's SwiGLU / GeGLU and RoPE kernels read and write in
    place of the model's own modules (0 for ``kernels="none"``): per dense layer the gate
    and up outputs, 2·i, and per layer the rotated q and k, q_dim + kv_dim (MoE layers keep
    their experts' own MLP path: zeroplan.liger)."""
    mt, kernels = spec.model_type, setup.kernels
    total = 0
    if liger.runs(mt, kernels, "swiglu", "geglu"):
        total += spec.num_dense_layers * 2 * spec.intermediate_size
    if liger.runs(mt, kernels, "rope"):
        total += spec.num_layers * (spec.q_dim + spec.kv_dim)
    return total


def gpu_setup(setup: TrainSetup) -> TrainSetup:
    """The setup whose elementwise traffic the GPU's clock prices: compiled layers as
    Liger's kernels (each norm, gated activation and rotary one fused kernel each way),
    whatever ``kernels`` says."""
    return replace(setup, kernels="liger") if setup.compile else setup


def host_operations(spec: ModelSpec, setup: TrainSetup) -> int:
    """Tensor operations one micro-batch's forward and backward dispatch:
    layers · ops per layer (frozen, or trained in full fine-tuning) + adapted modules · ops
    per LoRA adapter (with or without dropout; on the fused LoRA linears that count ·
    hostops.fused_adapter_share of their path, the host time timed against PEFT's layer:
    0.72 bf16, 0.70 autocast, 0.61 4-bit on an H100 machine's host), the architecture's
    counts (hostops),
    − what Liger's kernels take off it (liger_host_saving); compiled layers
    (``setup.compile``): that count without Liger · hostops.compiled_share, the calls a
    compiled layer makes for each eager one (0.51 bf16, 0.71 4-bit: counted on the CPU)."""
    ops = host_ops(spec.model_type)
    adapted = sum(n for _, n in lora_targets(spec, setup)) if setup.is_lora else 0
    per_layer = ops.per_layer(full=setup.method == "full")
    share = fused_adapter_share(fused_lora_path(setup)) if fused_lora_runs(setup) else 1.0
    per_adapter = ops.per_adapter(setup.lora_dropout)
    total = spec.num_layers * per_layer + round(adapted * per_adapter * share)
    if setup.compile:
        return round(total * compiled_share(quantized_linears(spec, setup) > 0))
    return total - liger_host_saving(spec, setup)


def liger_host_saving(spec: ModelSpec, setup: TrainSetup) -> int:
    """Operations a micro-batch no longer dispatches under Liger's kernels:

    norms · (own − Liger's) RMSNorm + dense layers · (own − Liger's) SiLU·mul
      + layers · (own − Liger's) rotary

    (hostops.LIGER_OPS, a trained norm's under full fine-tuning), norms = layers ·
    (norms_per_layer + 2 where the architecture has q/k norms) + the final one. 0 where no
    Liger kernel runs or the architecture's modules were not counted (hostops.LIGER_COUNTED).
    Measured on one H100, the launched 8B QLoRA step at 1 × 1,664 ran 18% faster with
    Liger and dropout 0 than without both, where dropout alone is counted 8%
    (benchmarks/results/host_h100.jsonl)."""
    mt, kernels = spec.model_type, setup.kernels
    if mt not in LIGER_COUNTED:
        return 0
    saved = 0
    if liger.runs(mt, kernels, "rms_norm"):
        own, ligers = LIGER_OPS["rms_norm_trained" if setup.method == "full" else "rms_norm"]
        norms = spec.num_layers * (spec.norms_per_layer + 2 * int(spec.qk_norm)) + 1
        saved += norms * (own - ligers)
    if liger.runs(mt, kernels, "swiglu"):
        saved += spec.num_dense_layers * (LIGER_OPS["swiglu"][0] - LIGER_OPS["swiglu"][1])
    if liger.runs(mt, kernels, "rope"):
        saved += spec.num_layers * (LIGER_OPS["rope"][0] - LIGER_OPS["rope"][1])
    return saved


def host_seconds(
    spec: ModelSpec,
    setup: TrainSetup,
    k: SpeedConstants = FITTED,
    m: MoESpeedConstants | None = MOE_IN_USE,
) -> float:
    """The host's time for one micro-batch, whatever its size:
    [host_step_s +] (1 + checkpointing · recompute) · (host_operations · host_op_s
        + 4-bit linears · host_4bit_s (not when compiled)
        + ZeRO-3's parameter tensors · zero3_tensor_s
        + MoE layers · host_layer_s).

    With MoE constants ``m`` (MOE_FITTED by default) an MoE layer adds
    host_layer_s, its routing and grouped_mm work beyond the operations counted on the
    CPU, and the micro-batch host_step_s (both 0 for a dense model); recompute is
    k.host_recompute, or m.host_recompute for an MoE model where ``m`` sets it.

    ZeRO-3's hooks are host work (per module: gather, wait, release, its trace), so they
    hide under a long enough GPU step and set a floor under a short one: on two H200s
    Llama-3.1-8B LoRA with checkpointing took 2.8-2.9 s a micro-batch at 1, 4 and 8 × 2048
    tokens alike (DDP: 0.56 s at 1 × 2048), and the recompute runs the forward's hooks
    again. Seconds of the machine the constants were measured on (Xeon hosts of H100 and
    H200 nodes); not scaled by the GPU, since it is the CPU's clock.

    With the decoder as CUDA graphs (``setup.cuda_graphs``): hostops.GRAPHED_MICRO_BATCH_OPS
    · host_op_s, what stays eager around the two replays."""
    if setup.cuda_graphs:
        # the decoder's forward and backward are two replays (zeroplan.launch.graphs): the
        # host dispatches only what stays eager around them, at any depth or checkpointing
        return GRAPHED_MICRO_BATCH_OPS * k.host_op_s
    hooks = parameter_tensors(spec, setup) * k.zero3_tensor_s if setup.zero == 3 else 0.0
    moe_layers = spec.moe.num_moe_layers * m.host_layer_s if (m and spec.moe) else 0.0
    step = m.host_step_s if (m and spec.moe) else 0.0
    recompute = k.host_recompute
    if m and spec.moe and m.host_recompute is not None:
        recompute = m.host_recompute
    return step + (1 + int(setup.grad_ckpt) * recompute) * (
        host_operations(spec, setup) * k.host_op_s
        # compiled, bitsandbytes' Python around each 4-bit matmul is traced away and its
        # dequantization calls are among the compiled layer's (host_operations)
        + (0 if setup.compile else quantized_linears(spec, setup)) * k.host_4bit_s
        + hooks
        + moe_layers
    )


def smooth_max(a: float, b: float, p: float) -> float:
    """(a^p + b^p)^(1/p), computed without overflow: max · (1 + (min/max)^p)^(1/p)."""
    hi, lo = max(a, b), min(a, b)
    if hi == 0.0:
        return 0.0
    return float(hi * (1 + (lo / hi) ** p) ** (1 / p))


def micro_batch_seconds(gpu_s: float, host_s: float, k: SpeedConstants = FITTED) -> float:
    """(GPU^p + host^p)^(1/p) for one micro-batch, GPU = ``gpu_s`` (gpu_seconds), host =
    ``host_s`` (host_seconds): about the longer of the two, since the host queues kernels
    ahead, and the shorter clock shows only where they are close."""
    return smooth_max(gpu_s, host_s, k.overlap_p)


def optimizer_seconds(
    spec: ModelSpec, setup: TrainSetup, gpu: GPU, world: int, k: SpeedConstants = FITTED
) -> float:
    """The optimizer step on the GPU: bytes per parameter · Ψ_t / bandwidth (ADAMW_BYTES;
    FOREACH_ADAMW_BYTES for torch AdamW's default foreach step, ``adamw_torch``; or the
    fitted 8-bit rate for bitsandbytes' 8-bit AdamW, which also pays
    optimizer_8bit_tensor_s per tensor it steps alone: optimizer_tensors), Ψ_t divided among the
    ranks under ZeRO 1-3; 0 when the optimizer is offloaded (offload_seconds)."""
    if setup.offload != "none":
        return 0.0
    shards = world if (setup.deepspeed and (setup.zero or 0) >= 1) else 1
    params, bandwidth = trainable_params(spec, setup) / shards, gpu.memory_bandwidth_gbs * 1e9
    if not setup.optim.endswith("8bit"):
        per_param = FOREACH_ADAMW_BYTES if setup.foreach_adamw else ADAMW_BYTES
        return per_param * params / bandwidth
    per_tensor = optimizer_tensors(spec, setup) * k.optimizer_8bit_tensor_s
    return k.optimizer_8bit_bytes * params / bandwidth + per_tensor


def optimizer_tensors(spec: ModelSpec, setup: TrainSetup) -> int:
    """The tensors bitsandbytes' 8-bit AdamW steps one at a time: every trainable one in the
    plain loop and DDP; none under DeepSpeed, whose mixed-precision and ZeRO optimizers
    hand it flat fp32 partitions, one per parameter group."""
    if not setup.optim.endswith("8bit") or setup.deepspeed:
        return 0
    return trainable_tensors(spec, setup)


def gradient_trips(setup: TrainSetup) -> int:
    """How often a step's gradients leave the GPU they were computed on: after every
    micro-batch under ZeRO 2-3 (DeepSpeed partitions them as they come), once at the
    accumulation boundary otherwise."""
    return setup.grad_accum if setup.deepspeed and (setup.zero or 0) >= 2 else 1


def comm_bytes_per_step(spec: ModelSpec, setup: TrainSetup, world: int) -> float:
    """Bytes each rank sends per optimizer step (ring collectives: (N−1)/N of the buffer).

    DDP / ZeRO-0:  all-reduce of the gradients, 2·(N−1)/N · g·Ψ_t (g = 4 B LoRA fp32 without
                   DeepSpeed, else 2 B)
    ZeRO-1:        reduce-scatter of bf16 gradients at the accumulation boundary +
                   all-gather of bf16 parameters: 2·(N−1)/N · 2 B·Ψ_t
    ZeRO-2:        the same, but the gradients are reduce-scattered after every micro-batch
                   (DeepSpeed partitions them as they come): (accumulation + 1)·(N−1)/N · 2 B·Ψ_t
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
    if setup.zero == 1:
        return 2 * ring * 2 * n_t
    if setup.zero == 2:
        return (gradient_trips(setup) + 1) * ring * 2 * n_t
    gathers = 3 if setup.grad_ckpt else 2
    per_micro = ring * (gathers * 2 * spec.total_params + 2 * n_t)
    return per_micro * setup.grad_accum


def link_gbs(cluster: Cluster, k: SpeedConstants = FITTED) -> float:
    """Per-GPU bandwidth for collectives: the node's link with P2P; without it NCCL stages
    through host memory, measured at ``host_staged_gbs`` (or the link, if slower); across
    nodes the slower of that and the network.

    P2P is ``cluster.gpu.p2p`` (the catalog's, NVML's for this machine, or ``--p2p`` /
    ``--no-p2p``); the network is ``--inter-node-gbs``, else 12.5 GB/s per GPU."""
    gpu = cluster.gpu
    bw = gpu.link_bandwidth_gbs if gpu.p2p else min(gpu.link_bandwidth_gbs, k.host_staged_gbs)
    if cluster.num_nodes > 1:
        bw = min(bw, cluster.inter_node_gbs or DEFAULT_INTER_NODE_GBS)
    return bw


def exposed_comm_seconds(comm_s: float, micro_gpu_s: float, setup: TrainSetup) -> float:
    """The part of the step's communication that compute does not hide.

    DDP, and DeepSpeed with ``overlap_comm``: gradients are reduced in buckets while the
    last micro-batch's backward runs, about half of its GPU time: max(0, comm − ½·micro)
    (ZeRO-2 reduces behind every micro-batch's backward: max(0, comm − accumulation·½·micro)).
    ZeRO-3 prefetches each layer's parameters during the previous one's compute:
    max(0, comm − accumulation · micro). DeepSpeed ZeRO 0-2 without ``overlap_comm``
    reduces after the backward: all of it."""
    if comm_s == 0.0:
        return 0.0
    if setup.zero == 3:
        return max(0.0, comm_s - setup.grad_accum * micro_gpu_s)
    if not setup.deepspeed or setup.overlap_comm:
        return max(0.0, comm_s - gradient_trips(setup) * 0.5 * micro_gpu_s)
    return comm_s


def cpu_adam_seconds(
    params: float, threads: int, ranks: int = 1, k: SpeedConstants = FITTED
) -> float:
    """DeepSpeed's CPU Adam over a rank's ``params`` parameters with ``threads`` OpenMP
    threads, while ``ranks`` ranks of the node step theirs at the same time:
    params · (ranks · cpu_adam_serial_s + cpu_adam_thread_s / threads).

    The part more threads do not shorten is the host's memory traffic (Adam streams every
    parameter's fp32 weights, moments and gradient through DRAM): the node's ranks share
    that memory, so it takes as long as streaming the node's partitions one after another.
    Measured on one H200's host at 1-16 threads (about 3.1 s at 1 thread for
    Llama-3.2-1B's 1.24 B, 0.5 s at 16); two ranks on a two-H200 host ran 0.16-0.19 s per
    step slower than that one-rank sweep predicts, at 1, 8 and 16 threads alike
    (realdata_2xh200_1b_offload)."""
    return params * (ranks * k.cpu_adam_serial_s + k.cpu_adam_thread_s / threads)


def offload_seconds(
    spec: ModelSpec, setup: TrainSetup, cluster: Cluster, k: SpeedConstants = FITTED
) -> float:
    """Optimizer offload per step: bf16 gradients down over PCIe, after every micro-batch
    under ZeRO 2-3 and once under ZeRO-1 (gradient_trips), and bf16 parameters up once,
    (trips + 1)·2 B·Ψ_t/N / PCIe; plus CPU Adam over the rank's partition Ψ_t/N at the
    rank's threads, the node's ranks sharing its memory (``cpu_adam_seconds``,
    ``Cluster.cpu_threads_per_rank``); parameter offload adds the parameters' trip per
    micro-batch, 2·2 B·Ψ/N · accumulation."""
    if setup.offload == "none":
        return 0.0
    world = cluster.world_size
    n_t = trainable_params(spec, setup) / world
    pcie = PCIE_EFFECTIVE_GBS.get(cluster.gpu.pcie_gen, 25.0)
    t = (gradient_trips(setup) + 1) * 2 * n_t / (pcie * 1e9)
    t += cpu_adam_seconds(n_t, cluster.cpu_threads_per_rank, cluster.gpus_per_node, k)
    if setup.offload == "optimizer+params":
        t += 2 * 2 * spec.total_params / world * setup.grad_accum / (pcie * 1e9)
    return t


def step_time(
    spec: ModelSpec,
    setup: TrainSetup,
    cluster: Cluster,
    fill: float = 1.0,
    launched: bool = True,
    k: SpeedConstants = FITTED,
    m: MoESpeedConstants | None = MOE_IN_USE,
) -> StepTime:
    """accumulation · micro-batch + optimizer (+ DeepSpeed's engine: deepspeed_step_s) +
    exposed communication + offload (+ the launched trainer's per-step cost;
    ``launched=False``: the lean step of the benchmarks).

    ``fill``: the share of token positions that hold real tokens (packed rows of real data,
    ``zeroplan.packing``); tokens/s counts real tokens, b·s·accum·N·fill per step.
    """
    world, gpu = cluster.world_size, cluster.gpu
    # the micro-batch's two clocks, used below and reported
    gpu_s, host_s = gpu_seconds(spec, setup, gpu, k, m), host_seconds(spec, setup, k, m)
    micro = micro_batch_seconds(gpu_s, host_s, k)
    compute = micro * setup.grad_accum + optimizer_seconds(spec, setup, gpu, world, k)
    if setup.deepspeed:
        compute += k.deepspeed_step_s
    comm = comm_bytes_per_step(spec, setup, world) / (link_gbs(cluster, k) * 1e9)
    exposed = exposed_comm_seconds(comm, gpu_s, setup)
    offload = offload_seconds(spec, setup, cluster, k)
    launch = 0.0
    if launched and setup.cuda_graphs:
        launch = graphed_launch_seconds(setup, k)
    elif launched:  # an MoE launch's own per-step cost where its constants have one
        moe_launch = m.launch_step_s if spec.moe is not None and m is not None else None
        launch = k.launch_step_s if moe_launch is None else moe_launch
    total = compute + exposed + offload + launch
    tokens = setup.tokens * setup.grad_accum * world * fill
    # an MoE step has a measured band only under shipped MoE constants (MOE_FITTED)
    calibrated = spec.moe is None or (m is not None and m == MOE_FITTED)
    return StepTime(
        compute,
        comm,
        exposed,
        offload,
        launch,
        total,
        tokens / total,
        gpu_s,
        host_s,
        calibrated,
        moe=spec.moe is not None,
    )


def graphed_launch_seconds(setup: TrainSetup, k: SpeedConstants = FITTED) -> float:
    """What a launched step adds with the decoder as CUDA graphs (SpeedConstants.graph_token_s),
    at most what an eager launched step adds:

    min(launch_step_s, b·s · accumulation · graph_token_s)

    The bound: the waits are the eager launch's too (its host reads, the collation), and on
    the 8B plans the graphed step waited less than the eager one (graphs3.jsonl); the
    measured launches had 1,664-24,576 token positions, beyond which the line through 0
    would keep growing where the eager launch's measured cost does not."""
    return min(k.launch_step_s, setup.tokens * setup.grad_accum * k.graph_token_s)


def padded_step_time(
    spec: ModelSpec,
    setup: TrainSetup,
    cluster: Cluster,
    batches: PaddedBatches,
    launched: bool = True,
    k: SpeedConstants = FITTED,
) -> StepTime:
    """A padded loop's optimizer step on real data (``batches``: packing.padded_batches of
    the records' lengths): step_time at the expected padded length of a micro-batch, real
    tokens counted (its fill), plus NEW_SHAPE_S for the share of micro-batches that meet a
    shape the run has not met before:

        step_time(s = E[longest]) + accumulation · NEW_SHAPE_S · shapes / micro-batches

    The step is priced at the mean padded length (the model is close to linear in s at the
    lengths measured); trainer warm-up events (Triton compiles) are not in it."""
    shaped = replace(setup, seq_len=max(1, round(batches.longest)))
    # real tokens per row are the records' mean length, whatever the rounding of s
    fill = batches.fill * batches.longest / shaped.seq_len
    t = step_time(spec, shaped, cluster, fill, launched, k)
    extra = setup.grad_accum * NEW_SHAPE_S * batches.new_shape_share
    total = t.total_s + extra
    return replace(
        t,
        compute_s=t.compute_s + extra,
        total_s=total,
        tokens_per_s=t.tokens_per_s * t.total_s / total,
        new_shape_s=extra,
        padded=True,
    )
