"""TrainSetup: the knobs of one fine-tuning run, validated, plus what they imply for a model.

The option names follow the estimate contract in DESIGN.md (``--method``, ``--zero``,
``--offload``, ``--micro-batch``, ``--seq-len``, ``--grad-ckpt``, ``--lora-r``,
``--lora-targets``, ``--optim``, ``--attn``, ``--kernels``, ``--loop``, ``--autocast``, ``--keep-outputs``)
so that a TrainSetup, the CLI and the JSON ``setup`` object are the same thing.

The training loop matters as much as the knobs (DESIGN.md, "Which training loop the estimate
describes"). ``loop`` names a preset for three things a loop decides: the optimizer, whether
the forward runs under bf16 autocast, and whether the model's output object is still alive
during backward. ``trainer`` is the HF Trainer's loop (what ``zeroplan launch``, TRL,
axolotl and LLaMA-Factory run): fused AdamW, autocast, outputs dropped. ``plain`` is the
hand-written loop of the transformers docs on a bf16 model: ``torch.optim.AdamW(params)``
(foreach), no autocast, ``out = model(...); out.loss.backward()``. Explicit ``optim``,
``autocast`` and ``keep_outputs`` override the preset; the resolved values are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from zeroplan.errors import BadSetupError
from zeroplan.liger import KERNEL_CHOICES
from zeroplan.models import Linear, ModelSpec

METHODS = ("lora", "qlora", "full")
OFFLOADS = ("none", "optimizer", "optimizer+params")
# HF Trainer's names (transformers.training_args.OptimizerNames) for the optimizers zeroplan
# models. adamw_torch is torch.optim.AdamW with PyTorch's defaults (foreach on a GPU),
# adamw_torch_fused the same with fused=True (HF Trainer's default on torch >= 2.8).
OPTIMIZERS = (
    "adamw_torch_fused",
    "adamw_torch",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "sgd",
)
# Other names accepted for the same optimizers: zeroplan's earlier ones (old plan.json files
# hold them) and HF's second name for bitsandbytes 8-bit AdamW.
OPTIM_ALIASES = {
    "adamw": "adamw_torch_fused",
    "paged_adamw": "paged_adamw_32bit",
    "adamw_bnb_8bit": "adamw_8bit",
}
TORCH_ADAMW = ("adamw_torch_fused", "adamw_torch")
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


@dataclass(frozen=True)
class LoopPreset:
    """What a training loop decides: its optimizer, autocast, and whether it keeps outputs."""

    optim: str
    autocast: bool
    keep_outputs: bool


LOOPS = {
    # HF Trainer / accelerate: fused AdamW, bf16 autocast (none under DeepSpeed, which casts
    # the whole model), compute_loss returns the loss only.
    "trainer": LoopPreset(optim="adamw_torch_fused", autocast=True, keep_outputs=False),
    # out = model(input_ids=..., labels=...); out.loss.backward(); torch.optim.AdamW(params)
    "plain": LoopPreset(optim="adamw_torch", autocast=False, keep_outputs=True),
}
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")
# Model types whose attention SDPA cannot compute, and why: Gemma-2 soft-caps its attention
# scores (flash_attention_2 and flex can). With no attention named, transformers runs eager
# for it (the default since 4.45, huggingface/transformers#32865); asked for sdpa, 5.25
# raises (models/gemma2/modeling_gemma2.py: _supports_sdpa = False), while older versions
# ran SDPA without the cap (the GPU machine's 5.17 did: docs/speed.md), another model.
NO_SDPA_MODEL_TYPES = {"gemma2": "Gemma-2 soft-caps its attention scores, which SDPA cannot"}
# Mixed precision: bf16 where the card has it, fp16 (with loss scaling) where it does not
# (T4, V100, RTX 20xx). "" in a TrainSetup means "the card's": resolve_precision fills it.
PRECISIONS = ("bf16", "fp16")
ALL_LINEAR = "all-linear"
# bytes per element
BF16 = 2  # also fp16
FP32 = 4

# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py), used when a setup does not
# name its own; dsconfig writes whatever the setup holds, so estimate and config agree.
DS_REDUCE_BUCKET_ELEMS = 500_000_000
DS_ALLGATHER_BUCKET_ELEMS = 500_000_000
DS_STAGE3_PREFETCH_ELEMS = 50_000_000
DS_STAGE3_MAX_LIVE_ELEMS = 1_000_000_000
DS_STAGE3_PERSISTENCE_THRESHOLD = 100_000
DS_SUB_GROUP_ELEMS = 1_000_000_000


@dataclass(frozen=True)
class TrainSetup:
    """One training configuration, per GPU. ``zero=None`` means no DeepSpeed (DDP or one GPU)."""

    method: str = "lora"
    micro_batch: int = 1
    seq_len: int = 2048
    # micro-batches per optimizer step: from the second on, gradients of the earlier ones
    # are resident during the forward
    grad_accum: int = 1
    zero: int | None = None
    offload: str = "none"
    grad_ckpt: bool = False
    lora_r: int = 16
    lora_targets: tuple[str, ...] = (ALL_LINEAR,)
    lora_dropout: float = 0.0
    # "" (or None): the loop's (LOOPS); resolved in __post_init__, aliases to their HF names
    optim: str = ""
    # "" (or None): the model's default (default_attention), filled in by resolve_attention
    # wherever a setup meets its model (estimate, plan); an explicit choice is checked there
    attn: str = ""
    fused_loss: bool = False
    # the elementwise kernels around the linears: "none" (the model's own PyTorch modules) or
    # "liger" (Liger's RMSNorm, SwiGLU / GeGLU and RoPE where the architecture has them:
    # zeroplan.liger); they keep fewer activations and move less memory
    kernels: str = "none"
    # each decoder layer through torch.compile (``zeroplan launch --compile``): inductor fuses
    # a layer's elementwise work and the host makes fewer calls (speed.host_operations). The
    # planner leaves it off: on the one host-bound launch measured it ran 1.08-1.13x, inside
    # the host-bound repeat spread, after a 20 s compile (docs/launch.md); the launch runs
    # what a setup says
    compile: bool = False
    # the decoder's forward and backward captured once as CUDA graphs and replayed
    # (``zeroplan launch --cuda-graphs``, launch/graphs.py): the host queues two launches
    # instead of every operation, so a host-paced step becomes the GPU's. One process
    # without DeepSpeed, LoRA / QLoRA (cuda_graphs_refusal)
    cuda_graphs: bool = False
    # peft.prepare_model_for_kbit_training upcasts non-quantized weights to fp32; zeroplan
    # launch does not, so this is off unless a user wants to model a run that does.
    upcast_non_quantized: bool = False
    # Batches padded to their longest row and an attention mask: what LLaMA-Factory, TRL and
    # axolotl run when they do not pack (HF's padding collators). Under sdpa that costs memory
    # (memory/activations.padding_mask_bytes and padding_mask_repeat_per_token); zeroplan
    # launch packs, so it is off by default.
    padding_mask: bool = False
    # TRL >= 1.x SFTTrainer's LM head (trl.trainer.utils.add_fused_lm_head): log-probs of the
    # labelled positions in tiles, no batch x seq x vocab logits (memory/logits.py). TRL's
    # own, always on in its SFTTrainer; Liger's is fused_loss.
    chunked_lm_head: bool = False
    # LoRA adapters kept in bf16 instead of PEFT's fp32 (weights, gradients and AdamW states
    # 2 B each): what TRL's SFTTrainer does to a quantized model's adapters (QLoRA).
    lora_bf16: bool = False
    # axolotl's fused LoRA autograd functions (LoRA_QKV, LoRA_O, LoRA_MLP, axolotl 0.19
    # src/axolotl/kernels/lora.py) in place of PEFT's per-adapter path: each fused group keeps
    # its shared input (and one dropout mask) instead of a copy per adapter, and LoRA_MLP
    # recomputes act(gate) (memory/activations.lora_kernel_saved). axolotl turns them on for
    # LoRA / QLoRA unless its recipe sets them.
    lora_kernels: bool = False
    # zeroplan launch's own LoRA linears (zeroplan.launch.loralinear): the base matmul, the
    # adapter's and their sum as one autograd function (cuBLAS addmm), without PEFT's
    # elementwise passes over each output (4-bit copy, · scaling, the sum) and its separate
    # sum of the input's two gradients. No more kept for the backward (less over fp32
    # adapters under autocast: no copy of the input per adapter); dropout 0 only, not under
    # ZeRO-3 (fused_lora_refusal). The planner weighs it both ways.
    fused_lora: bool = False
    reduce_bucket_elems: int = DS_REDUCE_BUCKET_ELEMS
    allgather_bucket_elems: int = DS_ALLGATHER_BUCKET_ELEMS
    stage3_prefetch_elems: int = DS_STAGE3_PREFETCH_ELEMS
    stage3_max_live_elems: int = DS_STAGE3_MAX_LIVE_ELEMS
    stage3_persistence_threshold: int = DS_STAGE3_PERSISTENCE_THRESHOLD
    # double reduce buckets for ZeRO-1/2; dsconfig writes it, DeepSpeed's own default is
    # on at stage 3 only
    overlap_comm: bool = True
    # the training loop (LOOPS) and the two things it decides besides the optimizer;
    # None: the loop's. Under DeepSpeed autocast is always off (bf16 casts the whole model).
    loop: str = "trainer"
    autocast: bool | None = None
    keep_outputs: bool | None = None
    # "bf16" or "fp16"; "" (or None): the card's, bf16 where it has it, else fp16, filled in
    # by resolve_precision wherever a setup meets its cluster (estimate, plan, config), so
    # the plan's setup, and the launch that reads it, hold the resolved value.
    precision: str = ""

    def __post_init__(self) -> None:
        _choice("--method", self.method, METHODS)
        _choice("--offload", self.offload, OFFLOADS)
        _choice("--loop", self.loop, tuple(LOOPS))
        preset = LOOPS[self.loop]
        optim = preset.optim if not self.optim else OPTIM_ALIASES.get(self.optim, self.optim)
        _choice("--optim", optim, OPTIMIZERS + tuple(OPTIM_ALIASES))
        if self.autocast and self.zero is not None:
            raise BadSetupError(
                "--autocast with DeepSpeed: DeepSpeed bf16 casts the whole model and runs "
                "without autocast; drop --autocast"
            )
        autocast = self.autocast
        if autocast is None:
            autocast = preset.autocast and self.zero is None
        keep = preset.keep_outputs if self.keep_outputs is None else self.keep_outputs
        object.__setattr__(self, "optim", optim)
        object.__setattr__(self, "autocast", autocast)
        object.__setattr__(self, "keep_outputs", keep)
        object.__setattr__(self, "attn", self.attn or "")
        if self.attn:
            _choice("--attn", self.attn, ATTENTIONS)
        _choice("--kernels", self.kernels, KERNEL_CHOICES)
        precision = self.precision or ""
        object.__setattr__(self, "precision", precision)
        if precision:
            _choice("--precision", precision, PRECISIONS)
        if precision == "fp16" and self.zero is None and not autocast:
            raise BadSetupError(
                "fp16 without DeepSpeed runs as PyTorch AMP (autocast + GradScaler), which "
                "--no-autocast / --loop plain turns off: drop it, or use --zero"
            )
        if self.fused_lora and (why := fused_lora_refusal(self)) is not None:
            raise BadSetupError(f"--fused-lora: {why}")
        if self.micro_batch < 1:
            raise BadSetupError(f"--micro-batch must be at least 1, got {self.micro_batch}")
        if self.grad_accum < 1:
            raise BadSetupError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if self.seq_len < 1:
            raise BadSetupError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise BadSetupError(
                f"--zero must be 0, 1, 2 or 3 (DeepSpeed ZeRO stage), got {self.zero}; "
                "leave it out for plain PyTorch/DDP"
            )
        if self.offload != "none" and (self.zero is None or self.zero == 0):
            raise BadSetupError(
                f"--offload {self.offload} needs DeepSpeed ZeRO: add --zero 2 or --zero 3"
            )
        if self.offload == "optimizer+params" and self.zero != 3:
            raise BadSetupError("--offload optimizer+params (ZeRO-Infinity) needs --zero 3")
        if self.method != "full":
            if self.lora_r < 1:
                raise BadSetupError(f"--lora-r must be at least 1, got {self.lora_r}")
            if not self.lora_targets:
                raise BadSetupError("--lora-targets is empty: give module names or all-linear")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise BadSetupError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if optim in BNB_OPTIMIZERS and self.offload != "none":
            raise BadSetupError(
                f"--optim {optim} is a bitsandbytes optimizer, but --offload {self.offload} "
                "runs DeepSpeed's own CPU Adam in its place: use --optim adamw_torch_fused, "
                "or drop --offload"
            )
        for name in (
            "reduce_bucket_elems",
            "allgather_bucket_elems",
            "stage3_prefetch_elems",
            "stage3_max_live_elems",
        ):
            if getattr(self, name) < 1:
                raise BadSetupError(f"{name} must be positive")

    @property
    def full_logits(self) -> bool:
        """Whether the loss materialises the b·s·V logits (neither fused nor chunked head)."""
        return not (self.fused_loss or self.chunked_lm_head)

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch on one GPU: b·s."""
        return self.micro_batch * self.seq_len

    @property
    def deepspeed(self) -> bool:
        return self.zero is not None

    @property
    def fp16(self) -> bool:
        """fp16 mixed precision (an unresolved precision counts as bf16)."""
        return self.precision == "fp16"

    @property
    def is_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def reentrant_checkpointing(self) -> bool:
        """Checkpointing is reentrant (else non-reentrant): TRL requires reentrant for PEFT
        under DeepSpeed ZeRO-3 (trl#2514), and the memory model follows what runs."""
        return self.grad_ckpt and self.is_lora and self.zero == 3

    @property
    def zero_init(self) -> bool:
        """ZeRO-3 with the model built inside ``deepspeed.zero.Init``: the trainer loop's
        (transformers' DeepSpeed integration loads the model under it once the config says
        stage 3; TRL, axolotl, LLaMA-Factory and ``zeroplan launch`` load it so). A plain
        loop builds the model first and hands it to ``deepspeed.initialize``."""
        return self.zero == 3 and self.loop != "plain"

    def to_dict(self) -> dict[str, Any]:
        # every field is a str, number, bool, None or tuple of str: a shallow copy is a copy
        # (asdict's deep copy cost the planner a sixth of its time)
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lora_targets"] = ",".join(self.lora_targets)
        return d

    @property
    def foreach_adamw(self) -> bool:
        """torch AdamW with PyTorch's default implementation (foreach on a GPU), whose step
        allocates parameter-sized temporaries; under CPU offload DeepSpeed's CPU Adam steps."""
        return self.optim == "adamw_torch" and self.offload == "none"


def fused_lora_refusal(setup: TrainSetup) -> str | None:
    """Why ``setup`` cannot run the launch's fused LoRA linears (None: it can), and what to
    pass instead: they need adapters, LoRA dropout 0 (the input each adapter sees is the
    layer's own) and the adapters' weights in memory (ZeRO-3 gathers them through their
    modules' hooks, which the fused function does not call)."""
    if setup.method not in ("lora", "qlora"):
        return "full fine-tuning has no adapters; drop it"
    if setup.lora_dropout > 0:
        return f"it runs at LoRA dropout 0, not {setup.lora_dropout:g}: pass --lora-dropout 0"
    if setup.zero == 3:
        return "ZeRO-3 gathers the adapters through their modules' hooks: use --zero 2 or drop it"
    return None


def cuda_graphs_refusal(
    setup: TrainSetup, world: int, cuda: bool = True, compiled: bool = False
) -> str | None:
    """Why the launch cannot run ``setup``'s decoder as CUDA graphs (None: it can;
    zeroplan.launch.graphs): a GPU, one process (DDP's gradient hooks run inside the
    backward), no DeepSpeed (its engine holds the gradients), adapters (a full fine-tune's
    gradients would be held twice: the graph's buffers and ``.grad``), and not beside
    ``--compile`` (each compiled layer is its own graph). TRL's reentrant checkpointing,
    which calls backward inside the backward, comes only with PEFT under ZeRO-3."""
    if not cuda:
        return "no GPU"
    if world > 1:
        return "several processes (DDP's gradient hooks run inside the backward)"
    if setup.zero is not None:
        return "DeepSpeed holds the gradients"
    if not setup.is_lora:
        return "full fine-tuning (the graph would hold a second copy of every gradient)"
    if compiled:
        return "--compile's layers (each is its own compiled graph)"
    return None


def refuse_cuda_graphs(
    setup: TrainSetup,
    world: int,
    cuda: bool = True,
    compiled: bool = False,
    fix: str = "pass --no-cuda-graphs",
) -> None:
    """``--cuda-graphs`` asked for where they cannot run: cuda_graphs_refusal's reason as a
    one-line error, ``fix`` saying how to go on."""
    why = cuda_graphs_refusal(setup, world, cuda, compiled)
    if why is not None:
        raise BadSetupError(f"--cuda-graphs: {why}; {fix}")


def cpu_refusal(setup: TrainSetup) -> str | None:
    """What in ``setup`` runs on a CUDA GPU only, and how to plan without it, in one line
    (None: every part runs on the CPU too). Ranks started on a CPU (``zeroplan launch
    --force`` without a GPU) would stop on each of these in turn; naming them all at once
    spares a retry per part. The plan options where ``zeroplan plan`` has one; the others
    come from a recipe or ``config``."""
    parts: list[tuple[str, str | None]] = []
    if setup.method == "qlora":
        parts.append(("--method qlora (bitsandbytes quantizes on the GPU)", "--method lora"))
    if setup.optim in BNB_OPTIMIZERS:
        parts.append((f"the {setup.optim} optimizer (bitsandbytes)", None))
    if setup.fused_loss:
        parts.append(("the fused loss (Liger's Triton kernels)", "--no-fused-loss"))
    if setup.attn == "flash_attention_2":
        parts.append(("flash_attention_2", None))
    if setup.zero is not None:
        parts.append((f"DeepSpeed ZeRO-{setup.zero}", None))
    if not parts:
        return None
    names = [w for w, _ in parts]
    what = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    flags = [f for _, f in parts if f is not None]
    how = f" ({', '.join(flags)})" if flags else ""
    need, it = ("needs", "it") if len(parts) == 1 else ("need", "them")
    return f"{what} {need} a CUDA GPU: plan again without {it}{how} to train on the CPU"


def resolve_precision(setup: TrainSetup, gpu_bf16: bool, gpu_name: str = "this GPU") -> TrainSetup:
    """``setup`` with its precision for a card that has bf16 (``gpu_bf16``) or not.

    "" becomes bf16 where the card has it, else fp16; bf16 asked for on a card without it
    is refused (the card cannot run it), and so is flash_attention_2: both arrived with
    Ampere (compute capability 8.0), the cards whose catalog entry has bf16 (T4, V100 and
    RTX 20xx have neither; flash-attn 2 raises on them at the first forward). This is
    where every setup meets its cluster's card. Idempotent, so every caller may apply it.
    """
    if setup.precision == "bf16" and not gpu_bf16:
        raise BadSetupError(
            f"--precision bf16: {gpu_name} has no bf16; use --precision fp16 (its default)"
        )
    if setup.attn == "flash_attention_2" and not gpu_bf16:
        raise BadSetupError(
            f"--attn flash_attention_2: FlashAttention-2 needs an Ampere or newer GPU (compute "
            f"capability 8.0+), and {gpu_name} is older; use --attn sdpa or eager"
        )
    if setup.precision:
        return setup
    return replace(setup, precision="bf16" if gpu_bf16 else "fp16")


def default_attention(model_type: str) -> str:
    """The attention transformers runs when none is named: sdpa, else (NO_SDPA_MODEL_TYPES)
    eager. The recipe readers fill a recipe's missing attention with it too."""
    return "eager" if model_type in NO_SDPA_MODEL_TYPES else "sdpa"


def resolve_attention(setup: TrainSetup, spec: ModelSpec) -> TrainSetup:
    """``setup`` with the attention its model runs: an unset one becomes the model's default
    (default_attention); sdpa asked for on a model SDPA cannot compute is refused, naming
    what runs (transformers 5.25 raises there too). Idempotent, so every caller may apply it."""
    if not setup.attn:
        return replace(setup, attn=default_attention(spec.model_type))
    why = NO_SDPA_MODEL_TYPES.get(spec.model_type)
    if setup.attn == "sdpa" and why:
        raise BadSetupError(
            f"sdpa attention: {spec.name} ({spec.model_type}) has no correct one ({why}; "
            "transformers 5.25 refuses it, older versions ran it without the cap): use eager "
            "(its default) or flash_attention_2 (--attn, or the recipe's attention key)"
        )
    return setup


def attention_note(spec: ModelSpec, setup: TrainSetup) -> str | None:
    """One line for estimate and plan where the model's attention is not the usual sdpa."""
    why = NO_SDPA_MODEL_TYPES.get(spec.model_type)
    if why is None or setup.attn != "eager":
        return None
    return (
        f"{spec.model_type}: eager attention, as transformers runs it ({why}; no sdpa path): "
        "heads x seq^2 attention scores per layer; flash_attention_2 keeps none (flash-attn)"
    )


def window_binds(sliding_window: int | None, seq_len: int) -> bool:
    """Whether a sliding layer's window (tokens a query sees, itself included) is shorter
    than the longest record, seq_len: only then does the window change what a token sees."""
    return sliding_window is not None and sliding_window < seq_len


def packed_attention(model_type: str, sliding_window: int | None, seq_len: int) -> str:
    """How ``zeroplan launch`` packs records by default, and so what the plan counts:
    ``varlen`` (one flat row of micro_batch × seq_len tokens, torch's flash varlen kernel)
    or ``mask`` (micro_batch rows of seq_len, transformers' block-diagonal mask).

    The mask for models the varlen kernel would train differently: Gemma-2's soft-capped
    scores (NO_SDPA_MODEL_TYPES), and sliding layers whose window binds (window_binds): the
    mask applies the window on any torch and its memory was measured launched (Gemma 3 1B,
    −1.6%); the varlen kernel applies it only where torch's takes ``window_size`` (2.11
    does: both paths matched transformers' sliding attention on one H100,
    window_check2_h100.jsonl), and ``--packed-attention varlen`` runs it."""
    if model_type in NO_SDPA_MODEL_TYPES or window_binds(sliding_window, seq_len):
        return "mask"
    return "varlen"


def packed_shape(kernel: str, seq_len: int, micro_batch: int) -> tuple[int, int]:
    """(tokens a packed row holds, rows per micro-batch) under a packed attention
    (packed_attention): ``varlen`` one flat row of micro_batch × seq_len tokens; the block
    ``mask`` micro_batch rows of seq_len (a mask over a longer row would cost its square)."""
    if kernel == "varlen":
        return micro_batch * seq_len, 1
    return seq_len, micro_batch


def sdpa_gets_mask(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Whether SDPA is handed an explicit b·s·s mask (with its per-layer memory terms,
    memory/activations.padding_mask_bytes): padded batches (``setup.padding_mask``), or a
    model whose sliding window binds (window_binds): its window is a mask, and the launch
    packs it under the block mask (packed_attention)."""
    return setup.attn == "sdpa" and (
        setup.padding_mask or window_binds(spec.sliding_window, setup.seq_len)
    )


def window_note(spec: ModelSpec, setup: TrainSetup) -> str | None:
    """One line for estimate and plan where a sliding window binds (window_binds)."""
    if not window_binds(spec.sliding_window, setup.seq_len):
        return None
    counted = (
        "; SDPA gets it as a mask: its per-layer copy and k/v repeated to every head counted"
        if sdpa_gets_mask(spec, setup)
        else ""
    )
    return (
        f"{spec.model_type}: sliding layers see {spec.sliding_window} tokens, fewer than seq "
        f"{setup.seq_len}: zeroplan launch packs it under the block mask (rows of seq "
        f"tokens, which apply the window on any torch){counted}"
    )


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise BadSetupError(f"{option} must be one of {', '.join(allowed)}; got '{value}'")


def parse_targets(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj'); 'all-linear' stays one token."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise BadSetupError(
            "--lora-targets is empty: give module names such as q_proj,v_proj or all-linear"
        )
    return names


def lora_targets(spec: ModelSpec, setup: TrainSetup) -> list[tuple[Linear, int]]:
    """The linears LoRA adapts, with how many layers hold each: ``[(linear, n_layers)]``.

    ``all-linear`` follows PEFT: every ``nn.Linear`` except the output head, and the 3-D
    expert banks of MoE layers too (PEFT wraps them as parameters). Named targets match
    ``nn.Linear`` modules only. A name that matches nothing is an error, as in PEFT.
    """
    if not setup.is_lora:
        return []
    # per spec and target list: the planner asks for it thousands of times per plan
    cache: dict[tuple[str, ...], list[tuple[Linear, int]]] = spec.__dict__.setdefault(
        "_lora_targets_cache", {}
    )
    key = tuple(setup.lora_targets)
    if key not in cache:
        cache[key] = _lora_targets(spec, setup)
    return list(cache[key])


def _lora_targets(spec: ModelSpec, setup: TrainSetup) -> list[tuple[Linear, int]]:
    everything = ALL_LINEAR in setup.lora_targets
    wanted = set(setup.lora_targets) - {ALL_LINEAR}
    found: list[tuple[Linear, int]] = []
    seen: set[str] = set()
    available: set[str] = set()
    for linears, n_layers in spec.linears_by_layer_kind():
        for lin in linears:
            if lin.group == "expert":
                if everything:
                    found.append((lin, n_layers))
                continue
            available.add(lin.name)
            if everything or lin.name in wanted:
                found.append((lin, n_layers))
                seen.add(lin.name)
    missing = wanted - seen
    if missing:
        raise BadSetupError(
            f"--lora-targets {','.join(sorted(missing))} matches no module of {spec.name}; "
            f"its linear layers are {','.join(sorted(available))} (or use all-linear)"
        )
    return found


def trainable_params(spec: ModelSpec, setup: TrainSetup) -> int:
    """Full: every parameter. LoRA: Σ over adapted linears of r·(in + out) per layer."""
    if not setup.is_lora:
        return spec.total_params
    return sum(n * lin.lora_params(setup.lora_r) for lin, n in lora_targets(spec, setup))


def trainable_bytes(setup: TrainSetup) -> int:
    """Bytes per trainable parameter, and per element of its gradient.

    DeepSpeed bf16 / fp16 casts the whole module: 2. Without it, full fine-tuning trains the
    bf16 weights (2), or under fp16 an fp32 model (4: AMP, memory.precision.amp_fp32_model), and
    PEFT keeps LoRA adapters in fp32 (4, ``autocast_adapter_dtype=True``) in either, unless
    ``lora_bf16`` (TRL's QLoRA: 2).
    """
    if setup.deepspeed:
        return BF16
    if setup.method == "full":
        return FP32 if setup.fp16 else BF16
    return BF16 if setup.lora_bf16 else FP32


def fused_lora_runs(setup: TrainSetup) -> bool:
    """The launch's fused LoRA linears run (``setup.fused_lora``) where the adapters compute in
    the input's dtype: bf16 adapters (DeepSpeed's, lora_bf16) or autocast; fp32 adapters
    without autocast keep PEFT's fp32 path (zeroplan.launch.loralinear)."""
    return setup.fused_lora and (setup.deepspeed or bool(setup.autocast) or setup.lora_bf16)
