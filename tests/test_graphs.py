"""The decoder as CUDA graphs (zeroplan/launch/graphs.py): what decides it, the one shape
packed micro-batches get for it, and, on a GPU, the same losses and gradients as eager
(with an optimizer step between micro-batches, autocast, the fused LoRA linears) and eager
again after a capture that cannot work."""

from __future__ import annotations

from typing import Any

import pytest
import tinyllm

from zeroplan.errors import BadSetupError
from zeroplan.launch import batching as zbatch
from zeroplan.launch import graphs, sft
from zeroplan.trainsetup import TrainSetup, cuda_graphs_refusal

torch = pytest.importorskip("torch")
GPU = torch.cuda.is_available()


def _row(lengths: list[int], start: int = 1) -> dict[str, list[int]]:
    ids: list[int] = []
    pos: list[int] = []
    for i, n in enumerate(lengths):
        ids += [start + i + j for j in range(n)]
        pos += list(range(n))
    return {"input_ids": ids, "labels": list(ids), "position_ids": pos}


# --------------------------------------------------------------------------- who runs them


@pytest.mark.parametrize(
    ("setup", "world", "cuda", "compiled", "why"),
    [
        (TrainSetup(method="lora"), 1, True, False, None),
        (TrainSetup(method="qlora"), 1, True, False, None),
        (TrainSetup(method="lora"), 1, False, False, "no GPU"),
        (TrainSetup(method="lora"), 2, True, False, "several processes"),
        (TrainSetup(method="lora", zero=0), 1, True, False, "DeepSpeed"),
        (TrainSetup(method="full"), 1, True, False, "full fine-tuning"),
        (TrainSetup(method="lora"), 1, True, True, "--compile"),
    ],
)
def test_where_graphs_can_run(
    setup: TrainSetup, world: int, cuda: bool, compiled: bool, why: str | None
) -> None:
    got = cuda_graphs_refusal(setup, world, cuda, compiled)
    assert (got is None) if why is None else (got is not None and why in got)


def _opts(cuda_graphs: bool | None) -> sft.Options:
    from pathlib import Path

    return sft.Options(plan=Path("p"), data="d", out=Path("o"), cuda_graphs=cuda_graphs)


def test_graphs_follow_the_plan_and_refuse_a_forced_impossible_one() -> None:
    lora = TrainSetup(method="lora", cuda_graphs=True)
    assert sft._graphs_why_not(_opts(None), lora, True, 1, False) is None
    assert "leaves them off" in str(
        sft._graphs_why_not(_opts(None), TrainSetup(method="lora"), True, 1, False)
    )
    assert sft._graphs_why_not(_opts(False), lora, True, 1, False) == "--no-cuda-graphs"
    # the plan's choice where it cannot run: eager, quietly (applied.json says why)
    assert "several processes" in str(sft._graphs_why_not(_opts(None), lora, True, 2, False))
    assert "--compile" in str(sft._graphs_why_not(_opts(None), lora, True, 1, True))
    # asked for where it cannot run: one line
    with pytest.raises(BadSetupError, match="--cuda-graphs: no GPU; pass --no-cuda-graphs"):
        sft._graphs_why_not(_opts(True), lora, False, 1, False)
    with pytest.raises(BadSetupError, match="full fine-tuning"):
        sft._graphs_why_not(_opts(True), TrainSetup(method="full"), True, 1, False)


def test_signature_and_refusals() -> None:
    ids = torch.zeros(1, 8, dtype=torch.long)
    a = graphs._signature({"input_ids": ids, "max_length_q": 32, "use_cache": False})
    assert a == graphs._signature({"input_ids": ids + 1, "max_length_q": 32, "use_cache": False})
    assert a != graphs._signature({"input_ids": ids, "max_length_q": 31, "use_cache": False})
    assert a != graphs._signature({"input_ids": torch.zeros(1, 9, dtype=torch.long),
                                   "max_length_q": 32, "use_cache": False})  # fmt: skip
    assert graphs._signature({"input_ids": ids, "past_key_values": object()}) is None
    assert graphs._refuses({"attention_mask": ids})
    assert graphs._refuses({"output_hidden_states": True})
    assert not graphs._refuses({"input_ids": ids, "use_cache": False, "attention_mask": None})


def test_decoder_module_is_the_parent_of_the_layers() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**tinyllm.TINY_DECODER))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert graphs.decoder_module(peft_model) is model.model
    assert graphs.decoder_module(model) is model.model
    model.config.num_hidden_layers = 3  # no list of that many layers: one line, not a traceback
    with pytest.raises(BadSetupError, match="no decoder layer list in 'llama' to capture"):
        graphs.decoder_module(model)


def test_eval_and_cpu_calls_run_eager() -> None:
    calls: list[dict[str, object]] = []

    class Decoder(torch.nn.Module):
        def forward(self, **kw: object) -> str:
            calls.append(kw)
            return "eager"

    dec = Decoder()
    g = graphs.GraphedDecoder(warn=print)
    g.install(dec, [])
    dec.eval()
    assert dec.forward(input_ids=torch.zeros(1, 2)) == "eager"
    dec.train()
    with torch.no_grad():
        assert dec.forward(input_ids=torch.zeros(1, 2)) == "eager"
    assert not g.captured and g.replays == 0 and len(calls) == 2


# --------------------------------------------------------------------------- one shape


def test_collator_pads_the_boundaries_to_one_count() -> None:
    rows = [_row([5, 9]), _row([3, 3, 3, 3]), _row([16])]
    bound = zbatch.one_shape(rows, 16, 2)[0]
    # [5, 9] + 1 padding segment of 2 = 3; [3]*4 + 1 of 4 = 5; [16] = 1: the two largest
    assert [zbatch.padded_shape(r, 16)[0] for r in rows] == [3, 5, 1]
    assert bound == 8
    col = zbatch.PackedCollator(0, 16, "flat", segments=bound)
    for pair in ([rows[0], rows[1]], [rows[2], rows[0]], [rows[2], rows[2]]):
        b = col(pair)
        assert b["cu_seq_lens_q"].shape == (bound + 1,)
        assert b["max_length_q"] == b["max_length_k"] == 16
        cu = b["cu_seq_lens_q"].tolist()
        assert cu[-1] == 32 and cu == sorted(cu)
    plain = zbatch.PackedCollator(0, 16, "flat")(rows[:2])
    assert plain["cu_seq_lens_q"].tolist() == [0, 5, 14, 16, 19, 22, 25, 28, 32]
    assert plain["max_length_q"] == 9
    # more segments than the bound: the batch keeps its own (it runs eager)
    few = zbatch.PackedCollator(0, 16, "flat", segments=2)(rows[:2])
    assert few["cu_seq_lens_q"].shape == (9,)
    with pytest.raises(ValueError, match="flat layout only"):
        zbatch.PackedCollator(0, 16, "rows", segments=4)


def test_fixed_max_length_is_the_rows_longest_segment() -> None:
    rows = [_row([5, 9]), _row([3, 3, 3, 3]), _row([2, 3])]
    # [5, 9]: 9; [3]*4 pads 4; [2, 3] pads a segment of 11
    assert zbatch.one_shape(rows, 16, 1)[1] == 11
    assert zbatch.one_shape(rows[:2], 16, 1)[1] == 9
    # padding segments are at most PAD_SEGMENT long
    assert zbatch.one_shape([_row([3])], 1000, 1)[1] == zbatch.PAD_SEGMENT
    col = zbatch.PackedCollator(0, 16, "flat", segments=8, longest=11)
    for pair in ([rows[0], rows[1]], [rows[2], rows[1]]):
        b = col(pair)
        assert b["max_length_q"] == b["max_length_k"] == 11
    # a longer segment than the bound keeps its own length (a shorter one would cut it)
    assert col([_row([16]), rows[1]])["max_length_q"] == 16
    # more segments than the bound: its own boundaries and its own longest
    assert (
        zbatch.PackedCollator(0, 16, "flat", segments=2, longest=11)(rows[:2])["max_length_q"] == 9
    )
    with pytest.raises(ValueError, match="with segments only"):
        zbatch.PackedCollator(0, 16, "flat", longest=4)
    with pytest.raises(ValueError, match="1 to capacity"):
        zbatch.PackedCollator(0, 16, "flat", segments=4, longest=17)


def test_reference_attention_skips_empty_segments() -> None:
    q = torch.randn(12, 2, 8)
    k = torch.randn(12, 2, 8)
    v = torch.randn(12, 2, 8)
    a = zbatch._segments_sdpa(q, k, v, [0, 5, 12], None)
    b = zbatch._segments_sdpa(q, k, v, [0, 5, 12, 12, 12], None)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- on the CPU


class ReplayAgain:
    """A recorder for the CPU, where CUDA graphs cannot exist: ``replay`` runs the recorded
    function again, with gradients as the captured kernels would record them, on the
    tensors it closed over (the graph's static inputs) and copies what it returns into
    what the capture returned (the graph's outputs). So a GraphedDecoder that forgot to
    copy a micro-batch in, read an output before its replay or lost a gradient trains
    differently from eager here too. tests/test_graphs.py's GPU tests run the real ones."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.released = False

    def warm(self) -> object:
        import contextlib

        return contextlib.nullcontext()

    def record(self, fn: object) -> tuple[object, object]:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = fn()  # type: ignore[operator]
        return _Again(fn, out), out

    def allocated(self) -> int:
        return 0

    def release(self) -> None:
        self.released = True


class _Again:
    def __init__(self, fn: object, out: object) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        with torch.enable_grad():
            new = self.fn()  # type: ignore[operator]
        olds = self.out if isinstance(self.out, tuple) else (self.out,)
        news = new if isinstance(new, tuple) else (new,)
        with torch.no_grad():
            for old, fresh in zip(olds, news, strict=True):
                if old is not None:
                    old.copy_(fresh)


@pytest.mark.parametrize(("fp32_adapters", "autocast", "fused"),
                         [(False, False, False), (True, True, True), (False, False, True)])  # fmt: skip
def test_graphed_decoder_trains_as_eager_on_the_cpu(
    fp32_adapters: bool, autocast: bool, fused: bool
) -> None:
    batches = _batches(6, None, "cpu")
    model, params = _tiny_lora(0, fp32_adapters, fused, "cpu")
    eager_losses, eager_grads = _train(model, params, batches, autocast, device="cpu")
    model, params = _tiny_lora(0, fp32_adapters, fused, "cpu")
    g = graphs.GraphedDecoder(warn=print, recorder=ReplayAgain())
    decoder = graphs.decoder_module(model)
    g.install(decoder, [p for p in decoder.parameters() if p.requires_grad])
    losses, grads = _train(model, params, batches, autocast, device="cpu")
    assert g.captured and g.failed is None and g.replays == len(batches)
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-5)
    for a, b in zip(eager_grads, grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # evaluation (no gradient) and another shape run eager, the graph untouched
    with torch.no_grad():
        model(**batches[0], use_cache=False)  # type: ignore[operator]
    model(**_batches(1, 40, "cpu")[0], use_cache=False).loss.backward()  # type: ignore[operator]
    assert g.replays == len(batches) and g.eager_calls == 1


def test_a_failed_capture_trains_eager_on_the_cpu() -> None:
    batches = _batches(3, None, "cpu")
    model, params = _tiny_lora(0, False, False, "cpu")
    eager_losses, eager_grads = _train(model, params, batches, False, 1, "cpu")
    model, params = _tiny_lora(0, False, False, "cpu")
    said: list[str] = []
    rec = ReplayAgain(fail=True)
    g = graphs.GraphedDecoder(warn=said.append, recorder=rec)
    decoder = graphs.decoder_module(model)
    g.install(decoder, [p for p in decoder.parameters() if p.requires_grad])
    losses, grads = _train(model, params, batches, False, 1, "cpu")
    assert not g.captured and rec.released and g.replays == 0
    assert said == [
        "CUDA graphs off, the decoder runs eager: the capture failed (RuntimeError: operation "
        "not permitted when stream is capturing)"
    ]
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-5)
    for a, b in zip(eager_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- on a GPU


def _tiny_lora(
    seed: int, fp32_adapters: bool, fused: bool, device: str = "cuda"
) -> tuple[object, list[object]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from zeroplan.launch import loralinear

    torch.manual_seed(seed)
    cfg = LlamaConfig(**tinyllm.TINY_DECODER, attn_implementation=zbatch.register_varlen())
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # not zero: every adapter's gradient flows from the start
            torch.nn.init.normal_(p, std=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    if fp32_adapters:
        for p in params:
            p.data = p.data.float()
    if fused:
        loralinear.install(model, group=True)
    return model, params


def _batches(n: int, segments: int | None, device: str = "cuda") -> list[dict[str, object]]:
    import random

    rng = random.Random(3)
    rows = []
    for _ in range(2 * n):
        lengths, left = [], 48
        while left > 4:
            k = rng.randint(3, min(left, 30))
            lengths.append(k)
            left -= k
        r = _row(lengths)
        r["input_ids"] = [rng.randrange(1, 300) for _ in r["input_ids"]]
        r["labels"] = list(r["input_ids"])
        rows.append(r)
    shape = zbatch.one_shape(rows, 48, 2)
    bound = shape[0] if segments is None else segments
    col = zbatch.PackedCollator(0, 48, "flat", segments=bound, longest=shape[1])
    out = []
    for i in range(n):
        b = col(rows[2 * i : 2 * i + 2])
        b.pop("zp_real_tokens")
        b.pop("zp_slots")
        out.append({k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()})
    return out


def _train(model: object, params: list[object], batches: list[dict[str, object]],
           autocast: bool, accumulate: int = 2, device: str = "cuda",
           ) -> tuple[list[float], list[object]]:  # fmt: skip
    opt = torch.optim.SGD(params, lr=0.5)
    losses = []
    for i, b in enumerate(batches):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**b, use_cache=False).loss  # type: ignore[operator]
        loss.backward()
        losses.append(float(loss))
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=i % 4 == 1)  # both: to None and in place
    return losses, [p.grad.clone() if p.grad is not None else None for p in params]  # type: ignore[attr-defined]


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(
    ("fp32_adapters", "autocast", "fused"),
    [(False, False, False), (True, True, False), (True, True, True), (False, True, True)],
)
def test_graphed_training_equals_eager(fp32_adapters: bool, autocast: bool, fused: bool) -> None:
    batches = _batches(7, None)
    model, params = _tiny_lora(0, fp32_adapters, fused)
    eager_losses, eager_grads = _train(model, params, batches, autocast)
    model, params = _tiny_lora(0, fp32_adapters, fused)
    g = graphs.GraphedDecoder(warn=print)
    decoder = graphs.decoder_module(model)
    g.install(decoder, [p for p in decoder.parameters() if p.requires_grad])
    losses, grads = _train(model, params, batches, autocast)
    assert g.captured and g.failed is None, g.failed
    assert g.replays == len(batches) and g.eager_calls == 0
    assert losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-3)
    for a, b in zip(eager_grads, grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    # another shape (a batch whose boundaries were not padded alike) runs eager
    odd = _batches(1, 40)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        model(**odd, use_cache=False).loss.backward()  # type: ignore[operator]
    assert g.eager_calls == 1


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_a_capture_that_cannot_work_falls_back_to_eager() -> None:
    batches = _batches(3, None)
    model, params = _tiny_lora(0, False, False)
    eager_losses, eager_grads = _train(model, params, batches, False, accumulate=1)
    model, params = _tiny_lora(0, False, False)
    decoder = graphs.decoder_module(model)
    layer = decoder.layers[0]
    plain = layer.forward

    def reads_the_gpu(*args: object, **kw: object) -> object:
        out = plain(*args, **kw)
        if float(args[0].float().abs().sum()) < 0:  # type: ignore[attr-defined]  # a host read
            raise AssertionError
        return out

    layer.forward = reads_the_gpu
    said: list[str] = []
    g = graphs.GraphedDecoder(warn=said.append)
    g.install(decoder, [p for p in decoder.parameters() if p.requires_grad])
    losses, grads = _train(model, params, batches, False, accumulate=1)
    assert g.failed is not None and not g.captured and len(said) == 1
    assert said[0].startswith("CUDA graphs off, the decoder runs eager: the capture failed")
    assert losses == pytest.approx(eager_losses, rel=1e-3, abs=1e-3)
    for a, b in zip(eager_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


# --------------------------------------------------------------------------- the commands


def test_plan_cuda_graphs_flag_and_the_rank_argument(tmp_path: object) -> None:
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from zeroplan.commands.cli import cli
    from zeroplan.launch.runner import TrainOptions

    args = ["plan", "meta-llama/Llama-3.2-1B", "--gpus", "1xH100", "--method", "lora"]
    args += ["--seq-len", "512", "--global-batch", "1"]
    eager = CliRunner().invoke(cli, [*args, "--no-cuda-graphs", "--json"])
    assert eager.exit_code == 0, eager.output
    assert json.loads(eager.output)["best"]["setup"]["cuda_graphs"] is False
    out = Path(str(tmp_path)) / "plan"
    # on by default (--cuda-graphs says so)
    graphed = CliRunner().invoke(cli, [*args, "-o", str(out)], env={"COLUMNS": "200"})
    assert graphed.exit_code == 0, graphed.output
    assert "CUDA graphs" in graphed.output and "replays them" in graphed.output
    data = json.loads((out / "plan.json").read_text())
    assert data["best"]["setup"]["cuda_graphs"] is True
    # the plan's setup reaches the rank through plan.json; the launch flag overrides it
    assert sft.read_plan(out / "plan.json").setup.cuda_graphs
    assert "--cuda-graphs" in TrainOptions(cuda_graphs=True).argv()
    assert "--no-cuda-graphs" in TrainOptions(cuda_graphs=False).argv()
    assert not any("graphs" in a for a in TrainOptions().argv())
    assert (
        sft.parse_args(["--plan", "p", "--data", "d", "--out", "o", "--no-cuda-graphs"]).cuda_graphs
        is False
    )


def test_the_varlen_forward_reads_nothing_on_the_host_for_a_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zeroplan_varlen has no mask function, so transformers builds no mask and never looks
    for packed rows (whose answer it read on the host, a wait for the GPU each forward)."""
    from transformers import masking_utils

    def looked(*args: object, **kw: object) -> None:
        raise AssertionError("find_packed_sequence_indices ran")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", looked)
    model, _ = _tiny_lora(0, False, False, "cpu")
    out = model(**_batches(1, None, "cpu")[0], use_cache=False)  # type: ignore[operator]
    assert torch.isfinite(out.loss)


def _graph_ceiling(pattern: str) -> tuple[Any, list[Any]]:
    """benchmarks/graph_ceiling.py as a module, and the results files matching ``pattern``
    (the test skips without any: a tree staged for a GPU call leaves the results behind)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "graph_ceiling.py"
    spec = importlib.util.spec_from_file_location("graph_ceiling", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = sorted(path.parent.joinpath("results").glob(pattern))
    if not results:
        pytest.skip(f"no benchmarks/results/{pattern} in this tree")
    return module, results


def test_the_graphed_prediction_holds_against_the_measured_gpu_busy_ceilings() -> None:
    """Every probed host-bound launch on today's path kept the GPU's busy seconds per step:
    its real tokens over them is what the step reaches once the host leaves no gaps. The
    plan's prediction for the graphed step stays within the issue's ±15% of each (18 8B
    QLoRA runs on H100s, one on an H200, one 1B LoRA: benchmarks/graph_ceiling.py)."""
    module, results = _graph_ceiling("host*_h*.jsonl")
    rows = module.ceiling_rows(results)
    assert len(rows) >= 20
    for row in rows:
        assert row["measured"] < row["ceiling"]  # the host left gaps in every one
        assert abs(row["predicted_graphs"] / row["ceiling"] - 1) <= 0.15, row
        assert row["predicted_graphs"] > 1.3 * row["predicted_eager"]


def test_graphed_launches_are_predicted_held_out() -> None:
    """Launches with the decoder as CUDA graphs (graphs*.jsonl on H100s: 1B LoRA and 8B
    QLoRA at micro-batch 1, 1B and Qwen2.5-0.5B at 4 × 704, Qwen3-1.7B at 1 × 1,664, the
    8B and Qwen3 plans): with speed's graph_token_s measured without the launches of the
    run's own GPU call, the plan's real tokens/s is within 10% of every launch's median
    step (Qwen3's 17.6% until Liger's norm loop was counted: speed.liger_norm_seconds) and
    within the issue's 15% of 9 in 10 of their measured rates (two lost a one-off host
    stall in 20 steps: 315 ms in Qwen3's); and a graphed launch never waits
    longer than an eager one (graphed_launch_seconds)."""
    from zeroplan import speed

    module, results = _graph_ceiling("graphs*.jsonl")
    rows = module.graphed_launch_rows(results)
    assert len(rows) >= 11 and {r["file"] for r in rows} >= {"graphs3.jsonl", "graphs5.jsonl"}
    for row in rows:
        assert abs(row["held_out"] / row["median_step"] - 1) <= 0.10, row
    within = [abs(r["held_out"] / r["measured"] - 1) <= 0.15 for r in rows]
    assert sum(within) >= 0.8 * len(rows)
    big = TrainSetup(method="lora", micro_batch=64, seq_len=1024, cuda_graphs=True)
    assert speed.graphed_launch_seconds(big) == speed.FITTED.launch_step_s


def test_estimate_prices_cuda_graphs_only_where_the_launch_can_capture_them() -> None:
    """zeroplan estimate --cuda-graphs: the graphed step's host clock and launch; where the
    launch cannot capture (several GPUs, full fine-tuning) one line, exit 2."""
    from click.testing import CliRunner

    from zeroplan.commands.cli import cli

    base = ["estimate", "meta-llama/Llama-3.2-1B", "--micro-batch", "1", "--seq-len", "512"]
    base += ["--fused-lora", "--json"]
    runs = {
        graphs: CliRunner().invoke(cli, [*base, "--gpus", "1xH100", graphs])
        for graphs in ("--cuda-graphs", "--no-cuda-graphs")
    }
    import json

    speeds = {k: json.loads(r.output)["speed"] for k, r in runs.items()}
    assert not speeds["--cuda-graphs"]["host_bound"] and speeds["--no-cuda-graphs"]["host_bound"]
    assert (
        speeds["--cuda-graphs"]["tokens_per_s"] > 1.3 * speeds["--no-cuda-graphs"]["tokens_per_s"]
    )
    import subprocess
    import sys

    for bad in (["--gpus", "2xH100"], ["--gpus", "1xH100", "--method", "full"]):
        out = subprocess.run(
            [sys.executable, "-m", "zeroplan", *base[:-2], *bad, "--cuda-graphs"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out.stderr
        assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
        assert "--cuda-graphs:" in out.stderr and "drop it" in out.stderr
