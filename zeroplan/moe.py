"""Mixture-of-experts LoRA: what each target set means, what was measured, and the refusals.

Under transformers 5 an MoE decoder layer holds its attention projections as ``nn.Linear``
modules, a router ``gate`` (a top-k router module with one 2-D weight, not an
``nn.Linear``) and the experts as two 3-D parameters, ``gate_up_proj`` (E, 2i, h) and
``down_proj`` (E, h, i), run by ``grouped_mm``. PEFT 0.21 puts LoRA on the attention
linears as on a dense model; the router (named, or through ``all-linear``) and the banks
(``all-linear`` only) it wraps as *parameters* (``lora.ParamWrapper``), which takes no
dropout and, for a bank, materialises W + B·A as large as the bank on every forward
(memory.activations.expert_bank_copies). bitsandbytes (4-bit and 8-bit, through
transformers 5.17) quantizes the attention linears only: banks and router stay bf16.

Target sets, by what LoRA reaches:

    attention           q_proj, k_proj, v_proj, o_proj (or some of them)
    attention + router  the above and/or ``gate``
    all-linear          every linear, the router and both expert banks

Only what was measured on a GPU is estimated (``MEASURED``); anything else is refused with
what was measured and the nearest measured choice, so that no "fits" verdict rests on a
guess. Measured: benchmarks/results/moe_h100.jsonl (benchmarks/moe_grid.py: cut Qwen3-30B-A3B
and Mixtral-8x7B shapes on one H100, LoRA on each target set with and without
checkpointing, micro-batch 1-4, seq 512-1024; QLoRA on attention of one-layer cuts; the
full 48-layer Qwen3-30B-A3B) and check_h200_moe.jsonl (the full Qwen3-30B-A3B, all-linear,
on one H200).
"""

from __future__ import annotations

from zeroplan.errors import ExpertDropoutError, UnmeasuredMoEError
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import ALL_LINEAR, TrainSetup, lora_targets

ATTENTION = "attention"
ROUTER = "attention + router"
ALL = "all-linear"
DENSE_MLP = "dense MLP"  # the dense layers of a sparse-step Qwen3-MoE (mlp_only_layers)

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RESULTS = "benchmarks/results/moe_h100.jsonl"

# family -> method -> target sets measured on a GPU (one GPU, no DeepSpeed, bf16)
MEASURED: dict[str, dict[str, tuple[str, ...]]] = {
    "qwen3_moe": {"lora": (ATTENTION, ROUTER, ALL), "qlora": (ATTENTION,)},
    "mixtral": {"lora": (ATTENTION, ROUTER, ALL), "qlora": (ATTENTION,)},
}


def target_set(spec: ModelSpec, setup: TrainSetup) -> str:
    """Which target set ``setup.lora_targets`` is on ``spec`` (an MoE model)."""
    groups = {lin.group for lin, _ in lora_targets(spec, setup)}
    if "expert" in groups:
        return ALL
    if "mlp" in groups:
        return DENSE_MLP
    return ROUTER if "router" in groups else ATTENTION


def wrapped_as_parameters(spec: ModelSpec, setup: TrainSetup) -> bool:
    """LoRA reaches the router or the expert banks, which PEFT wraps as parameters."""
    return any(lin.group in ("router", "expert") for lin, _ in lora_targets(spec, setup))


def measured(spec: ModelSpec) -> str:
    """What was measured for ``spec``'s family, as a phrase."""
    sets = MEASURED.get(spec.model_type, {})
    name = {"lora": "LoRA", "qlora": "QLoRA"}
    done = [f"{name.get(m, m)} on {' / '.join(s)}" for m, s in sets.items()] or ["nothing"]
    return (
        f"measured: {', '.join(done)} (router and all-linear with dropout 0), on one GPU "
        f"without DeepSpeed, bf16 ({RESULTS})"
    )


def nearest(spec: ModelSpec) -> str:
    """The nearest measured choice, as options to pass."""
    return f"--method lora --lora-targets {','.join(ATTENTION_TARGETS)}"


def check(spec: ModelSpec, setup: TrainSetup) -> None:
    """Refuse an MoE setup that was not measured, or that PEFT cannot run.

    Raises UnmeasuredMoEError (method, parallelism, precision or target set never measured)
    or ExpertDropoutError (dropout on the router or the banks); nothing for a dense model.
    """
    if spec.moe is None:
        return
    name, fam = spec.name, MEASURED.get(spec.model_type, {})
    if setup.method not in fam:
        what = {"full": "full fine-tuning", "qlora": "QLoRA"}.get(setup.method, setup.method)
        raise UnmeasuredMoEError(
            f"{name}: {what} of a mixture-of-experts model was not measured on a GPU "
            f"({measured(spec)}); use {nearest(spec)}"
        )
    if setup.deepspeed:
        raise UnmeasuredMoEError(
            f"{name}: mixture-of-experts LoRA under DeepSpeed (ZeRO) was not measured; "
            f"{measured(spec)}; drop --zero (one GPU, or DDP over several)"
        )
    if setup.kernels != "none":
        raise UnmeasuredMoEError(
            f"{name}: Liger's kernels on a mixture-of-experts model were not measured; "
            f"{measured(spec)}; use --kernels none"
        )
    if setup.fp16:
        raise UnmeasuredMoEError(
            f"{name}: mixture-of-experts LoRA in fp16 was not measured (transformers runs the "
            f"experts through grouped_mm in bf16 only); {measured(spec)}; use a card with bf16"
        )
    chosen = target_set(spec, setup)
    if chosen not in fam[setup.method]:
        why = (
            " (bitsandbytes leaves the expert banks and the router in bf16; only the attention "
            "linears are 4-bit)"
            if setup.method == "qlora"
            else ""
        )
        raise UnmeasuredMoEError(
            f"{name}: {setup.method} on the {chosen} target set of a mixture-of-experts model "
            f"was not measured{why}; {measured(spec)}; use {nearest(spec)}"
        )
    if setup.lora_dropout > 0 and wrapped_as_parameters(spec, setup):
        raise ExpertDropoutError(
            f"--lora-dropout {setup.lora_dropout:g} with {chosen} targets on {name}: PEFT wraps "
            "the router and the expert banks as parameters and puts no dropout on them "
            "(lora.ParamWrapper refuses lora_dropout != 0, so the run fails at start); use "
            f"--lora-dropout 0, or --lora-targets {','.join(ATTENTION_TARGETS)}"
        )


def plan_target_choices(
    spec: ModelSpec, targets: tuple[str, ...], method: str, dropout: float = TrainSetup.lora_dropout
) -> list[tuple[tuple[str, ...], float]]:
    """The (targets, dropout) pairs the planner may try for ``method`` on an MoE model.

    The user's targets as they are when measured, with the user's ``dropout`` (0 where PEFT
    takes none); for
    ``all-linear``, the measured sets it could mean: attention, and all-linear with dropout
    0 (for qlora, attention only). Empty when nothing measured fits the request.
    """
    measured_sets = MEASURED.get(spec.model_type, {}).get(method, ())
    attention: tuple[tuple[str, ...], float] = (ATTENTION_TARGETS, dropout)
    if ALL_LINEAR in targets:
        everything: tuple[tuple[str, ...], float] = ((ALL_LINEAR,), 0.0)
        choices = [attention] + ([everything] if ALL in measured_sets else [])
        return choices if ATTENTION in measured_sets else []
    setup = TrainSetup(method=method, lora_targets=targets)
    chosen = target_set(spec, setup)
    if chosen not in measured_sets:
        return []
    return [(targets, 0.0 if wrapped_as_parameters(spec, setup) else dropout)]


def describe_targets(targets: tuple[str, ...], dropout: float) -> str:
    """'all-linear (dropout 0)', 'q_proj,k_proj,v_proj,o_proj (dropout 0.05)'."""
    return f"{','.join(targets)} (dropout {dropout:g})"
