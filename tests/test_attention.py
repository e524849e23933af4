"""The attention a model runs: its default where none is named (eager for Gemma-2, which
transformers runs without sdpa), an explicit sdpa on Gemma-2 refused in one line, and one
rule for the CLI, the planner and the recipe readers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from zeroplan import recipes
from zeroplan.commands.cli import main
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


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


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
