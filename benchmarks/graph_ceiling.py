"""What a host-bound launch would run at with its host out of the way, from launches already
measured, beside the plan's prediction for its decoder as CUDA graphs (launch/graphs.py).

No GPU ran the graphs yet. But every host-bound launch that host_speed.py probed kept the
GPU's busy seconds per step (torch.profiler over two steps, ``probe.profile.
gpu_busy_s_per_step``): the step's kernels end to end without the gaps the host left. The
real tokens of a step (rows × row tokens × the packed rows' fill) over that time is the
rate a step without host gaps would reach: the ceiling the graphs aim at. It reads the
runs of today's path (Liger's kernels, fused LoRA linears, dropout 0, not compiled) and
prints, per run, the measured rate, the ceiling and the plan's prediction with and without
CUDA graphs (zeroplan.speed at the run's setup and fill).

    python benchmarks/graph_ceiling.py            # the table
    python benchmarks/graph_ceiling.py --check    # exit 1 when a ceiling is more than
                                                  # --band from the graphed prediction, or a
                                                  # graphed launch's median step more than
                                                  # --launch-band from its held-out one

What it does not show: the graphs' own cost (the copies in, the replays, the fused loss
still eager and its read of a count on the host) and whether the capture works; the
profiler's own overhead is inside the busy time.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def todays_path(setup: dict[str, Any]) -> bool:
    """The launch's default path as it stands (what the graphs would wrap)."""
    return (
        setup.get("kernels") == "liger"
        and bool(setup.get("fused_lora"))
        and not setup.get("lora_dropout")
        and not setup.get("compile")
    )


def launched(r: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A host_speed.py row's model spec, setup (TrainSetup) and one-GPU cluster."""
    from zeroplan.hardware import parse_cluster
    from zeroplan.models import load_model
    from zeroplan.trainsetup import TrainSetup, parse_targets

    raw = {k: v for k, v in r["setup"].items() if k in TrainSetup.__dataclass_fields__}
    raw["lora_targets"] = parse_targets(raw["lora_targets"])
    spec = load_model(r["model"].replace("--", "/"))
    return spec, TrainSetup(**raw), parse_cluster(f"1x{r['catalog_gpu']}")


def ceiling_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per probed run on today's path: its measured rate, GPU-busy ceiling and the
    plan's eager and graphed predictions."""
    from zeroplan.api import estimate

    out = []
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            probe = r.get("probe") or {}
            busy = (probe.get("profile") or {}).get("gpu_busy_s_per_step")
            setup = r.get("setup") or {}
            if not busy or not r.get("tokens_per_s") or not todays_path(setup):
                continue
            b = r["batching"]
            real = b["rows_per_micro_batch"] * b["row_tokens"] * b["fill"] * setup["grad_accum"]
            spec, as_run, cluster = launched(r)
            eager_setup = dataclasses.replace(as_run, cuda_graphs=False)
            predicted = {}
            for name, s in (("eager", eager_setup), ("graphs", dataclasses.replace(eager_setup, cuda_graphs=True))):  # fmt: skip
                est = estimate(spec, cluster, s, fill=b["fill"])
                predicted[name] = est.speed.tokens_per_s if est.speed else None
            out.append(
                {
                    "file": path.name,
                    "run": r["run"],
                    "gpu": r["catalog_gpu"],
                    "model": r["model"],
                    "measured": r["tokens_per_s"],
                    "gpu_busy_s": busy,
                    "ceiling": real / busy,
                    "predicted_eager": predicted["eager"],
                    "predicted_graphs": predicted["graphs"],
                }
            )
    return out


def graphed_launch_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per launch with the decoder as CUDA graphs (graphs*.jsonl): its measured
    real tokens/s and the plan's prediction, with speed's graph_token_s measured again
    without the launches of its own file (one GPU call, one machine): held out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fit_speed

    from zeroplan import speed
    from zeroplan.api import estimate

    out = []
    for path in paths:
        others = [p for p in paths if p != path]
        held_out = fit_speed.graph_token_s(fit_speed.graphed_launches(others))
        if held_out is None:
            continue
        k = dataclasses.replace(speed.FITTED, graph_token_s=held_out)
        for line in path.read_text().splitlines():
            r = json.loads(line)
            setup = r.get("setup") or {}
            if not (setup.get("cuda_graphs") and r.get("tokens_per_s")):
                continue
            spec, as_run, cluster = launched(r)
            fill = r["batching"]["fill"]
            st = speed.step_time(spec, as_run, cluster, fill=fill, k=k)
            est = estimate(spec, cluster, as_run, fill=fill)
            out.append(
                {
                    "file": path.name,
                    "run": r["run"],
                    "gpu": r["catalog_gpu"],
                    "measured": r["tokens_per_s"],
                    "median_step": r.get("step_rate_median"),
                    "predicted": est.speed.tokens_per_s if est.speed else None,
                    "held_out": st.tokens_per_s,
                }
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 outside --band")
    p.add_argument("--band", type=float, default=0.15, help="the issue's ±15% (default)")
    p.add_argument(
        "--launch-band",
        type=float,
        default=0.10,
        help="held-out graphed launches against their median step (default ±10%%)",
    )
    args = p.parse_args()
    rows = ceiling_rows([Path(f) for f in sorted(glob.glob(str(RESULTS / "host*_h*.jsonl")))])
    print(
        f"{'run':24} {'gpu':14} {'measured':>9} {'ceiling':>8} {'eager plan':>10} {'graphs plan':>11}  graphs/ceiling"
    )
    worst = 0.0
    for row in rows:
        ratio = row["predicted_graphs"] / row["ceiling"] - 1
        worst = max(worst, abs(ratio))
        print(
            f"{row['file'].removesuffix('.jsonl') + ' ' + row['run']:24} {row['gpu']:14} "
            f"{row['measured']:9,.0f} {row['ceiling']:8,.0f} {row['predicted_eager']:10,.0f} "
            f"{row['predicted_graphs']:11,.0f}  {ratio:+.1%}"
        )
    by_job: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        by_job.setdefault((row["run"], row["gpu"], row["model"]), []).append(row["ceiling"])
    for (run, gpu, model), ceilings in sorted(by_job.items()):
        print(
            f"{run} on {gpu} ({model}): {len(ceilings)} runs, ceiling median "
            f"{statistics.median(ceilings):,.0f} ({min(ceilings):,.0f}-{max(ceilings):,.0f})"
        )
    print(f"largest graphed-prediction miss against a ceiling: {worst:.1%}")
    launches = graphed_launch_rows(sorted(RESULTS.glob("graphs*.jsonl")))
    print(
        f"\n{'launched with CUDA graphs':28} {'measured':>9} {'median step':>11} {'plan':>8} "
        f"{'held out':>9}  against measured, median"
    )
    worst_launch = 0.0
    within = 0
    for row in launches:
        miss = row["held_out"] / row["measured"] - 1
        worst_launch = max(worst_launch, abs(row["held_out"] / row["median_step"] - 1))
        within += abs(miss) <= args.band
        print(
            f"{row['file'].removesuffix('.jsonl') + ' ' + row['run']:28} {row['measured']:9,.0f} "
            f"{row['median_step']:11,.0f} {row['predicted']:8,.0f} {row['held_out']:9,.0f}  "
            f"{miss:+.1%}, {row['held_out'] / row['median_step'] - 1:+.1%}"
        )
    print(
        f"held-out graphed launches: {within} of {len(launches)} within ±{args.band:.0%} of "
        f"the measured rate; largest miss against the median step {worst_launch:.1%}"
    )
    if args.check and (not rows or worst > args.band or worst_launch > args.launch_band):
        print("outside the bands" if rows else "no probed runs found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
