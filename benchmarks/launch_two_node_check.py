"""Two "nodes" on one two-GPU machine: one ``zeroplan launch`` per GPU, NCCL between them.

    python benchmarks/launch_two_node_check.py --work /tmp/2n --out $OUT/launch_two_node.jsonl \
        [--via flags,slurm] [--steps 30]

Each "node" is a ``zeroplan launch`` of its own with ``CUDA_VISIBLE_DEVICES`` set to one
GPU, meeting the other through the flags (``--nnodes 2 --node-rank R --master-addr
127.0.0.1``) or through SLURM's variables as srun sets them (``SLURM_JOB_NODELIST=
localhost,localhost``, ``SLURM_NODEID``, ``SLURM_JOB_ID``), in a run folder both see. The
model is the Llama-3.2-1B architecture with random weights (gpu_fixtures.build_model: no
network), LoRA, micro-batch 4, seq 768. For each way: train; after a checkpoint and a few
more steps, SIGINT to node rank 1's zeroplan (a terminal's Ctrl-C); record both exit
statuses (130 and 143 expected), whether any rank process is left, the last checkpoint;
then ``--resume`` on both to the end; each rank's peak allocated against the plan's.
``--zero 2`` runs the same under DeepSpeed ZeRO-2 (default: DDP).

``--network-path`` sets ``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1`` for the two "nodes" (not
for the one-node run beside them in ``--speed``), so that NCCL between them takes the
network (socket) transport, as between two machines, instead of NVLink or host shared memory.

This is the two-GPU run that the CPU tests (tests/test_multinode_run.py, gloo) cannot be:
NCCL across two torchrun agents; its rows are in benchmarks/results/launch_two_node_*.jsonl.
``--tiny`` runs the same sequence on the CPU (gloo, --force) to check this script.

Every run starts in a fresh folder under --work: a folder an earlier invocation left is
refused (``zeroplan launch`` would refuse it too, and its metrics would be read as this
run's) unless ``--clean`` deletes it first. A node still running after --timeout is stopped
(SIGINT, then SIGKILL after --grace), never left behind; a row whose nodes did not all exit
0 carries their last log line instead of a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402
from gpu_fixtures import (  # noqa: E402
    build_model,
    metrics,
    records,
    steady_tokens_per_s,
    versions,
)

from zeroplan.hardware import parse_cluster  # noqa: E402
from zeroplan.trainsetup import TrainSetup  # noqa: E402

ZP = [sys.executable, "-m", "zeroplan", "launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NETWORK_PATH = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}


def node_env(via: str, rank: int, job: str, tiny: bool, network: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["CUDA_VISIBLE_DEVICES"] = "" if tiny else str(rank)
    if network:
        env |= NETWORK_PATH
    if via == "slurm":
        env |= {
            "SLURM_JOB_ID": job,
            "SLURM_JOB_NODELIST": "localhost,localhost",
            "SLURM_NNODES": "2",
            "SLURM_NODEID": str(rank),
            "SLURM_NTASKS": "2",
        }
    return env


def launch_cmd(args: argparse.Namespace, run: Path, plan: str, extra: list[str]) -> list[str]:
    """``zeroplan launch`` of the plan into ``run`` on the check's records, logging each step."""
    cmd = [*ZP, str(args.work / f"{plan}.json"), "--data", str(args.work / "data.jsonl")]
    cmd += ["-o", str(run), "--logging-steps", "1", "--no-dashboard", *extra]
    return cmd + (["--force"] if args.tiny else [])


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> Any:
    """Start ``cmd`` in the repository as the leader of its own session, output to ``log``."""
    with log.open("a") as out:  # (the child holds its own copy)
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )


def start(
    via: str, rank: int, args: argparse.Namespace, run: Path, extra: list[str], plan: str = "plan"
) -> Any:
    if via == "flags":
        extra = [*extra, "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1"]
        extra += ["--master-port", str(args.port)]
    env = node_env(via, rank, args.job, args.tiny, args.network_path)
    return spawn(launch_cmd(args, run, plan, extra), node_log(args, run, rank), env)


def node_log(args: argparse.Namespace, run: Path, rank: int | None = None) -> Path:
    return args.work / (f"{run.name}.log" if rank is None else f"{run.name}-node{rank}.log")


def run_dirs(args: argparse.Namespace) -> list[Path]:
    """The run folders this invocation writes, each of which must start empty."""
    if args.speed:
        names = args.speed.split(",")
        return [args.work / f"speed-{n}-{spec}" for n in names for spec in ("2xH100", "2x1xH100")]
    return [args.work / via for via in args.via.split(",")]


def fresh_run_dirs(args: argparse.Namespace) -> None:
    """Refuse (exit 2) run folders an earlier invocation left, or delete them with --clean;
    their node logs go either way."""
    used = [d for d in run_dirs(args) if d.exists()]
    if used and not args.clean:
        print(
            f"launch_two_node_check: {', '.join(map(str, used))} already "
            f"exist{'s' if len(used) == 1 else ''} (an earlier run, whose metrics would be "
            "read as this one's): give another --work, or --clean to delete them first",
            file=sys.stderr,
        )
        sys.exit(2)
    for run in used:
        shutil.rmtree(run)
    for run in run_dirs(args):
        for log in (node_log(args, run), *args.work.glob(f"{run.name}-node*.log")):
            log.unlink(missing_ok=True)


def wait_nodes(nodes: list[Any], timeout: float, grace: float) -> list[int | None]:
    """Each process's exit status; those still running after ``timeout`` (all together)
    get SIGINT (a terminal's Ctrl-C: zeroplan stops its ranks), SIGKILL after ``grace``,
    and read None."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    late = [p for p in nodes if p.poll() is None]
    for p in late:
        os.killpg(p.pid, signal.SIGINT)  # each leads its own session (start_new_session)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in late) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in late:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return [None if p in late else p.returncode for p in nodes]


def last_line(path: Path) -> str | None:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else None


def ranks_left(run: Path) -> list[int]:
    left = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run).encode() in entry.read_bytes():
                left.append(int(entry.parent.name))
        except OSError:
            continue
    return left


def one_way(via: str, args: argparse.Namespace) -> dict[str, Any]:
    run = args.work / via
    row: dict[str, Any] = {
        "via": via,
        "setup": "ddp" if args.zero is None else f"zero{args.zero}",
        "network_path": args.network_path,
    }
    steps = ["--max-steps", str(args.steps), "--save-steps", str(args.save_steps)]
    nodes = [start(via, r, args, run, steps) for r in (0, 1)]
    t0 = time.time()
    while all(p.poll() is None for p in nodes) and time.time() - t0 < args.timeout:
        done = [m["step"] for m in metrics(run) if m["event"] == "train"]
        if done and max(done) >= args.save_steps + 3:
            nodes[1].send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    row["interrupt_rc"] = wait_nodes(nodes, args.grace, args.grace)
    row["left_after_interrupt"] = ranks_left(run)
    ends = {m["rank"]: m["step"] for m in metrics(run) if m["event"] == "end"}
    row["interrupted_at_step"] = ends
    row["checkpoints"] = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    nodes = [start(via, r, args, run, ["--resume", *steps]) for r in (0, 1)]
    row["resume_rc"] = wait_nodes(nodes, args.timeout, args.grace)
    lines = metrics(run)
    row["last_step"] = max((m["step"] for m in lines if m["event"] == "train"), default=None)
    row["ranks_logged"] = sorted({m["rank"] for m in lines})
    peaks: dict[int, int] = {}
    for m in lines:
        if m.get("peak_allocated_bytes"):
            peaks[m["rank"]] = max(peaks.get(m["rank"], 0), m["peak_allocated_bytes"])
    row["measured_peak_allocated_bytes"] = peaks
    plan = json.loads((args.work / "plan.json").read_text())
    row["predicted_peak_allocated_bytes"] = plan["best"]["peak_allocated_bytes"]
    row["left_at_end"] = ranks_left(run)
    return row


def speed(args: argparse.Namespace, setup: TrainSetup, model: Path) -> list[dict[str, Any]]:
    """Tokens/s of ``setup`` as two one-GPU nodes against one node of the same two GPUs."""
    rows = []
    name = "ddp" if setup.zero is None else f"zero{setup.zero}"
    for layout, spec in (("one node", "2xH100"), ("two nodes", "2x1xH100")):
        plan_name = f"plan-{name}-{spec}"
        plan = tinyllm.plan_for(model, setup, parse_cluster(spec))
        (args.work / f"{plan_name}.json").write_text(json.dumps(plan, indent=2) + "\n")
        run = args.work / f"speed-{name}-{spec}"
        steps = ["--max-steps", str(args.speed_steps)]
        if layout == "one node":
            cmd = launch_cmd(args, run, plan_name, [*steps, "--launcher", "torchrun"])
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
            if args.tiny:
                env["CUDA_VISIBLE_DEVICES"] = ""
            one = spawn(cmd, node_log(args, run), env)
            rcs = wait_nodes([one], args.timeout, args.grace)
            logs = [node_log(args, run)]
        else:
            args.port, args.job = free_port(), str(int(time.time()) % 10**6)
            nodes = [start("flags", r, args, run, steps, plan_name) for r in (0, 1)]
            rcs = wait_nodes(nodes, args.timeout, args.grace)
            logs = [node_log(args, run, r) for r in (0, 1)]
        lines = metrics(run)
        ok = all(rc == 0 for rc in rcs)
        rows.append(
            {
                "speed": name,
                "layout": layout,
                "network_path": args.network_path and layout == "two nodes",
                "returncode": rcs,
                # a failed run's metrics (none, or some steps) are no speed
                "error": None if ok else [last_line(log) for log in logs],
                "tokens_per_s": steady_tokens_per_s(lines) if ok else None,
                "last_step": max((m["step"] for m in lines if m["event"] == "train"), default=None),
                "measured_peak_allocated_bytes": max(
                    (m.get("peak_allocated_bytes") or 0 for m in lines), default=None
                ),
                "predicted_peak_allocated_bytes": plan["best"]["peak_allocated_bytes"],
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--via", default="flags,slurm")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--grace", type=float, default=120.0)
    p.add_argument("--timeout", type=int, default=420)
    p.add_argument("--tiny", action="store_true", help="CPU check of this script")
    p.add_argument(
        "--speed",
        default="",
        help="ddp,zero2: tokens/s as two one-GPU nodes against one node of both GPUs, instead "
        "of the stop-and-resume check",
    )
    p.add_argument("--speed-steps", type=int, default=12)
    p.add_argument("--zero", type=int, choices=[2, 3], help="stop/resume under ZeRO-N, not DDP")
    p.add_argument(
        "--network-path",
        action="store_true",
        help="NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 for the two nodes (NCCL over sockets)",
    )
    p.add_argument(
        "--clean",
        action="store_true",
        help="delete the run folders an earlier invocation left under --work (else refused)",
    )
    args = p.parse_args()
    args.work = args.work.resolve()  # the nodes run in the repository, not here
    args.work.mkdir(parents=True, exist_ok=True)
    fresh_run_dirs(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = args.work / "model"
    if not (model / "config.json").exists():
        (tinyllm.build_model_dir if args.tiny else build_model)(model)
    rows = tinyllm.alpaca_records(60) if args.tiny else records(800)
    tinyllm.write_jsonl(args.work / "data.jsonl", rows)
    seq = 64 if args.tiny else 768
    setup = TrainSetup(method="lora", micro_batch=4, seq_len=seq, grad_ckpt=True, optim="adamw")
    if args.zero is not None:
        setup = dataclasses.replace(setup, zero=args.zero, autocast=None)
    plan = tinyllm.plan_for(model, setup, parse_cluster("2x1xH100"))
    (args.work / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    if args.speed:
        for name in args.speed.split(","):
            zero = None if name == "ddp" else int(name.removeprefix("zero"))
            # autocast=None: the loop's choice again, which DeepSpeed turns off
            one = dataclasses.replace(setup, zero=zero, autocast=None)
            for row in speed(args, one, model):
                row["versions"] = versions()
                print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        return
    for via in args.via.split(","):
        args.port, args.job = free_port(), str(int(time.time()) % 10**6)
        row = one_way(via, args) | {"versions": versions()}
        print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
