"""zeroplan launch on a real GPU: the QLoRA story's setup, trained through the real stack.

    python benchmarks/launch_gpu_check.py --work /tmp/lc --out $OUT/launch_h100.jsonl \
        [--arch meta-llama--Meta-Llama-3-8B-Instruct] [--runs baseline,story,planned] [--steps 20]

Builds a random-weight model of a catalog architecture (default Llama-3.2-1B) with the
vocabulary of a small tokenizer built in code (no network on the GPU machine), writes
synthetic alpaca records long enough to fill most of the sequence, and runs, in order:

    baseline  the story's own TRL script (benchmarks/story_qlora_baseline.py), for tokens/s
    story     through ``zeroplan launch``: qlora, NF4 + double quant, r=16 on q/k/v/o,
              micro-batch 1 × accumulation 8, seq 768, paged AdamW 8-bit (the story's setup)
    planned   the same job (qlora r=16 q/k/v/o, seq 768, 8 sequences per step) as
              ``zeroplan plan`` chooses it for this GPU, then ``zeroplan launch``
    lora      lora all-linear, micro-batch 4, seq 768, checkpointing
    moe-attn  lora on q/k/v/o, micro-batch 4, seq 768 (for a mixture of experts)
    moe-all   lora all-linear with dropout 0, micro-batch 4, seq 768 (likewise)
    moe-all-ckpt  the same with gradient checkpointing (a deep cut whose bank copies do
              not fit without it)
    moe-qlora-attn  qlora (NF4 attention; the expert banks and router stay bf16) on q/k/v/o,
              micro-batch 4, seq 768
    moe-attn-router  lora on q/k/v/o and the router ``gate``, dropout 0, micro-batch 4,
              seq 768
    moe-host  lora on q/k/v/o, micro-batch 1, seq 1024: a step the speed model calls
              host-bound on an 8-layer Qwen3-30B-A3B cut (H100 and H200), its records
              packed about 99% full

``--tiny`` rehearses the MoE runs on the CPU: a tiny Qwen3-MoE at seq 128, planned for one
H100 and launched with ``--force``. ``--deadline`` skips the runs that would start with less
than 20 s of it left and shortens the last one's timeout to what is left.

For each launched run: the estimate's peak allocated against the peak the ranks measured
(metrics.jsonl), tokens/s after the first 3 steps against the plan's prediction, the loss
curve, exit code, and the run folder's report PNG. One JSON line per run, with versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402
from gpu_fixtures import (  # noqa: E402
    WARMUP_STEPS,
    build_model,
    metrics,
    records,
    steady_tokens_per_s,
    versions,
    write_plan,
)

from zeroplan.trainsetup import TrainSetup  # noqa: E402

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
RUNS = {
    "story": TrainSetup(
        method="qlora",
        micro_batch=1,
        grad_accum=8,
        seq_len=768,
        lora_targets=QKVO,
        optim="paged_adamw_8bit",
    ),
    "lora": TrainSetup(method="lora", micro_batch=4, seq_len=768, grad_ckpt=True),
    # mixture of experts (issue 29; --arch Qwen--Qwen3-30B-A3B --layers 8): attention, and
    # all-linear with dropout 0 (PEFT takes none on the banks it wraps as parameters)
    "moe-attn": TrainSetup(method="lora", micro_batch=4, seq_len=768, lora_targets=QKVO),
    "moe-all": TrainSetup(method="lora", micro_batch=4, seq_len=768, lora_dropout=0.0),
    "moe-all-ckpt": TrainSetup(
        method="lora", micro_batch=4, seq_len=768, lora_dropout=0.0, grad_ckpt=True
    ),
    # the target sets the plan offers that nothing had launched (benchmarks/moe_targets_gpu.sh):
    # QLoRA on attention, attention + router (dropout 0: PEFT's ParamWrapper takes none), and
    # a host-bound step (one sequence per micro-batch: the host's per-layer cost sets the pace)
    "moe-qlora-attn": TrainSetup(method="qlora", micro_batch=4, seq_len=768, lora_targets=QKVO),
    "moe-attn-router": TrainSetup(
        method="lora", micro_batch=4, seq_len=768, lora_targets=(*QKVO, "gate"), lora_dropout=0.0
    ),
    "moe-host": TrainSetup(method="lora", micro_batch=1, seq_len=1024, lora_targets=QKVO),
}
# the story's job, left for the planner to set up: `zeroplan plan` arguments
PLANNED = [
    "--method",
    "qlora",
    "--seq-len",
    "768",
    "--global-batch",
    "8",
    "--lora-targets",
    ",".join(QKVO),
]


def planner_plan(run: Path, model: Path) -> Path:
    """plan.json as ``zeroplan plan`` writes it for the story's job on this machine."""
    folder = run.parent / f"{run.name}-plan"
    cmd = [sys.executable, "-m", "zeroplan", "plan", str(model / "config.json"), *PLANNED]
    done = subprocess.run([*cmd, "-o", str(folder)], capture_output=True, text=True, cwd=ROOT)
    print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
    done.check_returncode()
    return folder / "plan.json"


def launch(
    name: str,
    plan: Path,
    model: Path,
    data: Path,
    run: Path,
    args: Any,
    timeout: float = 0.0,
    steps: int = 0,
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "zeroplan", "launch", str(plan), "--data", str(data)]
    cmd += ["-o", str(run), "--max-steps", str(steps or args.steps), "--model", str(model)]
    cmd += ["--logging-steps", "1", *(["--force"] if getattr(args, "tiny", False) else [])]
    start = time.time()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout or args.timeout, cwd=ROOT
        )
        rc, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:  # what it wrote until then is still read below
        rc, err = 124, str(exc.stderr or "")
    wall = time.time() - start
    lines = metrics(run)
    peaks = [m.get("peak_allocated_bytes") or 0 for m in lines]
    report = subprocess.run(
        [sys.executable, "-m", "zeroplan", "report", str(run)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    best = json.loads(plan.read_text())["best"]
    # with the speed band the plan quoted for the step (None where it quoted none)
    keys = ("peak_allocated_bytes", "device_used_bytes", "required_bytes", "tokens_per_s")
    predicted = {k: best.get(k) for k in (*keys, "error_p90", "host_bound")}
    measured_tps = steady_tokens_per_s(lines)
    applied = run / "applied.json"
    return {
        "run": name,
        "setup": best["setup"],
        "returncode": rc,
        "wall_s": wall,
        "predicted": predicted,
        "measured_peak_allocated_bytes": max(peaks) if peaks else None,
        "error": (predicted["peak_allocated_bytes"] / max(peaks) - 1)
        if peaks and max(peaks)
        else None,
        "tokens_per_s": measured_tps,
        "timed_from_step": WARMUP_STEPS,
        "losses": [
            {"step": m["step"], "loss": m["loss"]}
            for m in lines
            if m["event"] == "train" and m["rank"] == 0
        ],
        "metric_lines": len(lines),
        "applied": json.loads(applied.read_text()) if applied.exists() else None,
        "report_rc": report.returncode,
        "report_out": (report.stdout + report.stderr)[-500:],
        "stderr_tail": err[-2000:],
    }


def gpu_info() -> dict[str, str | None]:
    """The card and driver the runs were timed on (None on the CPU)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.splitlines()[0]
        gpu, driver = (x.strip() for x in out.split(","))
        return {"gpu": gpu, "driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"gpu": None, "driver": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="meta-llama--Llama-3.2-1B", help="catalog file name")
    p.add_argument(
        "--runs",
        default="story,lora",
        help="baseline,story,planned,lora; NAME:STEPS for more steps",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--records", type=int, default=400)
    p.add_argument("--timeout", type=int, default=400, help="seconds per run")
    p.add_argument("--layers", type=int, default=None, help="cut the model to N layers")
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen3-MoE (CPU rehearsal)")
    p.add_argument("--deadline", type=float, default=0.0, help="seconds for all runs (0: none)")
    args = p.parse_args()
    began = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = args.work / "model"
    if not (model / "config.json").exists():
        t = time.time()
        if args.tiny:
            arch = {**tinyllm.TINY_QWEN3_MOE, "num_hidden_layers": args.layers or 2}
            tinyllm.build_model_dir(model, arch=arch)
        else:
            build_model(model, args.arch, layers=args.layers)
        print(f"built {args.arch} in {time.time() - t:.0f}s", flush=True)
    texts = records(40, 10, 30) if args.tiny else records(args.records)
    data = tinyllm.write_jsonl(args.work / "data.jsonl", texts)
    env = {"arch": args.arch, "layers": args.layers, "versions": versions(), **gpu_info()}
    for item in args.runs.split(","):
        name, _, steps = item.partition(":")  # NAME:STEPS overrides --steps for that run
        if name == "baseline":
            script = ROOT / "benchmarks" / "story_qlora_baseline.py"
            cmd = [sys.executable, str(script), "--model", str(model), "--data", str(data)]
            cmd += ["--steps", str(args.steps), "--out", str(args.out), "--tag", args.arch]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            print(f"baseline rc={done.returncode}", done.stdout[-1500:], done.stderr[-3000:])
            continue
        run = args.work / name
        left = args.deadline - (time.time() - began) if args.deadline else args.timeout
        if left < 20:
            print(f"{name}: skipped, {left:.0f} s of the deadline left", flush=True)
            continue
        if name == "planned":
            plan = planner_plan(run, model)
        elif args.tiny:  # planned for one H100 at a length the CPU trains in seconds
            plan = run.parent / f"{run.name}-plan.json"
            write_plan(plan, model, dataclasses.replace(RUNS[name], seq_len=128), 1)
        else:
            plan = run.parent / f"{run.name}-plan.json"
            write_plan(plan, model, RUNS[name], None)
        timeout = min(args.timeout, left)
        row = launch(name, plan, model, data, run, args, timeout, int(steps or 0)) | env
        keys = ("run", "returncode", "measured_peak_allocated_bytes", "predicted", "error")
        print(json.dumps({k: row[k] for k in (*keys, "tokens_per_s")}), flush=True)
        if row["returncode"] != 0:
            print(row["stderr_tail"], flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
