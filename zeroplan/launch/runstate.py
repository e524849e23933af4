"""What the rank's training loop and its callbacks share: the token counter and the stop flag.

Its own module so that ``launch/sft.py`` (the loop) and ``launch/callbacks.py`` (the
Trainer callbacks, which import transformers and torch) do not import each other.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any


@dataclass(frozen=True)
class Divergence:
    """Where a run's training went non-finite (callbacks.StopOnDivergence): the optimizer
    step, its logged loss and gradient norm (None: not logged)."""

    step: int
    loss: float | None
    grad_norm: float | None


@dataclass
class Counter:
    """Non-padding tokens this rank trained on, kept on the device (read once per log line),
    and the token positions its batches had, padding included (a host integer)."""

    value: Any = 0
    slots: int = 0

    def add(self, n: Any, slots: int = 0) -> None:
        self.value = self.value + n
        self.slots += slots

    def read(self) -> int:
        v = self.value
        return int(v.item()) if hasattr(v, "item") else int(v)


class StopFlag:
    """Set by SIGTERM / SIGINT; the training loop reads it at each optimizer-step boundary.

    A second signal restores the default handler and re-sends itself: the process ends at
    once (the last complete checkpoint is still on disk).
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(
            f"zeroplan: {signal.Signals(signum).name}: stopping after this step and saving a "
            "checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def signalled(self) -> bool:
        return self.signum is not None
