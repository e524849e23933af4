"""Is the plan's choice the fastest of the setups it ranked? Issue 26's check, from the rows
of one GPU call (benchmarks/host_speed.py's five ranked runs) and their metrics:

    python benchmarks/plan_choice.py benchmarks/results/host3_h100.jsonl \
        benchmarks/results/host3_h100_runs.tgz

``--job 8b-lora`` reads the 8B bf16 LoRA plan's five runs instead of the 1B one's. More
calls may follow as further pairs of files (calls made back to back on one warm machine): a
run is read from the first call that has it, and a run timed in several calls prints each
call's rate, so the reader sees how far the machine moved between them.

For each ranked run it prints the predicted tokens/s, the measured tokens/s over the full
timed steps and the median step rate, and each one's share of the best. A run's timed steps
are those after WARMUP_STEPS (gpu_fixtures). A *remainder* step, one whose real tokens fall
below 90% of the run's median step (the epoch's one part-filled row, shuffled to any step), is
left out of the full-step rate: a long run meets it once an epoch, a 13-step benchmark
weighs it as one step in ten. Until batching.PAD_SEGMENT its padding ran as one long sample
under varlen attention (a 1B row's 38,136 padding tokens: 1.6 s against 0.6, host15). The
median needs no such rule and is printed beside it.

Exit 1 when the plan's choice is below ``--floor`` (0.95) of the best by either measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tarfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_fixtures import RANKED_JOBS, WARMUP_STEPS

REMAINDER = 0.9  # a step under this share of the median step's tokens: the part-filled row


def step_tokens(lines: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, real tokens, seconds) of each timed rank-0 step: tokens = the line's rate × the
    interval since the previous line (each train line's rate covers that interval)."""
    train = [m for m in lines if m.get("event") == "train" and m.get("rank", 0) == 0]
    out = []
    for prev, cur in itertools.pairwise(train):
        if prev["step"] >= WARMUP_STEPS and cur.get("tokens_per_s"):
            dt = cur["t"] - prev["t"]
            out.append((cur["step"], cur["tokens_per_s"] * dt, dt))
    return out


def measured(steps: list[tuple[int, float, float]]) -> dict[str, Any]:
    """Full-step rate (remainder steps out), median step rate, and what was left out."""
    median_tokens = statistics.median(t for _, t, _ in steps)
    full = [(s, t, dt) for s, t, dt in steps if t >= REMAINDER * median_tokens]
    return {
        "full_step_tokens_per_s": sum(t for _, t, _ in full) / sum(dt for _, _, dt in full),
        "median_step_rate": statistics.median(t / dt for _, t, dt in steps),
        "timed_steps": len(steps),
        "remainder_steps": [
            {"step": s, "tokens": round(t), "seconds": round(dt, 3)}
            for s, t, dt in steps
            if t < REMAINDER * median_tokens
        ],
    }


def metrics_from(tgz: Path) -> dict[str, list[dict[str, Any]]]:
    """Each run's metrics.jsonl lines from the call's tarball (run-NAME/metrics.jsonl)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 2 and parts[1] == "metrics.jsonl" and parts[0].startswith("run-"):
                data = tar.extractfile(member)
                assert data is not None
                text = data.read().decode()
                out[parts[0][4:]] = [json.loads(x) for x in text.splitlines() if x.strip()]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "calls", type=Path, nargs="+", metavar="ROWS RUNS",
        help="host_speed.py's JSONL and the same call's run folders (tar.gz), per call",
    )  # fmt: skip
    p.add_argument("--floor", type=float, default=0.95)
    p.add_argument("--job", choices=list(RANKED_JOBS), default="1b", help="which plan's runs")
    args = p.parse_args()
    if len(args.calls) % 2:
        p.error("give each call's JSONL and its runs' tar.gz, in pairs")
    ranked = RANKED_JOBS[args.job][2]
    calls = []  # (name, rows, metrics) of each call
    for rows_path, runs_path in zip(args.calls[::2], args.calls[1::2], strict=True):
        rows = {r["run"]: r for r in map(json.loads, rows_path.read_text().splitlines())}
        calls.append((rows_path.stem, rows, metrics_from(runs_path)))
    gpus = {rows[name]["gpu"] for _, rows, lines in calls for name in ranked if name in lines}
    if len(gpus) > 1:
        print(f"the calls ran on different GPUs ({', '.join(sorted(gpus))})", file=sys.stderr)
        return 1
    table = []
    for name in ranked:
        found = [(call, rows[name], lines[name]) for call, rows, lines in calls if name in lines]
        if not found:
            print(f"{name}: not measured in these calls", file=sys.stderr)
            return 1
        call, row, lines = found[0]
        s = row["setup"]
        shape = (
            f"{s['micro_batch']}×{s['seq_len']} ZeRO-{s['zero']} "
            f"{'offload ' + s['offload'] if s['offload'] != 'none' else ''}"
            f"{'ckpt' if s['grad_ckpt'] else ''}"
        ).strip()
        table.append(
            {"run": name, "call": call, "setup": shape,
             "predicted": row["path_predicted_tokens_per_s"]}
            | measured(step_tokens(lines))
            | {"again": [(c, measured(step_tokens(x))) for c, _, x in found[1:]]}
        )  # fmt: skip
    ok = True
    where = "one call" if len(calls) == 1 else f"{len(calls)} calls"
    print(f"{gpus.pop()}, {where}; plan's choice first")
    for key in ("full_step_tokens_per_s", "median_step_rate"):
        best = max(r[key] for r in table)
        share = table[0][key] / best
        ok &= share >= args.floor
        print(f"\nby {key.replace('_', ' ')}: the plan's choice is {share:.1%} of the best")
        for r in table:
            print(
                f"  {r['run']:12} {r['setup']:32} predicted {r['predicted']:8,.0f}  "
                f"measured {r[key]:8,.0f}  ({r[key] / best:6.1%}; "
                f"prediction {r['predicted'] / r[key] - 1:+.1%})"
                + (f"  [{r['call']}]" if len(calls) > 1 else "")
            )
            for call, again in r["again"]:
                print(f"  {'':12} {'':32} {'':18} again {again[key]:8,.0f}  [{call}]")
    for r in table:
        for rem in r["remainder_steps"]:
            print(f"{r['run']}: step {rem['step']} left out of the full-step rate ({rem})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
