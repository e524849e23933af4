"""The planner's step-time model against the measured multi-GPU rows (world size > 1).

    python benchmarks/speed_multi_gpu.py [FILES...]

For each row of benchmarks/results/ (memory_*.jsonl, speed_*.jsonl) that ran on several
GPUs without OOM:
zeroplan.speed.step_time (compute + ZeRO's communication over the row's GPUs and links)
against the measured step: the median after the first, and for ZeRO-3 the last (its first
steps record the module order for prefetching and run slower; as in fit_speed.py); then, per model and method, whether
the ZeRO stages rank in the measured order (what the planner's choice rests on).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accuracy import cluster_of, setup_of
from fit_speed import default_files, measured_seconds, timed_rows

from zeroplan import speed
from zeroplan.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    args = p.parse_args()
    # every multi-GPU row, also those timed over 2 steps (fit_speed.py's table keeps 5+)
    rows = timed_rows(args.files or default_files(), min_timed=2)
    data = [r for r in rows if r.get("world_size", 1) > 1]
    if not data:
        print("no multi-GPU rows")
        return 1
    errs = []
    groups: dict[tuple[str, str, int, bool], list[tuple[int, float, float]]] = defaultdict(list)
    for r in data:
        spec, setup, cluster = load_model(r["model"]), setup_of(r), cluster_of(r)
        pred = speed.step_time(spec, setup, cluster, launched=False)  # the lean step
        meas = measured_seconds(r)
        errs.append(abs(pred.total_s / meas - 1))
        groups[(r["model"], r["method"], r["micro_batch"], r["grad_ckpt"])].append(
            (r["zero"], meas, pred.total_s)
        )
        print(
            f"{r['model'].split('/')[-1]:22} {r['method']:5} mb{r['micro_batch']} "
            f"ckpt={int(r['grad_ckpt'])} zero={r['zero']}×{r['world_size']}  measured "
            f"{meas:.3f}s predicted {pred.total_s:.3f}s (compute {pred.compute_s:.3f}, "
            f"comm {pred.comm_s:.3f}) {pred.total_s / meas - 1:+.0%}"
        )
    print(
        f"{len(errs)} rows: step time error median {statistics.median(errs):.0%}, worst {max(errs):.0%}"
    )
    agree = compared = slow = 0
    for key, stages in groups.items():
        if len(stages) < 2:
            continue
        by_meas = [z for z, _, _ in sorted(stages, key=lambda s: s[1])]
        by_pred = [z for z, _, _ in sorted(stages, key=lambda s: s[2])]
        slow += by_meas[-1] == by_pred[-1]
        agree += by_meas[0] == by_pred[0]
        compared += 1
        print(
            f"{key[0].split('/')[-1]} {key[1]} mb{key[2]}: fastest stage measured {by_meas} "
            f"predicted {by_pred}"
        )
    print(f"slowest stage right in {slow} of {compared} groups, fastest in {agree} of {compared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
