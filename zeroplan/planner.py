"""plan(): the fastest setup that fits a cluster, the ranked alternatives, and why the rest lost.

Search space (``candidate_setups``): DeepSpeed off (DDP) or ZeRO 0-3, CPU offload of the
optimizer (ZeRO 1-3) or of optimizer and parameters (ZeRO-3), micro-batch 1-64, gradient
accumulation that keeps the global batch, checkpointing on/off, AdamW or 8-bit AdamW
(paged without DeepSpeed), fused loss on/off. Attention stays the model's default
(trainsetup.default_attention: sdpa, the one calibrated on a GPU; eager for Gemma-2, which
transformers runs without sdpa). A mixture-of-experts model is searched only as measured (zeroplan.moe):
no DeepSpeed, and the measured LoRA target sets the request allows, the choice said.

The base weights stay what the user asked for. ``lora`` keeps the bf16 base whenever a bf16
setup fits; only when none does is LoRA planned on a 4-bit base (``qlora``), and the plan
says so (``allow_quantization=False``, ``--no-quantization``, refuses even that). Otherwise
the fastest fitting 4-bit setup is reported beside the plan (``quantized_alternative``),
not chosen: a quantized base is a different model to train, and measured QLoRA steps have
not been faster than bf16 LoRA as reliably as predicted. ``auto`` lets the planner take
whichever of ``lora`` and ``qlora`` is predicted faster.

Constraint: the estimate's ``required_bytes`` ≤ (1 − margin) × card memory.
Objective: ``time`` maximises predicted tokens/s (zeroplan.speed); ``cost`` is the same on
a fixed cluster (price × GPUs × time); ``memory`` minimises required bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zeroplan import liger, moe
from zeroplan.errors import BadSetupError, UnmeasuredMoEError, ZeroplanError
from zeroplan.hardware import DEFAULT_CPU_CORES_PER_GPU, Cluster
from zeroplan.hostops import fused_adapter_share
from zeroplan.lengths import DataFit
from zeroplan.memory import MemoryEstimate, estimate
from zeroplan.models import ModelSpec
from zeroplan.packing import steps_per_epoch
from zeroplan.prices import GPUPrice, typical_price
from zeroplan.speed import (
    HELD_OUT_P90_GPU_BOUND,
    HELD_OUT_P90_HOST_BOUND,
    LAUNCHED_P90_GPU_BOUND,
    LAUNCHED_P90_HOST_BOUND,
    StepTime,
    family_note,
    fused_lora_path,
    gpu_note,
    step_time,
)
from zeroplan.trainsetup import (
    ALL_LINEAR,
    METHODS,
    TrainSetup,
    attention_note,
    cuda_graphs_refusal,
    fused_lora_refusal,
    packed_attention,
    packed_shape,
    resolve_attention,
    resolve_precision,
    window_note,
)

OBJECTIVES = ("time", "cost", "memory")
# what a plan may be asked for: a method, or auto (lora or qlora, whichever is faster)
PLAN_METHODS = (*METHODS, "auto")
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; everything else is the planner's to choose."""

    spec: ModelSpec
    cluster: Cluster
    method: str = "lora"
    seq_len: int = 2048
    global_batch: int | None = None  # sequences per optimizer step, all GPUs
    dataset_tokens: int | None = None
    margin: float = DEFAULT_MARGIN
    objective: str = "time"
    price_per_gpu_hour: float | None = None
    lora_r: int = 16
    lora_targets: tuple[str, ...] = (ALL_LINEAR,)
    # LoRA dropout above 0 keeps a mask per adapted input (a recipe may say 0)
    lora_dropout: float = TrainSetup.lora_dropout
    # lora: may fall back to a 4-bit base when no bf16 setup fits (and shows the fastest
    # 4-bit setup beside the plan); False: never a 4-bit base
    allow_quantization: bool = True
    allow_fused_loss: bool = True  # Liger's kernel (zeroplan[fused]) on the training machine
    # Liger's RMSNorm, SwiGLU / GeGLU and RoPE (liger-kernel on the training machine), for
    # the architectures it patches (zeroplan.liger)
    allow_kernels: bool = True
    # the launch's fused LoRA linears (zeroplan.launch.loralinear) offered where they can
    # run (fused_lora_choice); False for a recipe's plan (its trainer runs PEFT's layers) and --no-fused-lora
    allow_fused_lora: bool = True
    # the launch's decoder as CUDA graphs (zeroplan.launch.graphs) where it can run
    # (cuda_graphs_choice); False: plan --no-cuda-graphs. On H100s they ran host-bound
    # steps 1.38-4.16x and the GPU-bound plans 1.00-1.02x (graphs3-5.jsonl)
    allow_cuda_graphs: bool = True
    # the plan is for zeroplan launch; False: for another trainer's recipe (plan --emit)
    launched: bool = True
    # host RAM per node for CPU offload, bytes; None: unknown (offload plans say what they need)
    cpu_ram_per_node: int | None = None
    # the data's lengths at seq_len, packed into rows (plan --data): speed counts real
    # tokens, time covers the data's tokens × epochs, --global-batch counts rows
    data: DataFit | None = None
    epochs: float = 1.0
    # "bf16", "fp16", or "": the card's (bf16 where it has it, else fp16)
    precision: str = ""
    # lines the request's maker adds to the plan's assumptions (the CLI: a --seq-len left
    # out and held to a short context window)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.spec.check_seq_len(self.seq_len)
        # every candidate holds the resolved precision, so the plan's setup (and the config
        # and launch made from it) says what the estimate assumed
        probe = resolve_precision(
            TrainSetup(precision=self.precision, zero=0),
            self.cluster.gpu.bf16,
            self.cluster.gpu.name,
        )
        object.__setattr__(self, "precision", probe.precision)
        if self.method not in PLAN_METHODS:
            raise BadSetupError(f"--method must be one of {', '.join(PLAN_METHODS)}")
        if self.method == "auto" and not self.allow_quantization:
            raise BadSetupError(
                "--method auto chooses between a bf16 and a 4-bit base; with --no-quantization "
                "use --method lora"
            )
        if self.method == "qlora" and not self.allow_quantization:
            raise BadSetupError(
                "--method qlora trains on a 4-bit base, which --no-quantization forbids: use "
                "--method lora, or drop --no-quantization"
            )
        if self.objective not in OBJECTIVES:
            raise BadSetupError(f"--objective must be one of {', '.join(OBJECTIVES)}")
        if not 0 <= self.margin < 1:
            raise BadSetupError(f"--margin must be in [0, 1), got {self.margin}")
        if self.global_batch is not None and self.global_batch < self.cluster.world_size:
            raise BadSetupError(
                f"--global-batch {self.global_batch} is smaller than the {self.cluster.world_size} "
                "GPUs: each GPU needs at least one sequence per step"
            )
        if self.global_batch is not None and self.global_batch % self.cluster.world_size:
            raise BadSetupError(
                f"--global-batch {self.global_batch} does not split over {self.cluster.world_size} "
                f"GPUs: use a multiple of {self.cluster.world_size}"
            )
        if self.dataset_tokens is not None and self.dataset_tokens < 1:
            raise BadSetupError("--dataset-tokens must be positive")
        if self.cpu_ram_per_node is not None and self.cpu_ram_per_node <= 0:
            raise BadSetupError("--cpu-ram-per-node must be positive")
        price = self.price_per_gpu_hour
        if price is not None and not (math.isfinite(price) and price >= 0):
            raise BadSetupError(f"--price-per-gpu-hour must be a finite number >= 0, got {price}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise BadSetupError(f"--epochs must be positive, got {self.epochs}")
        if self.data is not None and self.data.cap != self.seq_len:
            raise BadSetupError(
                f"the data were fitted to {self.data.cap} tokens, the plan asks for {self.seq_len}"
            )

    def fill(self, micro_batch: int) -> float:
        """Real tokens per token position of a micro-batch: the data packed as the launch
        packs it (packed_rows); 1 for full-length sequences."""
        if self.data is None:
            return 1.0
        return self.data.pack_at(self.packed_rows(micro_batch)[0]).fill

    def packed_rows(self, micro_batch: int) -> tuple[int, int]:
        """(tokens a packed row holds, rows per micro-batch) as the launch packs this model
        (trainsetup.packed_attention): varlen, one row of micro-batch × seq_len tokens;
        the block mask, micro-batch rows of seq_len (rows fill less)."""
        path = packed_attention(self.spec.model_type, self.spec.sliding_window, self.seq_len)
        return packed_shape(path, self.seq_len, micro_batch)

    @property
    def tokens_to_train(self) -> int | None:
        """--dataset-tokens, else the data's real tokens × epochs."""
        if self.dataset_tokens is not None:
            return self.dataset_tokens
        if self.data is not None:
            return round(self.data.train_tokens * self.epochs)
        return None

    def price(self) -> GPUPrice | None:
        """The price a cost is computed at: the user's, else the dated table's (or None)."""
        if self.price_per_gpu_hour is not None:
            return GPUPrice(self.price_per_gpu_hour, "--price-per-gpu-hour")
        return typical_price(self.cluster.gpu.name)


@dataclass(frozen=True)
class Candidate:
    setup: TrainSetup
    estimate: MemoryEstimate
    step: StepTime
    fits: bool  # with the margin

    @property
    def family(self) -> str:
        family = family_of(self.setup, self.estimate.cluster["world_size"])
        if self.estimate.model["model_type"] in moe.MEASURED and self.setup.is_lora:
            # an MoE plan weighs target sets against each other (moe.plan_target_choices)
            family += f" · {moe.describe_targets(self.setup.lora_targets, self.setup.lora_dropout)}"
        return family


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    best: Candidate | None
    ranked: list[Candidate]  # fitting candidates, best first, one per distinct shape
    rejected: dict[str, str]  # family -> why it lost
    searched: int
    suggestion: str | None = None
    assumptions: tuple[str, ...] = field(default=())
    # --method lora with a bf16 plan: the fastest fitting 4-bit setup, shown, not chosen
    quantized_alternative: Candidate | None = None


def family_of(setup: TrainSetup, world: int = 1) -> str:
    if setup.zero is None:
        dist = "DDP" if world > 1 else "no DeepSpeed"
    else:
        dist = f"ZeRO-{setup.zero}"
        if setup.offload != "none":
            dist += f" + offload {setup.offload}"
    return f"{setup.method} · {dist}"


def _methods(req: PlanRequest) -> tuple[str, ...]:
    if req.method == "auto" or (req.method == "lora" and req.allow_quantization):
        return ("lora", "qlora")
    return (req.method,)


def _distributions(req: PlanRequest, method: str) -> Iterator[tuple[int | None, str]]:
    yield None, "none"
    if req.spec.moe is not None:
        return  # mixture of experts: measured without DeepSpeed only (zeroplan.moe)
    multi = req.cluster.world_size > 1
    for zero in (0, 1, 2, 3):
        # on one GPU, ZeRO 1-2 without offload only add buffers; ZeRO-0 is there for bf16
        # LoRA on PEFT's layers (recipes, --no-fused-lora), whose adapters DeepSpeed makes
        # bf16 (speed.lora_share), which pays for its engine's per-step cost (speed:
        # deepspeed_step_s) at large micro-batches; the fused linears skip those casts anyway
        if multi or zero == 3 or (zero == 0 and method == "lora"):
            yield zero, "none"
    for zero in (1, 2, 3):
        yield zero, "optimizer"
    if method != "qlora":  # 4-bit weights cannot be offloaded
        yield 3, "optimizer+params"


def _optimizers(zero: int | None, offload: str) -> tuple[str, ...]:
    if offload != "none":
        return ("adamw_torch_fused",)  # DeepSpeed's CPU Adam
    if zero is None:
        return ("adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit")
    return ("adamw_torch_fused", "adamw_8bit")


def _adapters(req: PlanRequest, method: str) -> list[dict[str, Any]]:
    """The LoRA targets (and dropout) to try: the request's; on a mixture-of-experts model
    the measured target sets it allows (moe.plan_target_choices)."""
    if req.spec.moe is None or method == "full":
        return [{"lora_targets": req.lora_targets, "lora_dropout": req.lora_dropout}]
    return [
        {"lora_targets": targets, "lora_dropout": dropout}
        for targets, dropout in moe.plan_target_choices(
            req.spec, req.lora_targets, method, req.lora_dropout
        )
    ]


# the methods whose launched steps were measured with Liger's kernels (kernels_h100.jsonl:
# Llama-3.1-8B LoRA, the fit; kernels_heldout_h100.jsonl: Llama-3.2-3B LoRA, held out;
# kernels2_h100.jsonl: Llama-3.1-8B QLoRA, 13,283 real tokens/s at 16 × 704, peak within
# 0.6% of its estimate; kernels3_h100.jsonl: the unfused-loss QLoRA plan, 13,016 beside the
# plan before's 9,030 in one call, peak within 0.02%); the plan leaves full fine-tuning on
# the model's own kernels until a run checks it
LIGER_MEASURED_METHODS = ("lora", "qlora")


def _dropout_note(dropout: float) -> str:
    """What the plan's LoRA dropout costs (benchmarks/results/kernels_heldout_h100.jsonl)."""
    if dropout == 0:
        return (
            "LoRA dropout 0 (PEFT's, LLaMA-Factory's, axolotl's and Unsloth's default; TRL's "
            "examples use 0.05, which measured 7% slower and 16 GB heavier on a 3B LoRA step): "
            "--lora-dropout to change it"
        )
    return (
        f"LoRA dropout {dropout:g}: each adapter keeps its own copy and mask of its input "
        "(--lora-dropout 0 keeps one input per shared tensor and runs faster)"
    )


def kernels_choice(req: PlanRequest, method: str) -> str:
    """Liger's kernels wherever allowed, measured for ``method`` and the architecture has
    them, else the model's own.

    Not searched both ways: in the memory and speed models Liger's path keeps fewer
    activations and moves less memory at every setup (memory.activations, speed.gpu_seconds),
    never more, and it measured 1.19× as fast with 11% less peak memory on an 8B LoRA step
    (benchmarks/results/kernels_h100.jsonl); a second copy of every candidate would double
    the search for a choice that cannot flip."""
    if req.spec.moe is not None or method not in LIGER_MEASURED_METHODS:
        return "none"  # MoE memory was measured without Liger (moe.check refuses it)
    return "liger" if req.allow_kernels and liger.liger_kernels(req.spec.model_type) else "none"


def fused_lora_choice(req: PlanRequest, method: str, dropout: float, zero: int | None) -> bool:
    """Whether the launch's fused LoRA linears may run: wherever allowed and they can
    (trainsetup.fused_lora_refusal), on dense models (an MoE model's attention linears
    would take them, but its step was measured with PEFT's).

    Where they may, candidate_setups offers each setup both ways and plan keeps the faster
    of each pair (_faster_layers): they keep no more than PEFT's tensors (less over fp32
    adapters under autocast: memory.activations.shares_inputs)
    and take passes off the GPU's step (speed.fused_lora_saved_bytes) and, timed on a GPU
    machine's host, 0.6-0.7 of PEFT's host time (hostops.FUSED_ADAPTER_HOST_US); the pair is
    kept so that a table timed otherwise still picks the faster."""
    if not req.allow_fused_lora or req.spec.moe is not None:
        return False
    probe = TrainSetup(method=method, lora_dropout=dropout, zero=zero)
    return fused_lora_refusal(probe) is None


def cuda_graphs_choice(req: PlanRequest, method: str, zero: int | None) -> bool:
    """Whether the launch runs the decoder as CUDA graphs: wherever allowed and it can
    (trainsetup.cuda_graphs_refusal: one GPU, no DeepSpeed, LoRA or QLoRA), on dense models (an
    MoE layer's routing reads the GPU on the host), in plans zeroplan launch runs.

    Not searched both ways: the graphs take the host's dispatch out of the step
    (speed.host_seconds) and nothing off the GPU's, so in the speed model they are never
    slower. candidate_setups leaves them off checkpointed setups: checkpointing stashes and
    restores the RNG's state around each layer, which a capture may refuse (torch issue
    162504, fixed for offsets only), and no GPU has run the two together."""
    if not (req.allow_cuda_graphs and req.launched) or req.spec.moe is not None:
        return False
    probe = TrainSetup(method=method, zero=zero)
    return cuda_graphs_refusal(probe, req.cluster.world_size) is None


def candidate_setups(req: PlanRequest) -> Iterator[TrainSetup]:
    world = req.cluster.world_size
    for method in _methods(req):
        kernels = kernels_choice(req, method)
        for adapters, (zero, offload) in itertools.product(
            _adapters(req, method), _distributions(req, method)
        ):
            fused_lora = fused_lora_choice(req, method, adapters["lora_dropout"], zero)
            graphs = cuda_graphs_choice(req, method, zero)
            for optim, lora_fused in itertools.product(
                _optimizers(zero, offload), (True, False) if fused_lora else (False,)
            ):
                for mb in MICRO_BATCHES:
                    if req.global_batch is not None:
                        per_gpu = req.global_batch // world
                        if per_gpu % mb:
                            continue
                        accum = per_gpu // mb
                    else:
                        accum = 1
                    for ckpt in (False, True):
                        for fused in (False, True) if req.allow_fused_loss else (False,):
                            yield TrainSetup(
                                method=method,
                                micro_batch=mb,
                                seq_len=req.seq_len,
                                grad_accum=accum,
                                zero=zero,
                                offload=offload,
                                grad_ckpt=ckpt,
                                lora_r=req.lora_r,
                                optim=optim,
                                fused_loss=fused,
                                kernels=kernels,
                                fused_lora=lora_fused,
                                cuda_graphs=graphs and not ckpt,
                                precision=req.precision,
                                **adapters,
                            )


def evaluate(req: PlanRequest, setup: TrainSetup) -> Candidate:
    setup = resolve_precision(setup, req.cluster.gpu.bf16, req.cluster.gpu.name)
    # the model's own attention (eager for Gemma-2), so the plan's setup says what runs
    setup = resolve_attention(setup, req.spec)
    est = estimate(req.spec, req.cluster, setup)
    limit = est.gpu_memory_bytes * (1 - req.margin)
    fits = est.required_bytes <= limit
    if req.cpu_ram_per_node is not None:
        fits = fits and est.cpu_bytes_per_node <= req.cpu_ram_per_node * (1 - req.margin)
    fill = req.fill(setup.micro_batch)
    return Candidate(setup, est, step_time(req.spec, setup, req.cluster, fill), fits)


def _check_moe(req: PlanRequest) -> None:
    """A mixture-of-experts request with no measured setup to search is refused, with what
    was measured (moe.check's message for the request as asked)."""
    if req.spec.moe is None:
        return
    if any(_adapters(req, m) for m in _methods(req) if m != "full"):
        return
    method = "lora" if req.method == "auto" else req.method
    moe.check(req.spec, TrainSetup(method=method, lora_targets=req.lora_targets, lora_dropout=0))
    raise UnmeasuredMoEError(  # (moe.check refuses every case that gets here)
        f"{req.spec.name}: nothing measured matches --method {req.method} "
        f"--lora-targets {','.join(req.lora_targets)}; use {moe.nearest(req.spec)}"
    )


def complexity(setup: TrainSetup, launched: bool = True) -> int:
    """Moving parts a setup adds; among equally fast setups the simplest wins. The fused
    loss is one where it alone brings Liger in: in another trainer's recipe (``launched``
    False: its Liger switch is a dependency of its own) or beside the model's own kernels.
    Launched beside Liger's kernels it adds nothing to install, and the tie falls to memory
    (on one H100 the default 8B QLoRA plan ran it 1.4% faster and 17 GB lighter than the
    plain loss, predicted 2%: benchmarks/results/kernels9_h100.jsonl)."""
    dist = 0 if setup.zero is None else 1 + setup.zero
    offload = {"none": 0, "optimizer": 5, "optimizer+params": 10}[setup.offload]
    optim = {"adamw_torch_fused": 0, "adamw_8bit": 1}.get(setup.optim, 2)
    liger_already = launched and setup.kernels == "liger"
    return 10 * (dist + offload) + optim + int(setup.fused_loss and not liger_already)


# Predicted speeds this close to the fastest are a tie, which the simpler setup wins, then
# the one with fewer micro-batches per step, then the micro-batch shape predicted faster,
# then, of one shape, the one with more memory to spare. The speed model's held-out error
# is 5-10% at the median, so a 2% edge is not a reason to add DeepSpeed or offload to a
# run; and where it errs between micro-batch sizes it is on the fixed costs of each
# micro-batch, which a larger one spreads (measured on two H200s: an 8B LoRA step at
# micro-batch 4 × 4 ran 4% faster than at 2 × 8, predicted 1%). Memory to spare came before
# the shape's speed until graphs6 (one H100, CUDA graphs): the 1B LoRA job's plan at 16 ×
# 768 then ran 74,634 real tokens/s a full step where 32 × 768, predicted 2.7% faster, ran
# 78,969 and 64 × 768 80,094 (93.2% and 98.6% of the best of the four measured); every
# setup keeps its 5% margin either way. Of one shape (the fused loss beside the plain one,
# a hair apart on a small vocabulary) the lighter still wins.
TIE = 0.03


def _tied(c: Candidate, fastest: float) -> bool:
    """Whether c's predicted speed is within TIE of the fastest: a tie."""
    return c.step.tokens_per_s >= (1 - TIE) * fastest


def _shape(req: PlanRequest, c: Candidate) -> tuple[int, int, int, int]:
    """What ranks tied setups before their speed: moving parts, micro-batches per step,
    and the micro-batch's shape."""
    s = c.setup
    return (complexity(s, req.launched), s.grad_accum, s.micro_batch, s.seq_len)


def _score(
    req: PlanRequest, c: Candidate, fastest: float, shape_fastest: float
) -> tuple[float, ...]:
    """c's sort key; ``shape_fastest``: the fastest predicted speed of the setups of c's
    _shape."""
    if req.objective == "memory":
        return (c.estimate.required_bytes, -c.step.tokens_per_s)
    # time and cost rank alike on one cluster
    if _tied(c, fastest):
        return (
            0,
            complexity(c.setup, req.launched),
            c.setup.grad_accum,
            -shape_fastest,
            c.estimate.required_bytes,
            -c.step.tokens_per_s,
        )
    return (
        1,
        -c.step.tokens_per_s,
        complexity(c.setup, req.launched),
        c.estimate.required_bytes,
    )


def _rank(req: PlanRequest, cands: list[Candidate]) -> list[Candidate]:
    """Fastest first; speeds within TIE of the fastest ranked by simplicity, then by their
    micro-batch shape's best speed, then by memory."""
    if not cands:
        return []
    fastest = max(c.step.tokens_per_s for c in cands)
    best: dict[tuple[int, int, int, int], float] = {}
    for c in cands:
        shape = _shape(req, c)
        best[shape] = max(best.get(shape, 0.0), c.step.tokens_per_s)
    return sorted(cands, key=lambda c: _score(req, c, fastest, best[_shape(req, c)]))


def _peft_layers_note(req: PlanRequest, best: Candidate) -> str:
    """Why a plan whose LoRA linears could be fused keeps PEFT's layers: predicted faster,
    which only a host-bound step over bf16 adapters can be (_faster_layers)."""
    try:
        fused = evaluate(req, dataclasses.replace(best.setup, fused_lora=True))
    except ZeroplanError as exc:  # the setup as resolved (precision, attention) refuses them
        return f"LoRA linears run PEFT's own layers: {exc}"
    gain = best.step.tokens_per_s / fused.step.tokens_per_s - 1
    path = fused_lora_path(fused.setup)
    paced = "the host sets this step's pace" if best.step.host_bound else "this step"
    return (
        f"LoRA linears run PEFT's own layers: {paced}, and the fused ones ask more of the "
        f"host over {path} adapters ({fused_adapter_share(path):.2f}x PEFT's time per "
        f"adapter), predicted {gain:.0%} slower here"
    )


def _faster_layers(results: list[Candidate]) -> list[Candidate]:
    """Of each setup evaluated on the fused LoRA linears and on PEFT's layers (the same
    memory), the one predicted faster; the fused one where they tie exactly (a GPU-bound
    step never runs slower on them). Order kept."""
    best: dict[TrainSetup, Candidate] = {}
    for c in results:
        key = dataclasses.replace(c.setup, fused_lora=False)
        held = best.get(key)
        if (
            held is None
            or c.step.tokens_per_s > held.step.tokens_per_s
            or (c.step.tokens_per_s == held.step.tokens_per_s and c.setup.fused_lora)
        ):
            best[key] = c
    kept = {id(c) for c in best.values()}
    return [c for c in results if id(c) in kept]


def _tie_lost_on(
    loser: TrainSetup, winner: TrainSetup, launched: bool = True, slower: bool = False
) -> str:
    """Why a setup tied on speed ranks below the chosen one, in _score's order (``slower``:
    its micro-batch shape is another and predicted slower than the winner's)."""
    if complexity(loser, launched) > complexity(winner, launched):
        return "adds moving parts"
    if loser.grad_accum > winner.grad_accum:
        return "takes more micro-batches per step"
    return "is the slower one" if slower else "leaves less memory to spare"


def plan(req: PlanRequest) -> Plan:
    """Evaluate every candidate, keep those that fit, rank them, explain each family's loss."""
    _check_moe(req)
    results: list[Candidate] = []
    for setup in candidate_setups(req):
        try:
            results.append(evaluate(req, setup))
        except ZeroplanError:
            continue  # a combination the estimator refuses (e.g. unsupported for this model)
    results = _faster_layers(results)
    fitting = _rank(req, [c for c in results if c.fits])
    # --method lora keeps the bf16 base when any bf16 setup fits; the 4-bit one is shown aside
    alternative = None
    fell_back = False
    if req.method == "lora":
        bf16 = [c for c in fitting if c.setup.method == "lora"]
        four_bit = [c for c in fitting if c.setup.method == "qlora"]
        if bf16:
            # each ranked among its own kind, as --method auto would rank it: the tie window
            # is measured from the fastest of that kind, not from the bf16 plan's speed
            ranked_4bit = _rank(req, four_bit)
            fitting, alternative = _rank(req, bf16), (ranked_4bit[0] if ranked_4bit else None)
        else:
            fell_back = bool(four_bit)
    best = fitting[0] if fitting else None
    rejected: dict[str, str] = {}
    by_family: dict[str, list[Candidate]] = {}
    for c in results:
        if alternative is not None and c.setup.method == "qlora":
            continue  # one line of its own (quantized_alternative), not a family that lost
        by_family.setdefault(c.family, []).append(c)
    fastest = max((c.step.tokens_per_s for c in fitting), default=0.0)
    for fam, members in by_family.items():
        if best is not None and fam == best.family:
            continue
        ok = [c for c in members if c.fits]
        if not ok:
            least = min(members, key=lambda c: c.estimate.required_bytes)
            gpu_limit = least.estimate.gpu_memory_bytes * (1 - req.margin)
            if least.estimate.required_bytes <= gpu_limit and req.cpu_ram_per_node:
                rejected[fam] = (
                    f"does not fit the host: needs {_gib(least.estimate.cpu_bytes_per_node)} GiB "
                    f"of CPU RAM per node, {_gib(req.cpu_ram_per_node * (1 - req.margin))} usable"
                )
            else:
                rejected[fam] = (
                    f"does not fit: even {describe(least.setup)} needs "
                    f"{_gib(least.estimate.required_bytes)} GiB of {_gib(gpu_limit)} usable"
                )
        elif best is not None:
            top = _rank(req, ok)[0]
            if req.objective == "memory":
                more = top.estimate.required_bytes / best.estimate.required_bytes - 1
                rejected[fam] = f"needs {more:.0%} more memory ({describe(top.setup)})"
            else:
                if _tied(top, fastest):
                    # a tie as the ranking has it (_score): lost on what breaks ties
                    edge = top.step.tokens_per_s / best.step.tokens_per_s - 1
                    outpaced = _shape(req, top)[2:] != _shape(req, best)[2:] and edge < 0
                    rejected[fam] = (
                        f"as fast (predicted {edge:+.0%}, a tie within {TIE:.0%}), but "
                        f"{_tie_lost_on(top.setup, best.setup, req.launched, outpaced)} "
                        f"({describe(top.setup)})"
                    )
                else:
                    slower = best.step.tokens_per_s / top.step.tokens_per_s - 1
                    rejected[fam] = f"slower by {slower:.0%} at its best ({describe(top.setup)})"
    suggestion = None if best else suggest(req)
    assumptions = [
        "speeds from zeroplan.speed, fitted on H100 and H200 steps; on steps no fit saw, 9 "
        f"in 10 predictions came within {HELD_OUT_P90_GPU_BOUND:.0%} of the measured speed "
        f"where the GPU sets the pace, {HELD_OUT_P90_HOST_BOUND:.0%} where the host does, "
        f"and 9 in 10 launched runs on real records within {LAUNCHED_P90_GPU_BOUND:.0%} and "
        f"{LAUNCHED_P90_HOST_BOUND:.0%} of their plan (docs/speed.md); the host's cost per "
        "dispatched operation was measured on Xeon hosts"
        + (
            "; mixture-of-experts steps have wider bands of their own (below)"
            if req.spec.moe
            else ""
        )
    ]
    assumptions.extend(req.notes)
    assumptions.extend(req.cluster.notes)
    assumptions += [n for n in (family_note(req.spec), gpu_note(req.cluster.gpu.name)) if n]
    if req.precision == "fp16":
        assumptions.append(
            f"fp16 mixed precision{'' if req.cluster.gpu.bf16 else f' ({req.cluster.gpu.name} has no bf16)'}: "
            "memory measured with fp16 forced on an H200; speeds use the fp16 peak "
            f"({req.cluster.gpu.fp16_tflops:g} TFLOP/s)"
        )
    if best is not None and req.spec.moe is not None and best.setup.is_lora:
        tried = [
            moe.describe_targets(t, d)
            for t, d in moe.plan_target_choices(
                req.spec, req.lora_targets, best.setup.method, req.lora_dropout
            )
        ]
        assumptions.append(
            f"mixture of experts: LoRA on "
            f"{moe.describe_targets(best.setup.lora_targets, best.setup.lora_dropout)}, "
            f"chosen among the measured target sets ({'; '.join(tried)}); peaks of those "
            f"measured within 2.5% ({moe.RESULTS}); the step's speed from the MoE step's model"
        )
    if best is not None and fell_back:
        assumptions.append(
            "no setup with the bf16 base fits: the plan trains LoRA on a 4-bit (NF4) base "
            "(qlora), which quantizes the frozen weights; --no-quantization refuses that"
        )
    elif best is not None and req.method == "auto":
        assumptions.append(
            f"--method auto: {best.setup.method} is predicted fastest"
            + (
                " (the frozen weights quantized to 4-bit NF4)"
                if best.setup.method == "qlora"
                else ""
            )
        )
    if best is not None and best.estimate.cpu_bytes_per_node and req.cpu_ram_per_node is None:
        assumptions.append(
            f"the offload needs {_gib(best.estimate.cpu_bytes_per_node)} GiB of CPU RAM per node; "
            "give --cpu-ram-per-node to plan within what the hosts have"
        )
    if best is not None and best.setup.offload != "none" and req.cluster.cpu_cores_per_node is None:
        assumptions.append(
            f"the offloaded optimizer steps on the CPU at {req.cluster.cpu_threads_per_rank} "
            f"threads per GPU ({DEFAULT_CPU_CORES_PER_GPU} cores per GPU assumed): give "
            "--cpu-cores-per-node for your hosts' count"
        )
    if best is not None and (attn_why := attention_note(req.spec, best.setup)):
        assumptions.append(attn_why)
    if best is not None and (window_why := window_note(req.spec, best.setup)):
        assumptions.append(window_why)
    if best is not None and best.setup.is_lora and req.spec.moe is None:
        assumptions.append(_dropout_note(best.setup.lora_dropout))
    if best is not None and best.setup.kernels == "liger":
        assumptions.append(
            "Liger's RMSNorm, SwiGLU/GeGLU and RoPE kernels run around the linears (fewer "
            "activations, less memory traffic; measured on Llama LoRA and QLoRA steps, its speed-up "
            "fitted on one 8B shape): pip install liger-kernel where you train, or plan with "
            "--no-liger"
        )
    if best is not None and best.setup.fused_lora:
        assumptions.append(
            "LoRA linears run as one function each (base matmul, adapter and sum, without "
            "PEFT's passes over each output or its casts to fp32 adapters; no more memory): "
            "zeroplan launch does this, --no-fused-lora plans PEFT's own layers"
        )
    elif best is not None and fused_lora_choice(
        req, best.setup.method, best.setup.lora_dropout, best.setup.zero
    ):
        assumptions.append(_peft_layers_note(req, best))
    if best is not None and best.setup.cuda_graphs:
        assumptions.append(
            "zeroplan launch captures the decoder's forward and backward once as CUDA graphs "
            "and replays them, so the host's dispatch does not set the pace (a failed capture "
            "runs eager, and the host then may); on H100s 1.4-4.2x the eager step where "
            "the host set its pace, 1.00-1.02x where the GPU did: --no-cuda-graphs for the "
            "eager step"
        )
    if best is not None and best.setup.fused_loss:
        assumptions.append(
            "the fused loss runs Liger's kernel: pip install 'zeroplan[fused]' where you train, "
            "or plan with --no-fused-loss"
        )
    return Plan(
        req,
        best,
        distinct(fitting),
        rejected,
        len(results),
        suggestion,
        tuple(assumptions),
        alternative,
    )


def distinct(ranked: list[Candidate]) -> list[Candidate]:
    """The best of each (family, micro-batch, accumulation, checkpointing): variants that
    differ only in optimizer or loss kernel and run as fast would crowd the table."""
    seen: set[tuple[str, int, int, bool]] = set()
    out = []
    for c in ranked:
        key = (c.family, c.setup.micro_batch, c.setup.grad_accum, c.setup.grad_ckpt)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def describe(setup: TrainSetup) -> str:
    parts = [f"micro-batch {setup.micro_batch}"]
    if setup.grad_accum > 1:
        parts.append(f"× {setup.grad_accum} accumulation")
    parts.append("checkpointing" if setup.grad_ckpt else "no checkpointing")
    if setup.fused_loss:
        parts.append("fused loss")
    if setup.cuda_graphs:
        parts.append("CUDA graphs")
    if setup.optim != "adamw_torch_fused":
        parts.append(setup.optim)
    return ", ".join(parts)


def suggest(req: PlanRequest) -> str:
    """Nothing fits: the smallest cluster of this GPU that would, and the cheapest change."""
    if req.spec.moe is not None:
        # no DeepSpeed for MoE (zeroplan.moe): more GPUs each hold the whole model
        least = min(_lean(req), key=lambda c: c.estimate.required_bytes, default=None)
        need = (
            f": even {describe(least.setup)} needs {_gib(least.estimate.required_bytes)} GiB"
            if least
            else ""
        )
        return (
            f"mixture of experts is planned only as measured, without DeepSpeed, so more "
            f"{req.cluster.gpu.name}s do not help{need} per GPU; a card with that much "
            "memory would fit it"
        )
    lines = []
    for n in (2, 4, 8, 16, 32, 64, 128, 256):
        if n <= req.cluster.world_size:
            continue
        nodes = max(1, math.ceil(n / 8)) if req.cluster.num_nodes > 1 or n > 8 else 1
        bigger = dataclasses.replace(req.cluster, gpus_per_node=n // nodes, num_nodes=nodes)
        # a larger cluster needs a global batch it can split
        sub = dataclasses.replace(req, cluster=bigger, global_batch=None)
        if any(c.fits for c in _lean(sub)):
            lines.append(f"{n}×{req.cluster.gpu.name} would fit it (ZeRO-3, offload as needed)")
            break
    else:
        lines.append(f"no cluster of up to 256 {req.cluster.gpu.name} fits it")
    if req.method == "full":
        alt = dataclasses.replace(req, method="lora", global_batch=None)
        if any(c.fits for c in _lean(alt)):
            lines.append(f"or --method lora / qlora fits on {req.cluster.describe()}")
    elif req.seq_len > 512:
        alt = dataclasses.replace(req, seq_len=req.seq_len // 2, global_batch=None)
        if any(c.fits for c in _lean(alt)):
            lines.append(f"or --seq-len {req.seq_len // 2} fits on {req.cluster.describe()}")
    return "; ".join(lines)


def _lean(req: PlanRequest) -> Iterator[Candidate]:
    """The least-memory setups of each kind: micro-batch 1, checkpointing, fused loss."""
    for method in _methods(req):
        for adapters, (zero, offload) in itertools.product(
            _adapters(req, method), _distributions(req, method)
        ):
            optim = "adamw_torch_fused" if offload != "none" else "adamw_8bit"
            setup = TrainSetup(
                method=method,
                seq_len=req.seq_len,
                zero=zero,
                offload=offload,
                grad_ckpt=True,
                fused_loss=req.allow_fused_loss,
                kernels=kernels_choice(req, method),
                fused_lora=fused_lora_choice(req, method, adapters["lora_dropout"], zero),
                optim=optim,
                lora_r=req.lora_r,
                precision=req.precision,
                **adapters,
            )
            try:
                yield evaluate(req, setup)
            except ZeroplanError:
                continue


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def plan_json(p: Plan, top: int = 8) -> dict[str, Any]:
    """The plan as one JSON object (``zeroplan plan --json`` and plan.json)."""

    def cand(c: Candidate) -> dict[str, Any]:
        out: dict[str, Any] = {
            "setup": c.setup.to_dict(),
            "family": c.family,
            "required_bytes": c.estimate.required_bytes,
            "peak_allocated_bytes": c.estimate.peak_allocated_bytes,
            "device_used_bytes": c.estimate.device_used_bytes,
            "cpu_bytes_per_node": c.estimate.cpu_bytes_per_node,
            **c.step.to_json(),
        }
        if p.request.data is not None:
            capacity, rows = p.request.packed_rows(c.setup.micro_batch)
            packed = p.request.data.pack_at(capacity)
            per_step = rows * c.setup.grad_accum * p.request.cluster.world_size
            out["steps_per_epoch"] = steps_per_epoch(packed.rows, per_step)
            out["fill"] = packed.fill
        tokens = p.request.tokens_to_train
        if tokens:
            hours = tokens / c.step.tokens_per_s / 3600
            out["hours"] = hours
            if price is not None:
                out["cost"] = hours * p.request.cluster.world_size * price.per_gpu_hour
        return out

    def quantized(c: Candidate | None) -> dict[str, Any] | None:
        if c is None or p.best is None:
            return None
        out = cand(c)
        out["speedup"] = c.step.tokens_per_s / p.best.step.tokens_per_s - 1
        out["changes"] = (
            "the frozen base weights are quantized to 4-bit NF4 (bitsandbytes): a different "
            "model in every forward pass; --method auto lets the plan choose it"
        )
        return out

    req = p.request
    # a cost needs the tokens to train on; then the user's price, else the dated table's
    price = req.price() if req.tokens_to_train else None
    return {
        "model": req.spec.name,  # for display; planfiles.model_location says what to load
        # a local model: its folder (absolute), so that the plan launches from any folder;
        # None for the catalog, the HF cache and the Hub (then "model" is the id)
        "model_path": req.spec.local_path,
        # where the config came from: a local config.json path, "catalog", "hf-cache" or "hub"
        "model_source": req.spec.source,
        "cluster": req.cluster.describe(),
        "world_size": req.cluster.world_size,
        "request": {
            "method": req.method,
            "seq_len": req.seq_len,
            "global_batch": req.global_batch,
            "dataset_tokens": req.dataset_tokens,
            "margin": req.margin,
            "objective": req.objective,
            "price_per_gpu_hour": price.per_gpu_hour if price else req.price_per_gpu_hour,
            "price_source": price.source if price else None,
            "cpu_ram_per_node": req.cpu_ram_per_node,
            "epochs": req.epochs,
            "tokens_to_train": req.tokens_to_train,
        },
        # tokens_per_s counts real tokens: the token positions of every step × this fill
        "data": req.data.to_json() if req.data is not None else None,
        "best": cand(p.best) if p.best else None,
        "alternatives": [cand(c) for c in p.ranked[1 : top + 1]],
        # --method lora, bf16 plan: the fastest 4-bit setup, not chosen (--method auto may)
        "quantized_alternative": quantized(p.quantized_alternative) if p.best else None,
        "rejected": p.rejected,
        "searched": p.searched,
        "suggestion": p.suggestion,
        "assumptions": list(p.assumptions),
    }
