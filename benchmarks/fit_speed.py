"""Fit zeroplan.speed's constants on the measured steps in benchmarks/results/.

    python benchmarks/fit_speed.py [FILES...] [--check] [--markdown] [--rows]

The fitted constants (``speed.SpeedConstants``: efficiency by method, the elementwise
traffic, the host's per-layer / per-adapter / per-4-bit-linear costs and checkpointing's
share of them, the 8-bit optimizer, the fused loss) minimise the squared log-ratio of
predicted to measured step time over the one-GPU rows without DeepSpeed (Nelder-Mead in log
space, from a fixed start: the same rows give the same constants). A row's measured time
is the median of its timed steps (speed_grid.py rows: every step after the warm-up; older
measure_memory.py rows: the steps after the first, which allocates the optimizer states;
ZeRO-3 there: the last step). Its predicted time is ``speed.step_time(..., launched=False)``:
the lean step.

These constants are measured, not fitted, each on named rows:
* ``lora_bytes``: bf16 LoRA under DDP against its DeepSpeed twins on two H200s;
* ``zero3_tensor_s``: ZeRO-3 rows against their DDP twins;
* ``host_staged_gbs``: a ZeRO-2 shape run with and without ``NCCL_P2P_DISABLE=1`` on two
  GPUs of one host: the extra seconds are the gradients' and parameters' traffic at the
  host-staged bandwidth;
* ``deepspeed_step_s``: one-GPU ZeRO-0 rows against plain twins of the same file;
* ``cpu_adam_serial_s`` / ``cpu_adam_thread_s``: optimizer-offload rows with DeepSpeed's
  CPU Adam at set OpenMP thread counts, less the predicted step without offload and the
  PCIe trips, as a line in 1 / threads;
* ``launch_step_s``: the launched runs of realdata_speed.py against the lean step of the
  same shape (realdata_h200_lean.jsonl);
* ``graph_token_s``: launched runs with the decoder as CUDA graphs (graphs*.jsonl): the
  median step less the profiler's GPU-busy seconds, least squares through 0 on the token
  positions (graph_token_s);
* ``norm_loop_s`` / ``norm_loop_element_s``: Liger's RMSNorm backward kernels in every
  probed launch's profile, against the turns of its row loop and the elements they handle
  (norm_loops), least squares on the relative error.

``--check`` exits 1 when zeroplan/speed.py's FITTED differs from this by more than 5% on
any constant, when its FITTED_FAMILIES or MEASURED_GPUS are not the rows' families and
cards, or when its held-out bands (HELD_OUT_P90_*) are a point off (a test runs it). Then the error that counts: predicted tokens/s against
measured on rows each refit did NOT see (leave one model family out, one GPU out, one
sequence length out, one micro-batch size out; a fold that leaves fewer than two rows per
constant is no fit, and says so), and on the rows no fit uses (DeepSpeed on one GPU, two
GPUs with and without P2P, offload). ``--markdown`` prints that table for docs/speed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import (  # the same row → TrainSetup as the memory comparison
    cluster_of,
    known_model,
    omp_threads_set,
    setup_of,
)

from zeroplan import speed
from zeroplan.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
FITTED_FIELDS = (
    "efficiency_lora",
    "efficiency_qlora",
    "efficiency_full",
    "act_bytes",
    "overlap_p",
    "host_op_s",
    "host_4bit_s",
    "host_recompute",
    "optimizer_8bit_bytes",
    "optimizer_8bit_tensor_s",
)
MEASURED_FIELDS = (
    "lora_bytes",
    "fused_chunk_s",
    "zero3_tensor_s",
    "host_staged_gbs",
    "deepspeed_step_s",
    "cpu_adam_serial_s",
    "cpu_adam_thread_s",
    "launch_step_s",
    "graph_token_s",
    "norm_loop_s",
    "norm_loop_element_s",
)


def default_files() -> list[Path]:
    return sorted([*RESULTS.glob("memory_*.jsonl"), *RESULTS.glob("speed_*.jsonl")])


# Single steps vary by 50% on these machines: rows timed over fewer steps (the 3-step
# memory rows time 2) are memory measurements, not speed ones.
MIN_TIMED = 5


def timed_rows(files: list[Path], min_timed: int = MIN_TIMED) -> list[dict[str, Any]]:
    """Rows that ran ``min_timed`` or more timed steps at full speed (no OOM, no error, no
    memory cap, a model with a config here)."""
    out = []
    for f in files:
        process = None
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            # the first shape of a process (speed_grid.py: one model build per line)
            this = (r["model"], r["method"], r.get("zero"), r.get("build_seconds"))
            first, process = this != process, this
            steps = r.get("step_seconds") or []
            timed = len(steps) if "warmup_steps" in r else len(steps) - 1
            if r.get("oom") or r.get("error") or timed < min_timed or r.get("memory_fraction"):
                continue
            if r.get("precision") == "fp16":
                continue  # forced fp16 on a bf16 card: memory rows, not a speed anyone runs
            if not known_model(r):
                continue
            r["_file"], r["_first"] = f.name, first and "build_seconds" in r
            out.append(r)
    return out


def measured_seconds(r: dict[str, Any]) -> float:
    if "_median_seconds" in r:  # a shape measured in several processes (shape_medians)
        return float(r["_median_seconds"])
    steps = r["step_seconds"]
    if "warmup_steps" in r:  # speed_grid.py: every kept step is a timed one
        return float(statistics.median(steps))
    return float(steps[-1] if r["zero"] == 3 else statistics.median(steps[1:]))


def gpu_label(r: dict[str, Any]) -> str:
    name = r["env"]["gpu"].replace("NVIDIA ", "").replace(" 80GB HBM3", "")
    return name


def is_fit_row(r: dict[str, Any]) -> bool:
    """One GPU, no DeepSpeed: the rows the fitted constants come from (DeepSpeed's own
    costs are measured constants, read off one-GPU twins)."""
    return r.get("world_size", 1) == 1 and r.get("zero") is None


@dataclasses.dataclass(frozen=True)
class Features:
    """What a one-GPU row's lean step is made of, the constants left out:
    seconds = accum · smooth_max(a/eff + b·lora_bytes + e·act_bytes + n + v·logits_bytes
    + chunks·fused_chunk_s + chunks·2·max(0, w − f/eff) + c,
    (1 + ckpt·hR)·(ops·hO + q·hQ + tensors·z3))
    + opt·bytes per parameter + opt_tensors·optimizer_8bit_tensor_s
    (speed.step_time, written out so that a fit costs microseconds)."""

    method: str
    a: float
    b: float
    e: float
    n: float  # the norms' counted traffic, seconds
    v: float
    chunks: int
    w: float  # one read of the output head's weight, seconds (speed.head_read_seconds)
    f: float  # one fused-loss chunk matmul's FLOPs at the card's peak, seconds
    c: float
    ops: int
    q: int
    tensors: int
    ckpt: int
    accum: int
    opt: float  # optimizer seconds per byte per parameter
    opt_8bit: bool
    opt_tensors: int  # tensors the 8-bit optimizer steps one by one

    def seconds(self, k: speed.SpeedConstants) -> float:
        gpu = self.a / k.efficiency(self.method) + self.b * k.lora_bytes + self.e * k.act_bytes
        gpu += self.n + self.v * k.logits_bytes + self.c
        gpu += self.chunks * k.fused_chunk_s
        if self.chunks:
            gpu += self.chunks * 2 * max(0.0, self.w - self.f / k.efficiency(self.method))
        host = (1 + self.ckpt * k.host_recompute) * (
            self.ops * k.host_op_s + self.q * k.host_4bit_s + self.tensors * k.zero3_tensor_s
        )
        per_param = k.optimizer_8bit_bytes if self.opt_8bit else speed.ADAMW_BYTES
        micro = speed.smooth_max(gpu, host, k.overlap_p)
        opt = self.opt * per_param + self.opt_tensors * k.optimizer_8bit_tensor_s
        return self.accum * micro + opt


_FEATURES: dict[int, Features] = {}
# optimizer_seconds at one byte per parameter: the fit scales it by the fitted bytes
ONE_BYTE = dataclasses.replace(speed.FITTED, optimizer_8bit_bytes=1.0, optimizer_8bit_tensor_s=0.0)


def features(r: dict[str, Any]) -> Features:
    key = id(r)
    if key not in _FEATURES:
        spec, setup, cluster = load_model(r["model"]), setup_of(r), cluster_of(r)
        gpu = cluster.gpu
        bw = gpu.memory_bandwidth_gbs * 1e9
        passes = speed.elementwise_passes(setup)
        chunks = 0
        if setup.fused_loss:
            chunks = speed.liger_chunks(setup.tokens, spec.vocab_size, spec.hidden_size)
        head = spec.vocab_size * spec.hidden_size
        peak = speed.peak_tflops(setup, gpu) * 1e12
        _FEATURES[key] = Features(
            method=setup.method,
            a=speed.flops_per_token(spec, setup)
            * setup.tokens
            / (speed.peak_tflops(setup, gpu) * 1e12),
            b=setup.tokens
            * speed.adapted_features(spec, setup)
            / bw
            * passes
            * speed.lora_share(setup),
            e=setup.tokens * speed.activation_features(spec) / bw * passes,
            n=setup.tokens * speed.NORM_BYTES * speed.norm_features(spec) / bw * passes,
            v=0.0 if setup.fused_loss else setup.tokens * spec.vocab_size / bw,
            chunks=chunks,
            w=head * 2 / bw,
            f=2 * -(-setup.tokens // max(chunks, 1)) * head / peak,
            c=speed.fixed_bytes(spec, setup) / bw,
            ops=speed.host_operations(spec, setup),
            q=speed.quantized_linears(spec, setup),
            tensors=speed.parameter_tensors(spec, setup) if setup.zero == 3 else 0,
            ckpt=int(setup.grad_ckpt),
            accum=setup.grad_accum,
            opt=speed.optimizer_seconds(spec, setup, gpu, cluster.world_size, ONE_BYTE)
            / (1.0 if setup.optim.endswith("8bit") else speed.ADAMW_BYTES),
            opt_8bit=setup.optim.endswith("8bit"),
            opt_tensors=speed.optimizer_tensors(spec, setup),
        )
    return _FEATURES[key]


def with_fitted(values: list[float], base: speed.SpeedConstants) -> speed.SpeedConstants:
    return dataclasses.replace(base, **dict(zip(FITTED_FIELDS, values, strict=True)))


def loss(rows: list[dict[str, Any]], k: speed.SpeedConstants) -> float:
    """Σ log(predicted / measured)² over the rows."""
    return prepared_loss(prepare(rows), k)


def prepare(rows: list[dict[str, Any]]) -> list[tuple[Features, float]]:
    """Each row's features and log measured seconds, read once for a fit's many losses."""
    return [(features(r), math.log(measured_seconds(r))) for r in rows]


def prepared_loss(prepared: list[tuple[Features, float]], k: speed.SpeedConstants) -> float:
    return sum((math.log(feat.seconds(k)) - log_measured) ** 2 for feat, log_measured in prepared)


def nelder_mead(
    f: Callable[[list[float]], float], x0: list[float], iters: int = 4000
) -> list[float]:
    """Minimise f from x0 (the textbook simplex: reflect, expand, contract, shrink)."""
    n = len(x0)
    simplex = [list(x0)]
    for i in range(n):
        x = list(x0)
        x[i] += 0.5
        simplex.append(x)
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = sorted(range(n + 1), key=lambda i: values[i])
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if values[-1] - values[0] < 1e-12:
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflected = [c + (c - w) for c, w in zip(centroid, worst, strict=True)]
        fr = f(reflected)
        if fr < values[0]:
            expanded = [c + 2 * (c - w) for c, w in zip(centroid, worst, strict=True)]
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = [c + 0.5 * (w - c) for c, w in zip(centroid, worst, strict=True)]
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [
                    [b + 0.5 * (x - b) for b, x in zip(best, s, strict=True)] for s in simplex[1:]
                ]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[min(range(n + 1), key=lambda i: values[i])]


START = [0.35, 0.35, 0.35, 20.0, 4.0, 2e-5, 3e-4, 0.5, 16.0, 5e-5]
# Generic starts (none from speed.py's values: a held-out fit must not start where a fit of
# its held-out rows ended). The loss has shallow valleys where a constant runs to its bound
# (an efficiency to the cap, a cost to nothing) and a simplex from one start can settle in
# one: without Qwen2.5, the fit from START alone put efficiency_full at the cap and the 8-bit
# per-tensor cost at nothing, at a loss 2.7% above what the other starts reach, and its
# prediction of Qwen2.5-0.5B's 8-bit steps was 42% too fast instead of 25%. The fit keeps
# the start whose end has the lowest loss on the rows it fits.
STARTS = (
    START,
    [0.6, 0.6, 0.6, *START[3:]],
    [*START[:3], *(3 * v for v in START[3:])],
)


def fit(
    rows: list[dict[str, Any]], base: speed.SpeedConstants = speed.FITTED, warm: bool = True
) -> speed.SpeedConstants:
    """The fitted constants (FITTED_FIELDS) for these one-GPU rows; a constant that no row
    can show (no ZeRO-3 row, no QLoRA row, ...) keeps its start value. ``warm``: also start
    from ``base``'s values (a held-out fit does not: they were fitted on the rows it holds
    out)."""
    rows = [r for r in rows if is_fit_row(r)]

    free = [i for i, name in enumerate(FITTED_FIELDS) if any(shown(name, r) for r in rows)]
    prepared = prepare(rows)
    start = [to_x(v, i) for i, v in enumerate(START)]

    def full(x: list[float]) -> list[float]:
        out = list(start)
        for i, v in zip(free, x, strict=True):
            out[i] = v
        return out

    def f(x: list[float]) -> float:
        return prepared_loss(prepared, with_fitted(values(full(x)), base))

    # from the generic starts and from speed.py's own constants (so that one more row or
    # constant cannot lose a minimum found before): the best of them
    current = [getattr(base, name) for name in FITTED_FIELDS]
    best: list[float] | None = None
    best_value = math.inf
    for origin in (*STARTS, current) if warm else STARTS:
        x = [to_x(v, i) for i, v in enumerate(origin) if i in free]
        value = f(x)
        for _ in range(3):  # restarts: the simplex collapses before the max() kinks settle
            x = nelder_mead(f, x)
            value, before = f(x), value
            if before - value < 1e-9:
                break
        if best is None or value < best_value:
            best, best_value = x, value
    assert best is not None
    return with_fitted(values(full(best)), base)


def shown(name: str, r: dict[str, Any]) -> bool:
    """Whether row r's time depends on the constant: a constant no fitted row shows (a
    method, or an optimizer, held out with its only family) keeps its START value rather
    than drifting where nothing pins it."""
    method, optim = r["method"], r["optim"]
    return {
        "efficiency_lora": method == "lora",
        "efficiency_qlora": method == "qlora",
        "efficiency_full": method == "full",
        "host_4bit_s": method == "qlora",
        "host_recompute": bool(r["grad_ckpt"]),
        "optimizer_8bit_bytes": method == "full" and optim.endswith("8bit"),
        "optimizer_8bit_tensor_s": method == "full" and optim.endswith("8bit"),
    }.get(name, True)


# The best a matmul reaches: 790 of 989 TFLOP/s for 8192³ bf16 on an H200 (the device
# notes); the efficiencies are fitted inside (0, MAX_EFFICIENCY), the rest in log space.
MAX_EFFICIENCY = 0.8


def to_x(v: float, i: int) -> float:
    """The fit's coordinate of constant i's value v (values() inverts it); an efficiency at
    the cap is taken just below it."""
    if i < 3:
        v = min(v, MAX_EFFICIENCY * (1 - 1e-6))
        return math.log(v / (MAX_EFFICIENCY - v))
    return math.log(max(v, 1e-300))


# Below this a fitted cost is nothing (a nanosecond, a nanobyte): the fit may push a term
# the rows do not show toward 0, and --check compares values by ratio.
FLOOR = 1e-9


def values(x: list[float]) -> list[float]:
    return [
        MAX_EFFICIENCY / (1 + math.exp(-v)) if i < 3 else max(FLOOR, math.exp(v))
        for i, v in enumerate(x)
    ]


# --- the measured constants ----------------------------------------------------------


def host_staged_gbs(rows: list[dict[str, Any]]) -> float | None:
    """bytes / (t_without_P2P − t_with_P2P + bytes / link) over ZeRO-2 pairs of the same
    shape (ZeRO-2 without overlap_comm reduces after the backward: all of it shows)."""
    by_shape: dict[tuple[Any, ...], dict[bool, dict[str, Any]]] = {}
    for r in rows:
        if r.get("world_size", 1) > 1 and r["zero"] == 2 and r.get("offload", "none") == "none":
            by_shape.setdefault(_shape(r, with_p2p=False), {})[bool(r.get("p2p", True))] = r
    out = []
    for pair in by_shape.values():
        if True in pair and False in pair:
            r = pair[False]
            spec, setup, cluster = load_model(r["model"]), setup_of(r), cluster_of(r)
            nbytes = speed.comm_bytes_per_step(spec, setup, cluster.world_size)
            extra = measured_seconds(r) - measured_seconds(pair[True])
            out.append(nbytes / (extra + nbytes / (cluster.gpu.link_bandwidth_gbs * 1e9)) / 1e9)
    return statistics.median(out) if out else None


def cpu_adam_seconds_per_param(
    rows: list[dict[str, Any]], k: speed.SpeedConstants
) -> tuple[float, float] | None:
    """(serial_s, thread_s): the least-squares line y = serial_s + thread_s / threads through
    y = (t − the step without offload − PCIe trips) / (Ψ_t/N) over the one-rank rows that
    ran DeepSpeed's CPU Adam at a set thread count (one H200's host at 1-16 threads). With
    several ranks on a node the serial part counts once per rank (speed.cpu_adam_seconds):
    those rows, and the launched runs, are the check."""
    xs, ys = [], []
    for r in rows:
        # the sweep of one host at set thread counts; the rest (torchrun's default of one
        # thread per rank on another host) are a check
        if r.get("optim") != "deepspeed_cpu_adam" or not omp_threads_set(r):
            continue
        if r.get("world_size", 1) > 1:
            continue
        spec, setup, cluster = load_model(r["model"]), setup_of(r), cluster_of(r)
        plain = speed.step_time(
            spec, dataclasses.replace(setup, offload="none"), cluster, launched=False, k=k
        )
        no_adam = dataclasses.replace(k, cpu_adam_serial_s=0.0, cpu_adam_thread_s=0.0)
        pcie = speed.offload_seconds(spec, setup, cluster, no_adam)
        n = speed.trainable_params(spec, setup) / cluster.world_size
        xs.append(1 / cluster.cpu_threads_per_rank)
        ys.append((measured_seconds(r) - plain.total_s - pcie) / n)
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


def deepspeed_step_s(rows: list[dict[str, Any]], k: speed.SpeedConstants) -> float | None:
    """(t_DeepSpeed − t_plain) − (their predicted difference without the engine's cost),
    median over one-GPU DeepSpeed rows with a plain twin of the same shape in the same file
    (the same process start, the same host): what DeepSpeed's engine adds to a step."""
    plain = {
        (r["_file"], _shape(r)): r
        for r in rows
        if r.get("world_size", 1) == 1 and r["zero"] is None
    }
    no_engine = dataclasses.replace(k, deepspeed_step_s=0.0)
    out = []
    for r in rows:
        twin = plain.get((r["_file"], _shape(r)))
        if twin is None or r["zero"] is None or r.get("offload", "none") != "none":
            continue
        predicted = lean_seconds(r, no_engine) - lean_seconds(twin, no_engine)
        out.append(measured_seconds(r) - measured_seconds(twin) - predicted)
    return statistics.median(out) if out else None


def fused_chunk_s(rows: list[dict[str, Any]], k: speed.SpeedConstants) -> float | None:
    """((t_fused − t_unfused) − their predicted difference without the chunks' cost) /
    (chunks · accumulation), median over twins that differ only in the fused loss, timed in
    the same process (one or two GPUs): what a fused-loss chunk costs beyond its matmul.
    Fitted on the shapes' medians it wandered (0.2-0.5 ms) with each refit, and a 3% swing
    in the fused loss's predicted gain flips a plan (the 1B full job on two H200s); in one
    process the host's and the machine's share cancels."""
    builds: dict[tuple[Any, ...], dict[bool, dict[str, Any]]] = {}
    for r in rows:
        process = (r["_file"], r.get("build_seconds"), r["zero"], r.get("ddp"))
        parallel = (r.get("world_size", 1), r.get("offload", "none"), r["optim"])
        key = (*process, *parallel, *_shape(r, with_fused=False))
        builds.setdefault(key, {})[r["fused_loss"]] = r
    no_chunks = dataclasses.replace(k, fused_chunk_s=0.0)
    out = []
    for twins in builds.values():
        if len(twins) < 2 or twins[True].get("build_seconds") is None:
            continue
        fused, plain = twins[True], twins[False]
        spec, setup = load_model(fused["model"]), setup_of(fused)
        chunks = speed.liger_chunks(setup.tokens, spec.vocab_size, spec.hidden_size)
        predicted = lean_seconds(fused, no_chunks) - lean_seconds(plain, no_chunks)
        gap = measured_seconds(fused) - measured_seconds(plain) - predicted
        out.append(gap / (chunks * setup.grad_accum))
    return max(FLOOR, statistics.median(out)) if out else None


def realdata_lean() -> dict[str, tuple[int, float]]:
    """realdata_h200_lean.jsonl by method: (token positions per step, the median step after
    the first); empty without the file."""
    lean_file = RESULTS / "realdata_h200_lean.jsonl"
    if not lean_file.exists():
        return {}
    lean = {}
    for line in lean_file.read_text().splitlines():
        r = json.loads(line)
        lean[r["method"]] = (
            r["micro_batch"] * r["seq_len"],
            statistics.median(r["step_seconds"][1:]),
        )
    return lean


def launch_step_s() -> float | None:
    """Launched step − lean step at the same shape: realdata_speed.py's full-length runs
    (positions per second = real tokens per second / fill) against realdata_h200_lean.jsonl."""
    lean = realdata_lean()
    if not lean:
        return None
    out = []
    for name in ("realdata_h200_8b_gqa.jsonl", "realdata_h200_1b_gqa.jsonl"):
        for line in (RESULTS / name).read_text().splitlines():
            r = json.loads(line)
            if r["data"] != "full" or r["method"] not in lean:
                continue
            positions, lean_s = lean[r["method"]]
            out.append(positions / (r["tokens_per_s"] / r["fill"]) - lean_s)
    return statistics.median(out) if out else None


def graphed_launches(paths: list[Path] | None = None) -> list[tuple[int, float]]:
    """Probed launches with the decoder as CUDA graphs (graphs*.jsonl, host_speed.py):
    (token positions a step, the step's seconds less the profiler's GPU-busy seconds:
    where the GPU waited). The step is the median step's (real tokens at the rows' fill
    over the median step's rate): a one-off stall of the host (graphs5's Qwen3 run lost
    315 ms once, in 20 steps of 68) is no wait of every step."""
    out = []
    for path in sorted(RESULTS.glob("graphs*.jsonl")) if paths is None else paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            s = r.get("setup") or {}
            busy = ((r.get("probe") or {}).get("profile") or {}).get("gpu_busy_s_per_step")
            if not (s.get("cuda_graphs") and r.get("step_rate_median") and busy):
                continue
            b = r["batching"]
            positions = b["rows_per_micro_batch"] * b["row_tokens"] * s["grad_accum"]
            out.append((positions, positions * b["fill"] / r["step_rate_median"] - busy))
    return out


def graph_token_s(runs: list[tuple[int, float]] | None = None) -> float | None:
    """Σ positions · wait / Σ positions² over graphed_launches: the least-squares line
    through 0."""
    runs = graphed_launches() if runs is None else runs
    if not runs:
        return None
    return sum(t * y for t, y in runs) / sum(t * t for t, _ in runs)


NORM_KERNELS = ("_rms_norm_backward_kernel", "_block_rms_norm_backward_kernel")


def norm_loops(paths: list[Path] | None = None) -> list[tuple[float, float, float]]:
    """Liger's RMSNorm backward in every probed launch (any results JSONL whose rows hold a
    probe's profile, Liger's norms on, not compiled): (its row loop's turns a step, the
    elements those turns handle, the profiled seconds of its backward kernels a step), the
    median of each shape's readings (model, tokens a micro-batch, accumulation, card):
    the 8B QLoRA job at 1 × 1,664 was probed in twenty runs and would outweigh the rest."""
    from graph_ceiling import launched  # a row's model, setup and card, as graph_ceiling reads them

    from zeroplan import liger

    shapes: dict[tuple[Any, ...], list[tuple[float, float, float]]] = {}
    for path in sorted(RESULTS.glob("*.jsonl")) if paths is None else paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            top = ((r.get("probe") or {}).get("profile") or {}).get("top_gpu")
            s = r.get("setup") or {}
            if not top or not r.get("batching") or s.get("compile") or not r.get("model"):
                continue
            spec, setup, cluster = launched(r)
            if not liger.runs(spec.model_type, setup.kernels, "rms_norm"):
                continue
            seconds = sum(t["ms_per_step"] for t in top if t["kernel"] in NORM_KERNELS) / 1e3
            b = r["batching"]
            tokens = b["rows_per_micro_batch"] * b["row_tokens"]
            turns = elements = 0.0
            for n, rows, columns in speed.rms_norms(spec, tokens):
                t, per_turn = speed.norm_turns(rows, columns, cluster.gpu.multiprocessors)
                turns += n * t * setup.grad_accum
                elements += n * t * per_turn * setup.grad_accum
            key = (r["model"], tokens, setup.grad_accum, r["catalog_gpu"])
            shapes.setdefault(key, []).append((turns, elements, seconds))
    out = []
    for readings in shapes.values():
        if all(sec > 0 for *_, sec in readings):
            out.append((*readings[0][:2], statistics.median(sec for *_, sec in readings)))
    return out


def norm_loop_constants(
    loops: list[tuple[float, float, float]] | None = None,
) -> tuple[float, float] | None:
    """(norm_loop_s, norm_loop_element_s): seconds ≈ turns · a + elements · b over norm_loops,
    least squares on the relative error (each reading divided by its seconds)."""
    loops = norm_loops() if loops is None else loops
    if len(loops) < 2:
        return None
    xs = [(t / y, e / y) for t, e, y in loops]
    s11 = sum(a * a for a, _ in xs)
    s12 = sum(a * b for a, b in xs)
    s22 = sum(b * b for _, b in xs)
    r1 = sum(a for a, _ in xs)
    r2 = sum(b for _, b in xs)
    det = s11 * s22 - s12 * s12
    if not det:
        return None
    return (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det


def lora_bytes(rows: list[dict[str, Any]], engine_s: float) -> float | None:
    """(Δ + engine_s) / ((1 − BF16_LORA_SHARE) · T · Σ(in + out) · (1 + ckpt/3) ·
    accumulation / bandwidth) over bf16 LoRA steps under DDP with a DeepSpeed ZeRO 0-2 twin
    of the same shape, Δ the DDP step's extra seconds: the adapters' fp32 input casts, which
    DeepSpeed's bf16 adapters skip (the two steps differ in little else for LoRA: its
    gradients are a few MB), less what DeepSpeed's engine adds to its step (engine_s:
    deepspeed_step_s). Measured here rather than fitted: on one GPU it trades against the
    efficiency and act_bytes."""
    ddp = {_shape(r): r for r in rows if r.get("ddp") and r["method"] == "lora"}
    out = []
    for r in rows:
        twin = ddp.get(_shape(r))
        if twin is None or r["zero"] not in (0, 1, 2) or r.get("offload", "none") != "none":
            continue
        spec, setup, cluster = load_model(r["model"]), setup_of(r), cluster_of(r)
        per_byte = (
            (1 - speed.BF16_LORA_SHARE)
            * setup.tokens
            * speed.adapted_features(spec, setup)
            * speed.elementwise_passes(setup)
            * setup.grad_accum
            / (cluster.gpu.memory_bandwidth_gbs * 1e9)
        )
        out.append((measured_seconds(twin) - measured_seconds(r) + engine_s) / per_byte)
    return statistics.median(out) if out else None


def zero3_tensor_s(rows: list[dict[str, Any]], k: speed.SpeedConstants) -> float | None:
    """The hooks' cost per parameter tensor that predicts a ZeRO-3 step exactly (found by
    bisection: the step grows with it), median over the ZeRO-3 shapes of several GPUs
    without offload (a shape read twice: the median of its two). The hooks sit on the
    host's clock (speed.host_seconds), so a row whose GPU work outlasts them cannot show
    them and is left out."""
    by_shape: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        if r["zero"] != 3 or r.get("world_size", 1) < 2 or r.get("offload", "none") != "none":
            continue
        seconds = measured_seconds(r)
        lo, hi = 0.0, 0.05
        if lean_seconds(r, dataclasses.replace(k, zero3_tensor_s=lo)) >= seconds:
            continue
        for _ in range(40):
            mid = (lo + hi) / 2
            if lean_seconds(r, dataclasses.replace(k, zero3_tensor_s=mid)) < seconds:
                lo = mid
            else:
                hi = mid
        by_shape.setdefault((_shape(r), r["optim"]), []).append((lo + hi) / 2)
    out = [statistics.median(v) for v in by_shape.values()]
    return statistics.median(out) if out else None


def _shape(r: dict[str, Any], with_p2p: bool = True, with_fused: bool = True) -> tuple[Any, ...]:
    """What makes two rows the same run but for their parallelism (and P2P, or the fused
    loss, unless told)."""
    return (
        r["model"],
        r["method"],
        r["micro_batch"],
        r["seq_len"],
        r["grad_ckpt"],
        r["fused_loss"] if with_fused else None,
        r.get("grad_accum", 1),
        r.get("p2p", True) if with_p2p else None,
        r["env"]["gpu"],
    )


def measured_constants(
    rows: list[dict[str, Any]], k: speed.SpeedConstants
) -> dict[str, float | None]:
    staged = host_staged_gbs(rows)
    engine = deepspeed_step_s(rows, k)
    k2 = dataclasses.replace(
        k,
        host_staged_gbs=staged or k.host_staged_gbs,
        deepspeed_step_s=k.deepspeed_step_s if engine is None else engine,
    )
    adam = cpu_adam_seconds_per_param(rows, k2)
    loops = norm_loop_constants()
    # (lora_bytes is measured before the fit: main)
    return {
        "fused_chunk_s": fused_chunk_s(rows, k2),
        "zero3_tensor_s": zero3_tensor_s(rows, k2),
        "host_staged_gbs": staged,
        "deepspeed_step_s": engine,
        "cpu_adam_serial_s": adam[0] if adam else None,
        "cpu_adam_thread_s": adam[1] if adam else None,
        "launch_step_s": launch_step_s(),
        "graph_token_s": graph_token_s(),
        "norm_loop_s": loops[0] if loops else None,
        "norm_loop_element_s": loops[1] if loops else None,
    }


# --- error on rows not fitted on ------------------------------------------------------


def lean_seconds(r: dict[str, Any], k: speed.SpeedConstants = speed.FITTED) -> float:
    """speed.step_time's lean step for row r."""
    spec, setup, cluster = load_model(r["model"]), setup_of(r), cluster_of(r)
    return speed.step_time(spec, setup, cluster, launched=False, k=k).total_s


def error(r: dict[str, Any], k: speed.SpeedConstants) -> float:
    """predicted/measured tokens/s − 1 (= measured/predicted seconds − 1): + is too fast."""
    return measured_seconds(r) / lean_seconds(r, k) - 1


# A held-out fit needs this many rows per fitted constant, or it is not a fit: with the H200
# rows held out, 9 H100 rows (one model, one sequence length) are left for 11 constants.
MIN_ROWS_PER_CONSTANT = 2


def holdout_errors(
    rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], base: speed.SpeedConstants
) -> dict[Any, list[float] | int]:
    """For each value g of key(row): fit on the one-GPU rows whose key differs, predict
    the one-GPU rows whose key is g; where fewer than MIN_ROWS_PER_CONSTANT rows per
    constant are left, no fit: the number of rows left instead of the errors."""
    fit_rows = [r for r in rows if is_fit_row(r)]
    errs: dict[Any, list[float] | int] = {}
    for g in sorted({key(r) for r in fit_rows}, key=lambda v: (isinstance(v, str), v)):
        train = [r for r in fit_rows if key(r) != g]
        if len(train) < MIN_ROWS_PER_CONSTANT * len(FITTED_FIELDS):
            errs[g] = len(train)
            continue
        k = fit(train, base, warm=False)
        errs[g] = [error(r, k) for r in fit_rows if key(r) == g]
    return errs


def _line(label: str, errs: list[float]) -> list[str]:
    a = [abs(e) for e in errs]
    worst = max(errs, key=abs)
    return [
        label,
        str(len(errs)),
        f"{statistics.median(a):.0%}",
        f"{worst:+.0%}",
        f"{sum(x <= 0.20 for x in a)} / {len(a)}",
    ]


def multi_label(r: dict[str, Any]) -> str:
    what = (
        "offload, CPU Adam"
        if r.get("offload", "none") != "none"
        else ("P2P" if r.get("p2p", True) else "no P2P")
    )
    if r.get("offload", "none") == "none":
        what = "NVLink" if r.get("p2p", True) else "NCCL_P2P_DISABLE=1"
        if r.get("world_size", 1) == 1:
            what = f"DeepSpeed ZeRO-{r['zero']}"
    return f"{r['world_size']}×{gpu_label(r)}, {what}"


Scored = list[tuple[dict[str, Any], float]]  # rows a fit did not see, each with its error


def holdout_report(
    rows: list[dict[str, Any]],
    k: speed.SpeedConstants,
    unseen: tuple[dict[str, Any], ...] = (),
) -> tuple[list[list[str]], Scored]:
    """One line per scheme and, under it, one per group held out; then the rows no fit
    uses, by machine; then ``unseen``: rows of models no results file the fit reads has
    (check_*.jsonl), by model. With the table, every prediction it scored (a one-GPU row
    once per scheme that held it out)."""
    fit_rows = [r for r in rows if is_fit_row(r)]
    scored: Scored = []
    table = [
        _line(
            "none: speed.py's own fit, in-sample, for comparison", [error(r, k) for r in fit_rows]
        )
    ]
    schemes = (
        (
            "leave one model family out",
            lambda r: r["model_type"],
            lambda g: speed.FITTED_FAMILIES.get(g, g),
        ),
        ("leave one GPU out", gpu_label, lambda g: f"{g}"),
        ("leave one sequence length out", lambda r: r["seq_len"], lambda g: f"seq {g}"),
        ("leave one micro-batch size out", lambda r: r["micro_batch"], lambda g: f"mb {g}"),
    )
    everything: list[float] = []
    for name, key, label in schemes:
        errs = holdout_errors(rows, key, k)
        for g, v in errs.items():
            if isinstance(v, list):  # holdout_errors keeps the rows' order
                scored += zip([r for r in fit_rows if key(r) == g], v, strict=True)
        flat = [e for v in errs.values() if isinstance(v, list) for e in v]
        everything += flat
        table.append(_line(f"**{name}**", flat))
        for g, v in errs.items():
            if isinstance(v, list):
                table.append(_line(f"  {label(g)} held out", v))
            else:
                held = sum(key(r) == g for r in fit_rows)
                table.append(
                    [
                        f"  {label(g)} held out",
                        str(held),
                        "no fit",
                        f"{v} rows left for {len(FITTED_FIELDS)} constants",
                        "—",
                    ]
                )
    table.append(_line("**all held-out predictions above**", everything))
    others = [r for r in rows if not is_fit_row(r)]
    table += _grouped(
        "**several GPUs and offload (not fitted; the measured constants were read off some)**",
        others,
        multi_label,
        k,
    )
    table += _grouped(
        "**models no fit has seen (check_*.jsonl, one H200)**",
        list(unseen),
        lambda r: r["model"].split("/")[-1],
        k,
    )
    scored += [(r, error(r, k)) for r in (*others, *unseen)]
    return table, scored


def p90(values: list[float]) -> float:
    """The 90th percentile, nearest rank: the smallest value 9 in 10 of ``values`` are at or
    below (speed.py's bands; realdata_predict.py's launched one)."""
    return sorted(values)[math.ceil(0.9 * len(values)) - 1]


def held_out_p90(scored: Scored) -> dict[bool, tuple[float, int]]:
    """By host_bound (speed.StepTime.host_bound of the row's lean step): the |error| that
    9 in 10 of the scored predictions stayed within (the 90th percentile, nearest rank),
    and how many there were. Mixture-of-experts rows are left out: family_note quotes
    their miss apart."""
    by: dict[bool, list[float]] = {True: [], False: []}
    for r, e in scored:
        spec = load_model(r["model"])
        if spec.moe is None:
            bound = speed.step_time(spec, setup_of(r), cluster_of(r), launched=False).host_bound
            by[bound].append(abs(e))
    return {bound: (p90(errs), len(errs)) for bound, errs in by.items() if errs}


def _grouped(
    title: str,
    rows: list[dict[str, Any]],
    label: Callable[[dict[str, Any]], str],
    k: speed.SpeedConstants,
) -> list[list[str]]:
    """A line for all of ``rows`` under ``title``, then one per label (none without rows)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(label(r), []).append(error(r, k))
    if not groups:
        return []
    lines = [_line(title, [e for v in groups.values() for e in v])]
    return lines + [_line(f"  {g}", v) for g, v in sorted(groups.items())]


def _repeat_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (*_shape(r), r["optim"])


def shape_readings(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """The one-GPU rows by shape (model, method, micro-batch, sequence length, switches,
    GPU, optimizer), in their order: each a reading of its shape by one process."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        if is_fit_row(r):
            groups.setdefault(_repeat_key(r), []).append(r)
    return groups


def shape_medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per one-GPU shape, its step the median over every process that measured it
    (shape_readings), in its first reading's place; the other rows as they are. The same
    shape measured in separate processes differs by a median 12-20% and up to 60-70% where
    the host sets the pace: one reading is a draw from that spread, the median of three a
    measurement the fit and its held-out check can stand on."""
    groups = shape_readings(rows)
    out: list[dict[str, Any]] = []
    for r in rows:
        if not is_fit_row(r):
            out.append(r)
            continue
        group = groups[_repeat_key(r)]
        if r is not group[0]:
            continue  # a later reading of a shape already placed
        if len(group) > 1:
            seconds = statistics.median(measured_seconds(x) for x in group)
            r = {**r, "_median_seconds": seconds, "_readings": len(group)}
        out.append(r)
    return out


def repeat_spread(rows: list[dict[str, Any]]) -> list[float]:
    """max/min − 1 of the measured step over each one-GPU shape measured more than once (in
    separate processes): how far a held-out prediction can expect to get."""
    out = []
    for group in shape_readings(rows).values():
        if len(group) > 1:
            seconds = [measured_seconds(r) for r in group]
            out.append(max(seconds) / min(seconds) - 1)
    return out


def print_table(table: list[list[str]], markdown: bool) -> None:
    head = ["held out", "rows", "median abs. error", "worst (+: predicted too fast)", "within 20%"]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|---|---|---|---|---|")
        for row in table:
            print("| " + " | ".join(c.replace("  ", "· ", 1) for c in row) + " |")
        return
    print(f"{head[0]:52} {head[1]:>5} {head[2]:>17} {head[3]:>29} {head[4]:>11}")
    for row in table:
        print(f"{row[0].replace('**', ''):52} {row[1]:>5} {row[2]:>17} {row[3]:>29} {row[4]:>11}")


def _fmt(name: str, v: float) -> str:
    return f"{v:.4g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--check", action="store_true")
    p.add_argument("--markdown", action="store_true", help="the held-out table as markdown")
    p.add_argument("--rows", action="store_true", help="every row, predicted against measured")
    args = p.parse_args()
    raw = timed_rows(args.files or default_files())
    rows = shape_medians(raw)
    # lora_bytes is measured before the fit, which then works around it (with DeepSpeed's
    # engine cost as speed.py has it: a fixed point once speed.py holds these values)
    pinned = lora_bytes(raw, speed.FITTED.deepspeed_step_s)
    fitted = fit(
        rows, dataclasses.replace(speed.FITTED, lora_bytes=pinned or speed.FITTED.lora_bytes)
    )
    fitted = dataclasses.replace(
        fitted, **{n: v for n, v in measured_constants(raw, fitted).items() if v is not None}
    )
    # the fit's written-out step (Features) must be speed.step_time's, row for row
    twin = max(
        abs(features(r).seconds(speed.FITTED) / lean_seconds(r) - 1) for r in rows if is_fit_row(r)
    )
    bad = twin > 1e-9
    if bad:
        print(f"fit_speed.Features differs from speed.step_time by up to {twin:.2e}: make them one")
    print(
        f"{sum(is_fit_row(r) for r in rows)} one-GPU shapes fitted on (the median of "
        f"{sum(is_fit_row(r) for r in raw)} readings), {sum(not is_fit_row(r) for r in rows)} others"
    )
    for name in (*FITTED_FIELDS, *MEASURED_FIELDS):
        mine, theirs = getattr(fitted, name), getattr(speed.FITTED, name)
        off = abs(mine / theirs - 1) > 0.05 if theirs else mine != 0
        bad |= off
        kind = "fitted" if name in FITTED_FIELDS else "measured"
        print(
            f"  {name:22} {kind:8} {_fmt(name, mine):>10}   speed.py {_fmt(name, theirs):>10}{'   DRIFTED' if off else ''}"
        )
    families = {r["model_type"] for r in rows if is_fit_row(r)}
    if families != set(speed.FITTED_FAMILIES):
        bad = True
        print(
            f"speed.FITTED_FAMILIES is {sorted(speed.FITTED_FAMILIES)}, the fitted rows' are {sorted(families)}"
        )
    # gpu_note names the cards behind the constants and bands: every row's, fitted or not
    cards = {cluster_of(r).gpu.name for r in rows}
    if cards != set(speed.MEASURED_GPUS):
        bad = True
        print(
            f"speed.MEASURED_GPUS is {sorted(speed.MEASURED_GPUS)}, the rows' are {sorted(cards)}"
        )
    if args.check and bad:
        print(
            "zeroplan/speed.py's FITTED differs from the fit by more than 5%: paste the values above"
        )
    if args.rows:
        for r in rows:
            e = error(r, speed.FITTED)
            print(
                f"  {r['model'].split('/')[-1]:18} {r['method']:5} {gpu_label(r):5} w{r.get('world_size', 1)} "
                f"z={r['zero']} mb{r['micro_batch']} s{r['seq_len']} c={int(r['grad_ckpt'])} a={r.get('grad_accum', 1)}"
                f" measured {measured_seconds(r):.3f}s  tokens/s error {e:+.0%}"
            )
    print("\npredicted tokens/s against measured on rows NOT fitted on (refit without them):")
    # scored like the fitted shapes: one point per shape, the median of its readings
    unseen = (
        ()
        if args.files
        else tuple(shape_medians(timed_rows(sorted(RESULTS.glob("check_*.jsonl")))))
    )
    table, scored = holdout_report(rows, speed.FITTED, unseen)
    print_table(table, args.markdown)
    # what estimate, plan and report tell users a prediction is good for
    quoted = {True: speed.HELD_OUT_P90_HOST_BOUND, False: speed.HELD_OUT_P90_GPU_BOUND}
    for bound, (band, n) in sorted(held_out_p90(scored).items()):
        name = "host-bound" if bound else "GPU-bound"
        off = abs(band - quoted[bound]) > 0.01
        bad |= off
        print(
            f"\n9 in 10 of the {n} held-out predictions of {name} steps within {band:.1%}"
            + (f"; speed.py quotes {quoted[bound]:.1%}: DRIFTED" if off else "")
        )
    firsts = [error(r, speed.FITTED) for r in raw if is_fit_row(r) and r["_first"]]
    others = [error(r, speed.FITTED) for r in raw if is_fit_row(r) and not r["_first"]]
    if firsts and others:
        print(
            f"\nthe first shape of a speed_grid.py process ({len(firsts)} rows) against the rest: "
            f"median error {statistics.median(firsts):+.1%} against {statistics.median(others):+.1%}, "
            f"median abs. {statistics.median(map(abs, firsts)):.0%} against "
            f"{statistics.median(map(abs, others)):.0%}"
        )
    spread = repeat_spread(raw)
    if spread:
        print(
            f"\nthe same one-GPU shape measured again, in another process: {len(spread)} shapes, "
            f"max/min − 1 median {statistics.median(spread):.0%}, worst {max(spread):.0%}"
        )
        # what estimate and report tell users about host-bound steps
        quoted = speed.HOST_BOUND_REPEAT_SPREAD
        if abs((1 + max(spread)) / quoted - 1) > 0.05:
            print(f"speed.HOST_BOUND_REPEAT_SPREAD is {quoted}, the rows say {1 + max(spread):.3g}")
            bad = True
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
