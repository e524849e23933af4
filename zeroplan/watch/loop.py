"""The dashboard loop: sample the GPUs and the host, record the samples, read what the
ranks logged, judge (alerts), show — once per interval.

``zeroplan launch`` runs it beside training in the launcher process::

    import threading
    from zeroplan.watch.loop import run_dashboard

    stop = threading.Event()
    dash = threading.Thread(
        target=run_dashboard,
        args=(run_dir, stop),
        kwargs={"rank_exit_codes": lambda: {r: p.poll() for r, p in procs.items()}},
        daemon=True,
    )
    dash.start()
    ...  # wait for the ranks
    stop.set(); dash.join(timeout=5)

:func:`run_dashboard` never raises an ``Exception``: a failure to sample, read or render
is logged (logger ``zeroplan.watch.loop`` and ``RUN_DIR/watch_errors.log``), a broken live
screen falls back to plain lines, and the loop goes on until ``stop_event`` is set. On a
terminal it draws the live screen; when its stream is not a terminal, TERM is ``dumb`` or
``CI`` is set it prints plain lines every ``plain_every_s`` (and at once when the alerts
change).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

from zeroplan.errors import BadPlanError
from zeroplan.watch.alerts import DEFAULT_HANG_AFTER_S, all_alerts, clock_is_low
from zeroplan.watch.dashboard import DashboardView, plain_lines, render, view_json
from zeroplan.watch.monitor import GPUBackend, HostSampler, Snapshot, open_backend
from zeroplan.watch.runlog import (
    METRICS_FILE,
    Prediction,
    RunState,
    SampleRecorder,
    TrainingLog,
    TrainingView,
    launch_result,
    read_prediction,
    run_state,
    trained_on,
)

logger = logging.getLogger("zeroplan.watch.loop")

DEFAULT_INTERVAL_S = 1.0
PLAIN_EVERY_S = 30.0  # plain lines in logs: often enough to follow, rare enough to read
ERRORS_FILE = "watch_errors.log"
STATE_EVERY_S = 5.0  # how often a watched run's folder is asked whether the run has ended

Mode = Literal["auto", "live", "plain", "json"]
ExitCodes = Callable[[], Mapping[int, "int | None"]]


class Collector:
    """Gathers one :class:`DashboardView` per call: it owns the GPU backend, the host
    sampler, the metrics reader and the sample recorder of one run folder."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        backend: GPUBackend | None,
        gpu_error: str | None = None,
        *,
        prediction: Prediction | None = None,
        record: bool = True,
        hang_after_s: float = DEFAULT_HANG_AFTER_S,
        rank_exit_codes: ExitCodes | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.backend = backend
        self.gpu_error = gpu_error
        self.prediction = prediction
        self.hang_after_s = hang_after_s
        self.rank_exit_codes = rank_exit_codes
        self.host = HostSampler()
        self.notes = list(notes)
        # The launcher's own dashboard (it passes rank_exit_codes) watches a live run by
        # definition, from the moment it starts; anyone else first asks the folder.
        launcher = rank_exit_codes is not None
        state = run_state(self.run_dir) if self.run_dir and not launcher else None
        if launcher:
            session_start: float | None = time.time()
        else:
            session_start = state.session_start if state else None
        self.training = (
            TrainingLog(self.run_dir / METRICS_FILE, session_start=session_start)
            if self.run_dir
            else None
        )
        self.state = state
        self._low_clock: dict[int, int] = {}  # GPU index -> consecutive low-clock samples
        if state is not None and state.finished and record:
            record = False
            self.notes.append(f"not recording: the run has ended ({state.outcome}): read-only")
        self.device: str | None = None  # what the ranks train on, once applied.json says
        self._state_read = time.time()
        self.recorder = SampleRecorder(self.run_dir) if self.run_dir and record else None
        if self.recorder is not None:
            self.notes.append(
                f"recording to {self.run_dir}/gpu_samples.jsonl"
                if self.recorder.active
                else f"not recording: {self.recorder.why_not}"
            )
        self._hostname = socket.gethostname()

    def collect(self) -> DashboardView:
        """Sample, record, read the metrics, judge."""
        gpus = self.backend.sample() if self.backend is not None else []
        now = time.time()
        snap = Snapshot(t=now, gpus=tuple(gpus), host=self.host.sample(), gpu_error=self.gpu_error)
        if self.recorder is not None:
            self.recorder.write(snap)
        training = None
        if self.training is not None:
            self.training.poll()
            training = self.training.view()
        exit_codes = self.rank_exit_codes() if self.rank_exit_codes else None
        if self.device is None and self.run_dir is not None:
            self.device = trained_on(self.run_dir)  # rank 0 writes it once the model loaded
        state = self._state_now(training, now)
        alive = _alive_pids(training) if exit_codes is None else None
        for g in snap.gpus:
            self._low_clock[g.index] = self._low_clock.get(g.index, 0) + 1 if clock_is_low(g) else 0
        alerts = all_alerts(
            snap.gpus,
            self.prediction,
            training,
            now,
            hang_after_s=self.hang_after_s,
            exit_codes=exit_codes,
            alive_pids=alive,
            this_host=self._hostname,
            low_clock_samples=self._low_clock,
            # read again with the state: a run that ended while watched has no hung ranks
            run_finished=state is not None and state.finished,
            run_failed=state.outcome if state is not None and state.failed else None,
        )
        return DashboardView(
            snapshot=snap,
            training=training,
            prediction=self.prediction,
            alerts=tuple(alerts),
            run_dir=str(self.run_dir) if self.run_dir else None,
            notes=tuple(self.notes),
            status=state.status if state is not None else None,
            outcome=state.outcome if state is not None else None,
            on_cpu=self.device == "cpu",
        )

    def _state_now(self, training: TrainingView | None, now: float) -> RunState | None:
        """The run folder's word on how the run ended, read again (every few seconds)
        while a run watched from outside goes on: once launch.json has its result, or every
        rank logged its end, it says how."""
        state = self.state
        if state is None or state.finished or self.run_dir is None:
            return state
        if now - self._state_read < STATE_EVERY_S:
            return state
        self._state_read = now
        ended = training is not None and training.finished
        if ended or launch_result(self.run_dir) is not None:
            self.state = run_state(self.run_dir)
        return self.state

    def close(self) -> None:
        try:
            if self.recorder is not None:
                self.recorder.close()
        finally:
            if self.backend is not None:
                self.backend.close()


def _alive_pids(training: TrainingView | None) -> set[int] | None:
    pids = {r.pid for r in training.ranks if r.pid is not None} if training else set()
    if not pids:
        return None
    import psutil

    return {p for p in pids if psutil.pid_exists(p)}


def open_collector(
    run_dir: str | os.PathLike[str] | None,
    *,
    fake_gpus: int | None = None,
    gpu_indices: Sequence[int] | None = None,
    backend: GPUBackend | None = None,
    record: bool = True,
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
    rank_exit_codes: ExitCodes | None = None,
    strict_plan: bool = True,
) -> Collector:
    """A Collector for ``run_dir`` with the real NVML backend (or ``backend`` / fake GPUs).

    ``strict_plan``: a plan.json that is not a plan raises BadPlanError; otherwise it
    becomes a note and the dashboard runs without a prediction.
    """
    notes = []
    prediction = None
    if run_dir is not None:
        try:
            prediction = read_prediction(run_dir)
        except BadPlanError as exc:
            if strict_plan:
                raise
            notes.append(f"no prediction: {exc}")
        if prediction is None and not notes:
            notes.append("no prediction: no plan.json with a plan in the run folder")
    error = None
    if backend is None:
        backend, error = open_backend(fake_gpus, gpu_indices)
    try:
        return Collector(
            run_dir,
            backend,
            error,
            prediction=prediction,
            record=record,
            hang_after_s=hang_after_s,
            rank_exit_codes=rank_exit_codes,
            notes=notes,
        )
    except BaseException:
        if backend is not None:
            backend.close()
        raise


def choose_mode(stream: IO[str]) -> Literal["live", "plain"]:
    """live on an interactive terminal; plain when piped, on a dumb terminal or in CI."""
    if os.environ.get("CI") or os.environ.get("TERM") == "dumb":
        return "plain"
    try:
        return "live" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "plain"


class _ErrorLog:
    """Logs a failure without flooding: the first few in full, then every 60th."""

    def __init__(self, run_dir: Path | None) -> None:
        self.path = run_dir / ERRORS_FILE if run_dir is not None else None
        self.count = 0

    def __call__(self, what: str, exc: BaseException) -> None:
        self.count += 1
        if self.count > 5 and self.count % 60:
            return
        if self.path is None:
            logger.error("dashboard: %s failed: %r", what, exc, exc_info=exc)
        else:
            logger.error("dashboard: %s failed: %r (traceback in %s)", what, exc, self.path)
            try:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what} failed (#{self.count})\n")
                    f.write("".join(traceback.format_exception(exc)))
            except OSError:
                logger.error("dashboard: cannot write %s", self.path, exc_info=exc)


def run_dashboard(
    run_dir: str | os.PathLike[str] | None,
    stop_event: threading.Event,
    *,
    interval: float = DEFAULT_INTERVAL_S,
    mode: Mode = "auto",
    stream: IO[str] | None = None,
    plain_every_s: float = PLAIN_EVERY_S,
    rank_exit_codes: ExitCodes | None = None,
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
    record: bool = True,
    gpu_indices: Sequence[int] | None = None,
    fake_gpus: int | None = None,
    backend: GPUBackend | None = None,
    width: int | None = None,
    quit_when_output_closed: bool = False,
) -> int:
    """Show the run until ``stop_event`` is set; return the number of refreshes.

    run_dir: the run folder (plan.json, metrics.jsonl; samples are recorded there), or None
    for GPUs and host only. interval: seconds between samples. mode: ``auto`` (see
    :func:`choose_mode`), ``live``, ``plain`` or ``json`` (one JSON object per line).
    stream: where to draw (stdout). In plain mode a block of lines goes out every
    ``plain_every_s`` and at once when an alert appears or clears. rank_exit_codes: the
    launcher's view of its ranks (rank -> exit status, None while running) for the "rank
    gone" alert. width: columns of the live screen (default: the terminal's).

    Exceptions from sampling, reading or rendering are logged and never propagate; a
    broken live screen falls back to plain lines; when the stream itself is closed
    (BrokenPipeError) the loop goes on recording silently, or returns if
    ``quit_when_output_closed``. KeyboardInterrupt propagates (the screen is restored).
    """
    out = stream if stream is not None else sys.stdout
    errors = _ErrorLog(Path(run_dir) if run_dir is not None else None)
    try:
        collector = open_collector(
            run_dir,
            fake_gpus=fake_gpus,
            gpu_indices=gpu_indices,
            backend=backend,
            record=record,
            hang_after_s=hang_after_s,
            rank_exit_codes=rank_exit_codes,
            strict_plan=False,
        )
    except Exception as exc:
        errors("starting the dashboard", exc)
        return 0
    shown = _Output(out, choose_mode(out) if mode == "auto" else mode, width, plain_every_s, errors)
    refreshes = 0
    try:
        while not stop_event.is_set():
            started = time.monotonic()
            try:
                view: DashboardView | None = collector.collect()
            except Exception as exc:
                errors("sampling", exc)
                view = None
            if view is not None:
                refreshes += 1
                shown.show(view, started)
                if shown.closed and quit_when_output_closed:
                    break
            stop_event.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        shown.stop()
        try:
            collector.close()
        except Exception as exc:
            errors("closing the samplers", exc)
    return refreshes


class _Output:
    """Where views go: the live screen, plain lines or JSON lines, with the fallbacks."""

    def __init__(
        self, out: IO[str], mode: str, width: int | None, plain_every_s: float, errors: _ErrorLog
    ) -> None:
        self.out, self.mode, self.plain_every_s, self.errors = out, mode, plain_every_s, errors
        self.screen = _LiveScreen(out, width) if mode == "live" else None
        self.closed = False
        self._last_plain = -float("inf")
        self._last_alerts: frozenset[tuple[str, str]] = frozenset()

    def show(self, view: DashboardView, now: float) -> None:
        if self.closed:
            return
        try:
            self._show(view, now)
        except Exception as exc:
            if not self._output_gone(exc):
                self.errors(f"showing ({self.mode})", exc)
                return
            # the reader went away (`| head`, a closed terminal): not the dashboard's fault
            logger.info("dashboard: output closed (%r); no more output", exc)
            self.closed = True

    def _output_gone(self, exc: Exception) -> bool:
        return isinstance(exc, BrokenPipeError) or bool(getattr(self.out, "closed", False))

    def _show(self, view: DashboardView, now: float) -> None:
        if self.screen is not None:
            try:
                self.screen.show(view)
                return
            except Exception as exc:
                if self._output_gone(exc):
                    raise
                self.errors("drawing the live screen", exc)
                self.stop()
                self.mode = "plain"
                _say(self.out, f"zeroplan: the live dashboard failed ({exc!r}); plain lines follow")
        if self.mode == "json":
            _say(self.out, json.dumps(view_json(view), allow_nan=False))
            return
        alerts = frozenset(a.key for a in view.alerts)
        if now - self._last_plain >= self.plain_every_s or alerts != self._last_alerts:
            try:
                text = "\n".join(plain_lines(view))
            except Exception as exc:
                self.errors("formatting plain lines", exc)
                return
            _say(self.out, text)
            self._last_plain, self._last_alerts = now, alerts

    def stop(self) -> None:
        if self.screen is not None:
            screen, self.screen = self.screen, None
            try:
                screen.stop()
            except Exception as exc:
                self.errors("closing the live screen", exc)


def _say(out: IO[str], text: str) -> None:
    out.write(text + "\n")
    out.flush()


class _LiveScreen:
    """rich Live, refreshed by us (no refresh thread of its own)."""

    def __init__(self, out: IO[str], width: int | None) -> None:
        from rich.console import Console
        from rich.live import Live

        # live mode was chosen for a terminal, or asked for: draw as on one either way
        self.console = Console(file=out, width=width, force_terminal=True)
        self.live: Live | None = None

    def show(self, view: DashboardView) -> None:
        from rich.live import Live

        shown = render(view, self.console.width)
        if self.live is None:
            self.live = Live(shown, console=self.console, auto_refresh=False)
            self.live.start(refresh=True)
        else:
            self.live.update(shown, refresh=True)

    def stop(self) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()


def watch_once(
    run_dir: str | os.PathLike[str] | None,
    *,
    fake_gpus: int | None = None,
    gpu_indices: Sequence[int] | None = None,
    backend: GPUBackend | None = None,
    record: bool = False,
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
) -> DashboardView:
    """One refresh: what ``zeroplan watch --once`` shows."""
    collector = open_collector(
        run_dir,
        fake_gpus=fake_gpus,
        gpu_indices=gpu_indices,
        backend=backend,
        record=record,
        hang_after_s=hang_after_s,
    )
    try:
        return collector.collect()
    finally:
        collector.close()
