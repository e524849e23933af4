"""The launch's fused LoRA linears (zeroplan.launch.loralinear): the same gradients as PEFT's
layers, PEFT's path wherever they cannot run, the setup rule, the plan's choice, the speed
model's count, and a launched run that records and trains on them.

Their speed is measured on a GPU (benchmarks/lora_linear_speed.py, benchmarks/kernels_speed.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tinyllm

from zeroplan.errors import BadSetupError
from zeroplan.trainsetup import TrainSetup, fused_lora_refusal, fused_lora_runs

# -- the setup rule ---------------------------------------------------------------------------


def test_the_setup_refuses_what_the_fused_linears_cannot_run() -> None:
    assert fused_lora_refusal(TrainSetup(method="lora", zero=2)) is None
    assert fused_lora_refusal(TrainSetup(method="qlora")) is None
    with pytest.raises(BadSetupError, match=r"--fused-lora: .* pass --lora-dropout 0"):
        TrainSetup(method="lora", lora_dropout=0.05, fused_lora=True)
    with pytest.raises(BadSetupError, match=r"--fused-lora: ZeRO-3 .* --zero 2"):
        TrainSetup(method="lora", zero=3, fused_lora=True)
    with pytest.raises(BadSetupError, match="--fused-lora: full fine-tuning has no adapters"):
        TrainSetup(method="full", fused_lora=True)


def test_they_run_where_the_adapters_compute_in_the_inputs_dtype() -> None:
    assert fused_lora_runs(TrainSetup(method="lora", zero=0, fused_lora=True))  # bf16 adapters
    assert fused_lora_runs(TrainSetup(method="qlora", fused_lora=True))  # autocast
    # fp32 adapters without autocast: PEFT computes the adapter in fp32
    assert not fused_lora_runs(TrainSetup(method="lora", loop="plain", fused_lora=True))
    assert not fused_lora_runs(TrainSetup(method="lora", zero=0))


# -- the speed model --------------------------------------------------------------------------


def test_the_speed_model_takes_the_counted_passes_off() -> None:
    from zeroplan import hostops, speed
    from zeroplan.hardware import parse_cluster
    from zeroplan.models import load_model

    spec = load_model("meta-llama/Llama-3.1-8B")
    gpu = parse_cluster("1xH100").gpu
    for method, zero in (("lora", 0), ("lora", None)):
        peft = TrainSetup(method=method, zero=zero, micro_batch=16, seq_len=704)
        fused = TrainSetup(method=method, zero=zero, micro_batch=16, seq_len=704, fused_lora=True)
        saved = speed.fused_lora_saved_bytes(spec, fused)
        assert speed.fused_lora_saved_bytes(spec, peft) == 0
        # the GPU's clock loses exactly the counted bytes at the card's bandwidth, and for
        # fp32 adapters under autocast (bf16 LoRA without DeepSpeed) PEFT's casts of each
        # adapter's input too: lora_share goes from 1 to 0, the DeepSpeed bf16 step's
        casts = speed.FITTED.lora_bytes * speed.adapted_features(spec, peft)
        casts *= speed.lora_share(peft) - speed.lora_share(fused)
        assert speed.lora_share(fused) == 0.0
        gap = speed.gpu_seconds(spec, peft, gpu) - speed.gpu_seconds(spec, fused, gpu)
        bandwidth = gpu.memory_bandwidth_gbs * 1e9
        assert gap == pytest.approx(fused.tokens * (saved + casts) / bandwidth)
        # the host: the adapters' count times the timed share (hostops.FUSED_ADAPTER_HOST_US)
        more = speed.host_operations(spec, fused) - speed.host_operations(spec, peft)
        adapters = 7 * spec.num_layers * hostops.host_ops("llama").adapter_no_dropout
        share = hostops.fused_adapter_share(speed.fused_lora_path(fused))
        assert more == pytest.approx(adapters * (share - 1), abs=1)
    # a dense model's QLoRA on the fused linears: bf16 LoRA's step on them plus the 4-bit
    # weights' dequantization (2.5 B a weight, forward and backward), not PEFT's 4-bit layer
    qlora_fused = TrainSetup(method="qlora", micro_batch=16, seq_len=704, fused_lora=True)
    lora_fused = TrainSetup(method="lora", micro_batch=16, seq_len=704, fused_lora=True)
    dequant = 2.5 * spec.quantizable_params() * 2 / (gpu.memory_bandwidth_gbs * 1e9)
    assert speed.gpu_seconds(spec, qlora_fused, gpu) == pytest.approx(
        speed.gpu_seconds(spec, lora_fused, gpu) + dequant
    )
    qlora_peft = TrainSetup(method="qlora", micro_batch=16, seq_len=704)
    assert speed.gpu_seconds(spec, qlora_peft, gpu) > speed.gpu_seconds(spec, qlora_fused, gpu)
    # a mixture of experts keeps PEFT's 4-bit price: its expert banks are not fused linears
    moe = load_model("Qwen/Qwen3-30B-A3B")
    assert speed.fused_4bit_as_bf16(spec, qlora_fused)
    assert not speed.fused_4bit_as_bf16(moe, qlora_fused)
    more = speed.host_operations(spec, qlora_fused) - speed.host_operations(spec, qlora_peft)
    adapters = 7 * spec.num_layers * hostops.host_ops("llama").adapter_no_dropout
    assert more == pytest.approx(adapters * (hostops.fused_adapter_share("4bit") - 1), abs=1)
    # by hand, one layer of Llama-3.1-8B's seven adapted linears (in, out), QLoRA: forward
    # 8 + 4 B per output feature, backward 4 B per output and 4 B per input feature
    linears = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)]
    linears += [(4096, 14336), (4096, 14336), (14336, 4096)]
    # + q/k/v and gate/up as two groups: 2 + 1 siblings past the first, on 4096 inputs,
    # (2 + 10) B each
    per_layer = sum(12 * o + 4 * o + 4 * i for i, o in linears) + 3 * 4096 * 12
    qlora = TrainSetup(method="qlora", fused_lora=True)
    assert speed.fused_lora_saved_bytes(spec, qlora) == 32 * per_layer
    # checkpointing's recompute runs the forward again, and saves its passes again
    ckpt = TrainSetup(method="qlora", fused_lora=True, grad_ckpt=True)
    assert speed.fused_lora_saved_bytes(spec, ckpt) == 32 * (
        per_layer + sum(12 * o for _, o in linears) + 3 * 4096 * 2
    )
    # compiled layers keep each linear alone; q and v alone make one group of two
    compiled = TrainSetup(method="qlora", fused_lora=True, compile=True)
    assert speed.fused_lora_saved_bytes(spec, compiled) == 32 * (per_layer - 3 * 4096 * 12)
    qv = TrainSetup(method="qlora", fused_lora=True, lora_targets=("q_proj", "v_proj"))
    q_v = sum(12 * o + 4 * o + 4 * i for i, o in (linears[0], linears[2]))
    assert speed.fused_lora_saved_bytes(spec, qv) == 32 * (q_v + 4096 * 12)


# -- the plan's choice ------------------------------------------------------------------------


def test_the_plan_chooses_them_where_they_run_and_not_for_recipes_or_moe() -> None:
    from zeroplan.hardware import parse_cluster
    from zeroplan.models import load_model
    from zeroplan.planner import PlanRequest, fused_lora_choice

    spec = load_model("meta-llama/Llama-3.1-8B")
    req = PlanRequest(spec=spec, cluster=parse_cluster("1xH100"), seq_len=512)
    assert fused_lora_choice(req, "lora", 0.0, 0)
    assert not fused_lora_choice(req, "lora", 0.05, 0)
    assert not fused_lora_choice(req, "lora", 0.0, 3)
    assert not fused_lora_choice(req, "full", 0.0, 0)
    off = PlanRequest(spec=spec, cluster=req.cluster, seq_len=512, allow_fused_lora=False)
    assert not fused_lora_choice(off, "lora", 0.0, 0)
    moe = PlanRequest(spec=load_model("Qwen/Qwen3-30B-A3B"), cluster=req.cluster, seq_len=512)
    assert not fused_lora_choice(moe, "lora", 0.0, 0)


def test_plan_and_estimate_say_so(capsys: Any) -> None:
    from zeroplan.commands.cli import cli

    def run(*argv: str) -> tuple[int, str]:
        try:
            cli.main(list(argv), standalone_mode=False)
        except SystemExit as exc:
            return int(exc.code or 0), capsys.readouterr().out
        return 0, capsys.readouterr().out

    code, out = run("plan", "meta-llama/Llama-3.1-8B", "--gpus", "1xH100", "--json")
    assert code == 0 and json.loads(out)["best"]["setup"]["fused_lora"] is True
    code, out = run(
        "plan", "meta-llama/Llama-3.1-8B", "--gpus", "1xH100", "--json", "--no-fused-lora"
    )
    assert code == 0 and json.loads(out)["best"]["setup"]["fused_lora"] is False


# -- the function against PEFT's layers, on the CPU ----------------------------------------


def _layer(base: Any, adapter_dtype: Any, dropout: float = 0.0) -> Any:
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    if hasattr(base.weight, "quant_state"):
        from peft.tuners.lora.bnb import Linear4bit as Linear  # type: ignore[no-redef]
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout)
    layer = Linear(base, "default", config=cfg, r=4, lora_alpha=8, lora_dropout=dropout)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    return layer


def _step(layer: Any, x: Any, autocast: bool) -> tuple[Any, list[Any]]:
    import torch

    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() ** 2).sum().backward()
    grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    for p in layer.parameters():
        p.grad = None
    return y.detach(), [g.detach().clone() for g in grads]


def _bf16_base(bias: bool) -> Any:
    import torch

    base = torch.nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    return base.requires_grad_(False)


def _4bit_base() -> Any:
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    base = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    weight = bnb.nn.Params4bit(torch.randn(48, 64) * 0.1, requires_grad=False, quant_type="nf4")
    base.weight = weight._quantize("cpu")
    return base


@pytest.mark.parametrize(
    "case", ["bf16 adapters", "fp32 adapters, autocast", "bias, autocast", "4-bit, autocast"]
)
def test_the_fused_linear_gives_peft_layers_output_and_gradients(case: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from zeroplan.launch import loralinear

    torch.manual_seed(0)
    base = _4bit_base() if case.startswith("4-bit") else _bf16_base(case.startswith("bias"))
    adapters = torch.bfloat16 if case == "bf16 adapters" else torch.float32
    layer = _layer(base, adapters)
    autocast = case.endswith("autocast")
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    y_peft, g_peft = _step(layer, x, autocast)
    assert loralinear.install(layer).layers == 1
    y_fused, g_fused = _step(layer, x, autocast)
    assert y_fused.dtype == y_peft.dtype and y_fused.shape == y_peft.shape
    # the same sums in another order: within bf16's rounding of the largest value
    assert (y_fused.float() - y_peft.float()).abs().max() <= 2e-2 * y_peft.abs().max()
    for fused, peft in zip(g_fused, g_peft, strict=True):
        assert fused.dtype == peft.dtype
        assert (fused.float() - peft.float()).abs().max() <= 2e-2 * peft.float().abs().max()
    loralinear.uninstall(layer)
    assert _step(layer, x, autocast)[0].equal(y_peft)


def test_peft_runs_wherever_the_fused_linear_cannot() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from zeroplan.launch import loralinear

    dropped = _layer(_bf16_base(False), torch.bfloat16, dropout=0.1)
    done = loralinear.install(dropped)
    assert (done.layers, done.kept, done.why_kept) == (0, 1, "LoRA dropout")

    layer = _layer(_bf16_base(False), torch.float32)
    calls: list[str] = []
    peft_forward = layer.forward

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append("peft")
        return peft_forward(*args, **kwargs)

    layer.forward = recorded  # what install finds as PEFT's forward
    assert loralinear.install(layer).layers == 1
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x)  # fp32 adapters, no autocast: PEFT's fp32 adapter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)  # fused
    layer.enable_adapters(False)
    layer(x)
    assert calls == ["peft", "peft"]


@pytest.mark.parametrize(
    ("checkpointing", "group"),
    [(None, True), (None, False), ("reentrant", True), ("non-reentrant", True)],
)
def test_per_record_gradients_of_a_model_match_peft(
    tmp_path: Path, checkpointing: str | None, group: bool, monkeypatch: Any
) -> None:
    """A tiny Llama with all-linear LoRA in fp32: each record's adapter gradients on the fused
    path equal PEFT's to float32 rounding, with q/k/v and gate/up run together (LoRAGroup)
    or each alone, and with and without gradient checkpointing (whose recompute runs the
    fused forward again)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zeroplan.launch import loralinear

    model_dir = tinyllm.build_model_dir(tmp_path / "m")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    records = [torch.randint(3, 200, (1, n)) for n in (5, 9, 13)]

    def grads() -> list[list[Any]]:
        out = []
        for ids in records:
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            out.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        return out

    peft = grads()
    layers = model.config.num_hidden_layers
    installed = loralinear.install(model, group=group)
    assert (installed.layers, installed.grouped) == (7 * layers, 5 * layers * group)
    calls = []
    group_apply = loralinear._GROUP_FN.apply
    monkeypatch.setattr(
        loralinear._GROUP_FN, "apply", lambda *a: calls.append(1) or group_apply(*a)
    )
    fused = grads()
    # each layer's q/k/v and gate/up once per record, again where checkpointing recomputes
    assert len(calls) == 2 * layers * len(records) * (1 + (checkpointing is not None)) * group
    for per_peft, per_fused in zip(peft, fused, strict=True):
        for a, b in zip(per_peft, per_fused, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_group_casts_its_fp32_adapters_once_each_way() -> None:
    """Under autocast with fp32 adapters (PEFT's QLoRA default) a q/k/v group casts the
    stacked A and each B to bf16 going forward, and back the stacked A's gradient and each
    B's: 2 · (1 + 3) casts, where casting each A alone took 2 · (3 + 3); and no cast of
    anything already in its dtype (x, the base weights, the outputs' gradients)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from torch.utils._python_dispatch import TorchDispatchMode

    from zeroplan.launch import loralinear

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(self, name, _layer(_bf16_base(False), torch.float32))

    class Casts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Casts.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    model = Attention()
    assert loralinear.install(model).grouped == 3
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    with Casts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [model.q_proj(x), model.k_proj(x), model.v_proj(x)]
        torch.autograd.backward(outs, [torch.ones_like(y) for y in outs])
    assert Casts.n == 2 * (1 + 3)
    assert model.q_proj.lora_A["default"].weight.grad.dtype == torch.float32


# -- a launched rank -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return tinyllm.build_model_dir(tmp_path_factory.mktemp("tiny"))


def _rank(tmp_path: Path, model_dir: Path, name: str, *flags: str, **setup: Any) -> Path:
    from zeroplan.launch import sft

    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(16))
    run = tmp_path / name
    tinyllm.write_plan(run, model_dir, method="lora", micro_batch=2, lora_r=4, **setup)
    argv = ["--plan", str(run / "plan.json"), "--data", str(data), "--out", str(run)]
    argv += ["--max-steps", "4", "--seed", "3", *flags]
    assert sft.run(sft.parse_args(argv), sft.StopFlag(), argv) == 0
    return run


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_a_launch_records_the_fused_linears_and_trains_as_peft_does(
    tmp_path: Path, model_dir: Path, capsys: Any
) -> None:
    pytest.importorskip("trl")
    fused = _rank(tmp_path, model_dir, "fused", fused_lora=True)
    kernels = json.loads((fused / "applied.json").read_text())["kernels"]
    assert kernels["lora"] == "fused linears (zeroplan)" and kernels["why_peft_lora"] is None
    err = capsys.readouterr().err
    # the tiny Llama's 2 layers × 7, q/k/v and gate/up with their siblings
    assert "LoRA: 14 fused linears (10 with siblings on one input)" in err
    result = json.loads((fused / "result.json").read_text())
    assert result["lora_linears"] == {"layers": 14, "kept": 0, "why_kept": None, "grouped": 10}
    plain = _rank(tmp_path, model_dir, "plain", "--kernels", "none", fused_lora=True)
    kernels = json.loads((plain / "applied.json").read_text())["kernels"]
    assert kernels["lora"] == "PEFT's layers" and kernels["why_peft_lora"] == "--kernels none"
    # same seed, same records: the same losses to float32 rounding
    assert _losses(fused) == pytest.approx(_losses(plain), rel=1e-4)
    assert len(_losses(fused)) >= 2
