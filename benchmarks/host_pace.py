"""How fast a host dispatches tensor operations, beside what the host-bound launches on it ran.

Where the host sets the pace (a small micro-batch, a small model, a 4-bit base) a step takes
the host's time to queue it, and that time moves with the host: on one H100 machine the same
launched 8B QLoRA job at 1 × 1,664 ran 4,773 and 8,136 tokens/s minutes apart, one run
queuing every step in about 350 ms where the other took 175 (host9_h100.jsonl). The plan's
host clock (``zeroplan.speed``) charges a fitted time per operation, the same on every host.
Would a pace timed at launch tell the slow hosts apart? For four such launches on three H100
machines the launch timed one before its first step (commit 301616a; host10-12_h100) and
it did not (host_pace_h100.jsonl): the fastest (168 ms a step) timed 10.5 µs an operation,
the slowest (264 ms) 11.6, and the two between (184 and 231 ms) 13.2 and 14.2. So the
launch no longer times it, and the plan's host clock stays one fitted rate.

The workload is fixed and small, so that the GPU keeps up and only the host's work is timed:
``LAYERS`` blocks of a matmul, a SiLU, an RMS scale and a residual sum over 16 × 64 tensors,
forward and backward, the way a decoder layer's Python, ATen and autograd calls come. Its
operations were counted under a dispatch counter (``count_ops``: every ATen call that returns
a tensor, views too, where ``count_host_ops.dispatched`` leaves aliases out of the plan's
count; 232 with torch 2.13 on the CPU, and ``OPS`` keeps that number, which the launch used
at 301616a rather than pay the counter's first use, about a second, before each run), and
the pace is

    µs per operation = median over ``runs`` of (time of ``calls`` steps / calls) / operations

the median rather than the fastest, because a run is paced by the host as it is, contended
or not. It takes about half a second on a GPU machine's host.

    python benchmarks/host_pace.py                       # this host's pace, one JSON line
    python benchmarks/host_pace.py --runs R1.tgz R2.tgz --out host_pace.jsonl
                                                         # the pace each launch recorded
                                                         # (applied.json's host_pace) beside
                                                         # its median step
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LAYERS = 8
WIDTH = 64
TOKENS = 16
OPS = 232  # count_ops(torch, _workload(torch, "cpu")); tests/test_host_pace.py recounts


@dataclass(frozen=True)
class HostPace:
    """What the timing found: ``op_us`` the median µs an operation, ``fastest_op_us`` the
    fastest run's, ``ops`` the operations in one step of the workload, over ``runs`` runs of
    ``calls`` steps each on ``device``."""

    op_us: float
    fastest_op_us: float
    ops: int
    calls: int
    runs: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _workload(torch: Any, device: str) -> Any:
    """One forward and backward of the fixed blocks (see the module's docstring)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, generator=g).to(device)
    ws = [
        (torch.randn(WIDTH, WIDTH, generator=g) / WIDTH**0.5).to(device).requires_grad_()
        for _ in range(LAYERS)
    ]
    silu = torch.nn.functional.silu

    def step() -> None:
        h = x
        for w in ws:
            y = silu(h @ w)
            h = h + y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        h.sum().backward()
        for w in ws:
            w.grad = None

    return step


def count_ops(torch: Any, step: Any) -> int:
    """ATen calls that return a tensor in one ``step``, forward and backward (views count
    too: they are calls the host makes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                Counter.n += 1
            return out

    with Counter():
        step()
    return Counter.n


def measure(device: str, calls: int | None = None, runs: int | None = None) -> HostPace:
    """Time the workload on ``device`` (its first run and a warm-up step left out): 9 runs
    of 40 steps on a GPU, 3 of 10 on a CPU (as the launch timed it at 301616a, where a CPU
    launch was a test's)."""
    import torch

    cuda = device.startswith("cuda")
    calls = calls or (40 if cuda else 10)
    runs = runs or (9 if cuda else 3)
    step = _workload(torch, device)
    ops = OPS

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    step()
    sync()
    per_op: list[float] = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        per_op.append((time.perf_counter() - t0) / calls / ops * 1e6)
    per_op = per_op[1:]
    return HostPace(
        op_us=round(statistics.median(per_op), 3),
        fastest_op_us=round(min(per_op), 3),
        ops=ops,
        calls=calls,
        runs=runs,
        device=device,
    )


def median_step_ms(metrics: Path) -> float | None:
    """The median wall ms between consecutive train lines of a run's metrics.jsonl (every
    step logs), the first three and the last three left out (warm-up; the final save)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    times = [r["t"] for r in rows if r.get("event") == "train"]
    gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(times)][3:-3]
    return round(statistics.median(gaps), 1) if gaps else None


def launched_rows(archive: Path) -> list[dict[str, Any]]:
    """One row per run folder in ``archive`` (a host_gpu.sh ``*_runs.tgz``, or a tgz of
    them) whose applied.json recorded the launch's host pace: that pace and the run's median
    step (host_speed.py's rows hold each run's tokens/s)."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        for inner in sorted(Path(tmp).rglob("*.tgz")):
            with tarfile.open(inner) as tar:
                tar.extractall(inner.with_suffix(""), filter="data")
        for applied in sorted(Path(tmp).rglob("applied.json")):
            done = json.loads(applied.read_text())
            pace = done.get("host_pace")
            if pace is None:
                continue
            rows.append(
                {"archive": archive.name, "run": str(applied.parent.relative_to(tmp)),
                 "op_us": pace["op_us"], "fastest_op_us": pace["fastest_op_us"],
                 "step_ms_median": median_step_ms(applied.parent / "metrics.jsonl"),
                 "versions": done.get("versions")}
            )  # fmt: skip
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="", help="cuda where there is one (default), else cpu")
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="run-folder archives")
    p.add_argument("--out", type=Path, help="JSON lines written here too")
    p.add_argument("--gpu", default="", help="with --runs: the machine's GPU and driver")
    args = p.parse_args()
    if args.runs:
        rows = [row for archive in args.runs for row in launched_rows(archive)]
        rows = [{**row, "gpu": args.gpu} for row in rows]
    else:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = [measure(device).to_dict()]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
