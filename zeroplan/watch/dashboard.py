"""The dashboard's faces: a rich rendering for terminals, plain lines for logs and CI, and
JSON for scripts. Everything here formats a :class:`DashboardView`; nothing samples,
reads files or decides what is wrong (that is monitor.py, runlog.py and alerts.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from zeroplan.watch.alerts import Alert, merged_lines
from zeroplan.watch.monitor import GPUSample, HostSample, Snapshot
from zeroplan.watch.runlog import Prediction, TrainingView, json_safe

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

GIB = 2**30
SPARK = "▁▂▃▄▅▆▇█"
MARK = "┃"  # the predicted peak on a memory bar
WIDE = 120  # from this many columns on: clocks, throttle reasons, full GPU names


@dataclass(frozen=True)
class DashboardView:
    """Everything one refresh shows."""

    snapshot: Snapshot
    training: TrainingView | None
    prediction: Prediction | None
    alerts: tuple[Alert, ...]
    run_dir: str | None = None
    notes: tuple[str, ...] = ()  # e.g. who records the samples, a plan.json problem
    status: str | None = None  # runlog.STATUSES, from the run folder; None: not asked
    outcome: str | None = None  # the status in words ("stopped by SIGINT at step 11")
    on_cpu: bool = False  # the ranks train on the CPU: the plan's GPU numbers do not apply

    @property
    def ended(self) -> str:
        """How the training panel says the run is over: the outcome when the run folder
        tells it; otherwise "ended" (every rank logged ``end``, which it does whether the
        run completed, was stopped or diverged)."""
        return self.outcome or "ended"


# -- small pure formatters ----------------------------------------------------------------


def sparkline(values: Sequence[float], width: int, floor: float | None = None) -> str:
    """The last ``width`` values as block characters, scaled between their min (or
    ``floor``) and max; NaN and inf as a space, a flat series as its middle block."""
    vals = list(values)[-width:] if width > 0 else []
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return " " * len(vals)
    lo, hi = (min(finite) if floor is None else floor), max(finite)
    span = hi - lo
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append(" ")
        elif span == 0:
            out.append(SPARK[len(SPARK) // 2])
        else:
            out.append(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))])
    return "".join(out)


def bar_cells(used: float, total: float, mark: float | None, width: int) -> tuple[int, int | None]:
    """(filled cells, cell of the mark or None) for a bar of ``width`` cells."""
    if total <= 0 or width <= 0:
        return 0, None
    filled = min(width, max(0, round(used / total * width)))
    cell = None if mark is None else min(width - 1, max(0, int(mark / total * width)))
    return filled, cell


def duration(seconds: float | None) -> str:
    """``5 s``, ``3m02s``, ``1h02m``, ``2d 7h``; ``-`` when unknown (no ``3:02``, which
    reads like a time of day)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h >= 48:
        return f"{h // 24}d {h % 24}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def short_name(name: str, narrow: bool = False) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100 80GB HBM3' (narrow: also without 'GeForce')."""
    out = name.removeprefix("NVIDIA ")
    return out.replace("GeForce ", "") if narrow else out


def short_command(command: str | None) -> str:
    """'/usr/bin/python3 -u x.py' -> 'python3 -u x.py': the program's path says little.

    One line: a ``python -c`` program's newlines would break the table (seen on an H100)."""
    if not command:
        return "?"
    program, _, rest = " ".join(command.split()).partition(" ")
    return program.rsplit("/", 1)[-1] + (f" {rest}" if rest else "")


def _gib(n: int | None, digits: int = 1) -> str:
    return "-" if n is None else f"{n / GIB:.{digits}f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}" if math.isfinite(x) else str(x)


# -- rich -----------------------------------------------------------------------------------
# Tables are drawn as aligned Text lines, not rich.table.Table: a Table measures every cell
# twice per refresh, which alone cost ~14 ms (1.4% of a core at 1 Hz) for 8 GPUs.


def grid(
    header: Sequence[str],
    rows: Sequence[Sequence[str | Text]],
    align: str,
    max_widths: Sequence[int | None] = (),
) -> Text:
    """Cells in columns two spaces apart, as one Text; ``align`` has one ``l``/``r`` per
    column; a cell wider than its column's max width ends in an ellipsis."""
    from rich.text import Text

    cells = [[c.copy() if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    widths = []
    for i, name in enumerate(header):
        w = max([len(name)] + [row[i].cell_len for row in cells])
        limit = max_widths[i] if i < len(max_widths) else None
        widths.append(min(w, limit) if limit else w)
    out = Text(no_wrap=True, overflow="ellipsis")
    last = len(header) - 1
    for k, line in enumerate([[Text(h, style="bold") for h in header], *cells]):
        if k:
            out.append("\n")
        for i, cell in enumerate(line):
            if i:
                out.append("  ")
            if cell.cell_len > widths[i]:
                cell.truncate(widths[i], overflow="ellipsis")
            if i < last or align[i] == "r":
                cell.align("right" if align[i] == "r" else "left", widths[i])
            out.append_text(cell)
    return out


def memory_bar(used: int | None, total: int | None, predicted: int | None, width: int) -> Text:
    """Used memory as a bar with the predicted peak marked ┃ (green below the prediction,
    yellow above it, red above 95% of the card)."""
    from rich.text import Text

    if used is None or not total:
        return Text("?" * width, style="dim")
    filled, cell = bar_cells(used, total, predicted, width)
    over_card = used > 0.95 * total
    over_pred = predicted is not None and used > predicted
    style = "red" if over_card else "yellow" if over_pred else "green"
    text = Text()
    for start, end in ((0, filled), (filled, width)):
        if cell is not None and start <= cell < end:
            pieces = [(start, cell), (cell, cell + 1), (cell + 1, end)]
        else:
            pieces = [(start, end)]
        for a, b in pieces:
            if b <= a:
                continue
            if a == cell:
                text.append(MARK, style="bold magenta")
            else:
                text.append(
                    ("█" if a < filled else "░") * (b - a), style=style if a < filled else "grey37"
                )
    return text


def _gpu_table(gpus: Sequence[GPUSample], prediction: Prediction | None, width: int) -> Text:
    from rich.text import Text

    wide = width >= WIDE
    pred = prediction.device_used_bytes if prediction else None
    fixed = 4 + 13 + 12 + 5 + 5 + 10 + (26 if wide else 0) + 2 * (8 if wide else 6)
    bar_width = max(8, min(50, width - fixed))
    if pred:
        title = (
            f"memory ({MARK} = predicted peak {_gib(pred)} GiB)"
            if wide
            else f"memory {MARK}={_gib(pred)} GiB"
        )
    else:
        title = "memory"
    header = ["GPU", "name", title, "GiB", "util", "temp", "power W"]
    align = "rllrrrr"
    if wide:
        header += ["SM MHz", "throttle"]
        align += "rl"
    rows = []
    for g in gpus:
        row: list[str | Text] = [
            str(g.index),
            short_name(g.name, narrow=not wide),
            memory_bar(g.memory_used_bytes, g.memory_total_bytes, pred, bar_width),
            f"{_gib(g.memory_used_bytes)}/{_gib(g.memory_total_bytes)}",
            _num(g.util_percent, ".0f") + "%",
            _num(g.temperature_c, ".0f") + "°C",
            f"{_num(g.power_w, '.0f')}/{_num(g.power_limit_w, '.0f')}",
        ]
        if wide:
            clocks = f"{_num(g.sm_clock_mhz, 'd')}/{_num(g.sm_clock_max_mhz, 'd')}"
            shown = [r for r in g.throttle_reasons if r != "gpu_idle"]
            row += [clocks, Text(", ".join(shown) or "-", style="yellow" if shown else "")]
        rows.append(row)
    return grid(
        header, rows, align, [None, 24 if wide else 12, None, None, None, None, None, None, 40]
    )


def _process_table(gpus: Sequence[GPUSample], width: int, limit: int = 16) -> Text | None:
    rows: list[list[str | Text]] = [
        [str(g.index), str(p.pid), p.user or "?", _gib(p.memory_bytes), short_command(p.command)]
        for g in gpus
        for p in g.processes
    ]
    if not rows:
        return None
    more = len(rows) - limit
    rows = rows[:limit]
    if more > 0:
        rows.append(["", "", "", "", f"… {more} more processes"])
    return grid(["GPU", "PID", "user", "GiB", "command"], rows, "rrlrl", [None, None, 12])


def _host_line(host: HostSample | None) -> Text:
    from rich.text import Text

    text = Text("host ", style="bold")
    if host is None:
        return text.append("-")
    cpu = f"CPU {_num(host.cpu_percent, '.0f')}%"
    if host.cpu_count:
        cpu += f" of {host.cpu_count} cores"
    if host.load_1m is not None:
        cpu += f" · load {host.load_1m:.1f}"
    text.append(cpu)
    text.append(f" · RAM {_gib(host.ram_used_bytes)}/{_gib(host.ram_total_bytes)} GiB")
    if host.swap_total_bytes:
        text.append(f" · swap {_gib(host.swap_used_bytes)}/{_gib(host.swap_total_bytes)} GiB")
    return text


def _training(view: DashboardView, width: int) -> Any:
    from rich.console import Group
    from rich.text import Text

    tr, now = view.training, view.snapshot.t
    if tr is None:
        if view.outcome:
            return Text(f"training: no metrics; the run {view.outcome}", style="dim")
        where = f"{view.run_dir}/metrics.jsonl" if view.run_dir else "no run folder given"
        return Text(f"training: no metrics yet ({where})", style="dim")
    lines: list[Any] = []
    total = f"/{tr.total_steps}" if tr.total_steps else ""
    step = Text(f"step {tr.step}{total}", style="bold")
    if tr.total_steps:
        done = min(1.0, tr.step / tr.total_steps)
        cells = max(10, min(40, width - 60))
        step.append(" " + "█" * round(done * cells) + "░" * (cells - round(done * cells)))
        step.append(f" {done:.0%}")
    over = tr.finished or view.outcome is not None
    step.append(f" · {view.ended}" if over else f" · ETA {duration(tr.eta_s)}")
    if tr.seconds_per_step:
        step.append(f" · {tr.seconds_per_step:.2f} s/step")
    lines.append(step)
    loss = Text(f"loss {_loss(tr.loss)} ")
    loss.append(sparkline(tr.loss_history, max(10, min(60, width - 60))), style="cyan")
    if tr.eval_loss is not None:
        loss.append(f" · eval {_loss(tr.eval_loss)}")
    loss.append(f" · lr {_num(tr.lr, '.2e')} · grad norm {_num(tr.grad_norm, '.3g')}")
    lines.append(loss)
    tok = Text(f"tokens/s {_num(tr.tokens_per_s, ',.0f')}")
    if view.prediction and view.prediction.tokens_per_s and view.on_cpu:
        # as zeroplan report says it: the plan's speed is its GPUs'
        tok.append(f" (plan {view.prediction.tokens_per_s:,.0f} on GPUs: not compared on the CPU)")
    elif view.prediction and view.prediction.tokens_per_s:
        band = f" ±{view.prediction.error_p90:.0%}" if view.prediction.error_p90 else ""
        bound = ", host-bound" if view.prediction.host_bound else ""
        tok.append(f" (plan {view.prediction.tokens_per_s:,.0f}{band}{bound})")
    if tr.padding is not None:
        # tokens/s counts real tokens; padding is work it leaves out
        tok.append(f" · {tr.padding:.0%} padding")
    if tr.batching:
        tok.append(f" · {tr.batching}")
    tok.append(" ")
    # from zero: a throughput that dips by 2% should not look like a collapse
    tok.append(sparkline(tr.tokens_history, max(10, min(40, width - 40)), floor=0.0), style="cyan")
    lines.append(tok)
    if tr.bad_lines:
        lines.append(Text(f"{tr.bad_lines} unreadable metrics lines skipped", style="dim"))
    # a GPU's predicted peak means nothing beside ranks on the CPU, which log no memory
    pred_alloc = view.prediction.peak_allocated_bytes if view.prediction else None
    pred_alloc = None if view.on_cpu else pred_alloc
    alloc_head = "peak alloc / pred GiB" if pred_alloc else "peak alloc GiB"
    hosts = sorted({r.host for r in tr.ranks if r.host})
    several = len(hosts) > 1
    if several:
        # NVML sees this machine's GPUs only; the other nodes' ranks come from their metrics
        lines.append(
            Text(
                f"{len(hosts)} nodes ({', '.join(hosts)}): the GPU table above is this "
                "machine's; every node's ranks are below, from the shared metrics.jsonl",
                style="dim",
            )
        )
    rows: list[list[str | Text]] = []
    for r in tr.ranks:
        age = "ended" if r.event == "end" else f"{duration(now - r.last_t)} ago"
        alloc = _gib(r.peak_allocated_bytes) + (f" / {_gib(pred_alloc)}" if pred_alloc else "")
        rows.append(
            [
                str(r.rank),
                *([r.host or "?"] if several else []),
                str(r.step),
                age,
                alloc,
                _gib(r.mem_reserved_bytes),
                _num(r.tokens_per_s, ",.0f"),
            ]
        )
    header = ["rank", *(["node"] if several else []), "step", "last metric", alloc_head]
    header += ["reserved GiB", "tokens/s"]
    lines.append(grid(header, rows, "r" + ("l" if several else "") + "rrrrr"))
    return Group(*lines)


def render(view: DashboardView, width: int) -> RenderableType:
    """The dashboard for a terminal ``width`` columns wide (80 and up)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.rule import Rule
    from rich.text import Text

    snap = view.snapshot
    head = Text("zeroplan watch", style="bold")
    head.append(time.strftime(" · %H:%M:%S", time.localtime(snap.t)))
    if view.run_dir:
        head.append(f" · {view.run_dir}")
    parts: list[Any] = [head]
    if view.prediction and (view.prediction.model or view.prediction.cluster):
        what = " on ".join(filter(None, [view.prediction.model, view.prediction.cluster]))
        if width >= WIDE:
            head.append(f" · {what}")
        else:
            parts.append(Text(f"plan: {what}"))
    for note in view.notes:
        parts.append(Text(note, style="dim"))
    if view.alerts:
        body = Text("\n").join(
            Text(line, style="bold red" if line.startswith("CRIT") else "yellow")
            for line in merged_lines(view.alerts)
        )
        parts.append(Panel(body, title="alerts", title_align="left", border_style="red"))
    if snap.gpu_error:
        parts.append(
            Text(f"{snap.gpu_error} — the training panel below still works.", style="yellow")
        )
    else:
        parts.append(_gpu_table(snap.gpus, view.prediction, width))
        procs = _process_table(snap.gpus, width, limit=16 if width >= WIDE else 8)
        if procs is not None:
            parts.append(Rule("processes", align="left", style="grey37"))
            parts.append(procs)
    parts.append(_host_line(snap.host))
    parts.append(Rule("training", align="left", style="grey37"))
    parts.append(_training(view, width))
    return Group(*parts)


# -- plain lines ----------------------------------------------------------------------------


def plain_lines(view: DashboardView) -> list[str]:
    """One summary line (plus one per alert) for logs and CI, where a live screen is noise."""
    snap = view.snapshot
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.t))
    parts = []
    tr = view.training
    if tr is None:
        parts.append(f"no metrics; {view.outcome}" if view.outcome else "no metrics yet")
    else:
        total = f"/{tr.total_steps}" if tr.total_steps else ""
        parts.append(
            f"step {tr.step}{total} loss {_loss(tr.loss)} lr {_num(tr.lr, '.2e')} "
            f"tok/s {_num(tr.tokens_per_s, ',.0f')} "
            + (view.ended if tr.finished or view.outcome else f"ETA {duration(tr.eta_s)}")
        )
    if snap.gpu_error:
        parts.append("no GPU data")
    elif snap.gpus:
        used = " ".join(_gib(g.memory_used_bytes) for g in snap.gpus[:8])
        more = f" +{len(snap.gpus) - 8}" if len(snap.gpus) > 8 else ""
        card = _gib(max((g.memory_total_bytes or 0) for g in snap.gpus))
        pred = f" (pred {_gib(view.prediction.device_used_bytes)})" if view.prediction else ""
        utils = [g.util_percent for g in snap.gpus if g.util_percent is not None]
        util = f" util {sum(utils) / len(utils):.0f}%" if utils else ""
        parts.append(f"GPU GiB {used}{more} of {card}{pred}{util}")
    if snap.host is not None:
        parts.append(
            f"CPU {_num(snap.host.cpu_percent, '.0f')}% RAM "
            f"{_gib(snap.host.ram_used_bytes)}/{_gib(snap.host.ram_total_bytes)} GiB"
        )
    lines = [f"[{stamp}] " + " | ".join(parts)]
    lines += [f"[{stamp}] ALERT {line}" for line in merged_lines(view.alerts)]
    return lines


# -- JSON ---------------------------------------------------------------------------------


def view_json(view: DashboardView) -> dict[str, Any]:
    """The view as one JSON object (``zeroplan watch --once --json``)."""
    snap = view.snapshot
    out: dict[str, Any] = json_safe(
        {
            "t": snap.t,
            "run_dir": view.run_dir,
            "gpu_error": snap.gpu_error,
            "gpus": [g.to_json() for g in snap.gpus],
            "host": snap.host.to_json() if snap.host else None,
            "prediction": asdict(view.prediction) if view.prediction else None,
            "training": _training_json(view.training),
            "alerts": [asdict(a) for a in view.alerts],
            "notes": list(view.notes),
            "status": view.status,
            "outcome": view.outcome,
            "trained_on_cpu": view.on_cpu,
        }
    )
    return out


def _training_json(tr: TrainingView | None) -> dict[str, Any] | None:
    if tr is None:
        return None
    out = asdict(tr)
    out["ranks"] = [asdict(r) for r in tr.ranks]
    out["loss_history"] = list(tr.loss_history)
    out["tokens_history"] = list(tr.tokens_history)
    return out
