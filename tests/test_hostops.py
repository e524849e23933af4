"""The host clock's counted operations (zeroplan/hostops.py, catalog/host_ops.json)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from zeroplan import hostops
from zeroplan.models import load_model, supported_architectures
from zeroplan.speed import FITTED, host_operations, host_seconds
from zeroplan.trainsetup import TrainSetup

ROOT = Path(__file__).resolve().parents[1]


def test_every_architecture_zeroplan_models_has_counted_operations() -> None:
    for model_type in supported_architectures():
        assert hostops.counted(model_type), model_type
    # a multimodal Gemma 3 checkpoint is read through its text tower
    assert hostops.host_ops("gemma3") == hostops.host_ops("gemma3_text")
    assert not hostops.counted("some_new_arch")
    assert hostops.host_ops("some_new_arch") == hostops.host_ops(hostops.FALLBACK)


def test_the_host_clock_counts_what_each_architecture_runs_not_its_layers() -> None:
    lora = TrainSetup(method="lora", lora_dropout=0.05)
    llama, gemma3 = load_model("meta-llama/Llama-3.2-1B"), load_model("google/gemma-3-1b-it")
    per_layer = {m.model_type: host_seconds(m, lora) / m.num_layers for m in (llama, gemma3)}
    # Gemma 3's six float32 norms a layer: measured on one H200 at 1 × 128, 0.26 s for 26
    # layers against Llama-3.2-1B's 0.13 s for 16 (check_h200_arch.jsonl)
    assert per_layer["gemma3_text"] > 1.3 * per_layer["llama"]
    # Phi-3 fuses q/k/v and gate/up: four adapters a layer where Llama has seven
    phi3 = load_model("microsoft/Phi-3-mini-4k-instruct")
    ops = hostops.host_ops("phi3")
    assert host_operations(phi3, lora) == phi3.num_layers * (ops.layer_frozen + 4 * ops.adapter)
    # full fine-tuning counts a trained layer and no adapter; no dropout, fewer operations
    full = TrainSetup(method="full")
    assert host_operations(llama, full) == llama.num_layers * hostops.host_ops("llama").layer_full
    plain = TrainSetup(method="lora", lora_dropout=0.0)
    assert host_operations(llama, plain) < host_operations(llama, lora)
    assert host_seconds(llama, full) == pytest.approx(
        host_operations(llama, full) * FITTED.host_op_s
    )


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_the_counted_operations_are_what_the_installed_modelling_code_runs(
    model_type: str,
) -> None:
    """A recount with this machine's transformers and PEFT (count_host_ops.py, the script
    that wrote the table): a release that changes a family's layer by more than a tenth
    fails here, and `python benchmarks/count_host_ops.py` writes the table again."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_host_ops

    fresh = count_host_ops.family_counts(model_type)
    table = hostops.host_ops(model_type)
    for field in ("layer_frozen", "layer_full", "adapter", "adapter_no_dropout"):
        assert fresh[field] == pytest.approx(getattr(table, field), rel=0.1), field


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_packed_step_runs_the_operations_the_table_counts(model_type: str) -> None:
    """zeroplan launch trains packed rows laid end to end with varlen attention, the table
    counts padded rows with sdpa: per layer the two dispatch the same operations
    (count_host_ops.py --packed, every sdpa family)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_host_ops

    assert count_host_ops.packed_differences(model_type) == {}


def test_the_gpu_clock_counts_the_norms_each_architecture_runs() -> None:
    from zeroplan.speed import norm_features

    llama, qwen3 = load_model("meta-llama/Llama-3.2-1B"), load_model("Qwen/Qwen3-0.6B")
    # two norms of h a layer and the final one
    assert norm_features(llama) == (2 * 16 + 1) * 2048
    # Qwen3 also normalises every query and key head: q_dim + kv_dim = 2048 + 1024
    assert norm_features(qwen3) == 28 * (2 * 1024 + 2048 + 1024) + 1024
    gemma3 = load_model("google/gemma-3-1b-it")
    assert norm_features(gemma3) == 26 * (4 * 1152 + 4 * 256 + 256) + 1152


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_the_moe_layer_count_is_the_grouped_mm_path(model_type: str) -> None:
    """An MoE layer's count is the path a GPU runs (transformers' grouped_mm experts, which
    torch >= 2.10 runs on the CPU too, not a loop over experts): the router's top-k and
    softmax, one sort of the routed copies, histc and cumsum for the offsets, the gathers
    and their index_put backward, and grouped_mm twice forward and twice backward; so the
    MoE layers' host work beyond host_op_s per operation (speed.MOE_CANDIDATE.host_layer_s)
    is a cost per operation, not operations left uncounted."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_host_ops

    ops = count_host_ops.per_layer_by_op(model_type, "frozen")
    routing = {"topk": 1, "_softmax": 1, "sort": 1, "histc": 1, "cumsum": 1, "_grouped_mm": 4}
    assert {op: ops.get(op) for op in routing} == routing
    assert ops["index"] == ops["index_put"] == 3
    assert sum(ops.values()) == hostops.host_ops(model_type).layer_frozen


def test_liger_takes_what_its_kernels_replace_off_the_host_count() -> None:
    """Per Llama layer: two RMSNorms (22 operations each, Liger's timed at 9), SiLU·mul (5,
    Liger's 6: more than the module's) and rotary (24 and 12): 37 of a frozen layer's 107;
    the final norm once more."""
    llama = load_model("meta-llama/Llama-3.2-1B")
    plain = TrainSetup(method="lora", lora_dropout=0.0)
    fast = TrainSetup(method="lora", lora_dropout=0.0, kernels="liger")
    saved = host_operations(llama, plain) - host_operations(llama, fast)
    assert saved == llama.num_layers * (2 * 13 - 1 + 12) + 13
    # Qwen3's q/k norms are Liger's too; full fine-tuning's norms train (24 and 12)
    qwen3 = load_model("Qwen/Qwen3-0.6B")
    full, full_fast = TrainSetup(method="full"), TrainSetup(method="full", kernels="liger")
    per_layer = 4 * 12 - 1 + 12
    assert host_operations(qwen3, full) - host_operations(qwen3, full_fast) == (
        qwen3.num_layers * per_layer + 12
    )
    # an architecture whose modules were not counted keeps its count under Liger
    gemma3 = load_model("google/gemma-3-1b-it")
    g_plain = TrainSetup(method="lora")
    assert host_operations(gemma3, g_plain) == host_operations(
        gemma3, TrainSetup(method="lora", kernels="liger")
    )


def test_what_liger_replaces_is_what_llamas_modules_dispatch() -> None:
    """hostops.LIGER_OPS' own side is a count (count_host_ops.py --liger) of the installed
    Llama modules that Liger's kernels take the place of."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_host_ops

    counted = count_host_ops.liger_pieces()
    assert counted == {name: own for name, (own, _) in hostops.LIGER_OPS.items()}


def test_the_fused_lora_linears_ask_the_host_for_the_counted_share() -> None:
    """hostops.FUSED_ADAPTER_OPS is a count (count_host_ops.py --fused-lora) of PEFT's layer
    and the launch's fused linear as installed here; the host clock scales the table's
    adapter count by it where the fused linears run."""
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_host_ops

    assert count_host_ops.fused_adapter_counts() == hostops.FUSED_ADAPTER_OPS
    spec = load_model("meta-llama/Llama-3.2-1B")
    peft = TrainSetup(method="qlora")
    fused = TrainSetup(method="qlora", fused_lora=True)
    table = hostops.host_ops("llama")
    adapters = 7 * spec.num_layers
    saved = adapters * table.adapter_no_dropout * (1 - hostops.fused_adapter_share("4bit"))
    assert host_operations(spec, peft) - host_operations(spec, fused) == pytest.approx(saved, abs=1)


def test_compiled_layers_ask_the_host_for_a_counted_share_of_the_eager_calls() -> None:
    """--compile: a Llama LoRA layer makes 72 calls for the eager layer's 140 in bf16 and
    100 with 4-bit linears (count_host_ops.py --compile, on the CPU); bitsandbytes' Python
    around each 4-bit matmul is traced away; the GPU's clock prices inductor's fused
    elementwise work as Liger's bytes."""
    from zeroplan.hardware import get_gpu
    from zeroplan.speed import (
        LIGER_NORM_BYTES,
        gpu_seconds,
        liger_norm_seconds,
        norm_features,
        quantized_linears,
    )

    llama = load_model("meta-llama/Llama-3.2-1B")
    eager = TrainSetup(method="lora", lora_dropout=0.0)
    compiled = TrainSetup(method="lora", lora_dropout=0.0, compile=True)
    assert host_operations(llama, compiled) == round(host_operations(llama, eager) * 72 / 140)
    q_eager = TrainSetup(method="qlora", lora_dropout=0.0)
    q_compiled = TrainSetup(method="qlora", lora_dropout=0.0, compile=True)
    assert host_operations(llama, q_compiled) == round(host_operations(llama, q_eager) * 100 / 140)
    assert host_seconds(llama, q_compiled) == pytest.approx(
        host_operations(llama, q_compiled) * FITTED.host_op_s
    )
    assert quantized_linears(llama, q_compiled) > 0  # in the eager clock, not the compiled
    assert host_seconds(llama, q_compiled) < host_seconds(llama, q_eager) / 1.5
    # Liger's savings are not taken twice: the compiled count is the same with or without
    liger = TrainSetup(method="lora", lora_dropout=0.0, kernels="liger", compile=True)
    assert host_operations(llama, liger) == host_operations(llama, compiled)
    h100 = get_gpu("H100")
    fused = TrainSetup(method="lora", lora_dropout=0.0, kernels="liger")
    # inductor's norms are Liger's bytes, without Liger's row loop (speed.liger_norm_seconds)
    norm_bytes = fused.tokens * LIGER_NORM_BYTES * norm_features(llama)
    assert gpu_seconds(llama, compiled, h100) == pytest.approx(
        gpu_seconds(llama, fused, h100)
        - liger_norm_seconds(llama, fused, h100, FITTED)
        + norm_bytes / (h100.memory_bandwidth_gbs * 1e9)
    )
    assert gpu_seconds(llama, compiled, h100) < gpu_seconds(llama, eager, h100)


def test_the_host_timing_script_times_each_adapter_path(tmp_path: Path, monkeypatch: Any) -> None:
    """benchmarks/host_timing.py (run on a GPU machine, where the calls launch kernels) on
    this CPU, the LoRA linears only (Liger's kernels need a GPU): one row per adapter path,
    PEFT's and the fused linear's host µs beside their share, and the machine."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import json

    import host_timing

    out = tmp_path / "t.jsonl"
    argv = ["host_timing.py", "--out", str(out), "--skip-liger", "--calls", "5", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    assert host_timing.main() == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["piece"] for r in rows] == [f"lora_adapter_{p}" for p in ("bf16", "autocast", "4bit")]
    for r in rows:
        assert r["device"] == "cpu" and r["versions"]["torch"] and "gpu" in r
        if r["peft_us"] > 0:  # five calls on a busy machine: the bare block's time may win
            assert r["fused_share"] == pytest.approx(r["fused_us"] / r["peft_us"], abs=1e-3)


def test_host_speed_runs_take_the_path_their_names_say() -> None:
    """benchmarks/host_speed.py changes a plan's setup into each host-bound run's. Made from
    a ZeRO-0 plan (bf16 LoRA on one GPU until the twenty-second session: autocast off, as
    DeepSpeed runs), a run without DeepSpeed must get the loop's autocast back; its 1B runs
    had kept it off, so "1b-mb1-fused" ran PEFT's fp32 adapters, not the fused linears."""
    pytest.importorskip("torch")
    import dataclasses

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import host_speed

    from zeroplan.trainsetup import fused_lora_runs

    for name, (_, method, _, changes, tree) in host_speed.RUNS.items():
        if tree == "before":  # another tree's code (before/), with its own setup fields
            continue
        zero = 0 if method == "lora" else None
        planned = TrainSetup(method=method, zero=zero, fused_lora=True, lora_dropout=0.0)
        fields = {f.name: getattr(planned, f.name) for f in dataclasses.fields(TrainSetup)}
        setup = TrainSetup(**{**fields, **changes})
        if setup.zero is None:
            assert setup.autocast, name
        if "fused" in name or name.startswith("8b-mb1"):
            assert setup.fused_lora and fused_lora_runs(setup), name
    # the mistake this guards against: a ZeRO-0 plan's autocast kept without DeepSpeed
    zero0 = TrainSetup(method="lora", zero=0, fused_lora=True, lora_dropout=0.0)
    kept_off = dataclasses.replace(zero0, zero=None)
    assert not kept_off.autocast and not fused_lora_runs(kept_off)


def test_host_speed_knows_each_plan_choice_run_by_its_job() -> None:
    """A plan-choice run's name gives its job (model, method) and its place in the plan's
    ranking; any other name is a RUNS entry."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import host_speed
    from gpu_fixtures import ranked_job

    assert ranked_job("8b-lora-alt2") == ("8b-lora", 2)
    assert ranked_job("1b-plan") == ("1b", 0)
    assert ranked_job("8b-mb1") is None
    assert host_speed._job_of("8b-lora-plan") == ("8b", "lora", [], "after")
    assert host_speed._job_of("1b-alt4") == ("1b", "lora", [], "after")
    assert host_speed._job_of("8b-mb1")[:2] == ("8b", "qlora")


def _plan_choice_call(
    tmp_path: Path,
    rates: list[float],
    runs: tuple[int, ...] = (0, 1, 2, 3, 4),
    tag: str = "",
    gpu: str = "test",
) -> tuple[Path, Path]:
    """host_speed.py's rows and run folders for the 8B LoRA job's five runs (``runs`` of
    them), each stepping at its rate (tokens/s) over 3 warm-up and 10 timed steps of 10,000
    tokens."""
    import io
    import json
    import tarfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_fixtures import RANKED_JOBS

    rows, tgz = tmp_path / f"rows{tag}.jsonl", tmp_path / f"runs{tag}.tgz"
    setup = {"micro_batch": 16, "seq_len": 704, "zero": None, "offload": "none"}
    names = RANKED_JOBS["8b-lora"][2]
    with rows.open("w") as out, tarfile.open(tgz, "w:gz") as tar:
        for name, rate in [(names[i], rates[i]) for i in runs]:
            row = {"run": name, "gpu": gpu, "setup": {**setup, "grad_ckpt": False},
                   "path_predicted_tokens_per_s": 15000.0}  # fmt: skip
            out.write(json.dumps(row) + "\n")
            lines = [{"event": "train", "rank": 0, "step": s, "t": s * 1e4 / rate,
                      "tokens_per_s": rate} for s in range(1, 14)]  # fmt: skip
            data = "".join(json.dumps(m) + "\n" for m in lines).encode()
            info = tarfile.TarInfo(f"run-{name}/metrics.jsonl")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return rows, tgz


def test_plan_choice_fails_where_the_plan_chose_a_slower_setup(tmp_path: Path) -> None:
    import subprocess

    script = str(ROOT / "benchmarks" / "plan_choice.py")
    for rates, code in (([15000, 14000, 13000, 12000, 11000], 0), ([13000, 15000, 12000, 11000, 10000], 1)):  # fmt: skip
        rows, tgz = _plan_choice_call(tmp_path, rates)
        done = subprocess.run(
            [sys.executable, script, str(rows), str(tgz), "--job", "8b-lora"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == code, done.stdout + done.stderr
        assert "8b-lora-alt4" in done.stdout


def test_plan_choice_reads_five_runs_over_several_calls(tmp_path: Path) -> None:
    """Runs split over calls on one machine are read from the first call that has each; a
    run no call has, or calls on different GPUs, fail."""
    import subprocess

    script = str(ROOT / "benchmarks" / "plan_choice.py")
    rates = [15000, 14000, 13000, 16000, 11000]  # the plan's choice is not the fastest

    def run(*calls: tuple[Path, Path]) -> subprocess.CompletedProcess[str]:
        files = [str(f) for pair in calls for f in pair]
        return subprocess.run(
            [sys.executable, script, *files, "--job", "8b-lora"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    first = _plan_choice_call(tmp_path, rates, (0, 1, 2), "1")
    second = _plan_choice_call(tmp_path, [15500, 0, 0, *rates[3:]], (0, 3, 4), "2")
    done = run(first, second)
    assert done.returncode == 1, done.stdout + done.stderr  # alt3, from the second call, wins
    assert "2 calls" in done.stdout and "[rows2]" in done.stdout
    assert "again   15,500  [rows2]" in done.stdout  # the plan's rate in the second call
    assert "not measured" in run(first).stderr
    other = _plan_choice_call(tmp_path, rates, (3, 4), "3", gpu="another")
    assert "different GPUs" in run(first, other).stderr
    odd = subprocess.run(
        [sys.executable, script, *map(str, first), str(second[0])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert odd.returncode == 2 and "in pairs" in odd.stderr
