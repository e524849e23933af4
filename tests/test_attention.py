"""The attention a model runs: its default where none is named (eager for Gemma-2, which
transformers runs without sdpa), an explicit sdpa on Gemma-2 refused in one line, and one
rule for the CLI, the planner and the recipe readers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_recipes import run

from zeroplan import recipes
from zeroplan.errors import BadSetupError
from zeroplan.hardware import parse_cluster
from zeroplan.memory import estimate
from zeroplan.memory.activations import per_layer_bytes_per_token
from zeroplan.models import load_model
from zeroplan.planner import PlanRequest, plan
from zeroplan.recipes.write import emit_files
from zeroplan.trainsetup import (
    NO_SDPA_MODEL_TYPES,
    TrainSetup,
    default_attention,
    resolve_attention,
)

GEMMA2 = load_model("google/gemma-2-9b-it")
LLAMA = load_model("meta-llama/Llama-3.2-1B")
H100 = parse_cluster("1xH100")


def test_unset_attention_is_the_models_default() -> None:
    assert TrainSetup().attn == ""
    assert resolve_attention(TrainSetup(), LLAMA).attn == "sdpa"
    gemma = resolve_attention(TrainSetup(), GEMMA2)
    assert gemma.attn == "eager"
    assert resolve_attention(gemma, GEMMA2) is gemma  # idempotent
    assert default_attention("gemma2") == "eager" and default_attention("gemma3_text") == "sdpa"


def test_gemma2_estimate_is_eager_and_says_why() -> None:
    setup = TrainSetup(micro_batch=1, seq_len=2048)
    est = estimate(GEMMA2, H100, setup)
    assert est.setup["attn"] == "eager"
    assert any("eager attention, as transformers runs it" in n for n in est.notes)
    # eager keeps the softmax's heads × seq² per layer: more than flash attention's
    flash = estimate(GEMMA2, H100, dataclasses.replace(setup, attn="flash_attention_2"))
    assert est.terms["activations"].bytes > flash.terms["activations"].bytes
    assert not any("eager attention" in n for n in flash.notes)
    # unresolved setups handed to the terms directly get the same eager layer
    assert per_layer_bytes_per_token(GEMMA2, setup) == per_layer_bytes_per_token(
        GEMMA2, dataclasses.replace(setup, attn="eager")
    )
    assert estimate(LLAMA, H100, TrainSetup()).setup["attn"] == "sdpa"


def test_explicit_sdpa_on_gemma2_is_refused() -> None:
    with pytest.raises(BadSetupError, match=r"use eager .* or flash_attention_2"):
        estimate(GEMMA2, H100, TrainSetup(attn="sdpa"))
    # explicit eager and flash_attention_2 run
    estimate(GEMMA2, H100, TrainSetup(attn="flash_attention_2"))


def test_cli_refuses_sdpa_on_gemma2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["estimate", "google/gemma-2-9b-it", "--attn", "sdpa"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("zeroplan: error: sdpa attention:")
    assert "eager" in err and "flash_attention_2" in err
    code, out, _ = run(["estimate", "google/gemma-2-9b-it", "--json"], capsys)
    assert code == 0 and json.loads(out)["setup"]["attn"] == "eager"


def test_plan_of_gemma2_runs_eager_with_a_note() -> None:
    p = plan(PlanRequest(spec=GEMMA2, cluster=parse_cluster("1x4090"), seq_len=2048))
    assert p.best is not None
    assert {c.setup.attn for c in p.ranked} == {"eager"}
    assert any("eager attention" in a for a in p.assumptions)
    llama = plan(PlanRequest(spec=LLAMA, cluster=H100, seq_len=1024))
    assert llama.best is not None and llama.best.setup.attn == "sdpa"


def test_recipe_readers_share_the_core_rule(tmp_path: Path) -> None:
    """TRL with no attn_implementation on Gemma-2: eager, from trainsetup's one rule."""
    assert "gemma2" in NO_SDPA_MODEL_TYPES
    assert not hasattr(recipes.common, "NO_SDPA_MODEL_TYPES")
    path = tmp_path / "trl.yaml"
    path.write_text(
        "model_name_or_path: google/gemma-2-9b-it\nuse_peft: true\nlora_r: 16\n"
        "per_device_train_batch_size: 1\nmax_length: 1024\nbf16: true\ndtype: bfloat16\n"
    )
    recipe, _ = recipes.read_recipe(path)
    assert recipe.setup["attn"] == "eager"


def test_writer_leaves_an_unset_attention_to_the_trainer(tmp_path: Path) -> None:
    files = emit_files("trl", "meta-llama/Llama-3.2-1B", TrainSetup(precision="bf16"), tmp_path)
    assert "attn_implementation" not in files["trl.yaml"]
    files = emit_files("trl", "google/gemma-2-9b-it", TrainSetup(attn="eager"), tmp_path)
    assert "attn_implementation: eager" in files["trl.yaml"]


def test_a_recipe_asking_sdpa_on_gemma2_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "lf.yaml"
    path.write_text(
        "model_name_or_path: google/gemma-2-9b-it\nstage: sft\ndo_train: true\n"
        "finetuning_type: lora\nlora_target: all\nflash_attn: sdpa\n"
        "per_device_train_batch_size: 1\ncutoff_len: 1024\nbf16: true\n"
    )
    code, out, err = run(["estimate", "--recipe", str(path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "recipe's attention key" in err


# --------------------------------------------------------------------------- sliding windows

GEMMA3 = load_model("google/gemma-3-1b-it")  # window 512 on 5 of 6 layers


def _hf_window(cfg: dict[str, object]) -> int | None:
    """What transformers' modelling hands a sliding layer: the config's sliding_window on
    a layer_types 'sliding_attention' layer, or on every layer where there are no layer_types
    (Mistral, Mixtral, Phi-3)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.for_model(**cfg).get_text_config()
    types = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    if types:
        return window if "sliding_attention" in types else None
    return window


BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 300,
}


@pytest.mark.parametrize(
    "extra",
    [
        {"model_type": "mistral"},  # the config class's 4096 where config.json is silent
        {"model_type": "mistral", "sliding_window": None},
        {"model_type": "mistral", "sliding_window": 256},
        {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
        {"model_type": "phi3", "sliding_window": 2047},
        {"model_type": "gemma2", "sliding_window": 128},
        {"model_type": "gemma3_text", "sliding_window": 512},
        {"model_type": "gemma3_text", "sliding_window": 512, "layer_types": ["full_attention"] * 4},
        {"model_type": "qwen2", "sliding_window": 4096},
        {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 2},
        {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 4},
        {"model_type": "qwen3", "use_sliding_window": True, "max_window_layers": 1},
        {
            "model_type": "qwen3_moe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "use_sliding_window": True,
        },
        {
            "model_type": "qwen3_moe",
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
        {"model_type": "llama"},
    ],
)
def test_sliding_window_is_what_transformers_hands_the_layers(extra: dict[str, object]) -> None:
    from zeroplan.models import spec_from_config

    cfg = {**BASE, **extra}
    assert spec_from_config(cfg).sliding_window == _hf_window(cfg)


def test_catalog_windows() -> None:
    assert GEMMA3.sliding_window == 512
    assert load_model("google/gemma-3-4b-it").sliding_window == 1024  # from its text_config
    assert GEMMA2.sliding_window == 4096
    assert load_model("mistralai/Mistral-7B-v0.3").sliding_window is None  # null in its config
    assert load_model("Qwen/Qwen2.5-7B").sliding_window is None  # use_sliding_window false
    assert LLAMA.sliding_window is None


def test_packed_attention_rule() -> None:
    """What the launch packs with by default and the plan counts: the block mask where a
    window binds (shorter than the records) or for Gemma-2, else varlen."""
    from zeroplan.trainsetup import packed_attention

    assert packed_attention("gemma3_text", 512, 1024) == "mask"
    assert packed_attention("gemma3_text", 512, 512) == "varlen"  # a record fits its window
    assert packed_attention("llama", None, 8192) == "varlen"
    assert packed_attention("gemma2", 4096, 1024) == "mask"  # its soft-cap


def test_a_binding_window_counts_the_sdpa_mask_terms() -> None:
    """Under sdpa a binding window is a mask: its per-layer copy and k/v repeated to every
    head (the padding-mask terms), counted on Gemma 3 at 1,024 tokens, not at 512."""
    from zeroplan.memory.activations import padding_mask_bytes, padding_mask_repeat_per_token

    long = TrainSetup(micro_batch=2, seq_len=1024, attn="sdpa")
    short = dataclasses.replace(long, seq_len=512)
    assert padding_mask_bytes(GEMMA3, long, 1) == 2 * 2 * 1024 * 1024
    assert padding_mask_repeat_per_token(GEMMA3, long) == 2 * 2 * (GEMMA3.q_dim - GEMMA3.kv_dim)
    assert padding_mask_bytes(GEMMA3, short, 1) == 0
    assert padding_mask_bytes(LLAMA, long, 1) == 0
    flash = dataclasses.replace(long, attn="flash_attention_2")  # flash takes the window
    assert padding_mask_bytes(GEMMA3, flash, 1) == 0
    assert any("sliding layers see 512 tokens" in n for n in estimate(GEMMA3, H100, long).notes)
    assert not any("sliding" in n for n in estimate(GEMMA3, H100, short).notes)
    no_window = dataclasses.replace(GEMMA3, sliding_window=None)
    assert (
        estimate(GEMMA3, H100, long).peak_allocated_bytes
        > estimate(no_window, H100, long).peak_allocated_bytes
    )


def test_plan_counts_the_rows_the_mask_packs() -> None:
    """A Gemma 3 plan on data counts micro-batch rows of seq_len (the block mask), a Llama
    plan one row of micro-batch x seq_len (varlen): the Gemma rows fill less."""
    from zeroplan.lengths import LengthProfile, fit_to_cap

    lengths = (600, 500, 700, 550) * 20  # no two share a row of 1,024
    fit = fit_to_cap(LengthProfile("test", "alpaca", "test", lengths), 1024)
    gemma = PlanRequest(GEMMA3, H100, seq_len=1024, data=fit)
    llama = PlanRequest(LLAMA, H100, seq_len=1024, data=fit)
    assert gemma.packed_rows(8) == (1024, 8)
    assert llama.packed_rows(8) == (8 * 1024, 1)
    assert gemma.fill(8) == fit.pack_at(1024).fill < llama.fill(8) == fit.pack_at(8192).fill
