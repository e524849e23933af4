"""What the terminal shows while the ranks train: the dashboard, or plain lines.

The dashboard (``run_dashboard(run_dir, stop_event)`` of the monitor side: ``zeroplan.watch.loop``,
or ``zeroplan.watch.dashboard`` if it moves there) is imported only when the run starts. It picks
its own face: the live screen on an interactive terminal, plain lines every 30 s when
stdout is not a terminal or ``CI`` is set, and it records the GPU samples that ``zeroplan
report`` draws, so it runs off a terminal too. If it is missing, raises, or returns before
the run ends, or with ``--no-dashboard``, zeroplan's own plain lines take over. Nothing here
can stop training: the display runs in a daemon thread and swallows its own failures.

Plain lines come from RUN_DIR/metrics.jsonl (one JSON object per line, appended by every
rank): the lowest rank's step, total steps and loss, and the sum of every rank's latest
``tokens_per_s``, at most once per ``every_s`` seconds and only when the step moved.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

DASHBOARD_MODULES = ("zeroplan.watch.dashboard", "zeroplan.watch.loop")

Say = Callable[[str], None]
ExitCodes = Callable[[], Mapping[int, "int | None"]]


class MetricsTail:
    """The complete lines appended to a JSONL file since ``offset``."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its end
        records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and isinstance(obj.get("rank"), int):
                    records.append(obj)
        return records


class Progress:
    """The latest record of each rank, and the line that says where training is."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, Any]] = {}
        self._printed_step: object = None

    def add(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            if rec.get("event", "train") == "train":
                self.latest[rec["rank"]] = rec

    def line(self, force: bool = False) -> str | None:
        """``step 12/100 · loss 1.2345 · 3,456 tokens/s``; None when the step has not moved."""
        if not self.latest:
            return None
        lead = self.latest[min(self.latest)]
        step = lead.get("step")
        if step == self._printed_step and not force:
            return None
        self._printed_step = step
        total = lead.get("total_steps")
        parts = [f"step {step}" + (f"/{total}" if total else "")]
        if isinstance(lead.get("loss"), (int, float)):
            parts.append(f"loss {lead['loss']:.4f}")
        speeds = [
            r["tokens_per_s"]
            for r in self.latest.values()
            if isinstance(r.get("tokens_per_s"), (int, float))
        ]
        if speeds:
            parts.append(f"{sum(speeds):,.0f} tokens/s")
        return " · ".join(parts)


def plain_progress(
    metrics: MetricsTail, progress: Progress, stop: threading.Event, every_s: float, out: IO[str]
) -> None:
    """Print a progress line every ``every_s`` seconds (when the step moved) until ``stop``."""
    while not stop.wait(every_s):
        progress.add(metrics.read())
        line = progress.line()
        if line:
            print_line(out, f"{time.strftime('%H:%M:%S')} {line}")


def print_line(out: IO[str], text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        out.write(text + "\n")
        out.flush()


def find_dashboard() -> Callable[..., Any] | None:
    """``run_dashboard`` from the monitor side, if it is there (imported only now)."""
    for name in DASHBOARD_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        fn: Callable[..., Any] | None = getattr(module, "run_dashboard", None)
        if callable(fn):
            return fn
    return None


def start_display(
    run_dir: Path,
    stop: threading.Event,
    metrics: MetricsTail,
    progress: Progress,
    *,
    dashboard: bool,
    every_s: float,
    out: IO[str],
    say: Say,
    rank_exit_codes: ExitCodes | None = None,
) -> threading.Thread:
    """Run the dashboard (or plain lines) in a daemon thread until ``stop`` is set."""

    def target() -> None:
        if dashboard:
            fn = find_dashboard()
            if fn is None:
                say("the dashboard is not available: plain progress lines follow")
            else:
                kwargs: dict[str, Any] = {}
                with contextlib.suppress(TypeError, ValueError):
                    if "rank_exit_codes" in inspect.signature(fn).parameters:
                        kwargs["rank_exit_codes"] = rank_exit_codes
                try:
                    fn(run_dir, stop, **kwargs)
                except BaseException as exc:  # a display failure must never stop training
                    say(f"the dashboard failed ({exc!r}): plain progress lines follow")
                if stop.is_set():
                    return
        try:
            plain_progress(metrics, progress, stop, every_s, out)
        except Exception as exc:
            say(f"progress lines failed ({exc!r}); training goes on, see {run_dir}/logs")

    thread = threading.Thread(target=target, name="zeroplan-display", daemon=True)
    thread.start()
    return thread
