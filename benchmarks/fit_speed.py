"""Fit zeroplan.speed's compute constants on the measured steps in benchmarks/results/.

    python benchmarks/fit_speed.py [FILES...] [--check]

Per method, a least-squares fit (relative error) of the measured seconds per micro-batch

    t = FLOPs·T / (peak · efficiency) + layers · overhead            (+ ZeRO-3 hooks)

over the single-GPU rows that ran without OOM (those timed over 6+ steps when a method has
2 or more), taking the median of the steps after the first (which allocates the optimizer
states). ``--check`` exits 1 when the constants in
zeroplan/speed.py differ from the fit by more than 5%, and prints predicted vs measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accuracy import known_model, setup_of  # the same row → TrainSetup as the memory comparison

from zeroplan import speed
from zeroplan.hardware import gpu_from_nvml_name
from zeroplan.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"


def timed_rows(files: list[Path], several_gpus: bool = False) -> list[dict[str, Any]]:
    """Rows that ran two or more steps at full speed (no OOM, no error, no memory cap), on
    one GPU or, with ``several_gpus``, on more than one."""
    out = []
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("oom") or r.get("error") or len(r.get("step_seconds") or []) < 2:
                continue
            if (r.get("world_size", 1) > 1) != several_gpus or r.get("memory_fraction"):
                continue
            if not known_model(r):
                print(f"skipped a row of {f.name}: model {r['model']!r} has no config here")
                continue
            out.append(r)
    return out


def measured_seconds(r: dict[str, Any]) -> float:
    """A row's step time: the median after the first step (which allocates the optimizer
    states); under ZeRO-3 the last step, since its first steps trace and re-trace the
    module order for prefetching."""
    steps = r["step_seconds"]
    return float(steps[-1] if r["zero"] == 3 else statistics.median(steps[1:]))


def fit(data: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """{method: (efficiency, overhead per layer)} from rows without ZeRO-3."""
    out = {}
    for method in ("lora", "qlora", "full"):
        xs, ys = [], []
        mine = [r for r in data if r["method"] == method and r["zero"] != 3]
        # rows timed over 5+ steps when there are enough (3-step rows time one or two steps)
        long = [r for r in mine if len(r["step_seconds"]) >= 6]
        for r in long if len(long) >= 2 else mine:
            spec, setup = load_model(r["model"]), setup_of(r)
            peak = gpu_from_nvml_name(r["env"]["gpu"], r["env"]["gpu_total_bytes"]).bf16_tflops
            t = measured_seconds(r)
            a = speed.flops_per_token(spec, setup) * setup.tokens / (peak * 1e12)
            b = spec.num_layers * speed.H100_TFLOPS / peak
            xs.append((a / t, b / t))  # relative least squares: (a·k + b·c)/t ≈ 1
            ys.append(1.0)
        if len(xs) < 2:
            continue
        # normal equations for [k, c], k = 1/efficiency
        saa = sum(a * a for a, _ in xs)
        sab = sum(a * b for a, b in xs)
        sbb = sum(b * b for _, b in xs)
        sa, sb = sum(a for a, _ in xs), sum(b for _, b in xs)
        det = saa * sbb - sab * sab
        k = (sa * sbb - sb * sab) / det
        c = (saa * sb - sab * sa) / det
        out[method] = (1 / k, max(c, 0.0))
    return out


def fit_zero3(data: list[dict[str, Any]]) -> float | None:
    """Seconds per parameter tensor per micro-batch that ZeRO-3 adds: the median over the
    ZeRO-3 rows of (measured − the model without ZeRO-3) / parameter tensors."""
    per_tensor = []
    for r in data:
        if r["zero"] != 3:
            continue
        spec, setup = load_model(r["model"]), setup_of(r)
        peak = gpu_from_nvml_name(r["env"]["gpu"], r["env"]["gpu_total_bytes"]).bf16_tflops
        plain = speed.compute_seconds(spec, dataclasses.replace(setup, zero=None), peak)
        extra = measured_seconds(r) - plain
        per_tensor.append(extra / speed.parameter_tensors(spec, setup))
    return statistics.median(per_tensor) if per_tensor else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    data = timed_rows(args.files or sorted(RESULTS.glob("memory_*.jsonl")))
    fitted = fit(data)
    bad = False
    for method, (eff, over) in fitted.items():
        print(
            f"{method:6} efficiency {eff:.3f} (speed.py {speed.EFFICIENCY[method]:.3f})  "
            f"overhead/layer {over * 1e3:.2f} ms (speed.py {speed.LAYER_OVERHEAD_S[method] * 1e3:.2f})"
        )
        bad |= abs(eff / speed.EFFICIENCY[method] - 1) > 0.05
        bad |= abs(over - speed.LAYER_OVERHEAD_S[method]) > 0.05 * max(over, 1e-4)
    z3 = fit_zero3(data)
    if z3 is not None:
        print(
            f"ZeRO-3 per parameter tensor {z3 * 1e3:.2f} ms (speed.py {speed.ZERO3_SECONDS_PER_TENSOR * 1e3:.2f})"
        )
        bad |= abs(z3 / speed.ZERO3_SECONDS_PER_TENSOR - 1) > 0.05
    errs = []
    for r in data:
        if r["zero"] == 3:
            continue  # timed by their last step only, above
        spec, setup = load_model(r["model"]), setup_of(r)
        peak = gpu_from_nvml_name(r["env"]["gpu"], r["env"]["gpu_total_bytes"]).bf16_tflops
        pred = speed.compute_seconds(spec, setup, peak)
        meas = measured_seconds(r)
        errs.append(abs(pred / meas - 1))
        if args.check:
            print(
                f"  {r['model'].split('/')[-1]:22} {r['method']:5} mb{r['micro_batch']} s{r['seq_len']} "
                f"ckpt={int(r['grad_ckpt'])} zero={r['zero']}  measured {meas:.3f}s predicted {pred:.3f}s "
                f"({pred / meas - 1:+.0%})"
            )
    if errs:
        print(
            f"{len(errs)} rows: step time error median {statistics.median(errs):.0%}, worst {max(errs):.0%}"
        )
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
