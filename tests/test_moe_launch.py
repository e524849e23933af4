"""A deep mixture of experts launched: the loss is the model's causal-LM loss, its gradients
stay finite and it learns (issue 29: the 16-layer Qwen3-30B-A3B cut trained to NaN from step 2).

The mechanism, read off benchmarks/moe_nan.py's probe on this tiny model: TRL switched on the
router's load-balancing loss, which counts every token of a packed row, padding included; a
padding segment attends only to itself and embeds to zeros, so its states stay exactly zero,
and each RMSNorm's backward multiplies its gradient by rsqrt(eps) = 1000. Seeded by that loss
at the last layer, the padding's gradient grew 750-4,400x a layer, overflowed by the second
layer, and inf × a zero input made every LoRA gradient NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

import tinyllm

from zeroplan.launch import sft
from zeroplan.trainsetup import TrainSetup

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_training_arguments_leave_the_router_loss_out() -> None:
    opts = sft.Options(Path("p"), "d", Path("o"))
    setup = TrainSetup(method="lora")
    assert sft.training_kwargs(setup, opts, True, None, False)["router_aux_loss_coef"] == 0.0
    # a TRL without the argument adds no such loss either: nothing to turn off
    old = sft.training_kwargs(setup, opts, True, None, False, fields={"output_dir"})
    assert "router_aux_loss_coef" not in old


def _train(tmp_path: Path, layers: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model = tinyllm.build_model_dir(
        tmp_path / "moe", arch={**tinyllm.TINY_QWEN3_MOE, "num_hidden_layers": layers}
    )
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(32))
    run = tmp_path / "run"
    # attention LoRA at dropout 0, four packed rows of 64 tokens: every row ends in padding
    tinyllm.write_plan(run, model, micro_batch=4, lora_r=8, lora_dropout=0.0, lora_targets=QKVO)
    argv = ["--plan", str(run / "plan.json"), "--data", str(data), "--out", str(run)]
    argv += ["--max-steps", "10", "--logging-steps", "1", "--lr", "1e-2", "--save-steps", "1000"]
    assert sft.run(sft.parse_args(argv), sft.StopFlag(), argv) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    applied = json.loads((run / "applied.json").read_text())
    return [m for m in lines if m["event"] == "train"], applied


def test_a_deep_moe_launch_learns_with_finite_gradients(tmp_path: Path) -> None:
    """16 layers: on the loop with the router's loss, step 1's gradient norm was NaN and
    every loss after it NaN."""
    steps, applied = _train(tmp_path, layers=16)
    assert applied["batching"]["packed_attention"] == "mask"  # padding segments of their own
    assert len(steps) == 10
    for m in steps:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]), steps
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert last < 0.8 * first, steps
    assert applied["training"]["router_aux_loss_coef"] == 0.0
