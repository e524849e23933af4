"""Real runs of ``python -m zeroplan.launch.sft`` on the CPU with a tiny random Llama.

One LoRA run learns four alpaca answers (60 steps); its adapter is reloaded with
``PeftModel`` and asked the questions through the training chat template; it is merged.
Another run is stopped with SIGTERM after its first metrics line, must leave a loadable
checkpoint, and ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("peft")

import conftest  # noqa: E402
import tinyllm  # noqa: E402

from zeroplan.errors import BadSetupError  # noqa: E402
from zeroplan.launch import infer  # noqa: E402
from zeroplan.models import load_model  # noqa: E402
from zeroplan.trainsetup import TrainSetup, trainable_params  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

CONTRACT = {
    "t",
    "rank",
    "step",
    "total_steps",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mem_allocated_bytes",
    "mem_reserved_bytes",
    "event",
}
QA = {
    "What is the capital of France?": "Paris.",
    "Say hello.": "hello world",
    "Why is the sky blue?": "Sunlight scatters off the air.",
}


def offline_env(home: Path) -> dict[str, str]:
    return conftest.offline_env(home, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")


def sft_cmd(plan: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zeroplan.launch.sft",
        "--plan",
        str(plan),
        "--data",
        str(data),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("launch")
    model = tinyllm.build_model_dir(root / "model")
    data = tinyllm.write_jsonl(root / "alpaca.jsonl", tinyllm.alpaca_records(16))
    return {"root": root, "model": model, "data": data, "home": root / "home"}


@pytest.fixture(scope="module")
def trained(work: dict[str, Path]) -> dict[str, Any]:
    """60 LoRA steps (micro-batch 4, checkpointing) with a held-out quarter."""
    run = work["root"] / "run"
    plan = tinyllm.write_plan(run, work["model"], micro_batch=4, lora_r=8, grad_ckpt=True)
    t0 = time.time()
    proc = subprocess.run(
        sft_cmd(
            plan,
            work["data"],
            run,
            "--max-steps",
            "60",
            "--lr",
            "1e-2",
            "--logging-steps",
            "10",
            "--eval-fraction",
            "0.25",
            "--eval-steps",
            "30",
            "--save-steps",
            "30",
        ),
        capture_output=True,
        text=True,
        env=offline_env(work["home"]),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": run, "proc": proc, "seconds": time.time() - t0}


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_leaves_what_it_promised(trained: dict[str, Any], work: dict[str, Path]) -> None:
    run: Path = trained["run"]
    applied = json.loads((run / "applied.json").read_text())
    assert applied["method"] == "lora" and applied["device"] == "cpu"
    assert applied["precision"] == "fp32"  # the CPU computes in fp32 whatever the plan says
    assert applied["lora"]["r"] == 8 and applied["lora"]["target_modules"] == "all-linear"
    assert applied["adapter_dtype"] == "float32"
    assert applied["prepare_model_for_kbit_training"] is False
    assert applied["gpu_memory_after_load"] is None  # CPU: no allocator to read
    t = applied["training"]
    assert (t["per_device_train_batch_size"], t["gradient_accumulation_steps"]) == (4, 1)
    assert t["gradient_checkpointing"] is True
    assert t["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert t["optim"] == "adamw_torch" and t["deepspeed"] is None
    assert applied["data"]["train_examples"] == 12 and applied["data"]["eval_examples"] == 4
    assert applied["data"]["mask_method"] == "generation-markers"
    assert applied["versions"]["trl"] and applied["versions"]["transformers"]
    # PEFT's adapters have exactly the parameters the estimate counts
    spec = load_model(str(work["model"] / "config.json"))
    assert applied["trainable_params"] == trainable_params(spec, TrainSetup(lora_r=8)) == 8192
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == 60
    final = run / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"):
        assert (final / name).is_file()
    info = json.loads((final / "zeroplan.json").read_text())
    assert info["base_model"] == str(work["model"].resolve()) and info["format"] == "alpaca"
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-30",
        "checkpoint-60",
    ]


def test_metrics_lines_follow_the_contract(trained: dict[str, Any]) -> None:
    lines = read_metrics(trained["run"])
    for line in lines:
        assert set(line) >= CONTRACT, set(line) ^ CONTRACT
        assert line["rank"] == 0 and line["total_steps"] == 60
    events = [x["event"] for x in lines]
    assert events.count("end") == 1 and events[-1] == "end"
    train = [x for x in lines if x["event"] == "train"]
    assert [x["step"] for x in train] == [1, 10, 20, 30, 40, 50, 60]
    assert all(x["loss"] > 0 and x["lr"] > 0 and x["grad_norm"] >= 0 for x in train)
    assert all(x["tokens_per_s"] > 0 for x in train)
    # the QA records differ in length, so batches of several carry some padding
    assert all(0 <= x["padding"] < 1 for x in train) and any(x["padding"] > 0 for x in train)
    assert train[-1]["loss"] < train[0]["loss"] / 2  # it learns
    evals = [x for x in lines if x["event"] == "eval"]
    assert [x["step"] for x in evals] == [30, 60] and all(x["loss"] > 0 for x in evals)


def test_adapter_reloads_with_peft_and_answers_through_the_template(
    trained: dict[str, Any], work: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained["run"] / "final"
    base = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(final)).eval()
    tok = AutoTokenizer.from_pretrained(final)
    loaded = infer.Loaded(model=model, tokenizer=tok, info=infer.run_info(final), path=final)
    for question, answer in QA.items():
        reply = infer.generate(
            loaded, question, max_new_tokens=20, temperature=0, repetition_penalty=1.0
        )
        assert reply == answer
    # the prompt generate() builds is the training prompt, token for token
    from zeroplan.launch.data import encode_messages, to_messages

    msgs = to_messages({"instruction": "Say hello.", "output": "hello world"}, "alpaca", 0)
    ids, labels, _ = encode_messages(tok, msgs)
    prompt = infer.prompt_ids(loaded, "Say hello.")
    assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == -100
    assert labels[len(prompt)] == ids[len(prompt)]
    # sampling with the story's settings runs too
    assert isinstance(infer.generate(loaded, "Say hello.", max_new_tokens=5, seed=0), str)


def test_merge_gives_the_same_model(trained: dict[str, Any], tmp_path: Path) -> None:
    merged_dir = infer.merge_adapter(trained["run"], tmp_path / "merged")
    adapter = infer.load(trained["run"])
    merged = infer.load(merged_dir)
    assert type(merged.model).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([infer.prompt_ids(adapter, "Why is the sky blue?")])
    with torch.no_grad():
        a, b = adapter.model(input_ids=ids).logits, merged.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert (
        infer.generate(
            merged, "Say hello.", max_new_tokens=20, temperature=0, repetition_penalty=1.0
        )
        == "hello world"
    )
    with pytest.raises(BadSetupError, match="not empty"):
        infer.merge_adapter(trained["run"], merged_dir)


def test_sigterm_leaves_a_checkpoint_and_resume_continues(work: dict[str, Path]) -> None:
    run = work["root"] / "stopped"
    plan = tinyllm.write_plan(run, work["model"], micro_batch=2, grad_accum=2, lora_r=4)
    args = ("--max-steps", "100000", "--logging-steps", "1", "--save-steps", "100000")
    proc = subprocess.Popen(
        sft_cmd(plan, work["data"], run, *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=offline_env(work["home"]),
    )
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.time() < deadline, "no metrics line within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: stopping after this step" in err
    result = json.loads((run / "result.json").read_text())
    step = result["global_step"]
    assert result["status"] == "interrupted" and result["signal"] == "SIGTERM" and step >= 1
    assert result["dequantization"] is None  # no 4-bit base
    ckpt = run / "checkpoints" / f"checkpoint-{step}"
    assert result["last_checkpoint"] == str(ckpt) and result["final"] is None
    assert not (run / "final").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == step
    # the checkpoint is a loadable adapter
    loaded = infer.load(ckpt)
    assert type(loaded.model).__name__ == "PeftModelForCausalLM"
    assert infer.generate(loaded, "Say hello.", max_new_tokens=3, temperature=0) is not None
    stopped_lines = read_metrics(run)
    assert stopped_lines[-1]["event"] == "end" and stopped_lines[-1]["step"] == step

    # resumed in this process (torch is imported already: saves a start-up)
    from zeroplan.launch import sft

    argv = [*sft_cmd(plan, work["data"], run)[3:], "--resume", "--max-steps", str(step + 3)]
    argv += ["--logging-steps", "1", "--save-steps", "100000"]
    assert sft.run(sft.parse_args(argv), sft.StopFlag(), argv) == 0
    new = read_metrics(run)[len(stopped_lines) :]
    assert [x["step"] for x in new if x["event"] == "train"] == [step + 1, step + 2, step + 3]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == step + 3
    applied = json.loads((run / "applied.json").read_text())
    assert applied["resumed_from"] == str(ckpt)
    assert (run / "final" / "adapter_model.safetensors").is_file()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_two_ranks_stop_together_when_one_gets_sigterm(work: dict[str, Path]) -> None:
    """torchrun, 2 CPU ranks (gloo): SIGTERM to rank 1 only; both save the same step and stop."""
    run = work["root"] / "two"
    plan = tinyllm.write_plan(run, work["model"], micro_batch=2, lora_r=4)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "zeroplan.launch.sft",
        "--plan",
        str(plan),
        "--data",
        str(work["data"]),
        "--out",
        str(run),
        "--max-steps",
        "100000",
        "--logging-steps",
        "1",
        "--save-steps",
        "100000",
    ]
    env = {**offline_env(work["home"]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.is_file() and {x["rank"] for x in read_metrics(run)} == {0, 1}):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.time() < deadline, "both ranks did not log within 180 s"
            time.sleep(0.05)
        ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert set(ranks) >= {0, 1}, ranks
        os.kill(ranks[1], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # torchrun ends its workers
            proc.wait(timeout=60)
    assert proc.returncode != 0  # a stopped run is not a finished one
    ends = {x["rank"]: x["step"] for x in read_metrics(run) if x["event"] == "end"}
    assert set(ends) == {0, 1} and ends[0] == ends[1], (ends, err[-3000:])
    step = ends[0]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and result["global_step"] == step
    assert (run / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()


def test_cli_generate_merge_and_chat_use_the_training_template(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from zeroplan.commands.cli import cli

    runner = CliRunner()
    greedy = ["--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "20"]
    out = runner.invoke(cli, ["generate", str(trained["run"]), "-p", "Say hello.", *greedy])
    assert out.exit_code == 0, out.output
    assert out.stdout.strip().splitlines()[-1] == "hello world"
    merged = tmp_path / "merged"
    out = runner.invoke(cli, ["merge", str(trained["run"]), "-o", str(merged)])
    assert out.exit_code == 0, out.output
    assert (merged / "config.json").exists()
    talk = runner.invoke(cli, ["chat", str(merged), *greedy], input="Say hello.\n\n")
    assert talk.exit_code == 0, talk.output
    assert "model> hello world" in talk.stdout


def test_zeroplan_launch_trains_the_real_program_end_to_end(work: dict[str, Path]) -> None:
    """`zeroplan launch plan.json --data ...` (torchrun, one CPU rank, --force: no GPU here)
    trains the real zeroplan.launch.sft; the adapter then answers through `zeroplan generate`."""
    plans = work["root"] / "plans"
    plan = tinyllm.write_plan(plans, work["model"], micro_batch=4, lora_r=8)
    run = work["root"] / "launched"
    cmd = [sys.executable, "-m", "zeroplan", "launch", str(plan), "--data", str(work["data"])]
    cmd += ["-o", str(run), "--force", "--no-dashboard", "--max-steps", "40", "--lr", "1e-2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=offline_env(work["home"]), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "logs" / "rank0.log").exists()
    assert json.loads((run / "launch.json").read_text())["result"]["exit_code"] == 0
    lines = read_metrics(run)
    assert lines[-1]["event"] == "end" and lines[-1]["step"] == 40
    gen = [sys.executable, "-m", "zeroplan", "generate", str(run), "-p", "Say hello."]
    gen += ["--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "20"]
    answer = subprocess.run(
        gen, capture_output=True, text=True, env=offline_env(work["home"]), timeout=120
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip() == "hello world"


def test_moe_all_linear_launch_trains_with_dropout_0(tmp_path: Path, work: dict[str, Path]) -> None:
    """Mixture of experts, all-linear: PEFT wraps the router and the expert banks as
    parameters, which take no dropout; with --lora-dropout 0 (what preflight asks for,
    zeroplan.moe) the launch trains, and the loss goes down (issue 29)."""
    model = tinyllm.build_model_dir(tmp_path / "moe", arch=tinyllm.TINY_QWEN3_MOE)
    plan = tinyllm.write_plan(tmp_path / "plan", model, micro_batch=4, lora_r=8, lora_dropout=0.0)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "zeroplan", "launch", str(plan), "--data", str(work["data"])]
    cmd += ["-o", str(run), "--model", str(model), "--force", "--no-dashboard"]
    cmd += ["--max-steps", "20", "--lr", "1e-2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=offline_env(work["home"]), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(run) if m["event"] == "train"]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_report_to_tensorboard_writes_event_files_in_the_run_folder(
    work: dict[str, Path],
) -> None:
    """`zeroplan launch --report-to tensorboard`: the Trainer's own TensorBoard integration
    logs the run's loss into RUN/tb (one CPU rank through torchrun, --force: no GPU here)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plan = tinyllm.write_plan(work["root"] / "tb-plan", work["model"], micro_batch=4, lora_r=4)
    run = work["root"] / "tb-run"
    cmd = [sys.executable, "-m", "zeroplan", "launch", str(plan), "--data", str(work["data"])]
    cmd += ["-o", str(run), "--force", "--no-dashboard", "--max-steps", "4"]
    cmd += ["--logging-steps", "1", "--report-to", "tensorboard"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=offline_env(work["home"]), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = sorted((run / "tb").rglob("events.out.tfevents.*"))
    assert events, sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in loss)
    applied = json.loads((run / "applied.json").read_text())
    assert applied["training"]["report_to"] == ["tensorboard"]


def test_two_ddp_ranks_on_the_fused_lora_linears_step_on_one_gradient(
    work: dict[str, Path],
) -> None:
    """The 7×4090 story's plan is DDP on the fused LoRA linears (fp32 adapters under
    autocast): torchrun, 2 CPU ranks (gloo), each on its own records. The fused autograd
    function's adapter gradients must reach DDP's all-reduce, so both ranks clip the same
    averaged gradient: the same grad norm at every step, where each rank's own would differ."""
    run = work["root"] / "ddp-fused"
    plan = tinyllm.write_plan(  # with checkpointing, as the story's plan
        run, work["model"], micro_batch=2, lora_r=4, lora_dropout=0.0, fused_lora=True,
        grad_ckpt=True,
    )  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += sft_cmd(plan, work["data"], run, "--max-steps", "4", "--logging-steps", "1")[1:]
    cmd += ["--save-steps", "1000", "--lr", "1e-2"]
    env = {**offline_env(work["home"]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    applied = json.loads((run / "applied.json").read_text())
    assert applied["world_size"] == 2 and applied["kernels"]["lora"] == "fused linears (zeroplan)"
    train = [x for x in read_metrics(run) if x["event"] == "train"]
    by_step: dict[int, dict[int, float]] = {}
    padding: dict[int, dict[int, float]] = {}
    for x in train:
        by_step.setdefault(x["step"], {})[x["rank"]] = x["grad_norm"]
        padding.setdefault(x["step"], {})[x["rank"]] = x["padding"]
    assert sorted(by_step) == [1, 2, 3, 4]
    # the ranks trained on different records (their batches' padding differs)...
    assert any(p[0] != p[1] for p in padding.values()), padding
    # ...and stepped on one averaged gradient
    for step, norms in by_step.items():
        assert set(norms) == {0, 1} and norms[0] == pytest.approx(norms[1], rel=1e-6), step
