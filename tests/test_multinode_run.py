"""Two ``zeroplan launch`` processes on this machine acting as two nodes of one run (one CPU
rank each, gloo, the real ``zeroplan.launch.sft`` on the tiny Llama of tinyllm.py): once
through ``--nnodes/--node-rank/--master-addr``, once through SLURM's variables, where
Ctrl-C to one node stops both, nothing is left running, and ``--resume`` continues.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("peft")

import conftest
import tinyllm

from zeroplan.hardware import parse_cluster
from zeroplan.launch import procs
from zeroplan.trainsetup import TrainSetup

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nodes")
    model = tinyllm.build_model_dir(root / "model")
    data = tinyllm.write_jsonl(root / "alpaca.jsonl", tinyllm.alpaca_records(16))
    setup = TrainSetup(seq_len=64, optim="adamw", micro_batch=2, lora_r=4)
    plan = tinyllm.plan_for(model, setup, parse_cluster("2x1xH100"))  # two nodes, one GPU each
    (root / "plan").mkdir()
    (root / "plan" / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return {"root": root, "plan": root / "plan" / "plan.json", "data": data}


def env_for(work: dict[str, Path], **extra: str) -> dict[str, str]:
    env = conftest.offline_env(
        work["root"] / "home",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        COLUMNS="200",
    )
    env = {k: v for k, v in env.items() if not k.startswith("SLURM")}
    return {**env, **extra}


def start(work: dict[str, Path], args: list[str], env: dict[str, str], cwd: Path) -> Any:
    cmd = [sys.executable, "-m", "zeroplan", "launch", str(work["plan"])]
    cmd += ["--data", str(work["data"]), "--force", "--no-dashboard", "--progress-every", "1"]
    cmd += ["--join-timeout", "120", "--logging-steps", "1", *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,  # as a terminal runs it: Ctrl-C reaches zeroplan only
    )


def finish(*nodes: Any, timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    try:
        for p in nodes:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def left_running(run: Path) -> list[int]:
    """Processes (not zombies) whose command line names the run folder."""
    left = []
    for pid, p in procs.process_table().items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(run).encode() in cmdline and not p.zombie:
            left.append(pid)
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_through_the_flags_train_to_the_end(work: dict[str, Path]) -> None:
    run, port = work["root"] / "flags", free_port()

    def node(rank: int) -> Any:
        flags = ["--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1"]
        flags += ["--master-port", str(port), "-o", str(run), "--max-steps", "6", "--lr", "1e-2"]
        return start(work, flags, env_for(work), work["root"])

    one = node(1)  # the order the nodes start in does not matter
    time.sleep(0.5)
    zero = node(0)
    (code0, err0), (code1, err1) = finish(zero, one)
    assert code0 == 0, err0[-3000:]
    assert code1 == 0, err1[-3000:]
    assert "starting rank 0 of 2 with torchrun" in err0
    assert "starting rank 1 of 2 with torchrun" in err1
    assert "node rank 1 of 2 (--nnodes), rendezvous at 127.0.0.1" in err1
    lines = metrics(run)
    ends = {x["rank"]: x["step"] for x in lines if x["event"] == "end"}
    assert ends == {0: 6, 1: 6}
    assert {x["rank"] for x in lines if x["event"] == "train"} == {0, 1}
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == 6
    assert (run / "final" / "adapter_model.safetensors").is_file()
    for name in ("launch.json", "launch.node1.json"):
        record = json.loads((run / name).read_text())
        assert record["result"]["exit_code"] == 0 and record["world_size"] == 2
    assert (run / "logs" / "rank0.log").exists() and (run / "logs" / "rank1.log").exists()
    assert not (run / ".nodes").exists()
    assert not left_running(run)


def slurm_job() -> str:
    """A job id whose derived port is free here."""
    for _ in range(100):
        job = str(random.randrange(10**6, 10**7))
        with socket.socket() as s:
            try:
                s.bind(("", 15000 + int(job) % 15000))
            except OSError:
                continue
        return job
    raise AssertionError("no free port in SLURM's range")


def test_two_slurm_nodes_stop_together_on_ctrl_c_and_resume(work: dict[str, Path]) -> None:
    job = slurm_job()
    cwd = work["root"] / "slurm"
    cwd.mkdir()
    run = cwd / "runs" / f"model-slurm{job}"  # the default run folder, the same on both nodes

    def node(rank: int, *args: str) -> Any:
        env = env_for(
            work,
            SLURM_JOB_ID=job,
            SLURM_JOB_NODELIST="localhost,localhost",
            SLURM_NNODES="2",
            SLURM_NODEID=str(rank),
            SLURM_NTASKS="2",
        )
        return start(work, list(args), env, cwd)

    steps = ("--max-steps", "100000", "--save-steps", "100000")
    zero, one = node(0, *steps), node(1, *steps)
    try:
        deadline = time.monotonic() + 180
        while {x["rank"] for x in metrics(run) if x["event"] == "train"} != {0, 1}:
            assert zero.poll() is None and one.poll() is None, "a node ended early"
            assert time.monotonic() < deadline, "the ranks never logged"
            time.sleep(0.1)
        pids = {x["pid"] for x in metrics(run) if "pid" in x}
        one.send_signal(signal.SIGINT)  # Ctrl-C on node rank 1
    finally:
        (code0, err0), (code1, err1) = finish(zero, one, timeout=120)
    assert code1 == 130, err1[-3000:]
    assert "stopped by SIGINT: every rank was stopped" in err1
    assert code0 == 143, err0[-3000:]  # node 0 got no signal: its ranks were told to stop
    assert "so every rank saved and stopped; --resume continues" in err0
    ends = {x["rank"]: x["step"] for x in metrics(run) if x["event"] == "end"}
    assert set(ends) == {0, 1} and ends[0] == ends[1], ends
    step = ends[0]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and result["global_step"] == step
    assert (run / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    table = procs.process_table()
    assert not [pid for pid in pids if pid in table], "a rank (or its zombie) is left"
    assert not left_running(run)

    # --resume on both nodes continues from that checkpoint
    more = ("--resume", "--max-steps", str(step + 2), "--save-steps", "100000")
    (code0, err0), (code1, err1) = finish(node(0, *more), node(1, *more))
    assert code0 == 0, err0[-3000:]
    assert code1 == 0, err1[-3000:]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["global_step"] == step + 2
    applied = json.loads((run / "applied.json").read_text())
    assert applied["resumed_from"] == str(run / "checkpoints" / f"checkpoint-{step}")
    train = [x for x in metrics(run) if x["event"] == "train"]
    assert {x["step"] for x in train if x["step"] > step} == {step + 1, step + 2}
    assert not left_running(run)
