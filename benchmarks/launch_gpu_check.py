"""zeroplan launch on a real GPU: the QLoRA story's setup, trained through the real stack.

    python benchmarks/launch_gpu_check.py --work /tmp/lc --out $OUT/launch_h100.jsonl [--steps 20]

Builds a random-weight model with the Llama-3.2-1B architecture (the vocabulary of a small
tokenizer built in code: no network on the GPU machine), writes synthetic alpaca records
long enough to fill the sequence, and launches, through ``zeroplan launch`` (torchrun,
per-rank logs, the dashboard recording NVML samples):

    story   qlora, NF4 + double quant, r=16 on q/k/v/o, micro-batch 1 × accumulation 8,
            seq 768, paged AdamW 8-bit (the QLoRA story's configuration)
    lora    lora all-linear, micro-batch 4, seq 768, checkpointing

For each: the estimate's peak allocated for the same config.json against the peak the
ranks measured (metrics.jsonl), tokens/s, exit code, and the run folder's report PNG.
One JSON line per run, with the environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402
from gpu_fixtures import build_model, records  # noqa: E402

from zeroplan.hardware import local_cluster  # noqa: E402
from zeroplan.models import load_model  # noqa: E402
from zeroplan.planner import Plan, PlanRequest, evaluate, plan_json  # noqa: E402
from zeroplan.trainsetup import TrainSetup  # noqa: E402

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
RUNS = {
    "story": dict(
        method="qlora",
        micro_batch=1,
        grad_accum=8,
        seq_len=768,
        lora_targets=QKVO,
        optim="paged_adamw_8bit",
    ),
    "lora": dict(method="lora", micro_batch=4, seq_len=768, grad_ckpt=True),
}


def write_plan(run: Path, model: Path, setup: dict[str, object]) -> tuple[Path, dict[str, int]]:
    spec = load_model(str(model / "config.json"))
    cluster = local_cluster()
    assert cluster is not None, "no GPU"
    chosen = TrainSetup(**setup)  # type: ignore[arg-type]
    req = PlanRequest(
        spec=spec,
        cluster=cluster,
        method=chosen.method,
        seq_len=chosen.seq_len,
        lora_targets=chosen.lora_targets,
    )
    best = evaluate(req, chosen)
    run.mkdir(parents=True, exist_ok=True)
    path = run.parent / f"{run.name}-plan.json"
    path.write_text(json.dumps(plan_json(Plan(req, best, [best], {}, 1)), indent=2) + "\n")
    est = best.estimate
    return path, {
        "peak_allocated_bytes": est.peak_allocated_bytes,
        "device_used_bytes": est.device_used_bytes,
        "required_bytes": est.required_bytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "model"
    if not (model / "config.json").exists():
        build_model(model)
    data = tinyllm.write_jsonl(args.work / "data.jsonl", records(400))
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "deepspeed", "accelerate"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    for name, setup in RUNS.items():
        run = args.work / name
        plan, predicted = write_plan(run, model, setup)
        cmd = [sys.executable, "-m", "zeroplan.cli", "launch", str(plan), "--data", str(data)]
        cmd += ["-o", str(run), "--max-steps", str(args.steps), "--model", str(model)]
        start = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
        wall = time.time() - start
        metrics = []
        mfile = run / "metrics.jsonl"
        if mfile.exists():
            metrics = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
        peaks = [m.get("peak_allocated_bytes") or 0 for m in metrics]
        tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
        report = subprocess.run(
            [sys.executable, "-m", "zeroplan.cli", "report", str(run)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        row = {
            "run": name,
            "setup": setup,
            "returncode": done.returncode,
            "wall_s": wall,
            "predicted": predicted,
            "measured_peak_allocated_bytes": max(peaks) if peaks else None,
            "error": (predicted["peak_allocated_bytes"] / max(peaks) - 1)
            if peaks and max(peaks)
            else None,
            "tokens_per_s_last": tps[-1] if tps else None,
            "metric_lines": len(metrics),
            "report_rc": report.returncode,
            "report_out": (report.stdout + report.stderr)[-500:],
            "stderr_tail": done.stderr[-2000:],
            "versions": versions,
        }
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in (
                        "run",
                        "returncode",
                        "measured_peak_allocated_bytes",
                        "predicted",
                        "error",
                        "tokens_per_s_last",
                    )
                }
            ),
            flush=True,
        )
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
