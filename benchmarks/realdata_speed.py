"""Real data at full speed: launched runs on variable-length records against the same setup on
full-length records, the plan's prediction against what ran, and the story's baselines.

    python benchmarks/realdata_speed.py --work /tmp/rd --out $OUT/realdata.jsonl \
        --arch meta-llama--Meta-Llama-3-8B-Instruct --method qlora --global-batch 8 \
        --lora-targets q_proj,k_proj,v_proj,o_proj \
        --runs full,alpaca,alpaca-mask,alpaca-padded,lognormal,story,trl-packing --steps 14

Builds a random-weight model of a catalog architecture with a small tokenizer built in code
(no network on the GPU machine) and three record sets (alpaca-like answers of 120-260 words;
a long-tail chat distribution, log-normal lengths from ~30 tokens to the cap; and records
that all fill the cap), plans the job with ``zeroplan plan MODEL --data alpaca.jsonl`` (the
data-aware plan: sequence cap from the longest record, packed micro-batches), then launches
that one plan.json on each record set:

    full           full-length records (every sample ≈ the cap): the reference speed
    alpaca         the alpaca-like records, packed, varlen flash attention (the default)
    alpaca-mask    the same, packed, SDPA block-diagonal mask
    alpaca-padded  the same, padded to the longest of each micro-batch (zeroplan before)
    lognormal      the long-tail chat records, packed, varlen
    alpaca-omp1    alpaca with OMP_NUM_THREADS=1 (torchrun's default for several ranks: a
                   CPU-offloaded optimizer's threads before zeroplan launch set them)
    alpaca-omp8    alpaca with OMP_NUM_THREADS=8 (a point between, for CPU Adam's model)
    story          benchmarks/story_qlora_baseline.py: the story's script as written
                   (TrainingArguments converted the way TRL converts them)
    trl-packing    the same job with TRL's own packing (bfd, padding-free), micro-batch 8

Tokens/s counts real (non-padding) tokens, over the steps after the first 3, as every rank
logs them (``--logging-steps 1``); each row keeps the per-step rates (their spread), the
loss curve, the peak allocated memory and the plan's prediction for that run (the plan's
tokens/s per token position × the run's packing fill). One JSON line per run, with versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
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
)

from zeroplan.hardware import usable_cpu_cores  # noqa: E402

# the launcher sets expandable segments unless the variable is set: this turns them off
NO_EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
LAUNCHED = {
    # name: (data set, extra launch options)
    "full": ("full", []),
    "alpaca-noexp": ("alpaca", ["--batching", "packed"]),
    "alpaca": ("alpaca", ["--batching", "packed"]),
    "alpaca-mask": ("alpaca", ["--batching", "packed", "--packed-attention", "mask"]),
    "alpaca-padded": ("alpaca", ["--batching", "padded"]),
    "lognormal": ("lognormal", ["--batching", "packed"]),
    "lognormal-padded": ("lognormal", ["--batching", "padded"]),
    "alpaca-omp1": ("alpaca", ["--batching", "packed"]),
    "alpaca-omp8": ("alpaca", ["--batching", "packed"]),
}
# runs that differ from another only in their environment
RUN_ENV = {
    "alpaca-noexp": NO_EXPANDABLE,
    # torchrun's one OpenMP thread per rank (what a CPU-offloaded optimizer stepped on
    # before zeroplan launch set OMP_NUM_THREADS): the same launch, the old way
    "alpaca-omp1": {"OMP_NUM_THREADS": "1"},
    "alpaca-omp8": {"OMP_NUM_THREADS": "8"},  # a point between, for the model's thread term
}
BASELINES = ("story", "trl-packing")


def words() -> list[str]:
    return " ".join(tinyllm.CORPUS).split()


def lognormal_records(n: int, max_words: int, seed: int = 1) -> list[dict[str, str]]:
    """Chat records whose answers are log-normal in length (median ~60 words, a long tail),
    from a few words up to ``max_words``: most records short, a few near the cap."""
    rng = random.Random(seed)
    pool = words()
    out = []
    for _ in range(n):
        k = max(3, min(max_words, int(rng.lognormvariate(math.log(60), 0.9))))
        answer = " ".join(rng.choice(pool) for _ in range(k))
        out.append({"instruction": "Answer briefly.", "input": "", "output": answer})
    return out


def full_records(n: int, n_words: int, seed: int = 2) -> list[dict[str, str]]:
    """Records of one length, just under the cap: every sample fills its share of a batch."""
    rng = random.Random(seed)
    pool = words()
    return [
        {
            "instruction": "Write a long answer.",
            "input": "",
            "output": " ".join(rng.choice(pool) for _ in range(n_words)),
        }
        for _ in range(n)
    ]


def zeroplan(
    *args: str,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    code: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m zeroplan ARGS`` run from the tree ``code`` (this one by default: ``-m``
    imports the package of the working directory first)."""
    return subprocess.run(
        [sys.executable, "-m", "zeroplan", *args],
        capture_output=True,
        text=True,
        cwd=code or ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def token_lengths(model: Path, data: Path) -> list[int]:
    from zeroplan.datatokens import load_tokenizer, token_lengths

    profile, _ = token_lengths(str(data), load_tokenizer(model))
    return list(profile.lengths)


def words_for(model: Path, work: Path, cap: int) -> int:
    """The most answer words whose records stay within ``cap`` tokens with this tokenizer."""
    lo, hi = 10, 4 * cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        probe = work / "probe.jsonl"
        tinyllm.write_jsonl(probe, full_records(64, mid))
        if max(token_lengths(model, probe)) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return lo


def rates(lines: list[dict[str, Any]]) -> list[float]:
    """Per-step real tokens/s of all ranks together, after the warm-up steps."""
    by_step: dict[int, float] = {}
    for m in lines:
        if m["event"] == "train" and m["step"] > WARMUP_STEPS and m.get("tokens_per_s"):
            by_step[m["step"]] = by_step.get(m["step"], 0.0) + m["tokens_per_s"]
    return [by_step[s] for s in sorted(by_step)]


def launch(name: str, plan: Path, model: Path, data: Path, work: Path, args: Any) -> dict[str, Any]:
    run = work / f"run-{name}"
    extra = LAUNCHED[name][1]
    start = time.time()
    done = zeroplan(
        "launch", str(plan), "--data", str(data), "-o", str(run), "--model", str(model),
        "--max-steps", str(args.steps), "--logging-steps", "1", "--no-dashboard", *extra,
        *(["--force"] if args.arch == "tiny" else []), timeout=args.timeout,
        env=RUN_ENV.get(name),
    )  # fmt: skip
    wall = time.time() - start
    lines = metrics(run)
    applied_file = run / "applied.json"
    applied = json.loads(applied_file.read_text()) if applied_file.exists() else {}
    best = json.loads(plan.read_text())["best"]
    batching = applied.get("batching") or {}
    step_rates = rates(lines)
    peaks = [m.get("peak_allocated_bytes") or 0 for m in lines]
    paddings = [m["padding"] for m in lines if m.get("padding") is not None]
    # the plan's rate per token position, at this run's fill (padded runs: 1 − padding)
    per_slot = best["tokens_per_s"] / best.get("fill", 1.0)
    fill = batching.get("fill")
    if fill is None and paddings:
        fill = 1 - statistics.mean(paddings)
    return {
        "run": name,
        "data": LAUNCHED[name][0],
        "env_overrides": RUN_ENV.get(name, {}),
        "returncode": done.returncode,
        "wall_s": round(wall, 1),
        "setup": best["setup"],
        "batching": batching,
        "tokens_per_s": steady_tokens_per_s(lines),
        "step_rates": [round(r) for r in step_rates],
        "step_rate_median": statistics.median(step_rates) if step_rates else None,
        "step_rate_min": min(step_rates) if step_rates else None,
        "step_rate_max": max(step_rates) if step_rates else None,
        "timed_steps": len(step_rates),
        "padding_mean": statistics.mean(paddings) if paddings else None,
        "fill": fill,
        "predicted_tokens_per_s": per_slot * fill if fill else None,
        "predicted_peak_allocated_bytes": best["peak_allocated_bytes"],
        "measured_peak_allocated_bytes": max(peaks) if peaks else None,
        # the first line's peak covers loading the model too: the steps alone, after it
        "measured_peak_after_first_line": max(peaks[1:]) if len(peaks) > 1 else None,
        "peaks": peaks,
        "memory_after_load": applied.get("gpu_memory_after_load"),
        "losses": [
            {"step": m["step"], "loss": m["loss"]}
            for m in lines
            if m["event"] == "train" and m["rank"] == 0 and m.get("loss") is not None
        ],
        "data_summary": applied.get("data"),
        "stderr_tail": done.stderr[-1500:],
    }


def baseline(name: str, model: Path, data: Path, work: Path, args: Any) -> dict[str, Any]:
    out = work / f"{name}.jsonl"
    mode = "story" if name == "story" else "trl-packing"
    cmd = [sys.executable, str(ROOT / "benchmarks/story_qlora_baseline.py"), "--model", str(model)]
    cmd += ["--data", str(data), "--steps", str(args.steps), "--out", str(out), "--mode", mode]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    row: dict[str, Any] = {"run": name, "data": "alpaca", "returncode": done.returncode}
    if out.exists():
        row.update(json.loads(out.read_text().splitlines()[-1]))
        row["run"] = name
    row["wall_s"] = round(time.time() - start, 1)
    row["stderr_tail"] = done.stderr[-1500:]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--arch", default="meta-llama--Llama-3.2-1B", help="catalog file name, or tiny (CPU)"
    )
    p.add_argument("--method", default="lora", choices=("lora", "qlora", "full"))
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--gpus", default=None, help="plan for this cluster (default: this machine)")
    p.add_argument("--runs", default=",".join([*LAUNCHED, *BASELINES]))
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--timeout", type=int, default=400, help="seconds per run")
    p.add_argument(
        "--full-vocab",
        action="store_true",
        help="the architecture's own vocabulary (the tokenizer uses its first ids): the real "
        "logits, so the plan weighs the fused loss as for the real model",
    )
    p.add_argument("--plan-args", default="", help="more options for zeroplan plan, one string")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    model = args.work / "model"
    if not (model / "config.json").exists():
        if args.arch == "tiny":  # a rehearsal on the CPU
            tinyllm.build_model_dir(model)
        else:
            build_model(model, args.arch, full_vocab=args.full_vocab)
    print(f"model ready in {time.time() - t0:.0f} s", flush=True)
    sets = {"alpaca": args.work / "alpaca.jsonl", "lognormal": args.work / "lognormal.jsonl"}
    tinyllm.write_jsonl(sets["alpaca"], records(args.records))

    # the data-aware plan of the job on the alpaca records
    plan_dir = args.work / "plan"
    plan_args = ["plan", str(model), "--data", str(sets["alpaca"]), "--method", args.method]
    plan_args += ["--global-batch", str(args.global_batch), "--lora-targets", args.lora_targets]
    plan_args += ["-o", str(plan_dir)] + (["--gpus", args.gpus] if args.gpus else [])
    plan_args += args.plan_args.split()
    if args.method == "lora":
        plan_args.append("--no-quantization")
    t = time.time()
    done = zeroplan(*plan_args)
    plan_s = time.time() - t
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    done.check_returncode()
    plan = plan_dir / "plan.json"
    planned = json.loads(plan.read_text())
    cap = planned["request"]["seq_len"]
    tinyllm.write_jsonl(sets["lognormal"], lognormal_records(args.records * 3, max_words=cap))
    sets["full"] = args.work / "full.jsonl"
    full = full_records(args.records * 2, words_for(model, args.work, cap))
    tinyllm.write_jsonl(sets["full"], full)
    lengths = {k: token_lengths(model, v) for k, v in sets.items()}
    common = {
        "arch": args.arch,
        "method": args.method,
        "global_batch": args.global_batch,
        "plan_seconds": round(plan_s, 2),
        "plan_best": planned["best"],
        "plan_data": planned["data"],
        "data_lengths": {
            k: {"n": len(v), "mean": statistics.mean(v), "min": min(v), "max": max(v)}
            for k, v in lengths.items()
        },
        "gpu": _gpu_name(),
        "cpu_cores": usable_cpu_cores(),
        "versions": versions(),
    }
    for name in args.runs.split(","):
        t = time.time()
        if name in LAUNCHED:
            row = launch(name, plan, model, sets[LAUNCHED[name][0]], args.work, args)
        elif name in BASELINES:
            row = baseline(name, model, sets["alpaca"], args.work, args)
        else:
            raise SystemExit(f"unknown run {name}")
        row.update(common)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        keys = ("run", "returncode", "tokens_per_s", "predicted_tokens_per_s", "fill")
        print(
            json.dumps({k: row.get(k) for k in keys}),
            f"peak {row.get('measured_peak_allocated_bytes')} vs "
            f"{row.get('predicted_peak_allocated_bytes')}; {time.time() - t:.0f} s",
            flush=True,
        )
        if row.get("returncode"):
            print(row.get("stderr_tail"), flush=True)


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


if __name__ == "__main__":
    main()
