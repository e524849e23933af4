"""``zeroplan report RUN``: what a run measured against what its plan predicted.

:func:`load_run` reads the run folder, :func:`summarize` computes the predicted-vs-measured
table (pure), :func:`write_png` draws memory per GPU over time against the predicted peak,
loss and tokens/s (matplotlib, the ``[report]`` extra, imported only here) and
:func:`write_html` wraps the picture and the table in one self-contained page;
:func:`write_report` writes both together, where :func:`report_paths` checked they can go.
"""

from __future__ import annotations

import base64
import html
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zeroplan.errors import MissingExtraError, NothingRecordedError, OutputWriteError
from zeroplan.outputs import check_new_file, files_together
from zeroplan.speed import HOST_BOUND_REPEAT_SPREAD
from zeroplan.watch.alerts import ESTIMATOR_ERROR
from zeroplan.watch.runlog import (
    GPU_SAMPLES_FILE,
    METRICS_FILE,
    MetricRecord,
    Prediction,
    RunState,
    check_run_dir,
    read_jsonl,
    read_metrics,
    read_prediction,
    run_state,
    trained_on,
)

if TYPE_CHECKING:
    from rich.console import Console

GIB = 2**30
PLOT_POINTS = 3000  # per GPU line: more than the figure has pixels across


@dataclass(frozen=True)
class RunData:
    """What a run folder holds."""

    run_dir: Path
    prediction: Prediction | None
    samples: list[dict[str, Any]]  # gpu_samples.jsonl rows
    metrics: list[MetricRecord]
    device: str | None = None  # what the ranks trained on (runlog.trained_on)
    state: RunState | None = None  # how the run ended (runlog.run_state)


@dataclass(frozen=True)
class GPUPeak:
    """Predicted vs measured nvidia-smi peak of one GPU."""

    host: str | None
    gpu: int
    name: str
    total_bytes: int | None
    measured_peak_bytes: int
    predicted_bytes: int | None  # the plan's device_used_bytes
    error: float | None  # measured / predicted - 1

    @property
    def within_error(self) -> bool | None:
        """|error| within the estimator's stated error (None without a prediction)."""
        return None if self.error is None else abs(self.error) <= ESTIMATOR_ERROR


@dataclass(frozen=True)
class RankPeak:
    """Predicted vs measured peak allocated (torch) memory of one rank."""

    rank: int
    measured_allocated_bytes: int | None
    measured_reserved_bytes: int | None
    predicted_allocated_bytes: int | None
    error: float | None


@dataclass(frozen=True)
class RunSummary:
    """The numbers of the report."""

    gpus: tuple[GPUPeak, ...]
    ranks: tuple[RankPeak, ...]
    duration_s: float | None
    last_step: int | None
    total_steps: int | None
    final_loss: float | None
    tokens_per_s_median: float | None  # all ranks together, median over steps
    predicted_tokens_per_s: float | None
    predicted_host_bound: bool = False
    predicted_error_p90: float | None = None  # speed.StepTime.error_p90 of the plan's step
    # the ranks trained on the CPU (launch --force without a GPU): the plan's speed is its
    # GPUs', so none is compared
    on_cpu: bool = False
    status: str = "running"  # runlog.STATUSES: completed, stopped, failed, diverged, ...
    outcome: str | None = None  # the status in words ("stopped by SIGINT at step 11")

    @property
    def speed_error(self) -> float | None:
        """predicted / measured tokens/s − 1 (+: the plan was too fast), as fit_speed.py
        scores the speed model; None without both, or where the ranks trained on the CPU."""
        if not self.tokens_per_s_median or not self.predicted_tokens_per_s or self.on_cpu:
            return None
        return self.predicted_tokens_per_s / self.tokens_per_s_median - 1

    @property
    def speed_within_band(self) -> bool | None:
        """Whether the plan's speed missed by no more than 9 in 10 predictions like it did
        on runs no fit saw (plan.json's error_p90); None where either is unknown."""
        err = self.speed_error
        if err is None or self.predicted_error_p90 is None:
            return None
        return abs(err) <= self.predicted_error_p90

    def to_json(self) -> dict[str, Any]:
        """``zeroplan report --json``."""
        return {
            "gpus": [
                {
                    "host": g.host,
                    "gpu": g.gpu,
                    "name": g.name,
                    "total_bytes": g.total_bytes,
                    "measured_peak_bytes": g.measured_peak_bytes,
                    "predicted_bytes": g.predicted_bytes,
                    "error": g.error,
                    "within_error": g.within_error,
                }
                for g in self.gpus
            ],
            "ranks": [r.__dict__ for r in self.ranks],
            "duration_s": self.duration_s,
            "last_step": self.last_step,
            "total_steps": self.total_steps,
            "final_loss": self.final_loss,
            "tokens_per_s_median": self.tokens_per_s_median,
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
            "predicted_host_bound": self.predicted_host_bound,
            "predicted_error_p90": self.predicted_error_p90,
            "speed_error": self.speed_error,
            "speed_within_band": self.speed_within_band,
            "trained_on_cpu": self.on_cpu,
            "status": self.status,
            "outcome": self.outcome,
            "estimator_error": ESTIMATOR_ERROR,
        }


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Everything recorded in ``run_dir``; NothingRecordedError when there is nothing."""
    path = check_run_dir(run_dir)
    keep = ("t", "gpu", "host", "name", "memory_used_bytes", "memory_total_bytes")
    samples = [
        {k: s.get(k) for k in keep} for s in read_jsonl(path / GPU_SAMPLES_FILE) if _is_sample(s)
    ]
    metrics = read_metrics(path / METRICS_FILE)
    if not samples and not metrics:
        raise NothingRecordedError(
            f"nothing to report in {path}: no {GPU_SAMPLES_FILE} or {METRICS_FILE} yet "
            "(zeroplan watch RUN_DIR records GPU samples)"
        )
    return RunData(path, read_prediction(path), samples, metrics, trained_on(path), run_state(path))


def _is_sample(s: dict[str, Any]) -> bool:
    return isinstance(s.get("t"), (int, float)) and isinstance(s.get("gpu"), int)


def _gpu_key(s: dict[str, Any]) -> tuple[str, int]:
    return (str(s.get("host") or ""), int(s["gpu"]))


def step_throughput(metrics: list[MetricRecord]) -> list[tuple[float, int, float]]:
    """(t, step, tokens/s of all ranks) per training step: the ranks' values summed."""
    by_step: dict[int, dict[int, MetricRecord]] = defaultdict(dict)
    for r in metrics:
        if r.event == "train" and r.tokens_per_s is not None:
            by_step[r.step][r.rank] = r
    out = []
    for step, ranks in sorted(by_step.items()):
        out.append(
            (
                max(r.t for r in ranks.values()),
                step,
                sum(r.tokens_per_s or 0.0 for r in ranks.values()),
            )
        )
    return out


def summarize(data: RunData) -> RunSummary:
    """Peaks per GPU and per rank against the prediction, and the run's progress."""
    pred = data.prediction
    peaks: dict[tuple[str, int], dict[str, Any]] = {}
    for s in data.samples:
        used = s.get("memory_used_bytes")
        if not isinstance(used, int):
            continue
        key = _gpu_key(s)
        if key not in peaks or used > peaks[key]["memory_used_bytes"]:
            peaks[key] = s
    gpus = tuple(
        GPUPeak(
            host=host or None,
            gpu=gpu,
            name=str(s.get("name") or "?"),
            total_bytes=s.get("memory_total_bytes"),
            measured_peak_bytes=int(s["memory_used_bytes"]),
            predicted_bytes=pred.device_used_bytes if pred else None,
            error=(s["memory_used_bytes"] / pred.device_used_bytes - 1) if pred else None,
        )
        for (host, gpu), s in sorted(peaks.items())
    )
    alloc: dict[int, int] = {}
    reserved: dict[int, int] = {}
    for r in data.metrics:  # the allocator's peaks where the ranks log them, else "now"
        for value in (r.peak_allocated_bytes, r.mem_allocated_bytes):
            if value is not None:
                alloc[r.rank] = max(alloc.get(r.rank, 0), value)
        for value in (r.peak_reserved_bytes, r.mem_reserved_bytes):
            if value is not None:
                reserved[r.rank] = max(reserved.get(r.rank, 0), value)
    ranks = tuple(
        RankPeak(
            rank=rank,
            measured_allocated_bytes=alloc.get(rank),
            measured_reserved_bytes=reserved.get(rank),
            predicted_allocated_bytes=pred.peak_allocated_bytes if pred else None,
            error=(alloc[rank] / pred.peak_allocated_bytes - 1) if pred and rank in alloc else None,
        )
        for rank in sorted(set(alloc) | set(reserved))
    )
    times = [s["t"] for s in data.samples] + [r.t for r in data.metrics]
    train = [r for r in data.metrics if r.event == "train"]
    lead = min((r.rank for r in train), default=None)
    lead_rows = [r for r in train if r.rank == lead]
    losses = [r.loss for r in lead_rows if r.loss is not None]
    tps = [v for _, _, v in step_throughput(data.metrics)]
    return RunSummary(
        gpus=gpus,
        ranks=ranks,
        duration_s=max(times) - min(times) if times else None,
        last_step=max((r.step for r in data.metrics), default=None),
        # the latest session's: a resume given a larger --max-steps logs another total
        total_steps=next((r.total_steps for r in reversed(data.metrics) if r.total_steps), None),
        final_loss=losses[-1] if losses else None,
        tokens_per_s_median=statistics.median(tps) if tps else None,
        predicted_tokens_per_s=pred.tokens_per_s if pred else None,
        predicted_host_bound=pred.host_bound if pred else False,
        predicted_error_p90=pred.error_p90 if pred else None,
        on_cpu=data.device == "cpu",
        status=data.state.status if data.state is not None else "running",
        outcome=data.state.outcome if data.state is not None else None,
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _g(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def gpu_rows(summary: RunSummary) -> list[list[str]]:
    """The predicted-vs-measured table as text cells (header first)."""
    rows = [["GPU", "name", "pred GiB", "peak GiB", "error", f"±{ESTIMATOR_ERROR:.0%}"]]
    for g in summary.gpus:
        label = (
            f"{g.host}:{g.gpu}"
            if g.host and len({x.host for x in summary.gpus}) > 1
            else str(g.gpu)
        )
        within = "-" if g.within_error is None else "yes" if g.within_error else "NO"
        rows.append(
            [
                label,
                g.name.removeprefix("NVIDIA "),
                _g(g.predicted_bytes),
                _g(g.measured_peak_bytes),
                _pct(g.error),
                within,
            ]
        )
    return rows


def rank_rows(summary: RunSummary) -> list[list[str]]:
    """Peak allocated per rank against the prediction (header first)."""
    rows = [["rank", "pred alloc GiB", "peak alloc GiB", "error", "peak reserved GiB"]]
    for r in summary.ranks:
        rows.append(
            [
                str(r.rank),
                _g(r.predicted_allocated_bytes),
                _g(r.measured_allocated_bytes),
                _pct(r.error),
                _g(r.measured_reserved_bytes),
            ]
        )
    return rows


def render_summary(summary: RunSummary, console: Console) -> None:
    """The two tables and the run's progress, for the terminal."""
    from rich.table import Table

    for title, rows in (
        ("Peak memory per GPU: predicted vs measured (nvidia-smi used)", gpu_rows(summary)),
        ("Peak allocated per rank (torch)", rank_rows(summary)),
    ):
        if len(rows) == 1:
            continue
        table = Table(title=title, title_justify="left", show_edge=False)
        for name in rows[0]:
            table.add_column(name, justify="left" if name == "name" else "right", no_wrap=True)
        for row in rows[1:]:
            table.add_row(*row, style="red" if row[-1] == "NO" else None)
        console.print(table)
    steps = f"{summary.last_step if summary.last_step is not None else '-'}/{summary.total_steps or '-'}"
    loss = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "-"
    tps = f"{summary.tokens_per_s_median:,.0f}" if summary.tokens_per_s_median else "-"
    if summary.predicted_tokens_per_s and summary.on_cpu:
        tps += (
            f" (plan {summary.predicted_tokens_per_s:,.0f} on its GPUs; not compared: the "
            "ranks trained on the CPU)"
        )
    elif summary.predicted_tokens_per_s:
        tps += f" (plan {summary.predicted_tokens_per_s:,.0f})"
        err, band = summary.speed_error, summary.predicted_error_p90
        if err is not None and band is not None:
            tps += "; " + speed_verdict(err, band)
        if summary.predicted_host_bound:
            tps += (
                "; the plan's step is host-bound (Python and kernel launches set its pace), "
                f"and such steps have run up to {HOST_BOUND_REPEAT_SPREAD:.1f}x slower in one "
                "process than in another"
            )
    console.print(
        f"{summary.outcome or summary.status} · steps {steps} · final loss {loss} · "
        f"tokens/s median {tps}"
    )


def speed_verdict(err: float, band: float) -> str:
    """How the plan's speed missed (err: predicted / measured − 1) against the band 9 in 10
    predictions like it stayed within on runs no fit saw, and what a miss beyond it means:
    a slower run has a cause the speed model does not know; a faster one, a setup it
    under-rates."""
    missed = f"the plan was {abs(err):.0%} too {'fast' if err > 0 else 'slow'}"
    usual = f"the {band:.0%} that 9 in 10 predictions like it stayed within"
    if abs(err) <= band:
        return f"{missed}, within {usual}"
    why = (
        "look for what the speed model does not know (data loading, other processes, "
        "throttling, a slower host)"
        if err > 0
        else "the speed model under-rates this setup, and may have ranked others above it"
    )
    return f"{missed}, beyond {usual}: {why}"


def peaks_kept(points: list[tuple[float, float]], most: int) -> list[tuple[float, float]]:
    """At most ``most`` points: each run of consecutive points is replaced by its highest,
    so that a one-second peak in a day of samples still shows."""
    if len(points) <= most:
        return points
    size = -(-len(points) // most)
    return [max(points[i : i + size], key=lambda p: p[1]) for i in range(0, len(points), size)]


def write_png(data: RunData, summary: RunSummary, path: str | os.PathLike[str]) -> Path:
    """Memory per GPU over time (predicted peak ± the estimator's error shaded), loss and
    tokens/s, and the predicted-vs-measured table, as one PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError(
            "zeroplan report draws with matplotlib: pip install 'zeroplan[report]'"
        ) from exc

    times = [s["t"] for s in data.samples] + [r.t for r in data.metrics]
    t0 = float(min(times))
    fig = Figure(figsize=(11, 12.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(4, 1, height_ratios=[3, 2, 2, 0.5 + 0.25 * max(1, len(summary.gpus))])
    ax_mem = fig.add_subplot(grid[0])
    ax_loss = fig.add_subplot(grid[1], sharex=ax_mem)
    ax_tok = fig.add_subplot(grid[2], sharex=ax_mem)
    ax_tab = fig.add_subplot(grid[3])
    title = f"zeroplan report · {data.run_dir.name}"
    if data.prediction and data.prediction.model:
        title += f" · {data.prediction.model}"
        if data.prediction.cluster:
            title += f" on {data.prediction.cluster}"
    fig.suptitle(title, fontsize=13)

    def minutes(t: float) -> float:
        return (t - t0) / 60

    series: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    totals = []
    for s in data.samples:
        if isinstance(s.get("memory_used_bytes"), int):
            series[_gpu_key(s)].append((minutes(s["t"]), s["memory_used_bytes"] / GIB))
        if isinstance(s.get("memory_total_bytes"), int):
            totals.append(s["memory_total_bytes"] / GIB)
    hosts = {h for h, _ in series}
    for (host, gpu), points in sorted(series.items()):
        xs, ys = zip(*peaks_kept(sorted(points), PLOT_POINTS), strict=True)
        ax_mem.plot(
            xs,
            ys,
            lw=1.2,
            marker="o" if len(xs) < 30 else None,  # a few samples: still visible
            ms=3,
            label=f"{host}:{gpu}" if len(hosts) > 1 else f"GPU {gpu}",
        )
    if data.prediction:
        p = data.prediction.device_used_bytes / GIB
        ax_mem.axhline(p, color="black", ls="--", lw=1.2, label=f"predicted peak {p:.1f} GiB")
        ax_mem.axhspan(
            p * (1 - ESTIMATOR_ERROR),
            p * (1 + ESTIMATOR_ERROR),
            color="grey",
            alpha=0.15,
            label=f"±{ESTIMATOR_ERROR:.0%} estimator error",
        )
    if totals:
        card = max(totals)
        ax_mem.axhline(card, color="dimgray", ls="-.", lw=1.2, label=f"card {card:.1f} GiB")
    ax_mem.set_title(
        "memory per GPU (nvidia-smi used) against the plan's predicted peak",
        loc="left",
        fontsize=10,
    )
    ax_mem.set_ylabel("GiB")
    ax_mem.set_ylim(bottom=0)
    if not series:
        ax_mem.text(
            0.5,
            0.5,
            "no GPU samples recorded",
            ha="center",
            va="center",
            transform=ax_mem.transAxes,
        )
    if series or data.prediction:
        ax_mem.legend(loc="lower right", fontsize=8, ncol=2)
    ax_mem.grid(alpha=0.3)

    train = [r for r in data.metrics if r.event == "train" and r.loss is not None]
    lead = min((r.rank for r in train), default=None)
    rows = [r for r in train if r.rank == lead]
    if rows:
        ax_loss.plot(
            [minutes(r.t) for r in rows],
            [r.loss or 0.0 for r in rows],
            lw=1.2,
            label=f"train loss (rank {lead})",
        )
    evals = [r for r in data.metrics if r.event == "eval" and r.loss is not None and r.rank == lead]
    if evals:
        ax_loss.plot(
            [minutes(r.t) for r in evals], [r.loss or 0.0 for r in evals], "o", label="eval loss"
        )
    if rows or evals:
        ax_loss.legend(loc="upper right", fontsize=8)
    else:
        ax_loss.text(
            0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax_loss.transAxes
        )
    ax_loss.set_title("loss", loc="left", fontsize=10)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)

    tps = step_throughput(data.metrics)
    if tps:
        ax_tok.plot(
            [minutes(t) for t, _, _ in tps],
            [v for _, _, v in tps],
            lw=1.2,
            label="measured (all ranks)",
        )
    if summary.predicted_tokens_per_s:
        ax_tok.axhline(
            summary.predicted_tokens_per_s,
            color="black",
            ls="--",
            lw=1.2,
            label=f"plan {summary.predicted_tokens_per_s:,.0f}",
        )
    if tps or summary.predicted_tokens_per_s:
        ax_tok.legend(loc="lower right", fontsize=8)
    if not tps:
        ax_tok.text(
            0.5, 0.5, "no tokens/s logged", ha="center", va="center", transform=ax_tok.transAxes
        )
    ax_tok.set_title("tokens/s, all GPUs together", loc="left", fontsize=10)
    ax_tok.set_ylabel("tokens/s")
    top = max([v for _, _, v in tps] + [summary.predicted_tokens_per_s or 0.0])
    ax_tok.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax_tok.set_xlabel("minutes since the first record")
    ax_tok.grid(alpha=0.3)

    ax_tab.axis("off")
    cells = gpu_rows(summary)
    if len(cells) > 1:
        ax_tab.set_title(
            "peak memory per GPU: predicted by the plan vs measured", loc="left", fontsize=10
        )
        table = ax_tab.table(
            cellText=cells[1:], colLabels=cells[0], loc="upper center", cellLoc="center"
        )
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        for (row, _col), cell in table.get_celld().items():
            if row > 0 and cells[row][-1] == "NO":
                cell.set_facecolor("#ffd6d6")
    else:
        ax_tab.text(
            0.5, 0.5, "no GPU samples: no predicted-vs-measured table", ha="center", va="center"
        )

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")  # whatever the name: write_html embeds it as a PNG
    return out


def write_html(summary: RunSummary, png: Path, path: str | os.PathLike[str], title: str) -> Path:
    """One self-contained page: the PNG inline and both tables."""

    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in rows[1:]
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    image = base64.b64encode(png.read_bytes()).decode("ascii")
    facts = [
        f"steps: {summary.last_step if summary.last_step is not None else '-'} / {summary.total_steps or '-'}",
        f"final loss: {summary.final_loss:.4f}"
        if summary.final_loss is not None
        else "final loss: -",
        "tokens/s (median over steps): "
        + (f"{summary.tokens_per_s_median:,.0f}" if summary.tokens_per_s_median else "-")
        + (
            f" (plan {summary.predicted_tokens_per_s:,.0f})"
            if summary.predicted_tokens_per_s
            else ""
        ),
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:auto}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>{"<br>".join(html.escape(f) for f in facts)}</p>
<h2>Peak memory per GPU: predicted vs measured (nvidia-smi used)</h2>{table(gpu_rows(summary))}
<h2>Peak allocated per rank (torch)</h2>{table(rank_rows(summary))}
<img src="data:image/png;base64,{image}" alt="memory, loss and tokens/s over time" width="1100">
</body></html>
"""
    out = Path(path)
    out.write_text(page, encoding="utf-8")
    return out


def report_paths(run_dir: Path, out: Path | None, html: bool) -> list[Path]:
    """Where the report goes: the PNG (``out``, else RUN_DIR/report.png) and, with ``html``,
    the page beside it. Checked before anything is drawn, so that a path that cannot be
    written is one line, not a traceback after the drawing."""
    png = out if out is not None else run_dir / "report.png"
    if png.suffix.lower() != ".png":
        raise OutputWriteError(
            f"-o {png}: the report is a PNG picture (its page embeds it as one): give a "
            "path ending in .png"
        )
    paths = [png, png.with_suffix(".html")] if html else [png]
    for path in paths:
        check_new_file(path, "the report")
    return paths


def write_report(data: RunData, summary: RunSummary, paths: list[Path]) -> list[Path]:
    """The PNG, and the page around it when ``paths`` (from report_paths) has two:
    written under temporary names and renamed together, so both are new or neither is."""
    with files_together(paths, "the report") as temps:
        write_png(data, summary, temps[0])
        if len(temps) > 1:
            write_html(summary, temps[0], temps[1], f"zeroplan report · {data.run_dir}")
    return paths
