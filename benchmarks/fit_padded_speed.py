"""The padded trainer loops' speed (issue 25): what LLaMA-Factory, TRL and axolotl add to the
step zeroplan's speed model predicts when they pad each micro-batch instead of packing, fitted
on some runs and checked on the others (CPU only).

    python benchmarks/fit_padded_speed.py [--check]

Rows: every step of benchmarks/results/recipes_gpu_h100*.jsonl (benchmarks/recipe_trainers.py,
one H100, each step's padded shape and seconds). Each step is compared with
``speed.step_time`` of its own shape (micro-batch × longest padded row, the trainer's loop
flags): the excess, measured − predicted seconds, falls in three kinds:

- a step whose shape the run has met before: the steady step (excess about 0);
- the first step of a new shape: the caching allocator's new block sizes and the kernels'
  first calls at that size: ``speed.NEW_SHAPE_S``, fitted here as the median excess of
  such steps in the FIT trainers' rows, and checked on the other trainer's;
- trainer events of a second or more (TRL's Triton JIT of its chunked LM head for a new
  specialisation, axolotl's stalls every third step in the first 14): counted and shown,
  not in the step model (their number over a long run is not measured).

The run's rate is then predicted as its real tokens over Σ (step_time + NEW_SHAPE_S at a new
shape) over the timed steps, against the measured real tokens/s of the same steps, with and
without the events. ``--check`` exits 1 when speed.NEW_SHAPE_S is more than 10% off this fit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zeroplan import speed  # noqa: E402
from zeroplan.hardware import parse_cluster  # noqa: E402
from zeroplan.models import load_model  # noqa: E402
from zeroplan.recipes import WARMUP_STALLS  # noqa: E402
from zeroplan.speed import step_time  # noqa: E402
from zeroplan.trainsetup import TrainSetup  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FILES = ("recipes_gpu_h100.jsonl", "recipes_gpu_h100_nokern.jsonl", "recipes_gpu_h100_mb8.jsonl")
FIT = ("lf", "trl")  # the trainers NEW_SHAPE_S is fitted on; the others are held out
EVENT_S = 0.5  # an excess above this is a trainer event, not a new shape's cost
WARMUP = 3  # the runs' timed steps start after these (recipe_trainers.summarize)
FORMAT = {"trl": "trl", "lf": "llamafactory", "ax": "axolotl"}  # recipe_trainers' names


def rows() -> list[dict[str, Any]]:
    out = []
    for name in FILES:
        path = RESULTS / name
        if path.exists():
            out += [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in out if r.get("per_step")]


def setup_of(row: dict[str, Any], b: int, s: int) -> TrainSetup:
    """The step's setup as the trainer ran it (the loop flags of recipe_trainers.py)."""
    st = row["setup"]
    trl, ax = row["trainer"] == "trl", row["trainer"] == "ax"
    return TrainSetup(
        method=st["method"],
        micro_batch=b,
        seq_len=s,
        grad_accum=st["grad_accum"],
        lora_r=st["lora_r"],
        lora_dropout=st["lora_dropout"],
        optim=st["optim"],
        grad_ckpt=st["grad_ckpt"],
        padding_mask=True,
        chunked_lm_head=trl,
        lora_bf16=trl and st["method"] == "qlora",
        lora_kernels=ax and "nokern" not in row["run"],
    )


def steps(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step after the first: its shape, whether new, measured and predicted seconds."""
    spec = load_model(row["arch"].replace("--", "/", 1))
    cluster = parse_cluster("1xH200" if "H200" in row["machine"]["gpu"] else "1xH100")
    seen: set[tuple[int, int]] = set()
    out = []
    for p in row["per_step"]:
        b, s = p["shapes"][0]
        new = (b, s) not in seen
        seen.add((b, s))
        predicted = step_time(spec, setup_of(row, b, s), cluster).total_s
        out.append(
            {
                "step": p["step"],
                "shape": (b, s),
                "new": new,
                "seconds": p["seconds"],
                "predicted": predicted,
                "excess": p["seconds"] - predicted,
                "real": p["real"],
                "padded": p["padded"],
            }
        )
    return out[1:]  # the first step starts everything (compiles, allocates, loads)


def fit(all_rows: list[dict[str, Any]]) -> float:
    """NEW_SHAPE_S: the median excess of the FIT trainers' new-shape steps (no events)."""
    return statistics.median(new_shape_excess(all_rows, held_out=False))


def held_out_shape(row: dict[str, Any]) -> bool:
    """A run at a shape no fit saw (the micro-batch-8 runs on Llama-3.2-1B)."""
    return any(v.startswith("mb") for v in row["run"].split("+")[1:])


def is_held_out(row: dict[str, Any]) -> bool:
    """A run no fit saw: another trainer's, or a held-out shape."""
    return row["trainer"] not in FIT or held_out_shape(row)


def new_shape_excess(all_rows: list[dict[str, Any]], held_out: bool) -> list[float]:
    """The excess of every new-shape step without a trainer event, of the held-out runs or
    of the fitted ones."""
    return [
        s["excess"]
        for r in all_rows
        if is_held_out(r) == held_out
        for s in steps(r)
        if s["new"] and s["excess"] < EVENT_S
    ]


def run_rate(row: dict[str, Any], new_shape_s: float) -> dict[str, Any]:
    """Measured and predicted real tokens/s over the timed steps, with and without events."""
    timed = [s for s in steps(row) if s["step"] > WARMUP]
    events = [s for s in timed if s["excess"] >= EVENT_S]
    quiet = [s for s in timed if s["excess"] < EVENT_S]

    def rates(some: list[dict[str, Any]]) -> tuple[float, float]:
        """Measured and predicted real tokens/s over these steps."""
        real = sum(s["real"] for s in some)
        predicted = sum(s["predicted"] + (new_shape_s if s["new"] else 0.0) for s in some)
        return real / sum(s["seconds"] for s in some), real / predicted

    measured, predicted = rates(timed)
    measured_quiet, predicted_quiet = rates(quiet)
    return {
        "run": row["run"],
        "held_out": is_held_out(row),
        "measured": measured,
        "predicted": predicted,
        "measured_quiet": measured_quiet,
        "predicted_quiet": predicted_quiet,
        "events": len(events),
        "event_s": sum(s["excess"] for s in events),
        "timed": len(timed),
        "repeat_excess": [round(s["excess"], 3) for s in timed if not s["new"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if speed.NEW_SHAPE_S drifted")
    args = ap.parse_args()
    all_rows = rows()
    new_shape_s = fit(all_rows)
    print(
        f"NEW_SHAPE_S fitted on {', '.join(FIT)}: {new_shape_s:.4f} s (shipped {speed.NEW_SHAPE_S})"
    )
    held = new_shape_excess(all_rows, held_out=True)
    if held:
        print(
            f"held-out new-shape steps: median excess {statistics.median(held):.4f} s (n={len(held)})"
        )
    print(f"{'run':<18} {'measured':>9} {'predicted':>9} {'gap':>7} {'quiet gap':>9} events")
    for r in all_rows:
        v = run_rate(r, speed.NEW_SHAPE_S)
        gap = v["measured"] / v["predicted"] - 1
        quiet = v["measured_quiet"] / v["predicted_quiet"] - 1
        mark = "*" if v["held_out"] else " "
        print(
            f"{v['run']:<17}{mark} {v['measured']:>9,.0f} {v['predicted']:>9,.0f} {gap:>+7.1%} "
            f"{quiet:>+9.1%} {v['events']}/{v['timed']} ({v['event_s']:.1f} s) "
            f"repeats {v['repeat_excess']}"
        )
    print("(* held out: a trainer or shape NEW_SHAPE_S was not fitted on; real tokens/s)")
    if args.check and abs(new_shape_s / speed.NEW_SHAPE_S - 1) > 0.10:
        sys.exit(1)


def warmup(row: dict[str, Any]) -> tuple[float, int]:
    """The run's trainer stalls after its first step: their seconds over the step model
    (recipes.WARMUP_STALLS holds each trainer's range) and the last step with one."""
    events = [s for s in steps(row) if s["excess"] >= EVENT_S]
    return sum(s["excess"] for s in events), max((s["step"] for s in events), default=0)


def data_estimates(all_rows: list[dict[str, Any]]) -> None:
    """``estimate --recipe R --data D`` of each run (recipe_trainers.py --rescore), against
    the run: the whole of it after the first step, and steady (steps 4 on, the trainer's
    stalls left out); the whole run also against the estimate with the trainer's warm-up
    stalls added (the middle of recipes.WARMUP_STALLS). And its padded length and real
    share."""
    print(
        f"{'run':<18} {'estimate':>8} {'whole':>7} {'gap':>7} {'+warm-up':>8} {'steady':>7} "
        f"{'gap':>7} {'padded len':>13} {'real share':>13} {'stalls':>10}"
    )
    for r in all_rows:
        e = r.get("estimate_recipe_data") or {}
        if "speed" not in e:
            continue
        timed = [s for s in steps(r) if s["step"] > WARMUP]
        quiet = [s for s in timed if s["excess"] < EVENT_S]
        rate_quiet = sum(s["real"] for s in quiet) / sum(s["seconds"] for s in quiet)
        lengths = [s["shape"][1] for s in timed]
        fill = sum(s["real"] for s in timed) / sum(s["padded"] for s in timed)
        # the whole run: every step after the first (whose start, 2-6 s, is the process's)
        run = steps(r)
        real = sum(s["real"] for s in run)
        rate = real / sum(s["seconds"] for s in run)
        d, sp = e["data"], e["speed"]
        tps = sp["tokens_per_s"]
        low, high, _ = WARMUP_STALLS.get(FORMAT[r["trainer"]], (0.0, 0.0, 0))
        whole = real / (real / tps + (low + high) / 2)  # the estimate with its warm-up added
        stall_s, last = warmup(r)
        print(
            f"{r['run']:<18} {tps:>8,.0f} {rate:>7,.0f} {rate / tps - 1:>+7.1%} "
            f"{rate / whole - 1:>+8.1%} {rate_quiet:>7,.0f} {rate_quiet / tps - 1:>+7.1%} "
            f"{statistics.mean(lengths):>6.0f}/{d['padded_length']:<6.0f} "
            f"{fill:>6.1%}/{d['fill']:<6.1%} {stall_s:>5.1f}s<={last}"
        )
    print("(whole: real tokens/s of every step after the first; +warm-up: against the estimate")
    print(" with the trainer's warm-up stalls added; steady: steps 4 on, stalls left out;")
    print(" padded length and real share of steps 4 on, measured/expected)")


if __name__ == "__main__":
    main()
    data_estimates(rows())
