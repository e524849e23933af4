"""Sampling what the GPUs and the host are doing, into plain dataclasses.

A *backend* answers "what does each GPU look like right now": :class:`NvmlBackend` asks
the NVIDIA driver through NVML (nvidia-ml-py, imported only when opened), and
:class:`FakeBackend` makes up believable numbers for tests and for measuring the
dashboard's own cost on a machine without GPUs. Every getter that a driver or card may
not support gives ``None`` instead of raising, so one missing field never hides the rest.

Units are those of nvidia-smi where it has one: bytes, percent, degrees C, watts, MHz.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# NVML clock event ("throttle") reason bits, as nvmlClocksEventReason* in nvml.h, named as
# nvidia-smi -q names them. The mask itself is kept too, so nothing is lost to the mapping.
THROTTLE_REASONS: dict[int, str] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def throttle_names(mask: int | None) -> tuple[str, ...]:
    """The names of the reason bits set in ``mask`` (unknown bits as ``0x...``)."""
    if not mask:
        return ()
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(hex(unknown))
    return tuple(names)


@dataclass(frozen=True)
class GPUProcess:
    """A process holding memory on a GPU. user / command are None when not visible
    (another PID namespace, a process that already ended, no permission)."""

    pid: int
    memory_bytes: int | None
    user: str | None = None
    command: str | None = None


@dataclass(frozen=True)
class GPUSample:
    """One GPU at one moment; any field the driver does not report is None."""

    t: float
    index: int
    name: str
    uuid: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    util_percent: float | None = None
    memory_util_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    sm_clock_max_mhz: int | None = None
    mem_clock_mhz: int | None = None
    throttle_mask: int | None = None
    throttle_reasons: tuple[str, ...] = ()
    processes: tuple[GPUProcess, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """One line of gpu_samples.jsonl (docs/watch.md: the run folder)."""
        out = asdict(self)
        out["gpu"] = out.pop("index")
        out["throttle_reasons"] = list(self.throttle_reasons)
        out["processes"] = [asdict(p) for p in self.processes]
        return out

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> GPUSample:
        """A gpu_samples.jsonl line back as a sample (unknown keys, such as host, ignored)."""
        known = {f for f in cls.__dataclass_fields__ if f not in {"index", "processes"}}
        fields = {k: v for k, v in row.items() if k in known}
        fields["throttle_reasons"] = tuple(row.get("throttle_reasons") or ())
        procs = tuple(GPUProcess(**p) for p in row.get("processes") or ())
        return cls(index=int(row["gpu"]), processes=procs, **fields)


@dataclass(frozen=True)
class HostSample:
    """The machine the launcher runs on: CPU offload and data loading live here."""

    t: float
    cpu_percent: float | None
    cpu_count: int | None
    load_1m: float | None
    ram_used_bytes: int | None
    ram_total_bytes: int | None
    swap_used_bytes: int | None
    swap_total_bytes: int | None

    def to_json(self) -> dict[str, Any]:
        """One line of host_samples.jsonl."""
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """Everything sampled at one refresh. ``gpu_error`` says why there are no GPUs."""

    t: float
    gpus: tuple[GPUSample, ...]
    host: HostSample | None
    gpu_error: str | None = None


class GPUBackend(Protocol):
    """Where GPU samples come from."""

    def sample(self) -> list[GPUSample]:
        """Every GPU, now."""
        ...

    def close(self) -> None:
        """Release the driver (idempotent)."""
        ...


class GPUDataUnavailable(Exception):
    """NVML cannot be used here; the message is the line the dashboard shows."""


# -- the real backend ---------------------------------------------------------------------


def _quiet(fn: Callable[..., T], *args: Any) -> T | None:
    """Call an NVML getter; a field this card or driver lacks (any NVMLError) is None."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    # Old pynvml releases return bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _ProcessNames:
    """user and command of a PID, looked up once per PID while it stays on a GPU."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[str | None, str | None]] = {}

    def lookup(self, pid: int) -> tuple[str | None, str | None]:
        if pid not in self._cache:
            self._cache[pid] = _describe_pid(pid)
        return self._cache[pid]

    def keep_only(self, pids: Iterable[int]) -> None:
        alive = set(pids)
        for pid in [p for p in self._cache if p not in alive]:
            del self._cache[pid]


def _describe_pid(pid: int) -> tuple[str | None, str | None]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a core dependency
        return None, None
    try:
        proc = psutil.Process(pid)
        user: str | None = proc.username()
        cmd = " ".join(proc.cmdline()) or proc.name()
    except (psutil.Error, OSError):
        return None, None
    return user, cmd


class NvmlBackend:
    """The GPUs this machine's NVIDIA driver reports, in NVML index order.

    Opening it raises :class:`GPUDataUnavailable` with a line for the user when nvidia-ml-py or the
    driver's libnvidia-ml is missing, the driver does not answer, or there are no GPUs.
    """

    def __init__(self, indices: Sequence[int] | None = None) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise GPUDataUnavailable(
                "No GPU data: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            ) from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GPUDataUnavailable(
                f"No NVIDIA GPU data: NVML says '{exc}' (no NVIDIA driver here?)"
            ) from exc
        except OSError as exc:  # a broken libnvidia-ml
            raise GPUDataUnavailable(f"No NVIDIA GPU data: cannot load NVML ({exc})") from exc
        self._open = True
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            wanted = list(range(count)) if indices is None else [i for i in indices if i < count]
            if not wanted:
                raise GPUDataUnavailable(
                    "No NVIDIA GPU data: the driver reports no GPUs"
                    if count == 0
                    else f"No NVIDIA GPU data: this machine has GPUs 0-{count - 1} only"
                )
            self._handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in wanted]
            self._static = {i: self._static_fields(h) for i, h in self._handles}
        except pynvml.NVMLError as exc:
            self.close()
            raise GPUDataUnavailable(f"No NVIDIA GPU data: NVML says '{exc}'") from exc
        except GPUDataUnavailable:
            self.close()
            raise
        self._memory_v2: bool | None = None  # unknown until the first call
        self._names = _ProcessNames()

    def _static_fields(self, handle: Any) -> dict[str, Any]:
        n = self._nvml
        return {
            "name": _text(n.nvmlDeviceGetName(handle)),
            "uuid": _text(u) if (u := _quiet(n.nvmlDeviceGetUUID, handle)) is not None else None,
            "sm_clock_max_mhz": _quiet(n.nvmlDeviceGetMaxClockInfo, handle, n.NVML_CLOCK_SM),
        }

    def _memory(self, handle: Any) -> tuple[int | None, int | None]:
        """(used, total) as nvidia-smi shows them.

        Since driver R510 nvidia-smi's "used" leaves out memory the driver reserves for
        itself, which is what the v2 query reports; drivers without it get v1 (used =
        total - free).
        """
        n = self._nvml
        if self._memory_v2 is not False and hasattr(n, "nvmlMemory_v2"):
            info = _quiet(n.nvmlDeviceGetMemoryInfo, handle, n.nvmlMemory_v2)
            self._memory_v2 = info is not None
            if info is not None:
                return int(info.used), int(info.total)
        info = _quiet(n.nvmlDeviceGetMemoryInfo, handle)
        return (int(info.used), int(info.total)) if info is not None else (None, None)

    def _throttle_mask(self, handle: Any) -> int | None:
        n = self._nvml
        getter = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            n, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        if getter is None:
            return None
        mask = _quiet(getter, handle)
        return int(mask) if mask is not None else None

    def _processes(self, handle: Any) -> list[GPUProcess]:
        n = self._nvml
        found: dict[int, int | None] = {}
        for name in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            procs = _quiet(getattr(n, name), handle)
            if procs is None:  # an older driver: the v2 struct
                v2 = getattr(n, name + "_v2", None)
                procs = _quiet(v2, handle) if v2 is not None else None
            for p in procs or []:
                # a process doing compute and graphics is listed twice: count it once
                mem = getattr(p, "usedGpuMemory", None)
                pid = int(p.pid)
                known = found.get(pid)
                found[pid] = max(known or 0, int(mem)) if mem is not None else known
        out = []
        for pid, mem in sorted(found.items()):
            user, cmd = self._names.lookup(pid)
            out.append(GPUProcess(pid=pid, memory_bytes=mem, user=user, command=cmd))
        return out

    def sample(self) -> list[GPUSample]:
        """Every opened GPU, now (one NVML call per field per GPU)."""
        n = self._nvml
        out = []
        seen: list[int] = []
        for index, h in self._handles:
            t = time.time()
            used, total = self._memory(h)
            util = _quiet(n.nvmlDeviceGetUtilizationRates, h)
            temp = _quiet(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
            power = _quiet(n.nvmlDeviceGetPowerUsage, h)
            limit = _quiet(n.nvmlDeviceGetEnforcedPowerLimit, h)
            mask = self._throttle_mask(h)
            procs = self._processes(h)
            seen += [p.pid for p in procs]
            static = self._static[index]
            out.append(
                GPUSample(
                    t=t,
                    index=index,
                    name=static["name"],
                    uuid=static["uuid"],
                    memory_used_bytes=used,
                    memory_total_bytes=total,
                    util_percent=float(util.gpu) if util is not None else None,
                    memory_util_percent=float(util.memory) if util is not None else None,
                    temperature_c=float(temp) if temp is not None else None,
                    power_w=power / 1000 if power is not None else None,
                    power_limit_w=limit / 1000 if limit is not None else None,
                    sm_clock_mhz=_quiet(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM),
                    sm_clock_max_mhz=static["sm_clock_max_mhz"],
                    mem_clock_mhz=_quiet(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_MEM),
                    throttle_mask=mask,
                    throttle_reasons=throttle_names(mask),
                    processes=tuple(procs),
                )
            )
        self._names.keep_only(seen)
        return out

    def close(self) -> None:
        if self._open:
            self._open = False
            # shutting down a half-initialised driver can fail; nothing to do about it
            with contextlib.suppress(self._nvml.NVMLError, OSError):
                self._nvml.nvmlShutdown()


# -- the fake backend ---------------------------------------------------------------------


@dataclass
class FakeGPU:
    """What one fake GPU reports; ``memory_used_bytes`` None means: ``memory_fraction`` of
    the card, breathing ±2% like a training step."""

    name: str = "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int = 81_559 * 2**20
    memory_used_bytes: int | None = None
    memory_fraction: float = 0.6
    util_percent: float | None = None
    temperature_c: float = 62.0
    power_limit_w: float = 700.0
    throttle_mask: int = 0
    processes: tuple[GPUProcess, ...] = field(default_factory=tuple)


class FakeBackend:
    """GPUs that do not exist: believable, slowly changing numbers (for tests and for
    measuring the dashboard's own CPU cost without a GPU). ``clock`` is injectable."""

    def __init__(
        self,
        gpus: int | Sequence[FakeGPU] = 8,
        clock: Callable[[], float] = time.time,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.gpus = [FakeGPU() for _ in range(gpus)] if isinstance(gpus, int) else list(gpus)
        self.indices = list(range(len(self.gpus))) if indices is None else list(indices)
        self._clock = clock
        self._t0 = clock()
        self.closed = False

    def sample(self) -> list[GPUSample]:
        t = self._clock()
        age = t - self._t0
        out = []
        for i, g in zip(self.indices, self.gpus, strict=False):
            wave = math.sin(age / 7 + i)
            used = g.memory_used_bytes
            if used is None:
                used = int(g.memory_total_bytes * (g.memory_fraction + 0.02 * wave))
            util = g.util_percent if g.util_percent is not None else round(90 + 8 * wave)
            procs = g.processes or (
                GPUProcess(
                    pid=10_000 + i,
                    memory_bytes=max(0, used - 500 * 2**20),
                    user="trainer",
                    command=f"python -u launch/sft.py --local_rank={i}",
                ),
            )
            out.append(
                GPUSample(
                    t=t,
                    index=i,
                    name=g.name,
                    uuid=f"GPU-fake-{i:04d}",
                    memory_used_bytes=max(0, used),
                    memory_total_bytes=g.memory_total_bytes,
                    util_percent=float(util),
                    memory_util_percent=float(round(util * 0.4)),
                    temperature_c=g.temperature_c + round(3 * wave),
                    power_w=round(g.power_limit_w * util / 100 * 0.9, 1),
                    power_limit_w=g.power_limit_w,
                    sm_clock_mhz=1980 if not g.throttle_mask else 1410,
                    sm_clock_max_mhz=1980,
                    mem_clock_mhz=2619,
                    throttle_mask=g.throttle_mask,
                    throttle_reasons=throttle_names(g.throttle_mask),
                    processes=procs,
                )
            )
        return out

    def close(self) -> None:
        self.closed = True


def open_backend(
    fake_gpus: int | None = None, indices: Sequence[int] | None = None
) -> tuple[GPUBackend | None, str | None]:
    """The real NVML backend (or ``fake_gpus`` fake ones), or None and the reason why not."""
    if fake_gpus is not None:
        wanted = [i for i in (indices or range(fake_gpus)) if i < fake_gpus]
        return FakeBackend(len(wanted), indices=wanted), None
    try:
        return NvmlBackend(indices), None
    except GPUDataUnavailable as exc:
        return None, str(exc)


# -- the host -----------------------------------------------------------------------------


class HostSampler:
    """CPU and RAM of this machine. CPU percent is over the time since the previous call
    (the first call measures a 0.1 s window so that a single sample is meaningful)."""

    def __init__(self) -> None:
        self._primed = False

    def sample(self) -> HostSample:
        import psutil

        t = time.time()
        cpu = psutil.cpu_percent(interval=None if self._primed else 0.1)
        self._primed = True
        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        try:
            load: float | None = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows
            load = None
        return HostSample(
            t=t,
            cpu_percent=float(cpu),
            cpu_count=psutil.cpu_count(),
            load_1m=load,
            ram_used_bytes=int(mem.total - mem.available),
            ram_total_bytes=int(mem.total),
            swap_used_bytes=int(swap.used),
            swap_total_bytes=int(swap.total),
        )
