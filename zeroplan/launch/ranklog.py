"""One rank's program with its output in ``LOG_DIR/rank{RANK}.log`` and its end in
``LOG_DIR/rank{RANK}.exit.json``.

``zeroplan launch`` has torchrun or the deepspeed launcher start this module on every rank::

    python -u -m zeroplan.launch.ranklog RUN_DIR/logs -- -m zeroplan.launch.sft --plan ...

It reads ``RANK`` (both launchers set it), starts ``python -u PROGRAM...`` with stdout and
stderr going straight to the log file (no pipe, so nothing is lost if this process dies),
waits, writes ``{"rank", "returncode", "signal", "pid", "t"}`` to the exit file, and exits
with the program's status (128 + N when signal N ended it). The exit file is how the
supervisor learns *which* rank failed under either launcher; the log names are global ranks
under both, which torchrun's own ``--log-dir/--redirects/--tee`` (local ranks, a random
folder per run) would not give.

Signals: this process leads a process group that the program shares, and nobody else.
The launchers signal that group (torchrun ``killpg``) or each process of the tree
(DeepSpeed's launch.py), so the program gets SIGTERM / SIGINT directly, exactly once.
Forwarding it from here as well would deliver it twice, and ``zeroplan.launch.sft`` takes
a second signal as "stop at once, without the checkpoint"; this process only notes it and
keeps waiting, so the exit file still gets written.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from zeroplan.outputs import write_atomic

LOG_NAME = "rank{rank}.log"
EXIT_NAME = "rank{rank}.exit.json"


def _note_signal(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler (not SIG_IGN), so the program starts with the default ones."""


def _write_exit(path: Path, record: dict[str, object]) -> None:
    # whole or not at all: the supervisor may read it the moment it appears
    write_atomic(path, json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        print(
            "usage: python -m zeroplan.launch.ranklog LOG_DIR -- PROGRAM [ARGS...]", file=sys.stderr
        )
        return 2
    log_dir, program = Path(args[0]), args[2:]
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    log_dir.mkdir(parents=True, exist_ok=True)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _note_signal)
    # Lead a process group of our own (torchrun already made us a session leader; under
    # DeepSpeed we share the launcher's group): then a signal to the launcher's group
    # reaches the launcher only, and it forwards exactly one SIGTERM to this rank.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)

    with (log_dir / LOG_NAME.format(rank=rank)).open("ab", buffering=0) as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"== zeroplan: rank {rank} starts {stamp} (pid {os.getpid()})\n".encode())
        proc = subprocess.Popen(
            [sys.executable, "-u", *program], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        returncode = proc.wait()  # retried by Python when a signal handler ran (PEP 475)
        sig = signal.Signals(-returncode).name if returncode < 0 else None
        log.write(f"== zeroplan: rank {rank} exits with {sig or returncode}\n".encode())
    _write_exit(
        log_dir / EXIT_NAME.format(rank=rank),
        {
            "rank": int(rank),
            "returncode": returncode,
            "signal": sig,
            "pid": proc.pid,
            "t": time.time(),
        },
    )
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main())
