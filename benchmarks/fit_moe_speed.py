"""Fit the MoE step's two constants (``speed.MoESpeedConstants``) and check them on rows
they did not see (CPU only).

    python benchmarks/fit_moe_speed.py [--check]

The fit: ``host_layer_s`` and ``bank_bytes`` minimise the squared log-ratio of predicted to
measured lean step time (``speed.step_time(..., launched=False)``) over the timed grid rows
of ONE model shape in benchmarks/results/moe_h100.jsonl (benchmarks/moe_grid.py, one H100:
every target set, with and without checkpointing; FIT_MODEL, cut to 8 layers), by a grid
search in log space refined twice (the same rows give the same constants). The dense
constants (``speed.FITTED``) are not touched.

Then the error that counts, predicted tokens/s against measured, on rows the fit did not
see: the other shape's grid rows (HELD_OUT_MODEL, 4 layers), the full-depth rows of the same
file, the H200 rows of the full Qwen3-30B-A3B (check_h200_moe.jsonl) and the two launched
runs (launch_moe_h100.jsonl, against ``step_time(..., fill)`` of the launched setup).
Each is printed beside the shipped model's (no MoE terms). 9 in 10 held-out lean rows must be
within ``speed.HELD_OUT_P90_*`` (host-bound and GPU-bound apart) and the launched runs
within ``speed.LAUNCHED_P90_*`` for the constants to ship (``ships``).

``--check`` exits 1 when zeroplan/speed.py's MOE_CANDIDATE differs from this fit by more
than 5% on either constant, or when MOE_FITTED (what the estimate uses) is shipped while
the held-out rows are out of band, or not shipped while they are in it (a test runs it).
``--fit-on mistralai/Mixtral-8x7B-v0.1`` runs the other fold (Qwen3 shapes held out).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_check  # the same cut models and setups as the memory comparison

from zeroplan import speed
from zeroplan.hardware import parse_cluster
from zeroplan.models import ModelSpec, load_model
from zeroplan.speed import MoESpeedConstants, step_time
from zeroplan.trainsetup import TrainSetup

FIT_MODEL = "Qwen/Qwen3-30B-A3B"
HELD_OUT_MODEL = "mistralai/Mixtral-8x7B-v0.1"


def lean_rows(fit_model: str = FIT_MODEL) -> list[dict[str, Any]]:
    """Every timed lean step of the MoE files: grid and full-depth rows on one H100, the
    full Qwen3-30B-A3B's all-linear rows on one H200. ``measured_s``: the median of the
    timed steps (after the row's warm-up)."""
    out = []
    for row in moe_check.rows("moe_h100.jsonl"):
        if row.get("section") not in ("grid", "depth") or row["error"]:
            continue
        steps = row["step_seconds"][row["warmup_steps"] :]
        spec = moe_check.cut(row["model"], row["num_layers"])
        out.append(_lean(row, spec, statistics.median(steps), "1xH100"))
    for row in moe_check.rows("check_h200_moe.jsonl"):
        if row["oom"]:
            continue
        steps = row["step_seconds"][row["warmup_steps"] :]
        out.append(_lean(row, load_model(row["model"]), statistics.median(steps), "1xH200"))
    for r in out:
        if r["group"] == "grid":
            r["group"] = "fit" if r["model"] == fit_model else "held-out"
    return out


def _lean(row: dict[str, Any], spec: ModelSpec, measured: float, gpu: str) -> dict[str, Any]:
    group = "h200" if gpu == "1xH200" else row["section"]
    return {
        "model": row["model"],
        "layers": spec.num_layers,
        "spec": spec,
        "setup": moe_check.setup_of(row),
        "gpu": gpu,
        "measured_s": measured,
        "group": group,
    }


def launched_rows() -> list[dict[str, Any]]:
    """The launched runs (moe_check.launch_rows) with their spec and fill."""
    out = []
    raw = moe_check.rows("launch_moe_h100.jsonl")
    for row, r in zip(raw, moe_check.launch_rows(), strict=True):
        out.append({**r, "spec": _launched_spec(row), "fill": row["applied"]["batching"]["fill"]})
    return out


def _launched_spec(row: dict[str, Any]) -> ModelSpec:
    sys.path.insert(0, str(moe_check.RESULTS.parent.parent / "tests"))
    import tinyllm

    from zeroplan.models import spec_from_config

    catalog = load_model(row["arch"].replace("--", "/"))
    vocab = len(tinyllm.build_tokenizer())
    config = {**catalog.config, "num_hidden_layers": row["layers"], "vocab_size": vocab}
    return spec_from_config(config, name=catalog.name)


def lean_error(r: dict[str, Any], m: MoESpeedConstants | None) -> tuple[float, bool]:
    """(predicted tokens/s / measured − 1, host-bound) of a lean row under ``m`` (None: the
    shipped model without MoE terms)."""
    p = step_time(r["spec"], r["setup"], parse_cluster(r["gpu"]), launched=False, m=m)
    return r["measured_s"] / p.total_s - 1, p.host_bound


def launched_error(r: dict[str, Any], m: MoESpeedConstants | None) -> tuple[float, bool]:
    """(predicted real tokens/s / measured − 1, host-bound) of a launched run under ``m``."""
    setup: TrainSetup = r["setup"]
    p = step_time(r["spec"], setup, parse_cluster("1xH100"), fill=r["fill"], m=m)
    return p.tokens_per_s / r["tokens_per_s"] - 1, p.host_bound


def loss(rows: list[dict[str, Any]], m: MoESpeedConstants) -> float:
    """Σ log²(predicted / measured step time)."""
    return sum(math.log1p(lean_error(r, m)[0]) ** 2 for r in rows)


def fit(rows: list[dict[str, Any]]) -> MoESpeedConstants:
    """Grid search over host_layer_s in [10 µs, 10 ms] and bank_bytes in [0.1, 1000] B
    (log-spaced, 0 included), refined twice around the best point."""
    hosts = [0.0] + [10 ** (-5 + 3 * i / 30) for i in range(31)]
    banks = [0.0] + [10 ** (-1 + 4 * i / 40) for i in range(41)]
    best = min((MoESpeedConstants(h, b) for h in hosts for b in banks), key=lambda m: loss(rows, m))
    for span in (1.25, 1.05):
        hosts = [best.host_layer_s * span ** (i / 5) for i in range(-5, 6)]
        banks = [best.bank_bytes * span ** (i / 5) for i in range(-5, 6)]
        best = min(
            (MoESpeedConstants(h, b) for h in hosts for b in banks), key=lambda m: loss(rows, m)
        )
    return MoESpeedConstants(float(f"{best.host_layer_s:.4g}"), float(f"{best.bank_bytes:.4g}"))


def p90(errors: list[float]) -> float:
    """The |error| 9 in 10 rows are within (nearest rank)."""
    if not errors:
        return 0.0
    ranked = sorted(abs(e) for e in errors)
    return ranked[max(0, math.ceil(0.9 * len(ranked)) - 1)]


def _label(r: dict[str, Any]) -> str:
    s: TrainSetup = r["setup"]
    targets = ",".join(s.lora_targets).replace("q_proj,k_proj,v_proj,o_proj", "qkvo")
    return (
        f"{r['model'].split('/')[-1]:18s} L={r['layers']:2d} {targets:10s} "
        f"{'ckpt' if s.grad_ckpt else '    '} {s.micro_batch}x{s.seq_len:<4d}"
    )


def report(m: MoESpeedConstants, fit_model: str = FIT_MODEL) -> dict[str, Any]:
    """Every row's error with and without the MoE terms; p90s by group and bound."""
    lean = lean_rows(fit_model)
    out: dict[str, Any] = {"rows": [], "bands": {}}
    for r in lean:
        err, host = lean_error(r, m)
        out["rows"].append((r["group"], _label(r), r["gpu"][2:], err, lean_error(r, None)[0], host))
    for r in launched_rows():
        err, host = launched_error(r, m)
        before = launched_error(r, None)[0]
        out["rows"].append(("launched", _label(r), "H100", err, before, host))
    for group in ("fit", "held-out", "depth", "h200", "launched"):
        for host in (False, True):
            errs = [e for g, _, _, e, _, h in out["rows"] if g == group and h == host]
            if errs:
                out["bands"][(group, host)] = (p90(errs), len(errs))
    return out


def ships(bands: dict[tuple[str, bool], tuple[float, int]]) -> bool:
    """The held-out lean rows within HELD_OUT_P90_* and the launched runs within
    LAUNCHED_P90_*, host-bound and GPU-bound apart."""
    ok = True
    for (group, host), (value, _) in bands.items():
        if group == "held-out":
            limit = speed.HELD_OUT_P90_HOST_BOUND if host else speed.HELD_OUT_P90_GPU_BOUND
        elif group == "launched":
            limit = speed.LAUNCHED_P90_HOST_BOUND if host else speed.LAUNCHED_P90_GPU_BOUND
        else:
            continue
        ok = ok and value <= limit
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument(
        "--fit-on", default=FIT_MODEL, help="the model shape to fit on (the other is held out)"
    )
    args = p.parse_args()
    fitted = fit([r for r in lean_rows(args.fit_on) if r["group"] == "fit"])
    print(f"fitted on {args.fit_on} grid rows: {fitted}")
    print(f"zeroplan.speed.MOE_CANDIDATE: {speed.MOE_CANDIDATE}")
    print(f"zeroplan.speed.MOE_FITTED (shipped): {speed.MOE_FITTED}")
    rep = report(fitted, args.fit_on)
    print("predicted tokens/s error (+: too fast): with the MoE terms, shipped model (none)")
    for group, label, gpu, err, before, host in rep["rows"]:
        bound = "host-bound" if host else "GPU-bound"
        print(f"  {group:8s} {label} {gpu} {err:+7.1%} {before:+7.1%} {bound}")
    print("9 in 10 within (rows):")
    for (group, host), (value, n) in rep["bands"].items():
        print(f"  {group:8s} {'host-bound' if host else 'GPU-bound ':10s} {value:6.1%} ({n})")
    shipped = ships(rep["bands"])
    print(f"within the plan's bands (ships): {shipped}")
    if args.check:
        pairs = (
            (fitted.host_layer_s, speed.MOE_CANDIDATE.host_layer_s),
            (fitted.bank_bytes, speed.MOE_CANDIDATE.bank_bytes),
        )
        if any(abs(a - b) > 0.05 * max(abs(a), abs(b)) for a, b in pairs):
            print("MOE_CANDIDATE differs from the fit by more than 5%")
            return 1
        if (speed.MOE_FITTED is not None) != shipped:
            print("MOE_FITTED must be MOE_CANDIDATE exactly when the held-out rows are in band")
            return 1
        if speed.MOE_FITTED not in (None, speed.MOE_CANDIDATE):
            print("MOE_FITTED, when shipped, is MOE_CANDIDATE")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
