"""Issue 29's NaN loss on the GPU: the 16-layer Qwen3-30B-A3B cut launched as
launch_gpu_check.py's moe-attn / moe-all runs (LoRA at dropout 0, micro-batch 4 × 768
packed), each variant a few steps, most under benchmarks/nan_probe (where the first
non-finite value appears: the batch, each layer's outputs and their gradients at real and at
padding tokens, the parameters after the step).

    python benchmarks/moe_nan.py --work /tmp/nan --out $OUT/moe_nan.jsonl \
        [--variants before-attn,fixed-attn,fixed-all] [--before MAIN_TREE] [--deadline 140]
    python benchmarks/moe_nan.py --work /tmp/nan --out /tmp/nan.jsonl --tiny   (CPU rehearsal)

Variants: ``before-attn`` the failing launch's tree (--before); ``fixed-attn`` and
``fixed-all`` this tree, ten steps; ``now`` this tree, three steps; ``old-loop`` with the
Trainer's own loop (zeroplan.launch.hostloop off); ``eager-experts`` transformers' per-expert
loop instead of grouped_mm; ``mask`` the SDPA block mask instead of the varlen kernel;
``now-4l`` a 4-layer cut. One JSON line per variant: losses and grad norms per step, peak
allocated against the plan, tokens/s, the probe's record, the rank log's tail, versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import gpu_fixtures as fx  # noqa: E402  (build_model, records, write_plan, metrics, ...)
import tinyllm  # noqa: E402

from zeroplan.trainsetup import TrainSetup  # noqa: E402

ARCH = "Qwen--Qwen3-30B-A3B"
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
SETUPS = {
    # launch_gpu_check.py's moe-attn and moe-all at dropout 0
    "attn": TrainSetup(
        method="lora", micro_batch=4, seq_len=768, lora_targets=QKVO, lora_dropout=0.0
    ),
    "all": TrainSetup(method="lora", micro_batch=4, seq_len=768, lora_dropout=0.0),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    setup: str = "attn"
    layers: int = 16
    steps: int = 3
    before: bool = False  # --before's zeroplan (the tree of the failing launch)
    probe: bool = True
    env: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()


VARIANTS = {
    "now": Variant(),
    "old-loop": Variant(env=(("ZP_NAN_OLD_LOOP", "1"),)),
    "eager-experts": Variant(env=(("ZP_NAN_EXPERTS", "eager"),)),
    "mask": Variant(extra=("--packed-attention", "mask")),
    "now-4l": Variant(layers=4),
    "before-attn": Variant(before=True),
    "fixed-attn": Variant(steps=10),
    "fixed-all": Variant(setup="all", steps=10, probe=False),
}


def run_variant(name: str, args: argparse.Namespace, data: Path, timeout: float) -> dict[str, Any]:
    v = VARIANTS[name]
    model = args.work / f"model{v.layers}"
    if not (model / "config.json").exists():
        t = time.time()
        if args.tiny:
            arch = {**tinyllm.TINY_QWEN3_MOE, "num_hidden_layers": v.layers}
            tinyllm.build_model_dir(model, arch=arch)
        else:
            fx.build_model(model, ARCH, layers=v.layers)
        print(f"built {v.layers} layers in {time.time() - t:.0f}s", flush=True)
    run = args.work / name
    plan = args.work / f"{name}-plan.json"
    if args.tiny:  # the CPU's rehearsal: a tiny Qwen3-MoE, planned for one H100
        planned = fx.write_plan(plan, model, dataclasses.replace(SETUPS[v.setup], seq_len=128), 1)
    else:
        planned = fx.write_plan(plan, model, SETUPS[v.setup], None)
    probe = args.work / f"{name}-probe.json"
    tree = args.before if v.before else ROOT
    env = dict(os.environ)
    paths = [str(tree), env.get("PYTHONPATH", "")]
    if v.probe:
        paths.insert(0, str(ROOT / "benchmarks" / "nan_probe"))
        env["ZP_NAN_PROBE"] = str(probe)
    env["PYTHONPATH"] = ":".join(paths)
    env.update(dict(v.env))
    cmd = [sys.executable, "-m", "zeroplan", "launch", str(plan), "--data", str(data)]
    cmd += ["-o", str(run), "--max-steps", str(v.steps), "--model", str(model)]
    cmd += ["--logging-steps", "1", *v.extra, *(["--force"] if args.tiny else [])]
    start = time.time()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=tree, env=env
        )
        rc, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = 124, str(exc.stderr or "")
    lines = fx.metrics(run)
    log = run / "logs" / "rank0.log"
    applied = (
        json.loads((run / "applied.json").read_text()) if (run / "applied.json").exists() else {}
    )
    peaks = [m.get("peak_allocated_bytes") or 0 for m in lines]
    predicted = planned["best"]["peak_allocated_bytes"]
    return {
        "variant": name,
        "spec": dataclasses.asdict(v),
        "tree": str(tree),
        "returncode": rc,
        "wall_s": time.time() - start,
        "train": [
            {k: m.get(k) for k in ("step", "loss", "grad_norm")}
            for m in lines
            if m.get("event") == "train"
        ],
        "predicted_peak_allocated_bytes": predicted,
        "measured_peak_allocated_bytes": max(peaks) if peaks else None,
        "error": predicted / max(peaks) - 1 if peaks and max(peaks) else None,
        "tokens_per_s": fx.steady_tokens_per_s(lines),
        "router_aux_loss_coef": applied.get("training", {}).get("router_aux_loss_coef"),
        "batching": applied.get("batching"),
        "host_loop": applied.get("host_loop"),
        "probe": json.loads(probe.read_text()) if v.probe and probe.exists() else None,
        "rank_log_tail": log.read_text()[-3000:] if log.exists() else None,
        "stderr_tail": err[-1500:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--deadline", type=float, default=140.0, help="seconds for all variants")
    p.add_argument("--run-timeout", type=float, default=45.0, help="seconds per launch")
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen3-MoE (CPU rehearsal)")
    p.add_argument("--before", type=Path, default=ROOT, help="the tree of before-* variants")
    args = p.parse_args()
    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = tinyllm.write_jsonl(
        args.work / "data.jsonl", fx.records(40 if args.tiny else 400, 10, 30)
    )
    if not args.tiny:
        data = tinyllm.write_jsonl(args.work / "data.jsonl", fx.records(400))
    env = {"arch": ARCH, "versions": fx.versions()}
    for name in args.variants.split(","):
        left = args.deadline - (time.time() - start)
        if left < 20:
            row: dict[str, Any] = {"variant": name, "skipped": f"{left:.0f} s left"}
        else:
            row = run_variant(name, args, data, min(args.run_timeout, left))
        row |= env
        summary = {k: row.get(k) for k in ("variant", "returncode", "wall_s", "train", "skipped")}
        print(json.dumps(summary), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
