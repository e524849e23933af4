"""benchmarks/peers_speed.py's Unsloth runs, without Unsloth: the arguments each run hands
Unsloth (its Llama-3.1 8B notebook's values, and what the packed run changes), the data
cell, the clock and the row every peer writes, and how kernels_speed.py starts an Unsloth
run. Where Unsloth is installed, a CPU run of both (Unsloth's CPU backend) writes that row.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tinyllm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernels_speed  # noqa: E402  (benchmarks/: the harness the GPU call runs)
import peers_speed  # noqa: E402

UNSLOTH = ("unsloth-notebook", "unsloth-packed")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_the_notebook_run_takes_the_notebooks_values(tmp_path: Path) -> None:
    load = peers_speed.unsloth_load_kwargs(tmp_path, cuda=True)
    assert load == {
        "model_name": str(tmp_path),
        "max_seq_length": 2048,
        "dtype": None,
        "load_in_4bit": True,
    }
    peft = peers_speed.unsloth_peft_kwargs("unsloth-notebook")
    assert peft == {
        "r": 16,
        "target_modules": SEVEN,
        "lora_alpha": 16,
        "lora_dropout": 0,
        "bias": "none",
        "use_gradient_checkpointing": "unsloth",
        "random_state": 3407,
        "use_rslora": False,
        "loftq_config": None,
    }
    cfg = peers_speed.unsloth_sft_config("unsloth-notebook", tmp_path, 13, cuda=True)
    expected = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "packing": False,
        "optim": "adamw_8bit",
        "learning_rate": 2e-4,
        "warmup_steps": 5,
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "seed": 3407,
        "max_length": 2048,
        "dataset_text_field": "text",
        "max_steps": 13,
    }
    assert {k: cfg[k] for k in expected} == expected
    # the trainer's checkpointing is left at TRL's default, as the notebook leaves it
    assert "gradient_checkpointing" not in cfg


def test_the_packed_run_changes_only_packing_and_checkpointing(tmp_path: Path) -> None:
    def differences(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
        return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}

    nb = peers_speed.unsloth_sft_config("unsloth-notebook", tmp_path, 13, cuda=True)
    packed = peers_speed.unsloth_sft_config("unsloth-packed", tmp_path, 13, cuda=True)
    assert differences(nb, packed) == {"packing", "gradient_checkpointing", "output_dir"}
    assert packed["packing"] is True and packed["gradient_checkpointing"] is False
    peft_nb = peers_speed.unsloth_peft_kwargs("unsloth-notebook")
    peft_packed = peers_speed.unsloth_peft_kwargs("unsloth-packed")
    assert differences(peft_nb, peft_packed) == {"use_gradient_checkpointing"}
    assert peft_packed["use_gradient_checkpointing"] is False


def test_a_cpu_rehearsal_drops_only_what_needs_cuda(tmp_path: Path) -> None:
    assert peers_speed.unsloth_load_kwargs(tmp_path, cuda=False)["load_in_4bit"] is False
    gpu = peers_speed.unsloth_sft_config("unsloth-packed", tmp_path, 5, cuda=True)
    cpu = peers_speed.unsloth_sft_config("unsloth-packed", tmp_path, 5, cuda=False)
    assert {k for k in gpu if gpu[k] != cpu[k]} == {"optim"}


def test_the_data_cell_formats_each_record_with_the_alpaca_prompt_and_eos(
    tmp_path: Path,
) -> None:
    path = tinyllm.write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Add.", "input": "1 2", "output": "3"},
        ],
    )
    texts = [t["text"] for t in peers_speed.alpaca_texts(path, "<|end|>")]
    assert texts[0].startswith("Below is an instruction that describes a task")
    assert texts[0].endswith(
        "### Instruction:\nSay hi.\n\n### Input:\n\n\n### Response:\nhi<|end|>"
    )
    assert "### Input:\n1 2\n\n### Response:\n3<|end|>" in texts[1]


def test_the_clock_times_the_steps_after_the_warm_up() -> None:
    # 6 steps of 100, 100, 100, 200, 300, 400 real tokens, one second apart but the last two
    ends = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0]
    tokens = [100, 200, 300, 500, 800, 1200]
    out = peers_speed.step_summary(ends, tokens)
    assert peers_speed.WARMUP_STEPS == 3
    assert out["timed_steps"] == 3
    assert out["tokens_per_s"] == pytest.approx((1200 - 300) / (6.0 - 2.0))
    assert out["step_rates"] == [200, 300, 200]
    assert out["tokens_per_step"] == [100, 100, 100, 200, 300, 400]
    assert peers_speed.step_summary(ends[:3], tokens[:3])["tokens_per_s"] is None


def test_every_peer_writes_the_same_row() -> None:
    clock = SimpleNamespace(ends=[0.0, 1.0, 2.0, 3.0, 4.0], tokens_at_end=[10, 20, 30, 45, 60])
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"train_runtime": 4.0}]
    rows = [
        peers_speed.row(name, trainer, 0.0, clock, None, history, {"packing": True})  # type: ignore[arg-type]
        for name, trainer in (("trl-users", "trl"), ("unsloth-packed", "unsloth"))
    ]
    assert rows[0].keys() == rows[1].keys()
    assert rows[1]["losses"] == [2.0, 1.5]
    assert rows[1]["tokens_per_s"] == pytest.approx(15.0)
    json.dumps(rows)


def test_kernels_speed_starts_the_unsloth_runs_with_their_own_packages() -> None:
    assert set(UNSLOTH) <= set(kernels_speed.PEERS) <= set(peers_speed.RUNS)
    base = {"PYTHONPATH": "/tmp/site-zp", "HOME": "/root"}
    env = kernels_speed.peer_env("unsloth-packed", base, "/tmp/s-unsloth")
    assert env["PYTHONPATH"] == os.pathsep.join(["/tmp/s-unsloth", "/tmp/site-zp"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["HOME"] == "/root"
    assert kernels_speed.peer_env("trl-users", base, "/tmp/s-unsloth") == base
    assert kernels_speed.peer_env("unsloth-notebook", {}, "")["PYTHONPATH"] == ""


@pytest.mark.slow
@pytest.mark.parametrize("run", UNSLOTH)
def test_an_unsloth_run_writes_its_row_on_the_cpu(tmp_path: Path, run: str) -> None:
    """Unsloth's CPU backend (no 4-bit, no 8-bit Adam, no packing without FlashAttention):
    the harness end to end where Unsloth is installed; its GPU path is the GPU call's."""
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("Unsloth is not installed (it is no extra of zeroplan)")
    model = tinyllm.build_model_dir(tmp_path / "model")
    data = tinyllm.write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": "Write.", "input": "", "output": " ".join(tinyllm.CORPUS)[:200]}] * 16,
    )
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers_speed.py"), "--model", str(model),
           "--data", str(data), "--run", run, "--work", str(tmp_path), "--steps", "4",
           "--out", str(out)]  # fmt: skip
    env = kernels_speed.peer_env(run, dict(os.environ), "")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["trainer"] == "unsloth" and row["timed_steps"] == 1
    assert row["tokens_per_s"] > 0 and row["versions"]["unsloth"]
    assert row["resolved"]["peft"] == peers_speed.unsloth_peft_kwargs(run)
    assert "backend" in row["resolved"]["attention"]
