"""The Trainer callbacks of a zeroplan run: the metrics lines, the stop on a signal and the
stop on a diverged loss.

Imported by ``zeroplan.launch.sft`` once it has decided to train (this module imports
transformers and torch).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from zeroplan.launch.runstate import Counter, Divergence, StopFlag


class StopOnSignal(TrainerCallback):
    """At each optimizer-step boundary: if any rank got a signal, save and stop (all ranks).

    The flag is max-reduced over the ranks each step (one integer), so that every rank saves
    the same step: a rank that left for the checkpoint while another ran one more step would
    hang in the collectives.
    """

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if any_rank(self.flag.signalled):
            control.should_save = True
            # logged before it is saved, so that StopOnDivergence checks these weights
            control.should_log = True
            control.should_training_stop = True
        return control


class StopOnDivergence(TrainerCallback):
    """Stop once training has diverged: the logged loss or gradient norm is NaN or infinite.

    In bf16 and fp32 nothing skips such a step: a non-finite gradient norm makes the
    clipped gradients, then Adam's state and the weights NaN, and every later step trains
    nothing at full price (issue 29's MoE launch ran 14 NaN steps). Under fp16 the loss
    scaler skips overflowed steps itself and their norms are inf by design: there only the
    loss counts, ``fp16_patience`` log lines in a row. The Trainer logs the mean loss over
    all ranks and the global norm, so every rank stops at the same step without a
    collective of its own.

    No checkpoint is saved from a step whose weights may be non-finite, so the newest
    checkpoint stays the last good one:

    * a step that saves also logs (``on_step_end``: the Trainer's flow callback, which
      runs before every callback given, asked for the save): the Trainer logs before it
      saves, so the line that finds the divergence comes first and vetoes the save (a
      save between two log lines would keep weights nobody checked);
    * once diverged, every later request to save is vetoed: the Trainer ends the epoch
      after ``should_training_stop``, and its flow callback's ``on_epoch_end`` asks for
      the epoch's save (``save_strategy="epoch"``, the default without --save-steps):
      that save kept the NaN weights of the step that diverged as "the last good one".
    """

    def __init__(self, fp16: bool, fp16_patience: int = 3) -> None:
        self.fp16 = fp16
        self.patience = fp16_patience if fp16 else 1
        self.run = 0  # non-finite log lines in a row
        self.diverged: Divergence | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._veto_or_check(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.diverged is not None:
            control.should_evaluate = False  # the weights are NaN: nothing to evaluate
        return self._veto_or_check(control)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> Any:
        logs = logs or {}
        if "loss" not in logs:
            return control
        loss, norm = _num(logs.get("loss")), _num(logs.get("grad_norm"))
        bad = not _finite(loss) or (not self.fp16 and not _finite(norm))
        self.run = self.run + 1 if bad else 0
        if self.run >= self.patience:
            self.diverged = Divergence(int(state.global_step), loss, norm)
            control.should_training_stop = True
            control.should_save = False  # this step's save comes after this line
        return control

    def _veto_or_check(self, control: Any) -> Any:
        """No save once diverged; before then, a save of this step is logged first."""
        if self.diverged is not None:
            control.should_save = False
        elif control.should_save:
            control.should_log = True
        return control


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def any_rank(value: bool) -> bool:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class MetricsWriter(TrainerCallback):
    """Appends one JSON line per logging step per rank to RUN/metrics.jsonl.

    Keys (the dashboard's contract): ``t`` (unix seconds), ``rank``, ``step``,
    ``total_steps``, ``loss`` (train: mean over the logging interval, all ranks; eval: the
    eval loss), ``lr``, ``grad_norm``, ``tokens_per_s`` (this rank's non-padding tokens per
    second since its previous train line), ``padding`` (the share of the token positions of
    its batches since then that were padding: work the tokens/s does not count),
    ``mem_allocated_bytes`` / ``mem_reserved_bytes``
    (``torch.cuda.memory_allocated`` / ``memory_reserved`` now, null on the CPU), ``event``
    (``train`` | ``eval`` | ``end``). Two more: ``peak_allocated_bytes`` /
    ``peak_reserved_bytes``, the allocator's peaks since the previous line (what the plan's
    ``peak_allocated_bytes`` predicts). Each line is one ``write`` to a file opened with
    O_APPEND, so the ranks of one machine never interleave within a line.
    """

    def __init__(self, path: Path, tokens: Counter, batching: str | None = None) -> None:
        self.path = path
        self.tokens = tokens
        self.batching = batching  # how batches are made, e.g. "packed, varlen attention"
        self.fd: int | None = None
        self.last_t = time.time()
        self.last_tokens = 0
        self.last_slots = 0
        self.train_loss: float | None = None

    def _write(self, args: Any, state: Any, event: str, **values: Any) -> None:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = {
            "t": time.time(),
            "rank": int(args.process_index),
            "step": int(state.global_step),
            "total_steps": int(state.max_steps),
            "loss": values.get("loss"),
            "lr": values.get("lr"),
            "grad_norm": values.get("grad_norm"),
            "tokens_per_s": values.get("tokens_per_s"),
            "padding": values.get("padding"),
            "batching": self.batching,
            **_memory(),
            "event": event,
        }
        os.write(self.fd, (json.dumps(line) + "\n").encode("utf-8"))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_t = time.time()
        self.last_tokens = self.tokens.read()
        self.last_slots = self.tokens.slots

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            now, tokens, slots = time.time(), self.tokens.read(), self.tokens.slots
            rate = (tokens - self.last_tokens) / (now - self.last_t) if now > self.last_t else None
            spans = slots - self.last_slots
            padding = 1 - (tokens - self.last_tokens) / spans if spans > 0 else None
            self.last_t, self.last_tokens, self.last_slots = now, tokens, slots
            self._write(
                args,
                state,
                "train",
                loss=_num(logs.get("loss")),
                lr=_num(logs.get("learning_rate")),
                grad_norm=_num(logs.get("grad_norm")),
                tokens_per_s=rate,
                padding=padding,
            )
        elif "eval_loss" in logs:
            self._write(args, state, "eval", loss=_num(logs.get("eval_loss")))
        elif "train_loss" in logs:
            self.train_loss = _num(logs.get("train_loss"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(args, state, "end", loss=self.train_loss)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _memory() -> dict[str, int | None]:
    if not torch.cuda.is_available():
        return {
            "mem_allocated_bytes": None,
            "mem_reserved_bytes": None,
            "peak_allocated_bytes": None,
            "peak_reserved_bytes": None,
        }
    out: dict[str, int | None] = {
        "mem_allocated_bytes": int(torch.cuda.memory_allocated()),
        "mem_reserved_bytes": int(torch.cuda.memory_reserved()),
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
    }
    torch.cuda.reset_peak_memory_stats()
    return out
