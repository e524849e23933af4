"""Where a launched run's time goes, against the lean training loop the planner's speed model
was fitted on; and where a ZeRO-3 run's memory peak is reached.

    python benchmarks/launch_overhead.py --work /tmp/ov --out $OUT/launch_overhead.jsonl \
        --profile $OUT/launch_overhead_profile.txt [--zero3]

On GPU 0, for a random-weight Llama-3.2-1B architecture (small vocabulary, as in
gpu_fixtures.py), LoRA all-linear, micro-batch 4, seq 768, checkpointing:

    lean     benchmarks/measure_memory.py: forward, backward, optimizer step on full-length
             random batches (what the speed model's efficiencies were fitted on)
    rank     the per-rank program ``python -m zeroplan.launch.sft`` run directly (no
             launcher) under cProfile on the synthetic alpaca records: seconds per step
             from its metrics, and the functions that took the time
    rank-unpadded  the same on 400 copies of one record: batches without padding (no
             attention mask), to tell the padded attention path from the Trainer's cost
    zero3    (--zero3, 2 GPUs) ``zeroplan launch`` of the same setup under ZeRO-3 for a few
             steps: every metrics line's peak (since the line before), and applied.json's
             memory once the model is loaded, to tell a load-time peak from a training one

One JSON line per part; the profile's top functions go to --profile.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import io
import itertools
import json
import os
import pstats
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

SETUP = dict(method="lora", micro_batch=4, seq_len=768, grad_ckpt=True, optim="adamw")


def lean(model: Path, work: Path) -> dict[str, Any]:
    out = work / "lean.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "measure_memory.py")]
    cmd += [str(model / "config.json"), "--method", "lora", "--micro-batch", "4"]
    cmd += ["--seq-len", "768", "--grad-ckpt", "--steps", "8", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0 or not out.exists():
        return {"part": "lean", "error": done.stderr[-2000:]}
    row = json.loads(out.read_text().splitlines()[-1])
    steady = row["step_seconds"][2:]
    return {
        "part": "lean",
        "step_seconds": row["step_seconds"],
        "tokens_per_s": 4 * 768 * len(steady) / sum(steady),
        "peak_allocated_bytes": row["peak_allocated_bytes"],
    }


def rank_direct(
    model: Path, data: Path, work: Path, profile_path: Path | None, name: str = "rank"
) -> dict[str, Any]:
    """The rank program in this process (world size 1), profiled."""
    from zeroplan.launch import sft

    plan = work / f"{name}-plan.json"
    write_plan(plan, model, TrainSetup(**SETUP), None)  # type: ignore[arg-type]
    run = work / name
    argv = ["--plan", str(plan), "--data", str(data), "--out", str(run), "--model", str(model)]
    argv += ["--max-steps", "20", "--logging-steps", "1"]
    prof = cProfile.Profile()
    start = time.time()
    prof.enable()
    rc = sft.main(argv)
    prof.disable()
    wall = time.time() - start
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)
    if profile_path is not None:
        profile_path.write_text(text.getvalue())
    lines = [m for m in metrics(run) if m["event"] == "train"]
    steps = [(b["t"] - a["t"]) for a, b in itertools.pairwise(lines)]
    return {
        "part": name,
        "rc": rc,
        "wall_s": wall,
        "step_seconds": steps,
        "tokens_per_s": steady_tokens_per_s(lines),
        "peak_allocated_bytes": max((m.get("peak_allocated_bytes") or 0) for m in lines),
    }


def zero3(model: Path, data: Path, work: Path, max_live: int | None, steps: int) -> dict[str, Any]:
    name = "zero3" if max_live is None else f"zero3-live{max_live:.0e}"
    plan = work / f"{name}-plan.json"
    setup = TrainSetup(**SETUP, zero=3)  # type: ignore[arg-type]
    if max_live is not None:
        setup = dataclasses.replace(setup, stage3_max_live_elems=max_live)
    predicted = write_plan(plan, model, setup, None)["best"]
    run = work / name
    cmd = [sys.executable, "-m", "zeroplan", "launch", str(plan), "--data", str(data)]
    cmd += [
        "-o",
        str(run),
        "--model",
        str(model),
        "--max-steps",
        str(steps),
        "--logging-steps",
        "1",
    ]
    cmd += ["--no-dashboard"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    applied = run / "applied.json"
    return {
        "part": name,
        "stage3_max_live_elems": setup.stage3_max_live_elems,
        "rc": done.returncode,
        "tail": (done.stdout + done.stderr)[-1500:],
        "predicted_peak_allocated_bytes": predicted["peak_allocated_bytes"],
        "metrics": [
            {
                k: m.get(k)
                for k in ("rank", "step", "event", "peak_allocated_bytes", "mem_allocated_bytes")
            }
            for m in metrics(run)
        ],
        "after_load": json.loads(applied.read_text()).get("gpu_memory_after_load")
        if applied.exists()
        else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--zero3", action="store_true")
    p.add_argument(
        "--max-live",
        default="",
        help="ZeRO-3 only, for each stage3_max_live_parameters (comma-separated; 'd' default)",
    )
    p.add_argument("--steps", type=int, default=8, help="ZeRO-3 steps")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "model"
    if not (model / "config.json").exists():
        build_model(model)
    data = tinyllm.write_jsonl(args.work / "data.jsonl", records(400))
    # ZeRO-3 first: the profiled rank below keeps its CUDA context on GPU 0 until the end
    parts = [lambda: zero3(model, data, args.work, None, args.steps)] if args.zero3 else []
    if args.max_live:
        lives = [None if v == "d" else int(float(v)) for v in args.max_live.split(",")]
        parts = [functools.partial(zero3, model, data, args.work, v, args.steps) for v in lives]
    else:
        parts.append(lambda: lean(model, args.work))
        parts.append(lambda: rank_direct(model, data, args.work, args.profile))
        # every record alike: no padding, so no attention mask (causal SDPA, as in the lean
        # loop); tells the cost of padded batches from the Trainer's own
        alike = tinyllm.write_jsonl(args.work / "alike.jsonl", records(1) * 400)
        parts.append(lambda: rank_direct(model, alike, args.work, None, "rank-unpadded"))
    env = {"versions": versions()}
    for part in parts:
        os.environ.pop("RANK", None)
        row = part() | env
        print(json.dumps({k: v for k, v in row.items() if k not in ("metrics", "versions")}))
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
