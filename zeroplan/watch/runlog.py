"""A run folder, read and written while the run goes: the plan's prediction (plan.json),
what the ranks log (metrics.jsonl) and what the dashboard samples (gpu_samples.jsonl,
host_samples.jsonl).

metrics.jsonl is appended by every rank, one JSON object per line (the launch contract):
``{"t", "rank", "step", "total_steps", "loss", "lr", "grad_norm", "tokens_per_s",
"mem_allocated_bytes", "mem_reserved_bytes", "event"}`` with event ``train`` / ``eval`` /
``end``; ``tokens_per_s`` is the rank's own throughput (the dashboard adds the ranks up).
Optional: ``peak_allocated_bytes`` / ``peak_reserved_bytes`` (the allocator's peaks since the
rank's previous line, compared with the plan's peak), ``padding`` (the share of the batches'
token positions since the previous line that were padding), ``pid`` and ``host`` (to tell a rank
that died from one that is slow). Unknown keys are ignored; a line that is not (yet) complete JSON is skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from zeroplan.errors import BadPlanError, RunDirNotFoundError
from zeroplan.outputs import read_json_object
from zeroplan.planfiles import model_name

if TYPE_CHECKING:  # an annotation only: the CLI and the launch import this module at start
    from zeroplan.watch.monitor import Snapshot

PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.jsonl"
GPU_SAMPLES_FILE = "gpu_samples.jsonl"
HOST_SAMPLES_FILE = "host_samples.jsonl"
LOCK_FILE = ".watch.lock"
LAUNCH_FILE = "launch.json"  # zeroplan launch's record; "result" is added when it ends
APPLIED_FILE = "applied.json"  # what rank 0 applied: setup, kernels, device ("cuda" or "cpu")
RESULT_FILE = "result.json"  # rank 0's end of a session: status, step, checkpoint, signal

# Longest command line kept per GPU process in gpu_samples.jsonl: a line is then ~550
# bytes, so 8 GPUs sampled at 1 Hz write ~16 MB per hour of run.
COMMAND_CHARS = 120


# -- the prediction -----------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Per-GPU numbers the plan predicted for its chosen setup (worst-loaded rank)."""

    device_used_bytes: int  # what nvidia-smi should show at the peak
    required_bytes: int  # what the card must hold (allocated × 1.03 + CUDA context)
    peak_allocated_bytes: int  # torch.cuda.max_memory_allocated
    world_size: int | None = None
    tokens_per_s: float | None = None  # all GPUs together
    model: str | None = None
    cluster: str | None = None
    # the host's clock sets the step's pace (speed.StepTime.host_bound): a measured speed
    # far from tokens_per_s may be the run's process rather than the model
    host_bound: bool = False
    # 9 in 10 predictions like it came within this fraction of the measured speed on runs
    # no fit saw (speed.StepTime.error_p90); None in a plan.json from before it was kept
    error_p90: float | None = None


def check_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` as a Path, or :class:`RunDirNotFoundError`: also for a plan's folder
    (``zeroplan plan -o``), where watching would write GPU samples beside the plan."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise RunDirNotFoundError(
            f"run folder {path} {what} (give the folder that holds plan.json and metrics.jsonl)"
        )
    if is_plan_folder(path):
        raise RunDirNotFoundError(
            f"{path} holds a plan, not a run (plan.json from zeroplan plan -o, nothing "
            f"launched there): launch it (zeroplan launch {path} --data DATA -o RUN_DIR), "
            "then give RUN_DIR"
        )
    return path


# What a launch or a rank writes into its run folder; a plan.json without any of them is a
# plan (zeroplan plan -o) that was never launched there
RUN_FILES = (LAUNCH_FILE, METRICS_FILE, APPLIED_FILE, RESULT_FILE, "logs", "checkpoints")


def is_plan_folder(path: Path) -> bool:
    """A plan's folder: plan.json, and nothing a launch or its ranks write."""
    return (path / PLAN_FILE).is_file() and not any((path / f).exists() for f in RUN_FILES)


def read_prediction(run_dir: str | os.PathLike[str]) -> Prediction | None:
    """The prediction in ``run_dir/plan.json``; None when there is no plan.json or its plan
    found nothing that fits. A plan.json that is not a plan raises BadPlanError."""
    path = Path(run_dir) / PLAN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadPlanError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadPlanError(f"{path} is not a plan (expected a JSON object)")
    best = data.get("best")
    if best is None:
        return None
    try:
        return Prediction(
            device_used_bytes=int(best["device_used_bytes"]),
            required_bytes=int(best["required_bytes"]),
            peak_allocated_bytes=int(best["peak_allocated_bytes"]),
            world_size=int(data["world_size"]) if data.get("world_size") else None,
            tokens_per_s=float(best["tokens_per_s"]) if best.get("tokens_per_s") else None,
            model=model_name(data) if data.get("model") else None,
            cluster=data.get("cluster"),
            host_bound=bool(best.get("host_bound", False)),
            error_p90=float(best["error_p90"]) if best.get("error_p90") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadPlanError(
            f"{path} is not a plan from `zeroplan plan` (best.{exc} missing or wrong)"
        ) from exc


def trained_on(run_dir: str | os.PathLike[str]) -> str | None:
    """The device the ranks trained on ("cuda", or "cpu" where ``zeroplan launch --force``
    started them without a GPU), from rank 0's applied.json; None before it is written or
    where it cannot be read."""
    data = read_json_object(Path(run_dir) / APPLIED_FILE)
    device = data.get("device") if data is not None else None
    return device if isinstance(device, str) else None


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None, so that it is strict JSON (the run folder's
    files and ``--json`` answers are read by other tools, whose parsers reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# -- metrics.jsonl ------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricRecord:
    """One line of metrics.jsonl."""

    t: float
    rank: int
    step: int
    total_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    mem_allocated_bytes: int | None = None
    mem_reserved_bytes: int | None = None
    event: str = "train"
    pid: int | None = None
    host: str | None = None
    peak_allocated_bytes: int | None = None  # allocator peak since the rank's previous line
    peak_reserved_bytes: int | None = None
    padding: float | None = None  # share of token positions that were padding, same interval
    batching: str | None = None  # how the rank makes its batches ("packed, varlen attention")


def _num(value: Any, kind: type[int] | type[float]) -> Any:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value:  # NaN: an honest "no value" on the screen, not a crash
        return None if kind is int else value
    return kind(value)


def parse_record(line: str) -> MetricRecord | None:
    """A metrics.jsonl line as a record; None for a line that is not one (partial, blank,
    missing t / rank / step)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    t, rank, step = _num(obj.get("t"), float), _num(obj.get("rank"), int), obj.get("step")
    step = _num(step, int)
    if t is None or rank is None or step is None:
        return None
    event = obj.get("event")
    return MetricRecord(
        t=t,
        rank=rank,
        step=step,
        total_steps=_num(obj.get("total_steps"), int),
        loss=_num(obj.get("loss"), float),
        lr=_num(obj.get("lr"), float),
        grad_norm=_num(obj.get("grad_norm"), float),
        tokens_per_s=_num(obj.get("tokens_per_s"), float),
        mem_allocated_bytes=_num(obj.get("mem_allocated_bytes"), int),
        mem_reserved_bytes=_num(obj.get("mem_reserved_bytes"), int),
        event=event if isinstance(event, str) else "train",
        pid=_num(obj.get("pid"), int),
        host=obj.get("host") if isinstance(obj.get("host"), str) else None,
        peak_allocated_bytes=_num(obj.get("peak_allocated_bytes"), int),
        peak_reserved_bytes=_num(obj.get("peak_reserved_bytes"), int),
        padding=_num(obj.get("padding"), float),
        batching=obj.get("batching") if isinstance(obj.get("batching"), str) else None,
    )


class JsonlTail:
    """The complete lines appended to a file since the last call.

    A last line without its newline is held back until the writer finishes it; a file that
    shrank (rewritten) is read again from the start.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offset:
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return [ln.decode("utf-8", "replace") for ln in lines if ln.strip()]


def read_metrics(path: str | os.PathLike[str]) -> list[MetricRecord]:
    """Every complete record in a metrics.jsonl (for the report)."""
    return [r for r in map(parse_record, JsonlTail(path).read_new()) if r is not None]


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file, one line at a time (a day of samples is hundreds
    of MB); lines that are not objects are skipped, a missing file is empty."""
    if not Path(path).exists():
        return
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    yield obj


@dataclass(frozen=True)
class RankStatus:
    """The latest word from one rank."""

    rank: int
    step: int
    total_steps: int | None
    last_t: float
    event: str
    tokens_per_s: float | None
    mem_allocated_bytes: int | None
    mem_reserved_bytes: int | None
    pid: int | None
    host: str | None
    peak_allocated_bytes: int | None = None  # the highest so far (peak or current allocated)


@dataclass(frozen=True)
class TrainingView:
    """The run as the ranks report it, at one moment.

    step, loss, lr and grad norm are the lead rank's (the lowest rank that has reported,
    rank 0 normally); tokens/s is the sum of every running rank's latest value.
    """

    ranks: tuple[RankStatus, ...]
    step: int
    total_steps: int | None
    loss: float | None
    lr: float | None
    grad_norm: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    loss_history: tuple[float, ...]
    tokens_history: tuple[float, ...]
    seconds_per_step: float | None
    eta_s: float | None
    finished: bool
    bad_lines: int
    padding: float | None = None  # the lead rank's latest share of padded positions
    batching: str | None = None  # the lead rank's batching


class TrainingLog:
    """Everything metrics.jsonl has said so far, kept small: the latest record per rank
    and the last ``history`` losses and throughputs."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        history: int = 240,
        *,
        session_start: float | None = None,
    ) -> None:
        # ``session_start``: when the current launch began (a resumed run's metrics.jsonl
        # holds the earlier session's ``end`` lines; those must not read as "finished")
        self.session_start = session_start
        self._tail = JsonlTail(path)
        self._latest: dict[int, MetricRecord] = {}
        self._peak: dict[int, int] = {}
        self._ended: set[int] = set()
        self._loss: deque[float] = deque(maxlen=history)
        self._tokens: deque[float] = deque(maxlen=history)
        self._steps: deque[tuple[float, int]] = deque(maxlen=20)
        self._lead_last: MetricRecord | None = None
        self._eval_loss: float | None = None
        self.bad_lines = 0

    def poll(self) -> int:
        """Read what was appended since the last poll; the number of new records."""
        n = 0
        for line in self._tail.read_new():
            rec = parse_record(line)
            if rec is None:
                self.bad_lines += 1
                continue
            self.add(rec)
            n += 1
        return n

    def add(self, rec: MetricRecord) -> None:
        """Take one record into account."""
        self._latest[rec.rank] = rec
        for value in (rec.peak_allocated_bytes, rec.mem_allocated_bytes):
            if value is not None and value > self._peak.get(rec.rank, -1):
                self._peak[rec.rank] = value
        if rec.event == "end":
            if self.session_start is None or rec.t >= self.session_start:
                self._ended.add(rec.rank)
        else:  # a rank that logs again after its end is running again (a resume)
            self._ended.discard(rec.rank)
        if rec.rank != min(self._latest):
            return
        if rec.event == "eval":
            self._eval_loss = rec.loss if rec.loss is not None else self._eval_loss
            return
        if rec.event != "train":
            return
        last = self._lead_last
        if last is None or rec.step != last.step:
            if rec.loss is not None:
                self._loss.append(rec.loss)
            total = self._tokens_per_s()
            if total is not None:
                self._tokens.append(total)
            self._steps.append((rec.t, rec.step))
        self._lead_last = rec

    def _tokens_per_s(self) -> float | None:
        values = [
            r.tokens_per_s
            for r in self._latest.values()
            if r.tokens_per_s is not None and r.rank not in self._ended
        ]
        return sum(values) if values else None

    def view(self) -> TrainingView | None:
        """The run now; None until a rank has logged anything."""
        if not self._latest:
            return None
        lead = self._lead_last or self._latest[min(self._latest)]
        total_steps = next(
            (r.total_steps for r in self._latest.values() if r.total_steps is not None), None
        )
        sps = None
        if len(self._steps) >= 2:
            (t0, s0), (t1, s1) = self._steps[0], self._steps[-1]
            sps = (t1 - t0) / (s1 - s0) if s1 > s0 and t1 >= t0 else None
        step = max(r.step for r in self._latest.values())
        finished = set(self._latest) <= self._ended
        eta = None
        if finished:
            eta = 0.0
        elif sps is not None and total_steps is not None:
            eta = max(0, total_steps - lead.step) * sps
        ranks = tuple(
            RankStatus(
                rank=r.rank,
                step=r.step,
                total_steps=r.total_steps,
                last_t=r.t,
                event=r.event,
                tokens_per_s=r.tokens_per_s,
                mem_allocated_bytes=r.mem_allocated_bytes,
                mem_reserved_bytes=r.mem_reserved_bytes,
                pid=r.pid,
                host=r.host,
                peak_allocated_bytes=self._peak.get(r.rank),
            )
            for r in sorted(self._latest.values(), key=lambda r: r.rank)
        )
        return TrainingView(
            ranks=ranks,
            step=step,
            total_steps=total_steps,
            loss=lead.loss,
            lr=lead.lr,
            grad_norm=lead.grad_norm,
            eval_loss=self._eval_loss,
            tokens_per_s=self._tokens_per_s(),
            padding=lead.padding,
            batching=lead.batching,
            loss_history=tuple(self._loss),
            tokens_history=tuple(self._tokens),
            seconds_per_step=sps,
            eta_s=eta,
            finished=finished,
            bad_lines=self.bad_lines,
        )


# -- has the run ended? ------------------------------------------------------------------


# How a run ended, as the dashboard and the report say it: ``running`` until the run folder
# says otherwise; ``completed`` (every step asked for), ``stopped`` (a signal: Ctrl-C,
# SIGTERM; its checkpoint saved), ``failed`` (a rank or the launcher failed), ``diverged``
# (the loss went non-finite) from launch.json's result and rank 0's result.json; ``ended``
# where every rank logged ``end`` and nothing says how (a launcher killed before it
# recorded the end, or ranks started without zeroplan launch and without a result.json).
STATUSES = ("running", "completed", "stopped", "failed", "diverged", "ended")


@dataclass(frozen=True)
class RunState:
    """What the run folder says about the run's life.

    ``finished``: the run is over, so watching it must not write into it. True when
    ``zeroplan launch`` recorded its result in launch.json, or when every rank logged
    ``end`` after the current launch began (a launcher killed without writing its result).
    ``session_start``: when a launch that has not ended began (launch.json's time), which
    the training view uses to ignore an earlier session's ``end`` lines; None otherwise.
    ``status`` (one of STATUSES) and ``outcome``, the status in words (``stopped by SIGINT
    at step 11``, ``failed: rank 0 failed (killed by SIGKILL) on node0``); None while
    running.
    """

    finished: bool
    session_start: float | None = None
    status: str = "running"
    outcome: str | None = None

    @property
    def failed(self) -> bool:
        """Ended in a failure a person should look at (the dashboard's alert)."""
        return self.status in ("failed", "diverged")


def run_state(run_dir: str | os.PathLike[str]) -> RunState:
    """Read launch.json, result.json and metrics.jsonl once; see :class:`RunState`."""
    run = Path(run_dir)
    launch = run / LAUNCH_FILE
    record = read_json_object(launch)
    session_start = None
    if record is not None:
        ended = record.get("result")
        if isinstance(ended, dict):
            began = record.get("started")
            result = _session_result(run, began if isinstance(began, (int, float)) else None)
            return RunState(True, None, *_launch_outcome(ended, result))
        with contextlib.suppress(OSError):
            session_start = launch.stat().st_mtime
    log = TrainingLog(run / METRICS_FILE, history=1, session_start=session_start)
    log.poll()
    view = log.view()
    if view is None or not view.finished:
        return RunState(False, session_start)
    result = _session_result(run, session_start)
    if result is None:
        return RunState(True, session_start, "ended", "ended: every rank logged its end")
    return RunState(True, session_start, *_result_outcome(result))


def launch_result(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """launch.json's ``result``: what zeroplan launch recorded when the launch ended."""
    record = read_json_object(Path(run_dir) / LAUNCH_FILE)
    ended = record.get("result") if record is not None else None
    return ended if isinstance(ended, dict) else None


def _session_result(run: Path, since: float | None) -> dict[str, Any] | None:
    """rank 0's result.json, when written by the session that began at ``since`` (a
    resumed run's folder holds the earlier session's until this one ends)."""
    path = run / RESULT_FILE
    try:
        if since is not None and path.stat().st_mtime < since:
            return None
    except OSError:
        return None
    return read_json_object(path)


def _result_outcome(result: dict[str, Any]) -> tuple[str, str]:
    """(status, outcome) from rank 0's result.json alone."""
    step = result.get("global_step")
    at = f" at step {step}" if isinstance(step, int) else ""
    status = result.get("status")
    if status == "completed":
        return "completed", f"completed{at}"
    if status == "diverged":
        return "diverged", f"diverged{at} (loss not finite)"
    if status == "interrupted":
        by = f" by {result['signal']}" if isinstance(result.get("signal"), str) else ""
        return "stopped", f"stopped{by}{at}"
    return "ended", "ended"


def _launch_outcome(ended: dict[str, Any], result: dict[str, Any] | None) -> tuple[str, str]:
    """(status, outcome) from launch.json's result and this session's result.json (which
    says more: the step, the signal, a divergence behind a rank's failure)."""
    code = ended.get("exit_code")
    told = _result_outcome(result) if result is not None else ("ended", "ended")
    if code == 0:
        return told if told[0] == "completed" else ("completed", "completed")
    if ended.get("reason") == "interrupted":
        # the signal zeroplan got (the ranks were passed SIGTERM), the step the rank saved
        signum = code - 128 if isinstance(code, int) and 128 < code < 160 else None
        by = f" by {_signal_name(signum)}" if signum else ""
        step = result.get("global_step") if told[0] == "stopped" and result else None
        return "stopped", f"stopped{by}" + (f" at step {step}" if isinstance(step, int) else "")
    if told[0] == "diverged":
        return told
    message = ended.get("message") or ended.get("reason") or f"exit status {code}"
    return "failed", f"failed: {message}"


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# -- recording samples --------------------------------------------------------------------


class SampleRecorder:
    """Appends every snapshot to gpu_samples.jsonl (one line per GPU) and
    host_samples.jsonl (one line per refresh), each line tagged with this host's name.

    Only one dashboard records a run: the first takes an exclusive lock on
    ``RUN_DIR/.watch.lock``; another ``zeroplan watch`` on the same folder shows the run
    without recording (``active`` False, ``holder`` says who records). A folder this user
    cannot write is watched without recording too (``why_not`` says so). The lock is an
    ``flock``: the kernel drops it when its process dies, so the lock file of a dead
    dashboard is simply taken over (its pid overwritten); ``close`` removes the file.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.active = False
        self.holder: str | None = None
        self.why_not = ""
        self._files: list[IO[str]] = []
        self._lock: IO[str] | None = None
        self._host = socket.gethostname()
        try:
            self._take_lock()
            if self.active:
                self._gpu = (self.run_dir / GPU_SAMPLES_FILE).open("a", encoding="utf-8")
                self._files.append(self._gpu)
                self._hostf = (self.run_dir / HOST_SAMPLES_FILE).open("a", encoding="utf-8")
                self._files.append(self._hostf)
        except OSError as exc:
            self.close()
            self.why_not = f"cannot write to {self.run_dir} ({exc.strerror or exc})"
        if self.holder:
            self.why_not = f"another dashboard ({self.holder}) records this run"

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: record without a lock
            self.active = True
            return
        path = self.run_dir / LOCK_FILE
        for _ in range(5):
            lock = path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                self.holder = f"pid {lock.read().strip() or '?'}"
                lock.close()
                return
            # the holder we waited on may have removed the file as it let go: then this
            # lock is on a file nobody else can see; open the path again
            try:
                same = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            lock.close()
        else:  # pragma: no cover - the file keeps vanishing: someone else is busy with it
            self.holder = "pid ?"
            return
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock
        self.active = True

    def write(self, snap: Snapshot) -> None:
        """Append one snapshot (nothing when another dashboard records this run)."""
        if not self.active:
            return
        lines = []
        for g in snap.gpus:
            row = g.to_json()
            row["host"] = self._host
            for p in row["processes"]:
                if p["command"] and len(p["command"]) > COMMAND_CHARS:
                    p["command"] = p["command"][: COMMAND_CHARS - 1] + "…"
            lines.append(json.dumps(row, separators=(",", ":")) + "\n")
        self._gpu.write("".join(lines))
        self._gpu.flush()
        if snap.host is not None:
            row = snap.host.to_json()
            row["host"] = self._host
            self._hostf.write(json.dumps(row, separators=(",", ":")) + "\n")
            self._hostf.flush()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        if self._lock is not None:
            # removed while still held, so that no one can take the lock on this file
            # between the release and the removal
            with contextlib.suppress(OSError):
                (self.run_dir / LOCK_FILE).unlink()
            self._lock.close()  # releases the flock
            self._lock = None
        self.active = False
