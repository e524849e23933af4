"""Fit the MoE step's six constants (``speed.MoESpeedConstants``) and check them on rows
they did not see (CPU only).

    python benchmarks/fit_moe_speed.py [--check] [--fit-experts 16,64,128]
        [--depth-fit qwen3-128x8=2,4,8 ...]

The rows: benchmarks/results/moe_speed_h100.jsonl (benchmarks/moe_speed.py, one H100: cut
models of 8-128 experts, top-k 2-8, attention and all-linear LoRA, micro-batch 1-4, with
and without checkpointing; per step the wall seconds and the host's own clock, the seconds
until the step was queued; for some, the GPU's busy seconds from torch.profiler),
moe_speed3_h100.jsonl (benchmarks/moe_depth.py, one H100: host-bound steps of a
Qwen3-30B-A3B-shaped cut at 2-16 layers and a Mixtral-8x7B-shaped one at 2-8, timed in
one process each way; its "moe_ops" rows are operation counts and are skipped), the
older moe_h100.jsonl (cut Qwen3-30B-A3B and Mixtral-8x7B grids, full-depth rows),
check_h200_moe.jsonl (full Qwen3-30B-A3B on one H200) and LAUNCHED (runs of ``zeroplan
launch``; those whose loss went NaN reported apart, "launched-nan").

The fit, one clock per constant: ``copy_bytes`` minimises the squared log-ratio of
``speed.gpu_seconds`` (+ the optimizer step) to the GPU's busy time on attention-only rows
of FIT_EXPERTS expert counts, then ``bank_bytes`` the same on all-linear rows;
``host_step_s``, ``host_layer_s`` and the MoE ``host_recompute`` (a grid: host_rows, whose
host clock is the step's: moe_depth's rows of DEPTH_FIT, which separate a cost per step
from one per layer, the moe_speed rows of FIT_EXPERTS and the older 8-layer grid's)
that of ``speed.host_seconds`` to the host's clock; ``bank_recompute`` that of the
predicted to the measured wall on checkpointed all-linear rows (one-dimensional searches
in log space, refined twice). The dense constants (``speed.FITTED``) are not touched.

Then the error that counts, predicted tokens/s against measured (the wall clock), on rows
the fit did not see: the other expert counts' rows of moe_speed_h100.jsonl and the older
Mixtral-8x7B grid ("held-out"), moe_depth's other shapes and depths ("held-out-depth");
the older Qwen3-30B-A3B grid (128 experts, a fitted count, partly in the host fit), the
full-depth rows, the H200 rows and the launched runs are printed too. Each beside the
dense model's (no MoE terms: what MoE steps were predicted with before MOE_IN_USE). 9 in 10 rows of each held-out group must be within
``speed.HELD_OUT_P90_*`` (host-bound and GPU-bound apart) and the launched runs with
finite losses within ``speed.LAUNCHED_P90_*`` for the constants to ship (``ships``). A
launched MoE step adds ``launch_step_s``, the median of the launched runs' steps beyond
their predicted lean step, in place of the dense trainer's; its band (MOE_LAUNCHED_P90)
comes from the launched-check runs, which that median did not see.

``--check`` exits 1 when zeroplan/speed.py's MOE_CANDIDATE differs from this fit by more
than 5% on any constant, or when MOE_FITTED (what the estimate uses) is shipped while the
held-out rows are out of band, or not shipped while they are in it (a test runs it).
``--fit-experts`` and ``--depth-fit`` fit on other expert counts and depths (the rest held
out).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_check  # the same cut models and setups as the memory comparison

from zeroplan import speed
from zeroplan.hardware import parse_cluster
from zeroplan.models import ModelSpec, load_model, spec_from_config
from zeroplan.speed import MoESpeedConstants, step_time
from zeroplan.trainsetup import TrainSetup

# the expert counts the constants are fitted on; 8 (Mixtral-8x7B's own) and 32 are held out
FIT_EXPERTS = (16, 64, 128)
H100 = parse_cluster("1xH100")
# moe_depth.py's host-bound steps (one process each way, same H100): the host constants are
# fitted on the Qwen3-30B-A3B-shaped cut at these depths; its 16 layers and every
# Mixtral-8x7B-shaped depth are held out (a whole depth and a whole shape)
DEPTH_FILE = "moe_speed3_h100.jsonl"
DEPTH_FIT = {"qwen3-128x8": (2, 4, 8)}
# launched runs (launch_gpu_check.py): file -> group. "launched": losses finite, the rows the
# quoted launched band (speed.MOE_LAUNCHED_P90) comes from. "launched-nan": the 16-layer
# Qwen3-30B-A3B cut's loss was NaN from step 2 (both target sets): NaN routing may send
# every token to the same experts, which grouped_mm runs faster, so those runs are reported
# apart. "launched-check": runs launched after the band was set, its check on runs it was
# not derived from: benchmarks/moe_band_gpu.sh's deeper cuts, and benchmarks/moe_targets_gpu.sh's
# target sets nothing had launched (Mixtral all-linear, QLoRA on attention, attention +
# router, a host-bound step), on whichever card that call got
LAUNCHED = {
    "launch_moe_h100.jsonl": "launched",
    "launch_moe3_h100.jsonl": "launched-nan",
    "launch_moe4_h100.jsonl": "launched-check",
    "launch_moe5_h100.jsonl": "launched-check",
    "launch_moe5_h200.jsonl": "launched-check",
    "launch_moe6_h100.jsonl": "launched-check",
}
# moe_nan.py's launches of the NaN fix (router_aux_loss_coef 0) that timed their steps:
# the 16-layer cut, all-linear, finite losses (group "launched")
NAN_FIX_FILE = "moe_nan_h100.jsonl"
# the rows no fit saw, of which the MoE bands (speed.MOE_HELD_OUT_P90_*) are the 9-in-10
# |error|: the 8 and 32 expert shapes and the older Mixtral grid, moe_depth's 16 layers and
# Mixtral shape, the full Qwen3-30B-A3B on the H100 and on the H200
HELD_OUT = ("held-out", "held-out-depth", "depth", "h200")


def speed_rows(fit_experts: tuple[int, ...] = FIT_EXPERTS) -> list[dict[str, Any]]:
    """The moe_speed.py rows: wall, host and (profiled rows) GPU seconds, medians of the
    timed steps; the profile's busy time is halved (torch.profiler's key_averages lists
    every kernel both under its operator and on its own)."""
    out = []
    for row in moe_check.rows("moe_speed_h100.jsonl"):
        if row["error"]:
            continue
        spec = spec_from_config(row["config"], name=row["shape"])
        assert spec.moe is not None
        busy = row.get("profile", {}).get("gpu_busy_s")
        group = "fit" if spec.moe.num_experts in fit_experts else "held-out"
        out.append(_timed(row, spec, group, busy / 2 if busy else None))
    return out


def _timed(row: dict[str, Any], spec: Any, group: str, busy_s: float | None) -> dict[str, Any]:
    """One timed lean MoE row of moe_speed.py or moe_depth.py (one H100): the medians of its
    wall and dispatch seconds after its warm-up steps."""
    warm = row["warmup_steps"]
    return {
        "model": row["shape"],
        "layers": spec.num_layers,
        "spec": spec,
        "setup": moe_check.setup_of(row),
        "gpu": "1xH100",
        "measured_s": statistics.median(row["step_seconds"][warm:]),
        "host_s": statistics.median(row["dispatch_seconds"][warm:]),
        "busy_s": busy_s,
        "group": group,
    }


def lean_rows(
    fit_experts: tuple[int, ...] = FIT_EXPERTS, depth_fit: dict[str, tuple[int, ...]] = DEPTH_FIT
) -> list[dict[str, Any]]:
    """Every timed lean step of the MoE files: speed_rows, then the older grid and
    full-depth rows on one H100 and the full Qwen3-30B-A3B's all-linear rows on one H200.
    ``measured_s``: the median of the timed steps (after the row's warm-up)."""
    out = speed_rows(fit_experts) + depth_rows(depth_fit)
    for row in moe_check.rows("moe_h100.jsonl"):
        if row.get("section") not in ("grid", "depth") or row["error"]:
            continue
        steps = row["step_seconds"][row["warmup_steps"] :]
        spec = moe_check.cut(row["model"], row["num_layers"])
        r = _lean(row, spec, statistics.median(steps), "1xH100")
        if r["group"] == "grid":
            experts = spec.moe.num_experts if spec.moe else 0
            r["group"] = "grid-fitE" if experts in fit_experts else "held-out"
        out.append(r)
    for row in moe_check.rows("check_h200_moe.jsonl"):
        if row["oom"]:
            continue
        steps = row["step_seconds"][row["warmup_steps"] :]
        out.append(_lean(row, load_model(row["model"]), statistics.median(steps), "1xH200"))
    return out


def depth_rows(depth_fit: dict[str, tuple[int, ...]] = DEPTH_FIT) -> list[dict[str, Any]]:
    """moe_depth.py's timed rows (bench "moe_depth"; its "moe_ops" rows are operation
    counts): the medians of the wall and dispatch seconds, ``group`` "depth-fit" for
    ``depth_fit``'s shapes and depths, "held-out-depth" for the rest, ``order`` the process."""
    out = []
    for row in moe_check.rows(DEPTH_FILE):
        if row["bench"] != "moe_depth" or row["error"] or row["oom"]:
            continue
        spec = spec_from_config(row["config"], name=row["shape"])
        fitted = row["num_layers"] in depth_fit.get(row["shape"], ())
        group = "depth-fit" if fitted else "held-out-depth"
        out.append(_timed(row, spec, group, None) | {"order": row["order"]})
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
    """The launched runs (moe_check.launch_rows of each LAUNCHED file, those present) with
    their spec, fill and group, then the timed runs of moe_nan.py's fix (nan_fix_rows)."""
    out = []
    for name, group in LAUNCHED.items():
        if not (moe_check.RESULTS / name).exists():
            continue
        raw = moe_check.rows(name)
        for row, r in zip(raw, moe_check.launch_rows(name), strict=True):
            if r["tokens_per_s"] is None:  # a run that timed no step after the warm-up
                continue
            fill = row["applied"]["batching"]["fill"]
            gpu = _card(row)
            spec = _launched_spec(row)
            out.append({**r, "spec": spec, "fill": fill, "group": group, "gpu": gpu, "file": name})
    return out + nan_fix_rows()


def nan_fix_rows() -> list[dict[str, Any]]:
    """moe_nan.py's launches of the fixed tree (variant "fixed-*") that timed their steps:
    the 16-layer Qwen3-30B-A3B cut at moe_nan.SETUPS' setup, group "launched"."""
    import moe_nan

    out = []
    for row in moe_check.rows(NAN_FIX_FILE):
        if not row["variant"].startswith("fixed") or not row.get("tokens_per_s"):
            continue
        layers = row["spec"]["layers"]
        spec = _launched_spec({"arch": row["arch"], "layers": layers})
        out.append(
            {
                "model": spec.name,
                "layers": layers,
                "setup": moe_nan.SETUPS[row["spec"]["setup"]],
                "tokens_per_s": row["tokens_per_s"],
                "losses": [x["loss"] for x in row["train"]],
                "spec": spec,
                "fill": row["batching"]["fill"],
                "group": "launched",
                "gpu": _card(row),
            }
        )
    return out


def _card(row: dict[str, Any]) -> str:
    """The cluster a launched row ran on: one H200 where its card says so, else one H100
    (the earliest rows name no card: they ran on an H100)."""
    return "1xH200" if "H200" in (row.get("gpu") or "") else "1xH100"


def _launched_spec(row: dict[str, Any]) -> ModelSpec:
    sys.path.insert(0, str(moe_check.RESULTS.parent.parent / "tests"))
    import tinyllm

    catalog = load_model(row["arch"].replace("--", "/"))
    vocab = len(tinyllm.build_tokenizer())
    config = {**catalog.config, "num_hidden_layers": row["layers"], "vocab_size": vocab}
    return spec_from_config(config, name=catalog.name)


def lean_error(r: dict[str, Any], m: MoESpeedConstants | None) -> tuple[float, bool]:
    """(predicted tokens/s / measured − 1, host-bound) of a lean row under ``m`` (None: the
    dense model, no MoE terms)."""
    p = step_time(r["spec"], r["setup"], parse_cluster(r["gpu"]), launched=False, m=m)
    return r["measured_s"] / p.total_s - 1, p.host_bound


def launched_error(r: dict[str, Any], m: MoESpeedConstants | None) -> tuple[float, bool]:
    """(predicted real tokens/s / measured − 1, host-bound) of a launched run under ``m``."""
    p = step_time(r["spec"], r["setup"], parse_cluster(r["gpu"]), fill=r["fill"], m=m)
    return p.tokens_per_s / r["tokens_per_s"] - 1, p.host_bound


def launch_excess(r: dict[str, Any], m: MoESpeedConstants) -> float:
    """Seconds a launched run's step took beyond the predicted lean step (micro-batches and
    optimizer, ``launched=False``): what the trainer added, against the dense runs'
    launch_step_s (30 ms)."""
    setup: TrainSetup = r["setup"]
    measured = setup.tokens * setup.grad_accum * r["fill"] / r["tokens_per_s"]
    lean = step_time(r["spec"], setup, parse_cluster(r["gpu"]), launched=False, m=m)
    return measured - lean.total_s


def quoted_error_p90(r: dict[str, Any], m: MoESpeedConstants) -> float | None:
    """The band estimate and plan quote for a launched run's step (StepTime.error_p90; None
    where the step is not calibrated)."""
    p = step_time(r["spec"], r["setup"], parse_cluster(r["gpu"]), fill=r["fill"], m=m)
    return p.error_p90 if p.calibrated else None


def host_clock(r: dict[str, Any], m: MoESpeedConstants) -> float:
    """speed.host_seconds of a row: what its host clock (``host_s``) is compared with."""
    return speed.host_seconds(r["spec"], r["setup"], m=m)


def gpu_clock(r: dict[str, Any], m: MoESpeedConstants) -> float:
    """The GPU's predicted busy seconds of a step: the micro-batch and the optimizer step."""
    gpu = H100.gpu
    return speed.gpu_seconds(r["spec"], r["setup"], gpu, m=m) + speed.optimizer_seconds(
        r["spec"], r["setup"], gpu, 1
    )


def _search(loss: Callable[[float], float], low: float, high: float) -> float:
    """The value in [low, high] (log-spaced, 0 included) minimising ``loss``, refined twice
    around the best point, to 4 significant digits."""
    grid = [0.0] + [low * (high / low) ** (i / 40) for i in range(41)]
    best = min(grid, key=loss)
    for span in (1.25, 1.05):
        best = min((best * span ** (i / 5) for i in range(-5, 6)), key=loss)
    return float(f"{best:.4g}")


def host_rows(
    copy: float,
    bank: float,
    fit_experts: tuple[int, ...],
    depth_fit: dict[str, tuple[int, ...]] = DEPTH_FIT,
) -> list[dict[str, Any]]:
    """The rows the host constants are fitted on, those whose predicted GPU clock (``copy``
    and ``bank`` the fitted GPU constants) is under half their host clock, so that the
    host's clock is the step's: moe_depth.py's rows of DEPTH_FIT (only the depths of one
    process separate a host cost per step from one per layer), the moe_speed rows of the
    fitted expert counts, and the older 8-layer grid's rows of those counts (their wall:
    no host clock was recorded). Three processes on two days: the host's speed differs
    between processes (HOST_BOUND_REPEAT_SPREAD), and the fit averages over them."""
    m = MoESpeedConstants(0.0, bank, copy)
    out = [r for r in depth_rows(depth_fit) if r["group"] == "depth-fit"]
    out += [r for r in speed_rows(fit_experts) if r["group"] == "fit"]
    for r in lean_rows(fit_experts, depth_fit):
        if r["group"] == "grid-fitE":
            out.append({**r, "host_s": r["measured_s"]})
    return [r for r in out if gpu_clock(r, m) < 0.5 * r["host_s"]]


def _grid(loss: Callable[..., float], axes: list[tuple[float, float]]) -> tuple[float, ...]:
    """The point of the box ``axes`` ((low, high) each) minimising ``loss``: a 21-point grid
    per axis, then twice one of 10 points a side around the best at a tenth of the
    spacing, each value >= low, to 4 significant digits."""
    steps = [(high - low) / 20 for low, high in axes]
    best = min(
        itertools.product(
            *[[low + i * d for i in range(21)] for (low, _), d in zip(axes, steps, strict=True)]
        ),
        key=lambda x: loss(*x),
    )
    for _ in range(2):
        steps = [d / 10 for d in steps]
        around = [
            [max(low, b + i * d) for i in range(-10, 11)]
            for (low, _), b, d in zip(axes, best, steps, strict=True)
        ]
        best = min(itertools.product(*around), key=lambda x: loss(*x))
    return tuple(float(f"{x:.4g}") for x in best)


def fit(
    rows: list[dict[str, Any]],
    fit_experts: tuple[int, ...] = FIT_EXPERTS,
    depth_fit: dict[str, tuple[int, ...]] = DEPTH_FIT,
) -> MoESpeedConstants:
    """Each constant on its own clock (module docstring); ``rows``: speed_rows of the fit
    (the GPU constants); the host constants on host_rows."""

    def log2(pred: float, measured: float) -> float:
        return math.log(pred / measured) ** 2

    profiled = [r for r in rows if r["busy_s"]]
    attn = [r for r in profiled if not speed.banks_adapted(r["spec"], r["setup"])]
    banks = [r for r in profiled if speed.banks_adapted(r["spec"], r["setup"])]
    copy = _search(
        lambda c: sum(
            log2(gpu_clock(r, MoESpeedConstants(0.0, 0.0, c)), r["busy_s"]) for r in attn
        ),
        0.1,
        1000.0,
    )
    bank = _search(
        lambda b: sum(
            log2(gpu_clock(r, MoESpeedConstants(0.0, b, copy)), r["busy_s"]) for r in banks
        ),
        0.1,
        1000.0,
    )
    # the host clock: step + (1 + c · recompute) · (dense operations' + L_moe · per layer)
    hosts = host_rows(copy, bank, fit_experts, depth_fit)
    ops = [host_clock(r, MoESpeedConstants(0.0, 0.0, host_recompute=0.0)) for r in hosts]

    def host_loss(step: float, layer: float, again: float) -> float:
        return sum(
            log2(
                step
                + (1 + int(r["setup"].grad_ckpt) * again)
                * (d + r["spec"].moe.num_moe_layers * layer),
                r["host_s"],
            )
            for r, d in zip(hosts, ops, strict=True)
        )

    # 0-20 ms per micro-batch, 0-5 ms per MoE layer, a recompute share of 0-2
    step, host, again = _grid(host_loss, [(0.0, 0.02), (0.0, 0.005), (0.0, 2.0)])
    # what the recompute repeats of the banks' traffic: the wall of the checkpointed
    # all-linear rows (no profile ran under checkpointing), the rest as fitted
    ckpt = [r for r in rows if r["setup"].grad_ckpt and speed.banks_adapted(r["spec"], r["setup"])]

    def constants(x: float) -> MoESpeedConstants:
        return MoESpeedConstants(host, bank, copy, x, step, again)

    recompute = _search(
        lambda x: sum(math.log1p(lean_error(r, constants(x))[0]) ** 2 for r in ckpt), 0.01, 10.0
    )
    # the launched trainer's per-step cost: the median excess of the launched runs with
    # finite losses over their predicted lean step (which does not depend on it)
    lean = constants(recompute)
    excess = [launch_excess(r, lean) for r in launched_rows() if r["group"] == "launched"]
    return dataclasses.replace(lean, launch_step_s=statistics.median(excess))


def p90(errors: list[float]) -> float:
    """The |error| 9 in 10 rows are within (nearest rank)."""
    if not errors:
        return 0.0
    ranked = sorted(abs(e) for e in errors)
    return ranked[max(0, math.ceil(0.9 * len(ranked)) - 1)]


def _label(r: dict[str, Any]) -> str:
    s: TrainSetup = r["setup"]
    targets = ",".join(s.lora_targets).replace("q_proj,k_proj,v_proj,o_proj", "qkvo")
    targets = ("qlora " if s.method == "qlora" else "") + targets
    return (
        f"{r['model'].split('/')[-1]:18s} L={r['layers']:2d} {targets:10s} "
        f"{'ckpt' if s.grad_ckpt else '    '} {s.micro_batch}x{s.seq_len:<4d}"
    )


GROUPS = (
    "fit",
    "held-out",
    "depth-fit",
    "held-out-depth",
    "grid-fitE",
    "depth",
    "h200",
    "launched",
    "launched-nan",
    "launched-check",
)


def report(
    m: MoESpeedConstants,
    fit_experts: tuple[int, ...] = FIT_EXPERTS,
    depth_fit: dict[str, tuple[int, ...]] = DEPTH_FIT,
) -> dict[str, Any]:
    """Every row's error with and without the MoE terms; p90s by group and bound; the two
    clocks' errors (host, GPU) on the moe_speed rows."""
    out: dict[str, Any] = {"rows": [], "bands": {}, "clocks": []}
    for r in lean_rows(fit_experts, depth_fit):
        err, host = lean_error(r, m)
        out["rows"].append((r["group"], _label(r), r["gpu"][2:], err, lean_error(r, None)[0], host))
        if "host_s" in r:
            gpu = gpu_clock(r, m) / r["busy_s"] - 1 if r["busy_s"] else None
            out["clocks"].append((r["group"], _label(r), host_clock(r, m) / r["host_s"] - 1, gpu))
    for r in launched_rows():
        err, host = launched_error(r, m)
        before = launched_error(r, None)[0]
        out["rows"].append((r["group"], _label(r), r["gpu"][2:], err, before, host))
    for group in GROUPS:
        for host in (False, True):
            errs = [e for g, _, _, e, _, h in out["rows"] if g == group and h == host]
            if errs:
                out["bands"][(group, host)] = (p90(errs), len(errs))
    return out


def within_dense_bands(bands: dict[tuple[str, bool], tuple[float, int]]) -> bool:
    """The held-out lean rows within the dense models' HELD_OUT_P90_* and the launched runs
    within LAUNCHED_P90_*, host-bound and GPU-bound apart (printed: MoE steps quote their
    own bands, moe_bands)."""
    ok = True
    for (group, host), (value, _) in bands.items():
        if group in ("held-out", "held-out-depth"):
            limit = speed.HELD_OUT_P90_HOST_BOUND if host else speed.HELD_OUT_P90_GPU_BOUND
        elif group == "launched":
            limit = speed.LAUNCHED_P90_HOST_BOUND if host else speed.LAUNCHED_P90_GPU_BOUND
        else:
            continue
        ok = ok and value <= limit
    return ok


# each MoE band -> the speed.py constant that quotes it
QUOTED = {
    "held-out GPU-bound": "MOE_HELD_OUT_P90_GPU_BOUND",
    "held-out host-bound": "MOE_HELD_OUT_P90_HOST_BOUND",
    "launched": "MOE_LAUNCHED_P90",
}


def moe_bands(
    rows: list[tuple[str, str, str, float, float, bool]],
) -> dict[str, tuple[float, int]]:
    """The MoE step's own bands from report()'s rows, (9 in 10 |error|, rows): the lean
    rows no fit saw (HELD_OUT), GPU-bound and host-bound apart, and the launched runs the
    MoE launch cost was not fitted on ("launched-check"; one band for both kinds of step:
    two of them are host-bound, too few for a band of their own)."""
    held = [(e, h) for g, _, _, e, _, h in rows if g in HELD_OUT]
    # the launched runs the MoE launch cost was not fitted on
    launched = [e for g, _, _, e, _, _ in rows if g == "launched-check"]
    gpu = [e for e, h in held if not h]
    host = [e for e, h in held if h]
    return {
        "held-out GPU-bound": (p90(gpu), len(gpu)),
        "held-out host-bound": (p90(host), len(host)),
        "launched": (p90(launched), len(launched)),
    }


def drifted(bands: dict[str, tuple[float, int]]) -> list[str]:
    """The speed.py constants more than a point off the band they quote."""
    return [
        name
        for band, name in QUOTED.items()
        if abs(bands[band][0] - float(getattr(speed, name))) > 0.01
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument(
        "--fit-experts",
        default=",".join(map(str, FIT_EXPERTS)),
        help="the expert counts to fit on (the others are held out)",
    )
    p.add_argument(
        "--depth-fit",
        action="append",
        metavar="SHAPE=DEPTHS",
        help="moe_depth shapes and depths to fit the host on, e.g. qwen3-128x8=2,4,8 "
        "(repeatable; default: DEPTH_FIT; the others are held out)",
    )
    args = p.parse_args()
    fit_experts = tuple(int(e) for e in args.fit_experts.split(","))
    depth_fit = DEPTH_FIT
    if args.depth_fit:
        pairs = [item.split("=") for item in args.depth_fit]
        depth_fit = {shape: tuple(int(d) for d in depths.split(",")) for shape, depths in pairs}
    fitted = fit(
        [r for r in speed_rows(fit_experts) if r["group"] == "fit"], fit_experts, depth_fit
    )
    print(f"fitted on {fit_experts} experts and the depths {depth_fit}: {fitted}")
    print(f"zeroplan.speed.MOE_CANDIDATE: {speed.MOE_CANDIDATE}")
    print(f"zeroplan.speed.MOE_FITTED (shipped with a band): {speed.MOE_FITTED}")
    rep = report(fitted, fit_experts, depth_fit)
    print("the two clocks, predicted over measured − 1 (moe_speed rows): host, GPU (profiled)")
    for group, label, host_err, gpu_err in rep["clocks"]:
        gpu = f"{gpu_err:+7.1%}" if gpu_err is not None else "       "
        print(f"  {group:9s} {label} {host_err:+7.1%} {gpu}")
    print("predicted tokens/s error (+: too fast): with the MoE terms, the dense model (none)")
    for group, label, gpu, err, before, host in rep["rows"]:
        bound = "host-bound" if host else "GPU-bound"
        print(f"  {group:9s} {label} {gpu} {err:+7.1%} {before:+7.1%} {bound}")
    print("9 in 10 within (rows):")
    for (group, host), (value, n) in rep["bands"].items():
        print(f"  {group:9s} {'host-bound' if host else 'GPU-bound ':10s} {value:6.1%} ({n})")
    print("launched, the step beyond the predicted lean step (the trainer's cost; dense: 30 ms):")
    for r in launched_rows():
        excess = launch_excess(r, fitted) * 1e3
        print(f"  {r['group']:9s} {_label(r)} {r['gpu'][2:]} {excess:6.1f} ms")
    print(f"within the dense models' bands: {within_dense_bands(rep['bands'])}")
    bands = moe_bands(rep["rows"])
    print("the MoE step's own bands (9 in 10 within, rows), and speed.py's quoted values:")
    for band, (value, n) in bands.items():
        quoted = float(getattr(speed, QUOTED[band]))
        print(f"  {band:20s} {value:6.1%} ({n})  speed.{QUOTED[band]} = {quoted:.1%}")
    checked = [r for r in launched_rows() if r["group"] == "launched-check"]
    dense_cost = dataclasses.replace(fitted, launch_step_s=None)
    if checked:
        print(
            "launched-check (the MoE launch cost not fitted on them), against the quoted band; "
            f"beside: with the dense trainer's {speed.FITTED.launch_step_s * 1e3:.0f} ms"
        )
        for r in checked:
            err, host_bound = launched_error(r, fitted)
            band = quoted_error_p90(r, speed.MOE_IN_USE)
            held = band is not None and abs(err) <= band
            quoted = f"±{band:.1%}" if band is not None else "no band"
            print(
                f"  {_label(r)} {r['gpu'][2:]} {err:+7.1%} {quoted}: "
                f"{'held' if held else 'MISSED'}{' (host-bound)' if host_bound else ''}; "
                f"dense cost {launched_error(r, dense_cost)[0]:+7.1%}"
            )
    if args.check:
        pairs = (
            (fitted.host_layer_s, speed.MOE_CANDIDATE.host_layer_s),
            (fitted.bank_bytes, speed.MOE_CANDIDATE.bank_bytes),
            (fitted.copy_bytes, speed.MOE_CANDIDATE.copy_bytes),
            (fitted.bank_recompute, speed.MOE_CANDIDATE.bank_recompute),
            (fitted.host_step_s, speed.MOE_CANDIDATE.host_step_s),
            (fitted.host_recompute or 0.0, speed.MOE_CANDIDATE.host_recompute or 0.0),
            (fitted.launch_step_s or 0.0, speed.MOE_CANDIDATE.launch_step_s or 0.0),
        )
        if any(abs(a - b) > 0.05 * max(abs(a), abs(b)) for a, b in pairs):
            print("MOE_CANDIDATE differs from the fit by more than 5%")
            return 1
        if speed.MOE_FITTED != speed.MOE_CANDIDATE:
            print("MOE_FITTED (shipped with the MoE bands) must be MOE_CANDIDATE")
            return 1
        off = drifted(bands)
        if off:
            print(f"DRIFTED: {', '.join(off)} more than a point off the rows' band")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
