"""--kernels and --compile: which path a rank takes, the refusals, the compile's fallback.

Liger's kernels are Triton (GPU only): their loss parity is measured in the GPU call of
benchmarks/kernels_speed.py. Here: the choice, the refusals at both preflights, what
applied.json and result.json record, and regional compilation on the CPU (torch's
``eager`` backend: dynamo traces the layers; inductor's C++ build would take a minute).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import tinyllm

from zeroplan.errors import (
    CompilerUnavailableError,
    KernelsUnsupportedError,
    MissingDependencyError,
)
from zeroplan.launch import kernels
from zeroplan.launch.kernels import KernelPath, choose

LLAMA_ONLY = frozenset({"llama"})


# -- the choice -----------------------------------------------------------------------------


def test_auto_follows_the_plan() -> None:
    """auto runs Liger's kernels where the plan chose them (its memory and speed assumed
    them) and the model's own where it did not; none and liger override the plan."""
    on_gpu = choose("auto", "llama", True, LLAMA_ONLY, fused_loss=True, planned=True)
    assert on_gpu.liger == kernels.LIGER_KERNELS and on_gpu.why_plain is None
    assert on_gpu.fused_loss and not on_gpu.compile
    plain = choose("auto", "llama", True, LLAMA_ONLY, False, planned=False)
    assert plain.liger == () and "the plan chose the model's own modules" in str(plain.why_plain)
    overridden = choose("none", "llama", True, LLAMA_ONLY, True, planned=True)
    assert overridden.liger == () and overridden.why_plain == "--kernels none"
    # the fused loss is the plan's on every path, --kernels none included
    assert overridden.fused_loss
    assert choose("liger", "llama", True, LLAMA_ONLY, False).liger == kernels.LIGER_KERNELS
    # a plan that chose Liger, launched where it cannot run: refused, with the way out
    # the LoRA linears: fused where the plan chose them and they run, PEFT's under none
    fused = choose("auto", "llama", True, LLAMA_ONLY, False, why_peft_lora=None)
    assert fused.fused_lora and fused.why_peft_lora is None and "fused LoRA" in fused.label
    peft = choose("none", "llama", True, LLAMA_ONLY, False, why_peft_lora=None)
    assert not peft.fused_lora and peft.why_peft_lora == "--kernels none"
    kept = choose("auto", "llama", True, LLAMA_ONLY, False, why_peft_lora="LoRA dropout 0.05")
    assert not kept.fused_lora and kept.to_dict()["lora"] == "PEFT's layers"
    with pytest.raises(MissingDependencyError, match="the plan's Liger kernels need liger"):
        choose("auto", "llama", True, None, False, planned=True)
    with pytest.raises(KernelsUnsupportedError, match="plan again with --no-liger"):
        choose("auto", "llama", False, LLAMA_ONLY, False, planned=True)
    with pytest.raises(KernelsUnsupportedError, match="no kernels for the 'phi3'"):
        choose("auto", "phi3", True, LLAMA_ONLY, False, planned=True)


def test_liger_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(MissingDependencyError, match="pip install liger-kernel, or pass"):
        choose("liger", "llama", True, None, False)
    with pytest.raises(KernelsUnsupportedError, match="need a CUDA GPU: pass --kernels none"):
        choose("liger", "llama", False, LLAMA_ONLY, False)
    with pytest.raises(KernelsUnsupportedError, match="no kernels for the 'phi3' architecture"):
        choose("liger", "phi3", True, LLAMA_ONLY, False)
    assert choose("liger", "llama", True, LLAMA_ONLY, False).liger == kernels.LIGER_KERNELS


def test_liger_kwargs_turn_on_only_the_paths_kernels() -> None:
    def apply_to_family(
        rope: bool = True,
        cross_entropy: bool = False,
        fused_linear_cross_entropy: bool = True,
        rms_norm: bool = True,
        swiglu: bool = True,
        layer_norm: bool = True,
        model: Any = None,
    ) -> None: ...

    fast = KernelPath("auto", kernels.LIGER_KERNELS, fused_loss=False, compile=False)
    assert kernels.liger_kwargs(apply_to_family, fast) == {
        "rope": True,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
        "rms_norm": True,
        "swiglu": True,
        "layer_norm": False,  # a switch zeroplan does not know stays off
    }
    plain = KernelPath("none", (), fused_loss=True, compile=False)
    assert kernels.liger_kwargs(apply_to_family, plain) == {
        "rope": False,
        "cross_entropy": False,
        "fused_linear_cross_entropy": True,
        "rms_norm": False,
        "swiglu": False,
        "layer_norm": False,
    }


def test_label_and_record() -> None:
    path = KernelPath("auto", ("rms_norm", "swiglu", "rope"), True, True, None, "0.8.5")
    assert path.label == "Liger rms_norm/swiglu/rope, compiled layers"
    assert path.to_dict() == {
        "requested": "auto",
        "liger": ["rms_norm", "swiglu", "rope"],
        "fused_loss": True,
        "compile": "regional (each decoder layer)",
        "why_plain": None,
        "liger_version": "0.8.5",
        "lora": "PEFT's layers",
        "why_peft_lora": None,
    }
    assert KernelPath("none", (), False, False).label == "plain kernels"


def test_compile_is_refused_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name)
    )
    with pytest.raises(CompilerUnavailableError, match=r"needs Triton .* or pass --no-compile"):
        kernels.check_compiler(cuda=True)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(CompilerUnavailableError, match=r"C\+\+ compiler .* --no-compile"):
        kernels.check_compiler(cuda=False)


# -- regional compilation on the CPU ----------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return tinyllm.build_model_dir(tmp_path_factory.mktemp("tiny"))


def _peft_model(model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config)


def _loss_and_grads(model: Any, ids: Any) -> tuple[float, list[Any]]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return float(loss), grads


def test_compiled_layers_compute_what_eager_does(model_dir: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = _peft_model(model_dir)
    ids = torch.randint(0, 100, (2, 12))
    eager_loss, eager_grads = _loss_and_grads(model, ids)
    warnings: list[str] = []
    regional = kernels.RegionalCompile(warn=warnings.append, backend="eager")
    layers = kernels.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 2
    regional.wrap(layers)
    for _ in range(2):
        loss, grads = _loss_and_grads(model, ids)
        assert loss == pytest.approx(eager_loss, rel=1e-5)
        for g, e in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    stats = regional.stats()
    assert warnings == [] and stats["fell_back_to_eager"] is None and stats["layers"] == 2
    assert stats["graphs"] >= 1 and stats["first_compiled_call_s"] is not None
    # a LoRA layer traces whole: nothing splits its graph, in the default mode
    assert stats["graph_breaks"] == 0 and stats["graph_break_reasons"] == {}
    assert stats["mode"] is None


def test_the_compile_mode_reaches_torch_compile(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    asked: list[dict[str, Any]] = []

    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(kernels, "COMPILE_MODE", "reduce-overhead")
    regional = kernels.RegionalCompile(warn=print)
    regional.wrap(kernels.decoder_layers(_peft_model(model_dir)))
    assert asked == [{"backend": "inductor", "mode": "reduce-overhead"}] * 2


def test_a_failing_compile_falls_back_to_eager_with_one_warning(model_dir: Path) -> None:
    import torch

    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no working compiler here\nsecond line of a long traceback")

    torch.manual_seed(0)
    model = _peft_model(model_dir)
    ids = torch.randint(0, 100, (2, 12))
    eager_loss, _ = _loss_and_grads(model, ids)
    warnings: list[str] = []
    regional = kernels.RegionalCompile(warn=warnings.append, backend=broken)
    regional.wrap(kernels.decoder_layers(model))
    for _ in range(3):
        loss, _ = _loss_and_grads(model, ids)
        assert loss == pytest.approx(eager_loss, rel=1e-6)
    (line,) = warnings
    assert "\n" not in line and "no working compiler here" in line
    assert line.endswith("the run goes on in eager mode")
    assert regional.stats()["fell_back_to_eager"].startswith("BackendCompilerFailed")


# -- the rank program: what it records ------------------------------------------------------


def _rank_run(tmp_path: Path, model_dir: Path, *extra: str) -> tuple[int, Path]:
    from zeroplan.launch import sft

    tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(8))
    run = tmp_path / "run"
    tinyllm.write_plan(run, model_dir, method="lora", micro_batch=2, lora_r=4)
    argv = ["--plan", str(run / "plan.json"), "--data", str(tmp_path / "d.jsonl")]
    argv += ["--out", str(run), "--max-steps", "2", "--logging-steps", "1", *extra]
    return sft.run(sft.parse_args(argv), sft.StopFlag(), argv), run


def test_the_rank_records_its_path_and_compile(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    pytest.importorskip("trl")

    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("inductor is broken on this machine")

    monkeypatch.setattr(kernels, "COMPILE_BACKEND", broken)
    code, run = _rank_run(tmp_path, model_dir, "--compile")
    assert code == 0
    applied = json.loads((run / "applied.json").read_text())
    assert applied["kernels"] == {
        "requested": "auto",
        "liger": [],
        "fused_loss": False,
        "compile": "regional (each decoder layer)",
        "why_plain": "the plan chose the model's own modules (--kernels liger overrides)",
        "liger_version": kernels.liger_version(),
        "lora": "PEFT's layers",
        "why_peft_lora": "the plan chose PEFT's layers",
    }
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed"
    assert "inductor is broken" in result["compile"]["fell_back_to_eager"]
    err = capsys.readouterr().err
    assert err.count("torch.compile of the decoder layers failed") == 1
    assert "kernels: plain kernels, compiled layers (the plan chose the model's own modules" in err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["batching"].endswith("plain kernels, compiled layers")


def test_the_rank_compiles_where_the_plan_chose_it_unless_told_not_to(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("trl")
    from zeroplan.launch import sft

    monkeypatch.setattr(kernels, "COMPILE_BACKEND", "eager")
    tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(8))
    for flag, compiled in (None, True), ("--no-compile", False):
        run = tmp_path / f"run-{flag}"
        tinyllm.write_plan(run, model_dir, method="lora", micro_batch=2, lora_r=4, compile=True)
        argv = ["--plan", str(run / "plan.json"), "--data", str(tmp_path / "d.jsonl")]
        argv += ["--out", str(run), "--max-steps", "1", *([flag] if flag else [])]
        assert sft.run(sft.parse_args(argv), sft.StopFlag(), argv) == 0
        applied = json.loads((run / "applied.json").read_text())
        assert applied["kernels"]["compile"] == (
            "regional (each decoder layer)" if compiled else "off"
        )


def test_the_rank_refuses_liger_on_the_cpu_before_loading(tmp_path: Path, model_dir: Path) -> None:
    pytest.importorskip("trl")
    kind = (
        MissingDependencyError if kernels.liger_model_types() is None else KernelsUnsupportedError
    )
    with pytest.raises(kind, match="--kernels liger") as err:
        _rank_run(tmp_path, model_dir, "--kernels", "liger")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "applied.json").exists()


# -- zeroplan launch: the options reach the ranks; the refusals come before anything starts --


def _launch(tmp_path: Path, model_dir: Path, train: Any, **plan_options: Any) -> Any:
    """A one-rank launch of a tiny LoRA plan (``plan_options``: its setup's other fields)."""
    from zeroplan.hardware import parse_cluster
    from zeroplan.launch.runner import build_launch, read_plan, resolve_nodes

    tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(4))
    plan = tinyllm.write_plan(tmp_path / "plan", model_dir, method="lora", **plan_options)
    return build_launch(
        read_plan(plan),
        run_dir=tmp_path / "run",
        data=str(tmp_path / "d.jsonl"),
        nodes=resolve_nodes(count=1),
        launcher="torchrun",
        gpu=parse_cluster("H100").gpu,
        train=train,
        model=str(model_dir),
        port=29613,
        inherited={},
    )


def test_launch_passes_the_options_and_refuses_liger_and_compile(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeroplan.hardware import parse_cluster
    from zeroplan.launch.preflight import preflight
    from zeroplan.launch.runner import TrainOptions

    la = _launch(tmp_path, model_dir, TrainOptions(kernels="liger", compile=True))
    assert la.rank_argv[-3:] == ("--compile", "--kernels", "liger")
    assert _launch(tmp_path, model_dir, TrainOptions(compile=False)).rank_argv[-1] == "--no-compile"
    assert "--kernels" not in _launch(tmp_path, model_dir, TrainOptions()).rank_argv
    h100 = parse_cluster("1xH100")

    monkeypatch.setattr(kernels, "liger_model_types", lambda: None)
    monkeypatch.setattr(kernels, "check_compiler", lambda cuda: None)
    (err,) = preflight(la, h100, force=True).errors
    assert isinstance(err, MissingDependencyError) and "pip install liger-kernel" in str(err)

    monkeypatch.setattr(kernels, "liger_model_types", lambda: frozenset({"qwen2"}))
    (err,) = preflight(la, h100, force=True).errors
    assert isinstance(err, KernelsUnsupportedError) and "'llama' architecture" in str(err)
    # no GPU here: liger cannot run whatever it patches
    monkeypatch.setattr(kernels, "liger_model_types", lambda: frozenset({"llama"}))
    assert isinstance(preflight(la, None, force=True).errors[0], KernelsUnsupportedError)
    assert preflight(la, h100, force=True).ok

    def no_compiler(cuda: bool) -> None:
        raise CompilerUnavailableError("--compile needs Triton ...: or pass --no-compile")

    monkeypatch.setattr(kernels, "check_compiler", no_compiler)
    (err,) = preflight(la, h100, force=True).errors
    assert isinstance(err, CompilerUnavailableError)
    # a plan that chose compiled layers is checked too, unless the launch says --no-compile
    chose = _launch(tmp_path, model_dir, TrainOptions(), compile=True)
    (err,) = preflight(chose, h100, force=True).errors
    assert isinstance(err, CompilerUnavailableError)
    eager = _launch(tmp_path, model_dir, TrainOptions(compile=False), compile=True)
    assert preflight(eager, h100, force=True).ok


def test_a_plan_that_chose_liger_is_refused_where_liger_cannot_run(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--kernels auto follows the plan: a plan made for Liger's kernels (its memory assumed
    them) is refused at preflight where they cannot run; --kernels none overrides it."""
    from zeroplan.hardware import parse_cluster
    from zeroplan.launch.preflight import preflight
    from zeroplan.launch.runner import TrainOptions

    def launch(train: Any) -> Any:
        return _launch(tmp_path, model_dir, train, kernels="liger")

    h100 = parse_cluster("1xH100")
    monkeypatch.setattr(kernels, "liger_model_types", lambda: None)
    (err,) = preflight(launch(TrainOptions()), h100, force=True).errors
    assert isinstance(err, MissingDependencyError)
    assert "the plan's Liger kernels need liger-kernel" in str(err) and "--no-liger" in str(err)
    assert preflight(launch(TrainOptions(kernels="none")), h100, force=True).ok
    monkeypatch.setattr(kernels, "liger_model_types", lambda: frozenset({"llama"}))
    assert preflight(launch(TrainOptions()), h100, force=True).ok


def test_ranks_forced_onto_the_cpu_are_refused_what_needs_a_gpu_before_they_start(
    tmp_path: Path, model_dir: Path
) -> None:
    """--force without a GPU starts the ranks on the CPU: the parts of the plan that run on a
    CUDA GPU only are refused at preflight, with the plan options that leave them out, not
    by the ranks after torchrun started them."""
    from zeroplan.launch.preflight import preflight
    from zeroplan.launch.runner import TrainOptions

    fused = _launch(tmp_path, model_dir, TrainOptions(kernels="none"), fused_loss=True)
    # (without liger-kernel installed the packages check refuses the fused loss too)
    (err,) = [e for e in preflight(fused, None, force=True).errors if "no GPU" in str(e)]
    assert isinstance(err, MissingDependencyError)
    assert str(err) == (
        "no GPU here: the fused loss (Liger's Triton kernels) needs a CUDA GPU: plan again "
        "without it (--no-fused-loss) to train on the CPU"
    )
    plain = _launch(tmp_path, model_dir, TrainOptions(kernels="none"))
    assert preflight(plain, None, force=True).ok
    # on a GPU the same plan passes (the ranks check their packages themselves)
    from zeroplan.hardware import parse_cluster

    assert not any(
        "no GPU here" in str(e)
        for e in preflight(fused, parse_cluster("1xH100"), force=True).errors
    )


def test_compiled_layers_around_varlen_attention_run_a_packed_step(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("trl")
    monkeypatch.setattr(kernels, "COMPILE_BACKEND", "eager")
    code, run = _rank_run(tmp_path, model_dir, "--compile", "--packed-attention", "varlen")
    assert code == 0
    stats = json.loads((run / "result.json").read_text())["compile"]
    assert stats["fell_back_to_eager"] is None and stats["layers"] == 2
    # the attention stays eager: each layer compiles as the graphs around it
    assert stats["graph_breaks"] >= 1 and stats["graphs"] >= 2


def test_a_compile_failing_in_the_backward_falls_back_and_the_run_goes_on(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    pytest.importorskip("trl")
    from torch._dynamo.backends.common import aot_autograd

    def broken_backward(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("the backward's kernels do not build")

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=broken_backward)
    monkeypatch.setattr(kernels, "COMPILE_BACKEND", backend)
    code, run = _rank_run(tmp_path, model_dir, "--compile")
    assert code == 0
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == 2
    assert "the backward's kernels do not build" in result["compile"]["fell_back_to_eager"]
    assert capsys.readouterr().err.count("torch.compile of the decoder layers failed") == 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if m["event"] == "train"]
    assert len(losses) == 2 and all(x == x and x > 0 for x in losses)


def test_launch_liger_here_is_one_line_and_nothing_starts(
    tmp_path: Path, model_dir: Path, subprocess_env: dict[str, str]
) -> None:
    """No GPU here (and no liger-kernel on a CPU machine): refused before anything starts."""
    import subprocess
    import sys

    tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(4))
    plan = tinyllm.write_plan(tmp_path / "plan", model_dir, method="lora")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "zeroplan", "launch", str(plan), "--model", str(model_dir)]
    argv += ["--data", str(tmp_path / "d.jsonl"), "-o", str(run), "--kernels", "liger", "--force"]
    env = {**subprocess_env, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "zeroplan: error: --kernels liger"
    )
    assert "--kernels none" in proc.stderr and not run.exists()
