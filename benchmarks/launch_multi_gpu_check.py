"""zeroplan launch on several GPUs under DeepSpeed ZeRO: train, Ctrl-C, resume, watch.

    python benchmarks/launch_multi_gpu_check.py --work /tmp/mg --out $OUT/launch_2gpu.jsonl \
        [--zero 2,3] [--steps 30]

For each ZeRO stage: a LoRA run of a random-weight Llama-3.2-1B architecture (the
vocabulary of a small tokenizer built in code: no network on the GPU machine) on every
visible GPU through ``zeroplan launch`` (the deepspeed launcher), checkpointing every
--save-steps. While it trains, ``zeroplan watch RUN --once --json`` is sampled from a
second process, as a user's second terminal would. Once a checkpoint exists and a few more
steps have run, the launch's whole process group gets SIGINT, as a terminal's Ctrl-C does.
Then: the exit status (130 expected), whether any rank process is left, the last
checkpoint's files; ``zeroplan launch RUN --resume`` to the end; the adapter's tensors
(non-empty: ZeRO-3 must gather them to save); the first step trained after the resume;
each rank's peak allocated against the plan's estimate; tokens/s against the plan's.

``--tiny`` runs the same sequence on the CPU (a tiny Llama, DDP over gloo, --force): it
checks this script, not DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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
    write_plan,
)

from zeroplan.trainsetup import TrainSetup  # noqa: E402

ZP = [sys.executable, "-m", "zeroplan"]


def rank_processes() -> list[str]:
    """Command lines of any per-rank program still alive on this machine."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "zeroplan.launch.sft" in line]


def checkpoints(run: Path) -> list[str]:
    folder = run / "checkpoints"
    names = [p.name for p in folder.glob("checkpoint-*")] if folder.exists() else []
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))


def adapter_tensors(final: Path) -> dict[str, Any]:
    """How many tensors the saved adapter holds and which are empty (ZeRO-3 saves its
    partitioned parameters as 0-element tensors unless they are gathered first)."""
    from safetensors import safe_open

    path = final / "adapter_model.safetensors"
    if not path.exists():
        return {"tensors": 0, "empty": []}
    with safe_open(str(path), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    empty = [k for k, shape in shapes.items() if 0 in shape or not shape]
    return {"tensors": len(shapes), "empty": empty, "elements": sum(_n(s) for s in shapes.values())}


def _n(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def one_stage(zero: int | None, args: argparse.Namespace, model: Path, data: Path) -> dict:
    name = f"zero{zero}" if zero is not None else "ddp"
    run = args.work / name
    setup = TrainSetup(
        method="lora",
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        grad_ckpt=True,
        zero=zero,
        optim="adamw",
    )
    plan_path = args.work / f"{name}-plan.json"
    plan = write_plan(plan_path, model, setup, 2 if args.tiny else None)
    base = ["--data", str(data), "--max-steps", str(args.steps), "--logging-steps", "1"]
    base += ["--save-steps", str(args.save_steps), "--model", str(model)]
    if args.tiny:
        base += ["--force", "--gpus", "2"]
    row: dict[str, Any] = {"run": name, "setup": setup.to_dict(), "predicted": plan["best"]}

    # ---- 1. train, watched from a second process, then Ctrl-C (SIGINT to the process group)
    log1 = (args.work / f"{name}-launch1.log").open("w")
    start = time.time()
    proc = subprocess.Popen(
        [*ZP, "launch", str(plan_path), "-o", str(run), *base],
        stdout=log1,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    interrupt_after = args.save_steps + 3
    watch_once: dict[str, Any] | None = None
    while proc.poll() is None and time.time() - start < args.timeout:
        steps = [m["step"] for m in metrics(run) if m["event"] == "train"]
        if steps and watch_once is None and max(steps) >= 2:
            snap = subprocess.run(
                [*ZP, "watch", str(run), "--once", "--json"],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            watch_once = json.loads(snap.stdout) if snap.returncode == 0 else None
            row["watch_once_rc"] = snap.returncode
            row["watch_once_err"] = snap.stderr[-500:]
        if steps and max(steps) >= interrupt_after:
            break
        time.sleep(0.5)
    row["first_start_s"] = time.time() - start
    interrupted_at = max([m["step"] for m in metrics(run) if m["event"] == "train"] or [0])
    os.killpg(proc.pid, signal.SIGINT)
    t_sig = time.time()
    try:
        proc.wait(timeout=args.grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log1.close()
    time.sleep(1.0)
    row.update(
        interrupted_at_step=interrupted_at,
        interrupt_rc=proc.returncode,
        interrupt_exit_s=time.time() - t_sig,
        left_after_interrupt=rank_processes(),
        checkpoints_after_interrupt=checkpoints(run),
        launch1_tail=(args.work / f"{name}-launch1.log").read_text()[-2500:],
        watch_once=watch_once,
    )
    last = checkpoints(run)[-1:] or [None]
    if last[0] is not None:
        row["last_checkpoint_files"] = sorted(
            str(p.relative_to(run / "checkpoints" / last[0]))
            for p in (run / "checkpoints" / last[0]).rglob("*")
            if p.is_file()
        )

    # ---- 2. resume to the end
    before = len(metrics(run))
    start = time.time()
    done = subprocess.run(
        [*ZP, "launch", str(run), "--resume", *base],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=args.timeout,
    )
    after = [m for m in metrics(run)[before:] if m["event"] == "train"]
    row.update(
        resume_rc=done.returncode,
        resume_s=time.time() - start,
        resume_tail=(done.stdout + done.stderr)[-2500:],
        first_step_after_resume=min((m["step"] for m in after), default=None),
        last_step=max((m["step"] for m in after), default=None),
        left_after_resume=rank_processes(),
        adapter=adapter_tensors(run / "final"),
        result=json.loads((run / "result.json").read_text())
        if (run / "result.json").exists()
        else None,
    )
    # ---- 3. memory and speed against the plan
    lines = metrics(run)
    peaks: dict[int, int] = {}
    for m in lines:
        if m.get("peak_allocated_bytes"):
            peaks[m["rank"]] = max(peaks.get(m["rank"], 0), m["peak_allocated_bytes"])
    predicted_peak = plan["best"]["peak_allocated_bytes"]
    row.update(
        measured_peak_allocated_bytes=peaks,
        peak_error={r: predicted_peak / p - 1 for r, p in peaks.items() if p},
        tokens_per_s=steady_tokens_per_s(after),
        predicted_tokens_per_s=plan["best"]["tokens_per_s"],
        gpu_sample_lines=sum(1 for _ in (run / "gpu_samples.jsonl").open())
        if (run / "gpu_samples.jsonl").exists()
        else 0,
    )
    report = subprocess.run([*ZP, "report", str(run)], capture_output=True, text=True, cwd=ROOT)
    row["report_rc"], row["report_out"] = report.returncode, (report.stdout + report.stderr)[-800:]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--zero", default="2,3", help="stages, comma-separated; 'none' for DDP")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=768)
    p.add_argument("--grace", type=float, default=120.0, help="seconds to wait after SIGINT")
    p.add_argument("--timeout", type=int, default=300, help="seconds per launch")
    p.add_argument("--tiny", action="store_true", help="CPU check of this script")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = args.work / "model"
    if not (model / "config.json").exists():
        if args.tiny:
            tinyllm.build_model_dir(model)
        else:
            build_model(model)
    n = 60 if args.tiny else 800
    rows = tinyllm.alpaca_records(n) if args.tiny else records(n)
    data = tinyllm.write_jsonl(args.work / "data.jsonl", rows)
    env = {"versions": versions()}
    for stage in args.zero.split(","):
        zero = None if stage == "none" else int(stage)
        row = one_stage(zero, args, model, data) | env
        brief = (
            "run",
            "interrupt_rc",
            "interrupted_at_step",
            "left_after_interrupt",
            "checkpoints_after_interrupt",
            "resume_rc",
            "first_step_after_resume",
            "last_step",
            "adapter",
            "measured_peak_allocated_bytes",
            "peak_error",
            "tokens_per_s",
            "predicted_tokens_per_s",
            "gpu_sample_lines",
        )
        print(json.dumps({k: row.get(k) for k in brief}), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
