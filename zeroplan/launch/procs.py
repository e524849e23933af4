"""The processes a launch started, found and ended without touching anyone else's.

torchrun starts every rank in a session of its own (``start_new_session=True``), so
signalling the launcher's process group does not reach the ranks, and a launcher killed
with SIGKILL leaves them running under init. The supervisor therefore keeps a table of every
descendant it has seen (``pid``, parent, process group, start time) and signals each one
whose start time still matches, so that a recycled pid is never hit. On Linux it also
becomes a child subreaper while the run lasts: orphaned ranks are re-parented to it, and it
reaps them, so no zombie outlives the run.

The table comes from ``/proc`` on Linux and from ``ps`` elsewhere; no psutil needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    start: str  # start time as the OS reports it: with pid, identifies the process
    zombie: bool


def _proc_stat(pid: int) -> Proc | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session tty tpgid flags ... starttime(22nd)"; comm may
    # hold spaces and parentheses, so split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 20:
        return None
    return Proc(pid, int(fields[1]), int(fields[2]), fields[19], fields[0] == "Z")


def process_table() -> dict[int, Proc]:
    """Every process on this machine that we can see."""
    table: dict[int, Proc] = {}
    if Path("/proc/self/stat").exists():
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (p := _proc_stat(int(entry.name))) is not None:
                table[p.pid] = p
        return table
    try:
        out = subprocess.run(
            [
                "ps",
                "-A",
                "-o",
                "pid=",
                "-o",
                "ppid=",
                "-o",
                "pgid=",
                "-o",
                "stat=",
                "-o",
                "lstart=",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return table
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5 and parts[0].isdigit():
            pid, ppid, pgid = int(parts[0]), int(parts[1]), int(parts[2])
            table[pid] = Proc(pid, ppid, pgid, parts[4].strip(), parts[3].startswith("Z"))
    return table


def descendants(roots: Iterable[int], table: Mapping[int, Proc] | None = None) -> dict[int, Proc]:
    """The processes below ``roots`` (not the roots themselves)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: dict[int, Proc] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found[child] = table[child]
                todo.append(child)
    return found


def alive(procs: Mapping[int, Proc], table: Mapping[int, Proc] | None = None) -> dict[int, Proc]:
    """Those of ``procs`` that still run (same pid *and* start time, not a zombie)."""
    table = process_table() if table is None else table
    return {
        pid: p
        for pid, p in procs.items()
        if (now := table.get(pid)) is not None and now.start == p.start and not now.zombie
    }


def signal_procs(procs: Mapping[int, Proc], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``procs`` that is still the process we saw."""
    for pid in alive(procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of any of ``pids`` that ended as our child (subreaper)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def set_subreaper(on: bool) -> bool:
    """Linux: make orphaned descendants our children (True when it worked)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
