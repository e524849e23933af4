"""The training loop's terms (issue 12) against numbers derived by hand.

A trainer loop (HF Trainer, TRL, ``zeroplan launch``: fused AdamW, bf16 autocast, outputs
dropped) is what the estimate described before; a plain loop (``out = model(...);
out.loss.backward()``, ``torch.optim.AdamW(params)``, no autocast on a bf16 model) adds
foreach AdamW's step temporaries, the kept output and fp32 adapter inputs. The Llama-3.1-8B
config is written out from its model card, as in test_memory_terms.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from zeroplan.errors import BadSetupError
from zeroplan.hardware import parse_cluster
from zeroplan.memory import estimate
from zeroplan.memory.activations import activation_profile, per_layer_bytes_per_token
from zeroplan.memory.logits import kept_output
from zeroplan.memory.optimizer import adamw_step_temporaries
from zeroplan.models import ModelSpec, spec_from_config
from zeroplan.trainsetup import OPTIMIZERS, TrainSetup, trainable_params

V, H, L, HEADS, KV_HEADS, HEAD_DIM, FF = 128256, 4096, 32, 32, 8, 128, 14336
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM  # 4096, 1024


def llama_like(vocab: int, **extra: object) -> ModelSpec:
    return spec_from_config(
        {
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": H,
            "num_hidden_layers": L,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "intermediate_size": FF,
            "tie_word_embeddings": False,
            **extra,
        },
        name=f"llama-like-{vocab}",
    )


LLAMA_8B = llama_like(V)
# Mistral-7B's shape: the same layers with a 32k vocabulary
SMALL_VOCAB = llama_like(32768)
PSI = 2 * V * H + L * (H * Q + 2 * H * KV + Q * H + 3 * H * FF) + L * 2 * H + H
R = 16
NT = L * R * ((H + Q) + 2 * (H + KV) + (Q + H) + 2 * (H + FF) + (FF + H))  # all-linear
H100 = parse_cluster("1xH100")


def lora(**kw: object) -> TrainSetup:
    # the terms below are counted by hand with dropout's mask and copy (LoRA dropout 0.05,
    # the default before issue 26)
    return TrainSetup(method="lora", **{"lora_dropout": 0.05, **kw})  # type: ignore[arg-type]


def full(**kw: object) -> TrainSetup:
    return TrainSetup(method="full", **kw)  # type: ignore[arg-type]


def test_hand_counts() -> None:
    assert trainable_params(LLAMA_8B, full()) == PSI == 8_030_261_248
    assert trainable_params(LLAMA_8B, lora()) == NT == 41_943_040


# ----------------------------------------------------------------------------- the switches


def test_the_trainer_loop_is_the_default_and_what_was_estimated_before() -> None:
    setup = TrainSetup()
    assert (setup.loop, setup.optim, setup.autocast, setup.keep_outputs) == (
        "trainer",
        "adamw_torch_fused",
        True,
        False,
    )
    # zeroplan's earlier names load as HF's (old plan.json files hold them)
    assert TrainSetup(optim="adamw") == setup
    assert TrainSetup(optim="paged_adamw").optim == "paged_adamw_32bit"
    assert TrainSetup(optim="adamw_bnb_8bit").optim == "adamw_8bit"
    # DeepSpeed bf16 casts the whole model and runs without autocast
    assert TrainSetup(zero=2).autocast is False
    est = estimate(LLAMA_8B, H100, lora(micro_batch=4, seq_len=2048))
    assert est.terms["kept_output"].bytes == est.terms["optimizer_temporaries"].bytes == 0
    assert est.calibrated and not any("not yet calibrated" in n for n in est.notes)


def test_plain_loop_preset_and_explicit_switches_override_it() -> None:
    plain = TrainSetup(loop="plain")
    assert (plain.optim, plain.autocast, plain.keep_outputs) == ("adamw_torch", False, True)
    mixed = TrainSetup(loop="plain", optim="adamw", autocast=True, keep_outputs=False)
    assert (mixed.optim, mixed.autocast, mixed.keep_outputs) == ("adamw_torch_fused", True, False)
    assert TrainSetup(keep_outputs=True).optim == "adamw_torch_fused"
    # the resolved values are what `setup` shows, and a round trip keeps them
    d = plain.to_dict()
    assert (d["loop"], d["optim"], d["autocast"], d["keep_outputs"]) == (
        "plain",
        "adamw_torch",
        False,
        True,
    )
    d["lora_targets"] = tuple(d["lora_targets"].split(","))
    assert TrainSetup(**d) == plain


@pytest.mark.parametrize(
    ("kw", "needles"),
    [
        (
            {"optim": "adafactor"},
            ["--optim must be one of", "adamw_torch_fused", "paged_adamw_32bit"],
        ),
        ({"loop": "accelerate"}, ["--loop must be one of trainer, plain"]),
        (
            {"zero": 2, "offload": "optimizer", "optim": "adamw_8bit"},
            ["--optim adamw_8bit", "CPU Adam"],
        ),
        ({"zero": 3, "offload": "optimizer", "optim": "paged_adamw_8bit"}, ["bitsandbytes"]),
        ({"zero": 3, "offload": "optimizer+params", "optim": "paged_adamw_32bit"}, ["--offload"]),
        ({"zero": 0, "autocast": True}, ["--autocast with DeepSpeed"]),
    ],
)
def test_bad_switches_are_one_line_errors(kw: dict[str, object], needles: list[str]) -> None:
    with pytest.raises(BadSetupError) as exc:
        TrainSetup(**kw)  # type: ignore[arg-type]
    text = str(exc.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text


def test_torch_adamw_with_offload_is_accepted() -> None:
    for optim in ("adamw", "adamw_torch", "adamw_torch_fused"):
        TrainSetup(zero=2, offload="optimizer", optim=optim)


# ----------------------------------------------------------------------------- foreach AdamW


@pytest.mark.parametrize(
    ("setup", "world", "expected"),
    [
        # no DeepSpeed: one sqrt(exp_avg_sq) per element, in the parameter's dtype
        (full(optim="adamw_torch"), 1, 2 * PSI),
        (lora(optim="adamw_torch"), 1, 4 * NT),
        (TrainSetup(method="qlora", optim="adamw_torch"), 1, 4 * NT),
        # DeepSpeed: the fp32 master partition the wrapped optimizer steps
        (full(optim="adamw_torch", zero=0), 2, 4 * PSI),
        (full(optim="adamw_torch", zero=2), 4, 4 * PSI // 4),
        (lora(optim="adamw_torch", zero=1), 2, 4 * NT // 2),
        # ZeRO-3 steps one sub-group (1e9 elements) at a time: PSI / 2 > 1e9
        (full(optim="adamw_torch", zero=3), 2, 4 * 1_000_000_000),
        # none: fused, bitsandbytes, SGD, CPU offload (DeepSpeed's CPU Adam)
        (full(optim="adamw_torch_fused"), 1, 0),
        (full(optim="adamw_8bit"), 1, 0),
        (full(optim="paged_adamw_32bit"), 1, 0),
        (full(optim="sgd"), 1, 0),
        (full(optim="adamw_torch", zero=2, offload="optimizer"), 2, 0),
    ],
)
def test_foreach_adamw_step_temporaries_by_hand(
    setup: TrainSetup, world: int, expected: int
) -> None:
    assert adamw_step_temporaries(LLAMA_8B, setup, world).bytes == expected


def test_foreach_temporaries_raise_the_step_peak_by_exactly_their_size() -> None:
    # full fine-tuning, a short checkpointed fused-loss step: model states dominate
    fused = estimate(LLAMA_8B, H100, full(seq_len=256, grad_ckpt=True, fused_loss=True))
    foreach = estimate(
        LLAMA_8B, H100, full(seq_len=256, grad_ckpt=True, fused_loss=True, optim="adamw_torch")
    )
    # fused: the end of backward (all gradients + the checkpoints) just tops the step's 8 B
    assert fused.peak_phase == "embedding backward (end of backward)"
    assert 8 * PSI < fused.peak_allocated_bytes < 8.01 * PSI
    # foreach: weights 2 B + states 4 B + gradients 2 B + the temporary 2 B per parameter
    assert foreach.peak_phase == "optimizer step"
    assert foreach.peak_allocated_bytes == 10 * PSI
    assert foreach.at_peak["optimizer_temporaries"] == 2 * PSI
    # measured on an H200 (memory_2xh200_loops.jsonl): no longer flagged
    assert foreach.calibrated
    assert not any("not yet calibrated" in n for n in foreach.notes)


def test_zero12_foreach_step_follows_the_freed_bf16_gradients() -> None:
    """DeepSpeed ZeRO-1/2 frees the bf16 gradients before the wrapped optimizer steps: the
    foreach temporaries (4 B · Ψ/N) come with the fp32 gradient copy (4 B · Ψ/N) only, so the
    step peaks as high as the flattening before it (static + 8 B · Ψ at N = 1): measured on
    one H100, ZeRO-1 and ZeRO-2 full fine-tuning of Llama-3.2-1B peaked at 25.39 GiB with
    foreach and with fused AdamW (edges_h100.jsonl)."""
    for zero in (1, 2):
        kw: dict[str, object] = {"seq_len": 256, "grad_ckpt": True, "zero": zero}
        fused = estimate(LLAMA_8B, H100, full(**kw))
        foreach = estimate(LLAMA_8B, H100, full(optim="adamw_torch", **kw))
        assert foreach.peak_allocated_bytes == fused.peak_allocated_bytes
        step = "optimizer step"
        assert foreach.terms["optimizer_temporaries"].bytes == 4 * PSI
        parts = {**foreach.at_peak}
        assert foreach.peak_phase in (step, "gradients flattened (before the step)")
        assert parts["gradients"] + parts["optimizer_temporaries"] == 8 * PSI


# ----------------------------------------------------------------------------- kept output


def test_kept_output_by_hand() -> None:
    t = 2048
    keep = lora(seq_len=t, keep_outputs=True)
    logits, cache = 2 * t * V, 2 * 2 * KV * t * L  # bf16 logits; bf16 keys + values
    assert kept_output(LLAMA_8B, keep).bytes == logits + cache
    # checkpointing turns transformers' cache off; the fused loss returns no logits
    assert kept_output(LLAMA_8B, dataclasses.replace(keep, grad_ckpt=True)).bytes == logits
    assert kept_output(LLAMA_8B, dataclasses.replace(keep, fused_loss=True)).bytes == cache
    no_cache = llama_like(V, use_cache=False)
    assert kept_output(no_cache, keep).bytes == logits
    assert kept_output(LLAMA_8B, lora(seq_len=t)).bytes == 0


def test_kept_logits_stay_through_the_start_of_backward() -> None:
    """128k vocabulary: backward's start stays the peak, with the bf16 logits beside the
    loss's 12 B per logit (the fp32 upcast is not kept: it dies with the loss function)."""
    t = 2048
    dropped = estimate(LLAMA_8B, H100, lora(seq_len=t))
    kept = estimate(LLAMA_8B, H100, lora(seq_len=t, keep_outputs=True))
    assert dropped.peak_phase == kept.peak_phase == "loss (start of backward)"
    assert kept.peak_allocated_bytes - dropped.peak_allocated_bytes == 2 * t * V
    assert kept.at_peak["kept_output"] == 2 * t * V


def test_kept_output_moves_the_peak_to_the_next_forward_on_a_small_vocabulary() -> None:
    """32k vocabulary: the previous step's output (logits + every layer's keys and values)
    beside the next forward's end, inside cross-entropy (bf16 logits 2 B + fp32 upcast 4 B +
    log-softmax 4 B per logit), outweighs 2 B per logit at backward's start."""
    t, v = 2048, 32768
    dropped = estimate(SMALL_VOCAB, H100, lora(seq_len=t))
    kept = estimate(SMALL_VOCAB, H100, lora(seq_len=t, keep_outputs=True))
    assert dropped.peak_phase == "loss (start of backward)"
    assert kept.peak_phase == "forward end (previous output alive)"
    cache = 2 * 2 * KV * t * L
    # (10 + 2) B·T·V + cache  against  12 B·T·V
    assert kept.peak_allocated_bytes - dropped.peak_allocated_bytes == cache
    assert kept.at_peak["logits"] == 10 * t * v
    assert kept.at_peak["kept_output"] == 2 * t * v + cache


# ----------------------------------------------------------------------------- no autocast

NORMS = 2 * 4 * H
ATTN = 2 * (Q + 2 * KV) + (2 * Q + 4 * HEADS)
MLP = 3 * 2 * FF
INPUTS = (H, H, H, Q, H, H, FF)  # q, k, v, o, gate, up, down


def test_lora_without_autocast_saves_fp32_adapter_inputs() -> None:
    autocast = NORMS + ATTN + MLP + sum(1 * d + 2 * d + 2 * R for d in INPUTS)
    # mask 1 B·d + the fp32 dropout output lora_A saves 4 B·d + lora_A's fp32 output 4 B·r
    fp32 = NORMS + ATTN + MLP + sum(1 * d + 4 * d + 4 * R for d in INPUTS)
    assert per_layer_bytes_per_token(LLAMA_8B, lora()) == autocast == 256_352
    assert per_layer_bytes_per_token(LLAMA_8B, lora(autocast=False)) == fp32 == 334_400
    # without autocast there are no cached bf16 copies of the fp32 adapters
    assert activation_profile(LLAMA_8B, lora(), NT).autocast_weights == 2 * NT
    assert activation_profile(LLAMA_8B, lora(autocast=False), NT).autocast_weights == 0
    # full fine-tuning trains bf16 weights: autocast changes nothing saved
    assert per_layer_bytes_per_token(LLAMA_8B, full(autocast=False)) == per_layer_bytes_per_token(
        LLAMA_8B, full()
    )
    # DeepSpeed: bf16 adapters, no autocast, whatever the loop
    assert per_layer_bytes_per_token(LLAMA_8B, lora(zero=2, loop="plain")) == (
        per_layer_bytes_per_token(LLAMA_8B, lora(zero=2))
    )


def test_plain_loop_lora_against_the_trainer_loop_by_hand() -> None:
    """Llama-3.1-8B, all-linear LoRA, micro-batch 1 × 2048, no checkpointing, 1×H100."""
    t = 2048
    trainer = estimate(LLAMA_8B, H100, lora(seq_len=t))
    plain = estimate(LLAMA_8B, H100, lora(seq_len=t, loop="plain"))
    assert trainer.peak_phase == plain.peak_phase == "loss (start of backward)"
    more_saved = L * t * sum(2 * d + 2 * R for d in INPUTS)
    assert plain.peak_allocated_bytes - trainer.peak_allocated_bytes == (
        more_saved - 2 * NT + 2 * t * V
    )
    assert plain.terms["optimizer_temporaries"].bytes == 4 * NT
    assert plain.setup["optim"] == "adamw_torch" and plain.setup["autocast"] is False
    assert plain.calibrated  # the plain loop's terms were measured on an H200
    assert not any("not yet calibrated" in n for n in plain.notes)


def test_every_optimizer_name_estimates() -> None:
    for optim in OPTIMIZERS:
        est = estimate(LLAMA_8B, H100, full(optim=optim, seq_len=512, grad_ckpt=True))
        assert est.peak_allocated_bytes == sum(est.at_peak.values())


# ----------------------------------------------------------------------------- the CLI


def test_cli_setup_shows_the_resolved_loop() -> None:
    import json

    from click.testing import CliRunner

    from zeroplan.commands.cli import cli

    def setup_of(*args: str) -> dict[str, object]:
        result = CliRunner().invoke(cli, ["estimate", "llama-3.2-1b", "--json", *args])
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        assert out["per_gpu"]["kept_output_bytes"] >= 0
        return dict(out["setup"])

    def loop(s: dict[str, object]) -> tuple[object, ...]:
        return (s["loop"], s["optim"], s["autocast"], s["keep_outputs"])

    assert loop(setup_of()) == ("trainer", "adamw_torch_fused", True, False)
    assert loop(setup_of("--loop", "plain")) == ("plain", "adamw_torch", False, True)
    assert loop(setup_of("--loop", "plain", "--optim", "adamw", "--drop-outputs")) == (
        "plain",
        "adamw_torch_fused",
        False,
        False,
    )
    assert loop(setup_of("--no-autocast", "--keep-outputs")) == (
        "trainer",
        "adamw_torch_fused",
        False,
        True,
    )
    assert loop(setup_of("--zero", "2", "--loop", "plain")) == ("plain", "adamw_torch", False, True)
    # config takes the same options; a torch AdamW (foreach or fused) needs no untested flag
    result = CliRunner().invoke(
        cli, ["config", "llama-3.2-1b", "--zero", "2", "--gpus", "2xH100", "--loop", "plain"]
    )
    assert result.exit_code == 0, result.output
    assert "zero_allow_untested_optimizer" not in json.loads(result.stdout)
