"""Fit zeroplan.speed's compute constants on the measured steps in benchmarks/results/.

    python benchmarks/fit_speed.py [FILES...] [--check]

Per method, a least-squares fit (relative error) of the measured seconds per micro-batch

    t = FLOPs·T / (peak · efficiency) + layers · overhead            (+ ZeRO-3 hooks)

over the single-GPU rows that ran without OOM (those timed over 6+ steps when a method has
2 or more), taking the median of the steps after the first (which allocates the optimizer
states). ``--check`` exits 1 when the constants in
zeroplan/speed.py differ from the fit by more than 5%, and prints predicted vs measured.

Then the error on rows the constants were NOT fitted on (``holdout_report``; ``--markdown``
prints it as a table for README.md): the same fit made without one model family (Llama,
Qwen2, Qwen3, Mistral: leave-one-family-out), without one sequence length, and without one
micro-batch size, each predicting the rows it left out; and the two-GPU rows, which no fit
uses, with speed.py's constants. The error is that of predicted tokens/s against measured
(tokens per step over the measured step time), on single-GPU rows without ZeRO-3 (ZeRO-3's
own constant is fitted on all its rows; there are too few to hold out).
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

from accuracy import (  # the same row → TrainSetup as the memory comparison
    cluster_of,
    known_model,
    setup_of,
)

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


_FEATURES: dict[int, tuple[float, float]] = {}


def features(r: dict[str, Any]) -> tuple[float, float]:
    """(a, b) of a row, such that its predicted seconds per micro-batch are a·k + b·c with
    k = 1/efficiency and c = overhead per layer: a = FLOPs·T / peak, b = layers·H100/peak."""
    key = id(r)
    if key not in _FEATURES:
        spec, setup = load_model(r["model"]), setup_of(r)
        peak = gpu_from_nvml_name(r["env"]["gpu"], r["env"]["gpu_total_bytes"]).bf16_tflops
        a = speed.flops_per_token(spec, setup) * setup.tokens / (peak * 1e12)
        b = spec.num_layers * speed.H100_TFLOPS / peak
        _FEATURES[key] = (a, b)
    return _FEATURES[key]


def predicted_seconds(r: dict[str, Any], constants: tuple[float, float]) -> float:
    """A row's seconds per micro-batch with (efficiency, overhead per layer) = constants."""
    a, b = features(r)
    eff, over = constants
    return a / eff + b * over


def fit(data: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """{method: (efficiency, overhead per layer)} from rows without ZeRO-3."""
    out = {}
    for method in ("lora", "qlora", "full"):
        xs = []
        mine = [r for r in data if r["method"] == method and r["zero"] != 3]
        # rows timed over 5+ steps when there are enough (3-step rows time one or two steps)
        long = [r for r in mine if len(r["step_seconds"]) >= 6]
        for r in long if len(long) >= 2 else mine:
            t = measured_seconds(r)
            a, b = features(r)
            xs.append((a / t, b / t))  # relative least squares: (a·k + b·c)/t ≈ 1
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


FAMILIES = {"llama": "Llama", "qwen2": "Qwen2.5", "qwen3": "Qwen3", "mistral": "Mistral"}


def holdout_errors(
    data: list[dict[str, Any]], key: Any
) -> tuple[dict[Any, list[float]], list[dict[str, Any]]]:
    """For each value g of key(row): fit on the rows whose key differs, predict those whose
    key is g. Returns {g: [predicted/measured tokens/s − 1, ...]} and the rows that could not
    be predicted (their method had fewer than two rows left to fit on)."""
    errs: dict[Any, list[float]] = {}
    unpredicted = []
    for g in sorted({key(r) for r in data}, key=lambda v: (isinstance(v, str), v)):
        constants = fit([r for r in data if key(r) != g])
        for r in data:
            if key(r) != g or r["zero"] == 3:
                continue
            if r["method"] not in constants:
                unpredicted.append(r)
                continue
            # tokens/s = tokens / seconds: predicted/measured − 1 = t_measured/t_predicted − 1
            err = measured_seconds(r) / predicted_seconds(r, constants[r["method"]]) - 1
            errs.setdefault(g, []).append(err)
    return errs, unpredicted


def _line(label: str, errs: list[float], skipped: int = 0) -> list[str]:
    a = [abs(e) for e in errs]
    worst = max(errs, key=abs)
    return [
        label,
        str(len(errs)) + (f" ({skipped} not predictable)" if skipped else ""),
        f"{statistics.median(a):.0%}",
        f"{worst:+.0%}",
        f"{sum(x <= 0.20 for x in a)} / {len(a)}",
    ]


def holdout_report(data: list[dict[str, Any]], multi: list[dict[str, Any]]) -> list[list[str]]:
    """The error of predicted tokens/s on rows the constants were not fitted on: one line per
    scheme and, under it, one per group held out."""
    table = []
    fitted = fit(data)
    insample = [
        measured_seconds(r) / predicted_seconds(r, fitted[r["method"]]) - 1
        for r in data
        if r["zero"] != 3 and r["method"] in fitted
    ]
    table.append(_line("none: speed.py's own fit, in-sample, for comparison", insample))
    schemes = (
        ("leave one model family out", lambda r: r["model_type"], lambda g: FAMILIES.get(g, g)),
        ("leave one sequence length out", lambda r: r["seq_len"], lambda g: f"seq {g}"),
        ("leave one micro-batch size out", lambda r: r["micro_batch"], lambda g: f"mb {g}"),
    )
    for name, key, label in schemes:
        errs, unpredicted = holdout_errors(data, key)
        table.append(_line(f"**{name}**", [e for v in errs.values() for e in v], len(unpredicted)))
        for g, v in errs.items():
            skipped = sum(key(r) == g for r in unpredicted)
            table.append(_line(f"  {label(g)} held out", v, skipped))
    if multi:
        errs = []
        for r in multi:
            spec, setup, cluster = load_model(r["model"]), setup_of(r), cluster_of(r)
            errs.append(measured_seconds(r) / speed.step_time(spec, setup, cluster).total_s - 1)
        table.append(_line("two H100s with NVLink, ZeRO 0-3 (never fitted on)", errs))
    return table


def print_table(table: list[list[str]], markdown: bool) -> None:
    head = ["held out", "rows", "median abs. error", "worst (+: predicted too fast)", "within 20%"]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|---|---|---|---|---|")
        for row in table:
            print("| " + " | ".join(c.replace("  ", "· ", 1) for c in row) + " |")
        return
    print(f"{head[0]:52} {head[1]:>22} {head[2]:>17} {head[3]:>29} {head[4]:>11}")
    for row in table:
        print(f"{row[0].replace('**', ''):52} {row[1]:>22} {row[2]:>17} {row[3]:>29} {row[4]:>11}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--check", action="store_true")
    p.add_argument("--markdown", action="store_true", help="the held-out table as markdown")
    args = p.parse_args()
    files = args.files or sorted(RESULTS.glob("memory_*.jsonl"))
    data = timed_rows(files)
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
            " (in-sample: these rows fitted the constants)"
        )
    print("\npredicted tokens/s against measured on rows NOT fitted on (refit without them):")
    print_table(holdout_report(data, timed_rows(files, several_gpus=True)), args.markdown)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
