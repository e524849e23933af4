"""How far off a perfect speed model would look against the fit's own readings.

Each one-GPU fit shape is the median of its readings (fit_speed.shape_medians), and the
readings of a host-bound shape move by process and by machine. This simulates that
noise alone: every shape keeps its number of readings, each reading is the truth times a
deviation drawn from the measured ones (log reading − log median of its shape, pooled
separately for host-bound and GPU-bound shapes, speed.py's own split), and a model that
predicts the truth exactly is scored the way fit_speed.py scores speed.py. It prints the
worst |error| such a model would show over all shapes, as quantiles over the draws, and
how much closer readings taken on the same machine call are than readings taken on
different ones (a results file holds one call of the GPU machine, or a few in a row).

    python benchmarks/noise_floor.py [--draws 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import fit_speed as fs  # noqa: E402

from zeroplan import speed  # noqa: E402
from zeroplan.models import load_model  # noqa: E402


def host_bound(r: dict[str, object]) -> bool:
    spec, setup, cluster = load_model(str(r["model"])), fs.setup_of(r), fs.cluster_of(r)
    return speed.step_time(spec, setup, cluster, launched=False).host_bound


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=2000, help="simulated sets of readings")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    groups = fs.shape_readings(fs.timed_rows(fs.default_files()))
    shapes = [(host_bound(rs[0]), [fs.measured_seconds(r) for r in rs]) for rs in groups.values()]
    pools: dict[bool, list[float]] = {True: [], False: []}
    for bound, seconds in shapes:
        if len(seconds) < 2:
            continue
        logs = [math.log(s) for s in seconds]
        mid = statistics.median(logs)
        # the median reading of an odd count deviates by 0 by construction: left out
        pools[bound] += [x - mid for x in logs if x != mid or len(logs) % 2 == 0]
    for bound, name in ((True, "host-bound"), (False, "GPU-bound")):
        n = sum(1 for b, _ in shapes if b == bound)
        sd = statistics.pstdev(pools[bound])
        print(f"{name}: {n} shapes, {len(pools[bound])} deviations, log sd {sd:.3f}")

    rnd = random.Random(args.seed)
    worst = []
    for _ in range(args.draws):
        errors = [
            math.exp(statistics.median(rnd.choice(pools[b]) for _ in seconds)) - 1
            for b, seconds in shapes
        ]
        worst.append(max(abs(e) for e in errors))
    print(
        f"a perfect model, scored on {len(shapes)} shape medians like these: worst |error| "
        f"median {quantile(worst, 0.5):.0%}, 10-90% {quantile(worst, 0.1):.0%}-"
        f"{quantile(worst, 0.9):.0%}; above 35% in {sum(w > 0.35 for w in worst) / len(worst):.0%} "
        "of the draws"
    )

    same, other = [], []
    for rs in groups.values():
        reads = [(r["_file"], math.log(fs.measured_seconds(r))) for r in rs]
        for i, (fi, xi) in enumerate(reads):
            for fj, xj in reads[i + 1 :]:
                (same if fi == fj else other).append(abs(xi - xj))
    for label, d in (("the same machine call", same), ("different calls", other)):
        if d:
            apart = math.exp(statistics.median(d)) - 1
            print(
                f"two readings of one shape from {label}: {len(d)} pairs, median {apart:.0%} apart"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
