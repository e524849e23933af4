"""Start the launcher(s), watch every rank, stop them all, and say what happened.

* Each launcher command starts in a session of its own (so a terminal's Ctrl-C reaches
  only zeroplan) with stdin closed and its output in ``RUN_DIR/logs/launcher.log``; the
  ranks write ``RUN_DIR/logs/rank{N}.log`` themselves (see ranklog.py).
* A rank that ends with a non-zero status (its ``rank{N}.exit.json``) stops the run: the
  others get SIGTERM, and the message names the rank and shows its last log lines.
* SIGINT (Ctrl-C), SIGTERM and SIGHUP to zeroplan stop the run the same way.
* Stopping: SIGTERM to each launcher's process group and to every descendant outside it
  (torchrun puts each rank in a session of its own), ``grace_s`` seconds for the ranks to
  write their checkpoint and exit, then SIGKILL to whatever is left (a second Ctrl-C kills
  at once). Every process is matched by pid *and* start time, and orphans are reaped, so
  nothing is left running and no zombie remains.

Exit status: 0 when every rank finished, 1 when a rank (or the launcher) failed,
128 + the signal when stopped by one (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from zeroplan.launch import multinode, procs
from zeroplan.launch.progress import MetricsTail, Progress, print_line, start_display
from zeroplan.launch.ranklog import EXIT_NAME
from zeroplan.launch.runner import (
    DEFAULT_GRACE_S,
    LAUNCHER_LOG,
    Launch,
    describe_nodes,
    write_files,
)
from zeroplan.outputs import write_atomic
from zeroplan.watch.runlog import METRICS_FILE

DEFAULT_PROGRESS_S = 10.0
LET_LAUNCHER_S = 5.0  # a rank failed: the launcher stops the others itself, first
KILL_MARGIN_S = 5.0  # after the grace period, before SIGKILL: the launcher's own kill first
TAIL_LINES = 20
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Say = Callable[[str], None]


def _stderr(text: str) -> None:
    print(f"zeroplan: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RankExit:
    """What ``rank{N}.exit.json`` says."""

    rank: int
    returncode: int
    signal: str | None
    t: float

    def status(self) -> str:
        return f"killed by {self.signal}" if self.signal else f"exit status {self.returncode}"


def read_exits(log_dir: Path) -> dict[int, RankExit]:
    exits = {}
    for path in log_dir.glob(EXIT_NAME.format(rank="*")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            d = json.loads(path.read_text(encoding="utf-8"))
            exits[int(d["rank"])] = RankExit(
                int(d["rank"]), int(d["returncode"]), d.get("signal"), float(d["t"])
            )
    return exits


def _ended_on_stop(e: RankExit) -> bool:
    """Killed by, or exited as (128 + signal), one of the signals a stop sends to ranks."""
    sent = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL}
    if e.signal is not None:
        return e.signal in {s.name for s in sent}
    return e.returncode in {128 + s for s in sent}


def tail_lines(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` lines of a text file (empty if it cannot be read)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=n)]
    except OSError:
        return []


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    reason: str  # done | rank failed | launcher failed | interrupted
    message: str
    failed_rank: int | None = None
    exits: Mapping[int, RankExit] = field(default_factory=dict)
    killed: int = 0  # processes that needed SIGKILL
    seconds: float = 0.0


class Supervisor:
    """Runs ``launch.commands`` and keeps every process they start under control."""

    def __init__(
        self,
        launch: Launch,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        poll_s: float = 0.2,
        say: Say = _stderr,
        kill_margin_s: float = KILL_MARGIN_S,
    ) -> None:
        self.launch = launch
        self.grace_s = grace_s
        self.kill_margin_s = kill_margin_s
        self.poll_s = poll_s
        self.say = say
        self.popens: list[subprocess.Popen[bytes]] = []
        self.known: dict[int, procs.Proc] = {}
        self.signals: list[int] = []
        self.signal_t: list[float] = []  # when each arrived (monotonic)
        self.killed_at_once = False  # a further signal cut the grace period short
        self._before: set[int] = set()
        self._nodes_checked = 0.0

    # -- what the dashboard asks ------------------------------------------------------

    def rank_exit_codes(self) -> dict[int, int | None]:
        """rank -> exit status, None while it runs. Once the user has stopped the run, a rank
        that ended on the stop signal reads as None too: it did what it was asked, and the
        dashboard must not call it gone (seen on 2×H100: a CRIT alert after every Ctrl-C)."""
        exits = read_exits(self.launch.log_dir)
        codes: dict[int, int | None] = {}
        for r in range(self.launch.world_size):
            e = exits.get(r)
            stopped = e is not None and bool(self.signals) and _ended_on_stop(e)
            codes[r] = None if e is None or stopped else e.returncode
        return codes

    def host_of(self, rank: int) -> str:
        return self.launch.host_of(rank)

    # -- the run ----------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.monotonic()
        on_signal = self._on_signal
        old = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
        subreaper = procs.set_subreaper(True)
        self._before = {pid for pid, p in procs.process_table().items() if p.ppid == os.getpid()}
        try:
            result = self._start() or self._watch()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if subreaper:
                procs.set_subreaper(False)
        return RunResult(
            result.exit_code,
            result.reason,
            result.message,
            result.failed_rank,
            result.exits,
            result.killed,
            time.monotonic() - started,
        )

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_t.append(time.monotonic())
        self.signals.append(signum)  # acted on by the loop; printing here could re-enter

    def _how_stopped(self, killed: int) -> str:
        """How the ranks ended once stopped: each on its SIGTERM, or ``killed`` processes by
        SIGKILL after the grace period, or at once on a further signal."""
        if not killed:
            return "every rank was stopped"
        what = f"{killed} process{'es' if killed != 1 else ''}"
        if self.killed_at_once and len(self.signal_t) > 1:
            after = self.signal_t[1] - self.signal_t[0]
            return f"a second signal {after:.1f} s after the first killed {what} at once"
        return f"every rank was stopped ({what} with SIGKILL after the {self.grace_s:.0f} s grace)"

    def _start(self) -> RunResult | None:
        log_path = self.launch.log_dir / LAUNCHER_LOG
        with log_path.open("ab") as log:
            for cmd in self.launch.commands:
                env = {**os.environ, **self.launch.env, **cmd.env}
                try:
                    p = subprocess.Popen(
                        list(cmd.argv),
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as exc:
                    killed = self._terminate(why=f"cannot start {cmd.argv[0]}")
                    return RunResult(
                        1, "launcher failed", f"cannot start {cmd.argv[0]}: {exc}", killed=killed
                    )
                self.popens.append(p)
        return None

    def _refresh(self) -> None:
        """Remember every process the launch has started so far (pid and start time)."""
        table = procs.process_table()
        me = os.getpid()
        launchers = {p.pid for p in self.popens}
        # ranks orphaned by a dead launcher are re-parented to us (subreaper)
        orphans = {
            pid: p
            for pid, p in table.items()
            if p.ppid == me and pid not in launchers and pid not in self._before
        }
        self.known.update(orphans)
        self.known.update(procs.descendants([*launchers, *orphans], table))

    def _watch(self) -> RunResult:
        last_refresh = 0.0
        while True:
            if self.signals:
                name = signal.Signals(self.signals[0]).name
                killed = self._terminate(why=f"{name} received")
                exits = read_exits(self.launch.log_dir)
                return RunResult(
                    128 + self.signals[0],
                    "interrupted",
                    f"stopped by {name}: {self._how_stopped(killed)}; "
                    + what_is_left(self.launch.run_dir),
                    exits=exits,
                    killed=killed,
                )
            gone = self._failed_node()
            if gone is not None:
                killed = self._terminate(why=gone[1])
                return RunResult(
                    1,
                    "node failed",
                    f"{gone[1]}, so the ranks here were stopped",
                    exits=read_exits(self.launch.log_dir),
                    killed=killed,
                )
            failed = self._first_failure()
            if failed is not None:
                what = "stopped" if self._stopped_elsewhere(failed) else "failed"
                killed = self._terminate(
                    why=f"rank {failed.rank} {what}", let_launcher_s=LET_LAUNCHER_S
                )
                return self._failure(failed, killed)
            codes = [p.poll() for p in self.popens]
            if self._all_ranks_done(codes):
                # several nodes: torchrun waits at its exit barrier for every node's agent,
                # minutes when another node's was stopped after its ranks had finished
                killed = self._terminate(why="every rank finished", quiet=True)
                return RunResult(
                    0,
                    "done",
                    self._all_finished(),
                    exits=read_exits(self.launch.log_dir),
                    killed=killed,
                )
            if all(c is not None for c in codes):
                failed = self._first_failure()
                killed = self._terminate(why="the launcher ended", quiet=True)
                if failed is not None:
                    return self._failure(failed, killed)
                bad = [c for c in codes if c != 0]
                if bad:
                    log = self.launch.log_dir / LAUNCHER_LOG
                    lines = "\n".join("    " + ln for ln in tail_lines(log))
                    return RunResult(
                        1,
                        "launcher failed",
                        f"{self.launch.launcher} exited with status {bad[0]} and no rank reported "
                        f"a failure; last lines of {log}:\n{lines}",
                        exits=read_exits(self.launch.log_dir),
                        killed=killed,
                    )
                return RunResult(
                    0,
                    "done",
                    self._all_finished(),
                    exits=read_exits(self.launch.log_dir),
                    killed=killed,
                )
            now = time.monotonic()
            if now - last_refresh >= 1.0:
                self._refresh()
                last_refresh = now
            time.sleep(self.poll_s)

    def _failed_node(self) -> tuple[int, str] | None:
        """Several nodes: one that gave up joining or was stopped (its marker in
        RUN_DIR/.nodes says why): (node rank, what ended it)."""
        if self.launch.rendezvous is None:
            return None
        now = time.monotonic()
        if now - self._nodes_checked < 1.0:
            return None
        self._nodes_checked = now
        failed = multinode.failed_nodes(self.launch.run_dir)
        return min(failed.items()) if failed else None

    def _first_failure(self) -> RankExit | None:
        failed = [e for e in read_exits(self.launch.log_dir).values() if e.returncode != 0]
        return min(failed, key=lambda e: e.t) if failed else None

    def _all_finished(self) -> str:
        n = self.launch.world_size
        return "the rank finished" if n == 1 else f"all {n} ranks finished"

    def _all_ranks_done(self, codes: list[int | None]) -> bool:
        """Several nodes: every rank of every node exited 0 and this node's launcher has
        had LET_LAUNCHER_S to end by itself."""
        if self.launch.rendezvous is None or all(c is not None for c in codes):
            return False
        exits = read_exits(self.launch.log_dir)
        if len(exits) < self.launch.world_size or any(e.returncode for e in exits.values()):
            return False
        return time.time() - max(e.t for e in exits.values()) > LET_LAUNCHER_S

    def _stopped_elsewhere(self, failed: RankExit) -> bool:
        """Several nodes: a rank ended on a stop signal that this node did not get."""
        return self.launch.rendezvous is not None and _ended_on_stop(failed) and not self.signals

    def _failure(self, failed: RankExit, killed: int) -> RunResult:
        if self._stopped_elsewhere(failed):
            # several nodes: another node was stopped (Ctrl-C, SIGTERM) and its ranks told
            # every rank to save and stop; that is not this node's failure
            code = failed.returncode if 128 < failed.returncode < 160 else 128 + signal.SIGTERM
            return RunResult(
                code,
                "interrupted",
                f"stopped: rank {failed.rank} on {self.host_of(failed.rank)} ended on a stop "
                f"signal ({failed.status()}), so every rank saved and stopped; "
                + what_is_left(self.launch.run_dir),
                failed_rank=failed.rank,
                exits=read_exits(self.launch.log_dir),
                killed=killed,
            )
        log = self.launch.rank_log(failed.rank)
        lines = "\n".join("    " + ln for ln in tail_lines(log))
        others = self.launch.world_size - 1
        return RunResult(
            1,
            "rank failed",
            f"rank {failed.rank} failed ({failed.status()}) on {self.host_of(failed.rank)}"
            + {0: "", 1: "; the other rank was stopped"}.get(
                others, f"; the other {others} ranks were stopped"
            )
            + f". Last lines of {log}:\n{lines}",
            failed_rank=failed.rank,
            exits=read_exits(self.launch.log_dir),
            killed=killed,
        )

    def _terminate(self, why: str, quiet: bool = False, let_launcher_s: float = 0.0) -> int:
        """Stop everything the launch started; return how many processes needed SIGKILL.

        Each rank must get SIGTERM exactly once: ``zeroplan.launch.sft`` saves a checkpoint
        on the first and stops at once on a second. The launchers forward one to every rank
        (torchrun signals each rank's process group, DeepSpeed's launch.py each process of
        the rank's tree) and each rank leads a process group of its own (ranklog.py), so
        zeroplan signals the launchers' process groups only, and the ranks' groups itself
        only when no launcher process is left to do it. ``let_launcher_s``: a rank failed
        and the launcher stops the others by itself; give it that long first.
        """
        groups = {p.pid for p in self.popens}  # each launcher leads its own session and group
        sent = False  # SIGTERM went to the launchers
        direct = False  # ... and to the ranks, by zeroplan itself

        def launcher_alive() -> bool:
            return any(p.poll() is None for p in self.popens) or any(
                q.pgid in groups for q in procs.alive(self.known).values()
            )

        def ended() -> bool:
            return all(p.poll() is not None for p in self.popens) and not procs.alive(self.known)

        def wait(seconds: float) -> bool:
            """True when everything ended; False on timeout or on a further signal."""
            nonlocal direct
            signals_seen = len(self.signals)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                self._refresh()
                self._reap()
                if ended():
                    return True
                if len(self.signals) > signals_seen:
                    self.say("second signal: killing now")
                    self.killed_at_once = True
                    return False
                if sent and not direct and not launcher_alive():
                    self._signal_ranks(groups, signal.SIGTERM)  # orphaned: no one forwards
                    direct = True
                time.sleep(self.poll_s)
            return ended()

        self._refresh()
        if ended() or (let_launcher_s and wait(let_launcher_s)):
            self._reap()
            return 0
        if not quiet:
            self.say(
                f"{why}: stopping the ranks (SIGTERM; SIGKILL after {self.grace_s:.0f} s"
                + ("; Ctrl-C again kills at once" if self.signals else "")
                + ")"
            )
        for pgid in groups:
            procs.signal_group(pgid, signal.SIGTERM)
        sent = True
        # The launchers' own escalation (torchrun --shutdown-timeout, DeepSpeed's 30 s) comes
        # first; SIGKILL from here only for what outlives it.
        killed = 0
        if not wait(self.grace_s + self.kill_margin_s):
            left = procs.alive(self.known)
            killed = len(left) + sum(p.poll() is None for p in self.popens)
            self.say(f"{killed} process{'es' if killed != 1 else ''} still running: SIGKILL")
            for pgid in groups:
                procs.signal_group(pgid, signal.SIGKILL)
            self._signal_ranks(groups, signal.SIGKILL)
            procs.signal_procs(left, signal.SIGKILL)
        for p in self.popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        deadline = time.monotonic() + 5
        while procs.alive(self.known) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        self._reap()
        return killed

    def _signal_ranks(self, launcher_groups: set[int], sig: signal.Signals) -> None:
        """``sig`` to the process group of every process still running outside the
        launchers' groups (the ranks, each in its own)."""
        for pgid in {p.pgid for p in procs.alive(self.known).values()} - launcher_groups:
            procs.signal_group(pgid, sig)

    def _reap(self) -> None:
        for p in self.popens:
            p.poll()
        procs.reap(self.known)


def what_is_left(run_dir: Path) -> str:
    """After a stop: the checkpoint --resume continues from; or, without one, whether the
    folder holds an earlier run's steps (then it must be deleted, or another -o given) or
    nothing a new launch would be refused for (the same command starts it again)."""
    from zeroplan.launch.preflight import earlier_run
    from zeroplan.launch.sft import last_checkpoint

    ckpt = last_checkpoint(run_dir)
    if ckpt is not None:
        return f"--resume continues from {ckpt.name}"
    held = earlier_run(run_dir)
    if held is not None:
        return (
            f"no checkpoint was saved, so there is nothing to resume ({held}): delete "
            f"{run_dir} to start again there, or give -o NEW_DIR"
        )
    return (
        f"the run saved nothing and trained no step: the same command (the same -o) starts "
        f"it again in {run_dir}, or delete the folder"
    )


def _headline(message: str) -> str:
    """A result's message without the log tail it introduces (``...; last lines of LOG:``)."""
    first = message.splitlines()[0] if message else ""
    return re.split(r"[.;] [Ll]ast lines of ", first)[0]


def _update_record(launch: Launch, result: RunResult, started: float) -> None:
    path = launch.run_dir / launch.record_name
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    record["started"] = started
    record["ended"] = time.time()
    record["result"] = {
        "exit_code": result.exit_code,
        "reason": result.reason,
        "failed_rank": result.failed_rank,
        "ranks": {str(r): e.returncode for r, e in sorted(result.exits.items())},
        # what zeroplan said, for zeroplan watch / report: without the log lines it shows
        "message": _headline(result.message),
    }
    with contextlib.suppress(OSError):
        write_atomic(path, json.dumps(record, indent=2) + "\n")


def run_launch(
    launch: Launch,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    dashboard: bool = False,
    progress_every_s: float = DEFAULT_PROGRESS_S,
    out: IO[str] | None = None,
    say: Say = _stderr,
) -> RunResult:
    """Write RUN_DIR's files, start the ranks, show progress, supervise; the outcome."""
    out = sys.stdout if out is None else out
    metrics_path = launch.run_dir / METRICS_FILE
    write_files(launch)
    offset = metrics_path.stat().st_size if metrics_path.exists() else 0
    metrics, progress = MetricsTail(metrics_path, offset), Progress()
    supervisor = Supervisor(launch, grace_s=grace_s, say=say)
    world = launch.world_size
    rdv = launch.rendezvous
    if rdv is None:
        say(
            f"starting {world} rank{'s' if world > 1 else ''} with {launch.launcher} "
            f"({describe_nodes(launch.nodes)}); logs: {launch.log_dir}/rank0.log"
            + (f" … rank{world - 1}.log" if world > 1 else "")
        )
    else:
        first, last = launch.first_rank, launch.first_rank + len(launch.nodes[0].slots) - 1
        ranks = f"rank {first}" if first == last else f"ranks {first}-{last}"
        logs = f"rank{first}.log" + (f" … rank{last}.log" if last > first else "")
        say(
            f"starting {ranks} of {world} with {launch.launcher} on {rdv.host} "
            f"({rdv.describe()}); logs: {launch.log_dir}/{logs}"
        )
    stop = threading.Event()
    started = time.time()
    display = start_display(
        launch.run_dir,
        stop,
        metrics,
        progress,
        dashboard=dashboard,
        every_s=progress_every_s,
        out=out,
        say=say,
        rank_exit_codes=supervisor.rank_exit_codes,
    )
    try:
        result = supervisor.run()
    finally:
        stop.set()
        display.join(timeout=5)
    if not display.is_alive():
        progress.add(metrics.read())
        line = progress.line()  # the last step, unless the plain lines said it already
        if line:
            print_line(out, f"{time.strftime('%H:%M:%S')} {line}")
    _update_record(launch, result, started)
    return result
