"""Printing to a stdout that fails: the reader left (``zeroplan plan | head -1``) or the
output cannot be written (``zeroplan estimate --json > /dev/full``).

Commands print through click.echo and rich's console. An OSError raised inside them leaves
the command as StdoutFailed, which ``main`` turns into a quiet exit for a reader that left
and one ``zeroplan: error:`` line otherwise, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import click

# The modules commands print through: an OSError raised inside them is the output's.
PRINTERS = ("click.", "rich.")
# 128 + SIGPIPE (13): what a shell reports for cat or grep when the reader of their pipe
# leaves. Python ignores SIGPIPE and raises BrokenPipeError instead, and click would make
# that a silent exit 1; 141 keeps the Unix meaning: `set -o pipefail` scripts see zeroplan
# as they see any other tool whose output was cut short, and plain pipes ignore it.
READER_LEFT_STATUS = 141


class StdoutFailed(Exception):
    """Printing failed. Not an OSError, so that click's main lets it by: click turns a
    BrokenPipeError into ``sys.exit(1)`` before ``main`` could see it."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


def raised_by_printing(exc: OSError) -> bool:
    """Whether ``exc`` was raised while printing: inside click.echo or rich's console, and
    not on a file opened by name (those carry the name, and are the command's to report)."""
    if exc.filename is not None:
        return False
    tb = exc.__traceback__
    module = ""
    while tb is not None:  # the innermost Python frame is the one whose write failed
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return module.startswith(PRINTERS)


class Group(click.Group):
    """zeroplan's command group: a command whose printing fails raises StdoutFailed."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if raised_by_printing(exc):
                raise StdoutFailed(exc) from exc
            raise
        except SystemExit as exc:
            # rich's console meets a BrokenPipeError with SystemExit(1), raised while handling
            # it (Console.on_broken_pipe): the pipe error is its context
            pipe = exc.__context__
            if isinstance(pipe, BrokenPipeError) and raised_by_printing(pipe):
                raise StdoutFailed(pipe) from pipe
            raise


def flush() -> None:
    """Flush stdout before exiting: a failure of the last buffered write is seen here, not
    by Python's own flush at exit (which would print 'Exception ignored ...')."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError as exc:
        raise StdoutFailed(exc) from exc


def exit_status(failed: StdoutFailed) -> int:
    """Say what happened (nothing when the reader left) and return the exit status."""
    _drop_stdout()
    if isinstance(failed.error, BrokenPipeError):
        return READER_LEFT_STATUS
    with contextlib.suppress(OSError):  # stderr may be the same broken pipe or full disk
        click.echo(
            f"zeroplan: error: cannot write the output: {failed}; free the space or send it "
            "elsewhere",
            err=True,
        )
    return 2


def _drop_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that what is still buffered is dropped
    quietly at exit instead of failing a second time."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # no descriptor (a captured stdout): nothing is flushed to it at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
