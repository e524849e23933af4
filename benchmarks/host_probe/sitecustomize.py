"""A probe of the launched training process (benchmarks/host_speed.py puts this folder first
on PYTHONPATH; it does nothing unless ZEROPLAN_HOST_PROBE names a JSON file to write).

It times on the host what transformers' Trainer does each optimizer step (the seconds spent
inside each of its methods, no GPU sync added), lists where the host waited for the GPU
(torch's sync debug mode over two steps: file, line and count of every synchronising call),
runs torch.profiler over two more (kernels, ATen operations and GPU-busy seconds a
step), and watches one more through a TorchDispatchMode (``HostReads``; the last step's end
closes it, before the final save): every operator that hands a GPU value to the host (an
``.item()``, a copy to CPU memory, ``nonzero`` and the like) or copies CPU memory onto a GPU,
with the Python lines and thread behind it. The backward's count too: torch hands the mode
to autograd's threads with the rest of the thread-local state (on the CPU the backward runs
in the caller's thread; on an H100, host7's reads include Liger's backward ``equal`` in
autograd's thread). The Trainer is patched
when ``transformers.trainer`` is first imported, so the probe reads whichever zeroplan tree
launched the run, before and after alike.

    ZEROPLAN_HOST_PROBE=/tmp/run/probe.json  ZEROPLAN_HOST_PROBE_STEPS=14  (first probed step)

``ZEROPLAN_COMPILE_MODE`` (probe or not) sets torch.compile's mode for ``--compile``
(zeroplan.launch.kernels.COMPILE_MODE), e.g. ``reduce-overhead`` for CUDA graphs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
import warnings
from collections import Counter, defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from probe_hooks import patch_on_import  # benchmarks/probe_hooks.py

del sys.path[0]  # the launch's sys.path, as it was

PATH = os.environ.get("ZEROPLAN_HOST_PROBE")
FIRST = int(os.environ.get("ZEROPLAN_HOST_PROBE_STEPS", "14"))
# the Trainer's (and TRL's / zeroplan's subclasses') methods timed, each call's host seconds
TIMED = (
    "get_batch_samples",
    "training_step",
    "_prepare_inputs",
    "compute_loss",
    "floating_point_ops",
    "_clip_grad_norm",
    "_get_grad_norm",
    "_maybe_log_save_evaluate",
)


class _Probe:
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.t_begin: float | None = None
        self.syncs: Counter[str] = Counter()
        self.sync_steps = 0
        self.profile: dict[str, Any] = {}
        self.prof: Any = None
        self.step = 0
        self.mark = 0.0
        self.prof_t = 0.0
        self.reads: Any = None  # the HostReads mode while it watches a step
        self.host_reads: dict[str, float] = {}

    def timed(self, name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - t

        return wrapper

    def begin(self) -> None:
        import torch

        now = time.perf_counter()
        if self.t_begin is not None:
            self.current["wall"] = now - self.t_begin
            self.steps.append(dict(self.current))
        self.current = defaultdict(float)
        self.t_begin = now
        self.step += 1
        if not torch.cuda.is_available():
            return
        if self.step == FIRST:
            torch.cuda.set_sync_debug_mode(1)
            warnings.simplefilter("always")
            warnings.showwarning = self.on_warning
        if self.step == FIRST + 2:
            torch.cuda.set_sync_debug_mode(0)
            self.sync_steps = 2
            self.prof = torch.profiler.profile(
                activities=[
                    torch.profiler.ProfilerActivity.CPU,
                    torch.profiler.ProfilerActivity.CUDA,
                ],
                with_stack=True,  # the Python line behind each memcpy (caller_chain)
            )
            self.prof.__enter__()
            self.prof_t = now
        if self.step == FIRST + 4:
            self.stop_profile()
            self.reads = host_reads_mode()
            self.reads.__enter__()
        if self.step == FIRST + 5:
            self.stop_reads()

    def stop_reads(self) -> None:
        """Leave the HostReads mode (also at the run's end) and keep what it saw."""
        if self.reads is None:
            return
        self.reads.__exit__(None, None, None)
        self.host_reads = dict(self.reads.seen.most_common(20))
        self.reads = None

    def stop_profile(self) -> None:
        """Close the profiler (also at the run's end: one left open at exit aborted the
        rank after its last step in the first GPU call, host_h100.jsonl's returncode 1)."""
        if self.prof is None:
            return
        import torch

        torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.profile = self.summarise(self.prof, time.perf_counter() - self.prof_t, 2)
        self.prof = None

    def on_warning(self, message: Any, category: Any, filename: str, lineno: int, *a: Any) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [
            f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
            for f in traceback.extract_stack()[:-1]
            if "sitecustomize" not in f.filename and "/warnings" not in f.filename
        ]
        self.syncs[" < ".join(reversed(frames[-4:]))] += 1

    @staticmethod
    def summarise(prof: Any, wall: float, steps: int) -> dict[str, Any]:
        kernels = gpu_us = ops = outer = launches = 0
        copies: dict[str, int] = defaultdict(int)  # the host's memcpy calls, by what made them
        for e in prof.events():
            kind = str(getattr(e, "device_type", ""))
            if "LaunchKernel" in e.name:  # the host's launch calls (eager and compiled alike)
                launches += 1
            if e.name == "cudaMemcpyAsync":
                copies[caller_chain(e)] += 1
            if "CUDA" in kind:
                kernels += 1
                gpu_us += e.device_time_total if hasattr(e, "device_time_total") else 0
            elif e.name.startswith("aten::"):
                ops += 1
                # the calls Python (or a compiled graph's wrapper) makes, not those inside
                parent = e.cpu_parent
                while parent is not None and not parent.name.startswith("aten::"):
                    parent = parent.cpu_parent
                outer += parent is None
        top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        kernels_by_name = []
        by_kind: dict[str, float] = defaultdict(float)
        for avg in prof.key_averages():
            # the kernels themselves: a CPU operator's device time is its kernels' again
            if "CUDA" not in str(getattr(avg, "device_type", "")):
                continue
            us = getattr(avg, "self_device_time_total", 0) or 0
            if us <= 0:
                continue
            kernels_by_name.append((us, avg.count, avg.key))
            by_kind[_kind(avg.key)] += us / 1e3 / steps
        kernels_by_name.sort(reverse=True)
        return {
            "gpu_ms_per_step_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items())},
            "top_gpu": [
                {
                    "ms_per_step": round(us / 1e3 / steps, 3),
                    "calls_per_step": n / steps,
                    "kernel": name[:160],
                }
                for us, n, name in kernels_by_name[:40]
            ],
            "steps": steps,
            "wall_s_per_step": wall / steps,
            "kernels_per_step": kernels / steps,
            "gpu_busy_s_per_step": gpu_us / 1e6 / steps,
            "aten_ops_per_step": ops / steps,
            "top_level_aten_ops_per_step": outer / steps,
            "launch_calls_per_step": launches / steps,
            "top_self_cpu": top,
            "memcpy_callers_per_step": {
                k: n / steps for k, n in sorted(copies.items(), key=lambda kv: -kv[1])[:12]
            },
            "copy_kernel_callers_per_step": copy_kernel_callers(prof.events(), steps),
        }

    def write(self) -> None:
        if not PATH:
            return
        steady = self.steps[3 : FIRST - 1] if len(self.steps) >= FIRST else self.steps[3:]
        phases: dict[str, float] = {}
        for row in steady:
            for k, v in row.items():
                phases[k] = phases.get(k, 0.0) + v / max(1, len(steady))
        out = {
            "probed_steps": len(steady),
            "mean_host_seconds": phases,
            "steps": self.steps,
            "syncs_per_step": {k: v / max(1, self.sync_steps) for k, v in self.syncs.items()},
            "profile": self.profile,
            "host_reads_per_step": self.host_reads,
        }
        with open(PATH, "w") as f:
            json.dump(out, f, indent=1)


# operators that read a GPU value on the host (the host waits for the GPU to get there) even
# where no output lands in CPU memory: their result's size or truth depends on the data
HOST_READING = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2",
     "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc"}
)  # fmt: skip


# the operators that copy a tensor as it is to another device
HOST_COPIES = frozenset({"copy_", "_to_copy", "_copy_from", "_copy_from_and_resize"})


def host_reads_mode() -> Any:
    """A TorchDispatchMode that counts, by ``"op [DtoH|HtoD] @ file:line fn < …  [thread]"``,
    every operator that reads a GPU value on the host: one of HOST_READING, or one with an
    input on a GPU and an output in CPU memory (``.cpu()``, ``.to("cpu")``, a copy into a CPU
    tensor, "DtoH"); and every copy from CPU memory onto a GPU ("HtoD": ``.to("cuda")`` of a
    CPU tensor). On the CPU only HOST_READING's operators are counted. ``torch.tensor(...,
    device="cuda")`` copies below the dispatcher's Python layer: only the profiler sees it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def device_types(tree: Any) -> set[str]:
        return {t.device.type for t in tree_leaves(tree) if hasattr(t, "device")}

    class HostReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: Counter[str] = Counter()

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            ins, outs = device_types((args, kwargs)), device_types(out)
            # a GPU input and a CPU output (copy_'s output is its CPU destination): the host
            # reads; a copy from CPU memory to a GPU (not a CPU scalar in a GPU operator,
            # which rides along as an argument) also waits unless pinned and non-blocking
            way: str | None = None  # not counted
            if "cpu" in outs and ins - {"cpu", "meta"}:
                way = " DtoH"
            elif name in HOST_COPIES and "cpu" in ins and outs - {"cpu", "meta"}:
                way = " HtoD"
            elif name in HOST_READING:
                way = ""
            if way is not None:
                where = f"{python_lines()} [{threading.current_thread().name}]"
                self.seen[f"{name}{way} @ {where}"] += 1
            return out

    return HostReads()


def _torch_dir() -> str:
    """torch's package folder, found without importing it. Matched as a prefix: a "/torch/"
    anywhere in the path also matched every package of the GPU image, whose environment is
    /opt/torch/.venv, and hid transformers' frames (host7's reads named TRL's and ours)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    origin = spec.origin if spec is not None else None
    return os.path.dirname(origin) + os.sep if origin else ""


TORCH_DIR = _torch_dir()


def _outside_torch(where: str) -> bool:
    """Whether a frame (its file name, or a profiler stack line "path(line): fn") is neither
    torch's nor this probe's: the frames that say which code made an operator."""
    inside = bool(TORCH_DIR) and where.startswith(TORCH_DIR)
    return not inside and "sitecustomize" not in where


def python_lines(depth: int = 3) -> str:
    """The innermost ``depth`` frames of this thread's Python stack outside torch and this
    probe, innermost first ("file.py:12 fn < …"); "-" where none (C++ alone)."""
    frames = [
        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
        for f in traceback.extract_stack()
        if _outside_torch(f.filename)
    ]
    return " < ".join(reversed(frames[-depth:])) or "-"


def caller_chain(event: Any, depth: int = 5) -> str:
    """The operators above a profiler event, innermost first ("a < b < c"), then, where the
    profile kept Python stacks (``with_stack``), the innermost frame outside torch that made
    them ("@ file.py(12): fn"), and what the copy was where the profiler tied a GPU memcpy to
    them ("[DtoH]"): what made a memcpy call (benchmarks/memcpy_probe.py reads them the same
    way)."""
    chain, parent, where, what = [], event.cpu_parent, "", ""
    while parent is not None and len(chain) < depth:
        chain.append(parent.name[:60])
        where = where or _python_frame(parent)
        what = what or _memcpy_kind(parent)
        parent = parent.cpu_parent
    return " < ".join(chain) + (f" @ {where}" if where else "") + (f" [{what}]" if what else "")


def copy_kernel_callers(events: Any, steps: int, top: int = 12) -> list[dict[str, Any]]:
    """What launched the GPU's copy kernels (``_kind`` "copy": ATen's direct and cast copies,
    cat, the runtime's memcpy and memset), by the operator that launched them and
    caller_chain above it: calls and GPU milliseconds a step, the ``top`` costliest. The
    default 8B QLoRA step spent 29 ms a step in them (kernels8's profile), 457 same-dtype
    copies and 192 strided ones among them, with no caller named."""
    found: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        for kernel in getattr(e, "kernels", None) or []:
            if _kind(str(getattr(kernel, "name", ""))) != "copy":
                continue
            key = f"{e.name[:60]} < {caller_chain(e)}" if e.cpu_parent is not None else e.name
            found[key][0] += 1
            found[key][1] += (getattr(kernel, "duration", 0) or 0) / 1e3
    ranked = sorted(found.items(), key=lambda kv: -kv[1][1])[:top]
    return [
        {"calls_per_step": n / steps, "ms_per_step": round(ms / steps, 3), "caller": key}
        for key, (n, ms) in ranked
    ]


def _python_frame(event: Any) -> str:
    """The innermost frame of an event's Python stack outside torch and this probe."""
    for frame in getattr(event, "stack", None) or []:
        if _outside_torch(frame):
            return str(frame)[-90:]
    return ""


def _memcpy_kind(event: Any) -> str:
    """DtoH, HtoD, DtoD... of the first GPU memcpy the profiler tied to an operator."""
    for kernel in getattr(event, "kernels", None) or []:
        name = str(getattr(kernel, "name", ""))
        if name.startswith("Memcpy "):
            return name.split()[1]
    return ""


# what a GPU kernel's name says it does (torch.profiler's names: cuBLAS / CUTLASS matmuls,
# flash attention, bitsandbytes' dequantization, ATen's own kernels (at::native::, sorted
# into copies, reductions and elementwise), copies the runtime makes, and Triton kernels
# (Liger's and inductor's, named *_kernel or triton_*). ATen's are told apart first: their
# names also end in _kernel.
KINDS = (
    ("attention", ("flash", "fmha", "attention")),  # first: flash kernels name cutlass types
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    ("dequant", ("dequant", "kdequantize")),
    ("copy", ("memcpy", "memset")),
)
ATEN_KINDS = (
    ("copy", ("copy_", "direct_copy", "catarray", "cat_", "bfloat16_copy")),
    ("reduce", ("reduce", "norm", "sum")),
)


def _kind(name: str) -> str:
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    if "at::native" in low:
        for kind, marks in ATEN_KINDS:
            if any(m in low for m in marks):
                return kind
        return "elementwise"
    if "triton" in low or "liger" in low or low.endswith("_kernel"):
        return "triton"
    return "other"


PROBE = _Probe()


def _patch(module: Any) -> None:
    trainer_cls = module.Trainer
    init = trainer_cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name in TIMED:
            fn = getattr(self, name, None)
            if fn is not None:
                setattr(self, name, PROBE.timed(name, fn))
        acc = self.accelerator
        acc.backward = PROBE.timed("backward", acc.backward)
        from transformers import TrainerCallback

        class ProbeCallback(TrainerCallback):  # type: ignore[misc]
            def on_step_begin(self, *a: Any, **k: Any) -> None:
                PROBE.begin()

            def on_pre_optimizer_step(self, *a: Any, **k: Any) -> None:
                PROBE.mark = time.perf_counter()

            def on_optimizer_step(self, *a: Any, **k: Any) -> None:
                PROBE.current["optimizer"] += time.perf_counter() - PROBE.mark
                PROBE.mark = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, *a: Any, **k: Any) -> None:
                # scheduler, zero_grad and the step-end callbacks
                PROBE.current["after_optimizer"] += time.perf_counter() - PROBE.mark
                if state.global_step >= state.max_steps:
                    # the last step: the final save comes next, which no window is for
                    # (host6's profile and host7's reads ran into it: 896 copies)
                    PROBE.stop_reads()
                    PROBE.stop_profile()

            def on_train_end(self, *a: Any, **k: Any) -> None:
                PROBE.stop_reads()
                PROBE.stop_profile()
                PROBE.write()

        self.add_callback(ProbeCallback())

    trainer_cls.__init__ = __init__


if PATH:
    patch_on_import({"transformers.trainer": _patch})
if os.environ.get("ZEROPLAN_COMPILE_MODE"):
    try:
        import zeroplan.launch.kernels as _kernels

        _kernels.COMPILE_MODE = os.environ["ZEROPLAN_COMPILE_MODE"]
    except ImportError:
        pass
