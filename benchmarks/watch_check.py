"""Does `zeroplan watch` show what nvidia-smi shows, and what does a 1 Hz refresh cost?

    # on a GPU machine: 30 comparisons under load, 60 s of CPU cost, a --once rendering
    python benchmarks/watch_check.py --out benchmarks/results/watch_h100.jsonl \\
        --compare 30 --load --cpu-seconds 60 --once-out benchmarks/results/watch_once_h100.txt

    # anywhere (no GPU): the CPU cost of the dashboard itself with 8 fake GPUs
    python benchmarks/watch_check.py --fake-gpus 8 --cpu-seconds 60 \\
        --out benchmarks/results/watch_cpu.jsonl

Agreement: each round samples through zeroplan.watch.monitor, runs ``nvidia-smi --query-gpu``,
and samples through zeroplan.watch.monitor again; a field agrees when nvidia-smi's value lies
within the two zeroplan samples (widened by a tolerance of the field's resolution), so
numbers that move between the calls are still judged fairly. Processes are compared with
``nvidia-smi --query-compute-apps``. ``--load`` runs a matmul loop with a 4 GiB tensor on
every GPU in child processes (needs torch) so that utilization, power, clocks, memory and
processes are not all idle values.

CPU cost: the dashboard loop (zeroplan.watch.loop.run_dashboard: sample, record to a run
folder, read metrics.jsonl, alerts, draw) runs at ``--interval`` for ``--cpu-seconds``
beside a child process that appends a metrics line per rank per second, and the
process's CPU time (user + system, all threads) is divided by the wall time. It is done
for the live screen at 200 and 80 columns and for plain lines; a per-refresh breakdown
(sampling+reading vs drawing) is measured without sleeping.

Every row goes to ``--out`` as JSON lines; the first row is the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zeroplan.watch.dashboard import render
from zeroplan.watch.loop import open_collector, run_dashboard, watch_once
from zeroplan.watch.monitor import GPUBackend, GPUSample, NvmlBackend, open_backend

MIB = 2**20
GIB = 2**30

# nvidia-smi field -> (zeroplan GPUSample attribute, unit divisor, absolute tolerance).
# Tolerances are the resolution nvidia-smi prints (MiB, whole %, whole degrees, MHz) plus
# what moves between two NVML reads milliseconds apart.
FIELDS: dict[str, tuple[str, float, float]] = {
    "memory.total": ("memory_total_bytes", MIB, 1),
    "memory.used": ("memory_used_bytes", MIB, 2),
    "utilization.gpu": ("util_percent", 1, 2),
    "temperature.gpu": ("temperature_c", 1, 1),
    "power.draw": ("power_w", 1, 2.0),
    "enforced.power.limit": ("power_limit_w", 1, 0.5),
    "clocks.sm": ("sm_clock_mhz", 1, 15),
    "clocks.mem": ("mem_clock_mhz", 1, 1),
    "clocks.max.sm": ("sm_clock_max_mhz", 1, 0),
}
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")

LOAD_SCRIPT = """
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
keep = torch.empty(int(4 * 2**30), dtype=torch.uint8, device="cuda")
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(20):
        y = x @ x
    torch.cuda.synchronize()
"""

METRICS_WRITER = """
import json, sys, time
path, ranks, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
step, t0 = 0, time.time()
with open(path, "a") as f:
    while time.time() - t0 < seconds:
        step += 1
        for r in range(ranks):
            f.write(json.dumps({"t": time.time(), "rank": r, "step": step, "total_steps": 100000,
                "loss": 2.0 / (1 + step / 50), "lr": 2e-4, "grad_norm": 0.7, "tokens_per_s": 1234.5,
                "mem_allocated_bytes": 17 * 2**30, "mem_reserved_bytes": 19 * 2**30,
                "event": "train"}) + "\\n")
        f.flush()
        time.sleep(1.0)
"""


def _run(cmd: list[str], timeout: float = 30) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return p.returncode, p.stdout if p.returncode == 0 else p.stderr + p.stdout


def environment(backend: GPUBackend | None, fake: int | None) -> dict[str, Any]:
    import rich

    env: dict[str, Any] = {
        "kind": "env",
        "t": time.time(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "rich": getattr(rich, "__version__", None) or _version("rich"),
        "nvidia_ml_py": _version("nvidia-ml-py"),
        "psutil": _version("psutil"),
        "zeroplan_git": _run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"])[
            1
        ].strip(),
        "zeroplan_uncommitted_changes": bool(
            _run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain"])[1].strip()
        ),
        "backend": f"fake x{fake}" if fake else "nvml",
    }
    if backend is not None:
        env["gpus"] = [g.name for g in backend.sample()]
    if not fake:
        try:
            import pynvml

            v = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = v.decode() if isinstance(v, bytes) else v
        except Exception as exc:  # report, do not stop
            env["driver"] = f"unknown ({exc})"
        rc, out = _run(["nvidia-smi", "--version"])
        env["nvidia_smi"] = out.strip() if rc == 0 else None
    return env


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


# -- agreement with nvidia-smi ----------------------------------------------------------


def _smi_value(text: str) -> float | str | None:
    t = text.strip()
    if not t or t.startswith("[") or t in {"N/A", "Not Supported"}:
        return None
    try:
        return float(t)
    except ValueError:
        return t


def query_smi(fields: list[str]) -> tuple[list[dict[str, Any]] | None, str]:
    """nvidia-smi --query-gpu=index,name,FIELDS as a list of dicts (None and why on error)."""
    rc, out = _run(
        [
            "nvidia-smi",
            f"--query-gpu=index,name,{','.join(fields)}",
            "--format=csv,noheader,nounits",
        ]
    )
    if rc != 0:
        return None, out.strip()
    rows = []
    for line in out.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        row: dict[str, Any] = {"index": int(cells[0]), "name": cells[1]}
        for f, c in zip(fields, cells[2:], strict=False):
            row[f] = _smi_value(c)
        rows.append(row)
    return rows, ""


def supported_fields() -> tuple[list[str], str | None, list[str]]:
    """The FIELDS this nvidia-smi knows, the throttle-reason field it knows, and those dropped."""
    fields, dropped = [], []
    for f in FIELDS:
        ok, _ = query_smi([f])
        (fields if ok is not None else dropped).append(f)
    reason = next((f for f in REASON_FIELDS if query_smi([f])[0] is not None), None)
    return fields, reason, dropped


def query_apps() -> dict[int, float | None] | None:
    rc, out = _run(
        [
            "nvidia-smi",
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ]
    )
    if rc != 0:
        return None
    apps: dict[int, float | None] = {}
    for line in out.strip().splitlines():
        pid, mem = (c.strip() for c in line.split(","))
        value = _smi_value(mem)
        apps[int(pid)] = value if isinstance(value, float) else None
    return apps


def _bracket(smi: float, a: float | None, b: float | None, tol: float) -> bool:
    vals = [v for v in (a, b) if v is not None]
    if not vals:
        return False
    return min(vals) - tol <= smi <= max(vals) + tol


def compare_round(
    backend: GPUBackend, fields: list[str], reason_field: str | None, n: int
) -> list[dict[str, Any]]:
    asked = fields + ([reason_field] if reason_field else [])
    t_a = time.time()
    before = {g.index: g for g in backend.sample()}
    t_smi = time.time()
    smi, err = query_smi(asked)
    smi_s = time.time() - t_smi
    apps = query_apps()
    after = {g.index: g for g in backend.sample()}
    t_b = time.time()
    if smi is None:
        return [{"kind": "compare", "round": n, "error": err}]
    v1 = _memory_v1()
    rows = []
    for s in smi:
        a, b = before.get(s["index"]), after.get(s["index"])
        if a is None or b is None:
            rows.append({"kind": "compare", "round": n, "gpu": s["index"], "error": "not sampled"})
            continue
        checks: dict[str, Any] = {
            "name": {"smi": s["name"], "zeroplan": a.name, "agree": s["name"] == a.name}
        }
        for f in fields:
            attr, unit, tol = FIELDS[f]
            za, zb = getattr(a, attr), getattr(b, attr)
            za = za / unit if za is not None else None
            zb = zb / unit if zb is not None else None
            value = s.get(f)
            agree = (
                (za is None and zb is None)
                if value is None
                else isinstance(value, float)
                and _bracket(value, za, zb, max(tol, 0.01 * value if f == "power.draw" else 0))
            )
            checks[f] = {"smi": value, "zeroplan": [za, zb], "agree": agree}
        if reason_field:
            raw = s.get(reason_field)
            mask = int(raw, 16) if isinstance(raw, str) and raw.startswith("0x") else raw
            checks[reason_field] = {
                "smi": raw,
                "zeroplan": [a.throttle_mask, b.throttle_mask],
                "agree": mask in (a.throttle_mask, b.throttle_mask),
            }
        if apps is not None:
            pids_a = {p.pid for p in a.processes}
            pids_b = {p.pid for p in b.processes}
            mine = {p.pid: p.memory_bytes for p in a.processes}
            on_gpu = {pid: m for pid, m in apps.items() if pid in pids_a | pids_b}
            checks["processes"] = {
                "smi_pids_on_any_gpu": sorted(apps),
                "zeroplan": sorted(pids_a),
                "memory_mib": {
                    str(pid): [m, (mine.get(pid) or 0) / MIB] for pid, m in on_gpu.items()
                },
                # every pid zeroplan sees is one nvidia-smi lists, memory within 2 MiB
                "agree": all(pid in apps for pid in pids_a & pids_b)
                and all(
                    m is None or abs(m - (mine.get(pid) or 0) / MIB) <= 2
                    for pid, m in on_gpu.items()
                    if pid in mine
                ),
            }
        row = {
            "kind": "compare",
            "round": n,
            "gpu": s["index"],
            "window_s": round(t_b - t_a, 4),
            "nvidia_smi_s": round(smi_s, 4),
            "memory_used_v1_mib": v1.get(s["index"]),
            "checks": checks,
            "all_agree": all(c["agree"] for c in checks.values()),
        }
        rows.append(row)
    return rows


def _memory_v1() -> dict[int, float]:
    """used = total - free (NVML v1), to explain a memory.used mismatch should one appear."""
    try:
        import pynvml

        return {
            i: pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used / MIB
            for i in range(pynvml.nvmlDeviceGetCount())
        }
    except Exception:
        return {}


def start_load(gpus: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(gpus):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(seconds)], env=env))
    return procs


# -- CPU cost -------------------------------------------------------------------------------


def make_run_dir(card_bytes: int, ranks: int) -> Path:
    run = Path(tempfile.mkdtemp(prefix="zeroplan-watch-check-"))
    plan = {
        "model": "synthetic (watch_check)",
        "cluster": f"{ranks} GPUs",
        "world_size": ranks,
        "best": {
            "device_used_bytes": int(card_bytes * 0.62),
            "required_bytes": int(card_bytes * 0.6),
            "peak_allocated_bytes": int(card_bytes * 0.55),
            "tokens_per_s": 1234.5 * ranks,
        },
    }
    (run / "plan.json").write_text(json.dumps(plan))
    return run


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_loop(
    run: Path,
    seconds: float,
    interval: float,
    mode: str,
    width: int,
    fake: int | None,
    plain_every_s: float,
) -> dict[str, Any]:
    """CPU time / wall time of run_dashboard in this process over ``seconds``."""
    stop = threading.Event()
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed below, after the thread ends
    result: dict[str, int] = {}

    def target() -> None:
        result["refreshes"] = run_dashboard(
            run,
            stop,
            interval=interval,
            mode=mode,  # type: ignore[arg-type]
            stream=sink,
            width=width,
            fake_gpus=fake,
            plain_every_s=plain_every_s,
        )

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    time.sleep(min(3.0, interval * 3))  # imports, NVML init, first refreshes
    c0, w0 = _cpu_s(), time.monotonic()
    time.sleep(seconds)
    c1, w1 = _cpu_s(), time.monotonic()
    stop.set()
    thread.join(timeout=10)
    sink.close()
    return {
        "kind": "cpu_cost",
        "mode": mode,
        "width": width if mode == "live" else None,
        "plain_every_s": plain_every_s if mode == "plain" else None,
        "interval_s": interval,
        "gpus": fake if fake else "all",
        "backend": f"fake x{fake}" if fake else "nvml",
        "wall_s": round(w1 - w0, 3),
        "cpu_s": round(c1 - c0, 4),
        "cpu_fraction_of_one_core": round((c1 - c0) / (w1 - w0), 5),
        "refreshes_total": result.get("refreshes"),
    }


def measure_parts(run: Path, fake: int | None, width: int, n: int = 50) -> dict[str, Any]:
    """CPU ms per refresh: collect (sample, record, read, alerts) and draw, no sleeping."""
    collector = open_collector(run, fake_gpus=fake, record=False)
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, force_terminal=True)
    try:
        collector.collect()
        c0 = time.process_time()
        views = [collector.collect() for _ in range(n)]
        c1 = time.process_time()
        for v in views:
            console.print(render(v, width))
        c2 = time.process_time()
    finally:
        collector.close()
    return {
        "kind": "cpu_per_refresh",
        "backend": f"fake x{fake}" if fake else "nvml",
        "width": width,
        "refreshes": n,
        "collect_ms": round((c1 - c0) / n * 1000, 3),
        "draw_ms": round((c2 - c1) / n * 1000, 3),
    }


def once_text(run: Path | None, fake: int | None, widths: tuple[int, ...] = (200, 80)) -> str:
    from rich.console import Console

    view = watch_once(run, fake_gpus=fake)
    parts = []
    for w in widths:
        console = Console(record=True, width=w, file=io.StringIO())
        console.print(render(view, w))
        parts.append(f"===== zeroplan watch --once, {w} columns =====\n" + console.export_text())
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSONL results (appended)")
    ap.add_argument("--compare", type=int, default=20, help="rounds against nvidia-smi (GPU)")
    ap.add_argument("--compare-every", type=float, default=0.5, help="seconds between rounds")
    ap.add_argument("--load", action="store_true", help="matmul load on every GPU (torch)")
    ap.add_argument("--cpu-seconds", type=float, default=60, help="0: skip the CPU cost")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--fake-gpus", type=int, default=None, help="no NVML: N fake GPUs")
    ap.add_argument("--run-dir", type=Path, default=None, help="a real run folder to read")
    ap.add_argument("--once-out", type=Path, default=None, help="save a --once rendering")
    ap.add_argument("--note", default=None, help="a remark stored with the environment")
    args = ap.parse_args()

    backend, error = open_backend(args.fake_gpus)
    if backend is None:
        sys.exit(f"watch_check: {error} (use --fake-gpus 8 to measure the CPU cost)")
    gpus = backend.sample()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out.open("a", encoding="utf-8")

    def write(row: dict[str, Any]) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()

    env = environment(backend, args.fake_gpus)
    if args.note:
        env["note"] = args.note
    write(env)
    load: list[subprocess.Popen[bytes]] = []
    try:
        if args.load and not args.fake_gpus:
            # long enough for the comparison and the CPU cost (which then sees busy GPUs);
            # stopped in `finally` below as soon as the checks are done
            busy_s = 60 + args.compare * (args.compare_every + 2) + 3 * (args.cpu_seconds + 10)
            load = start_load(len(gpus), busy_s)
            time.sleep(8)  # CUDA init, allocation, clocks up
        if isinstance(backend, NvmlBackend) and args.compare > 0:
            if shutil.which("nvidia-smi") is None:
                write({"kind": "compare", "error": "nvidia-smi not found"})
            else:
                fields, reason, dropped = supported_fields()
                write(
                    {
                        "kind": "compare_fields",
                        "fields": fields,
                        "reason_field": reason,
                        "unsupported": dropped,
                    }
                )
                rows: list[dict[str, Any]] = []
                for n in range(args.compare):
                    for row in compare_round(backend, fields, reason, n):
                        write(row)
                        rows.append(row)
                    time.sleep(args.compare_every)
                write(summary(rows, load=bool(load)))
        backend.close()
        run = args.run_dir or make_run_dir(_card(gpus), len(gpus))
        if args.once_out:
            args.once_out.parent.mkdir(parents=True, exist_ok=True)
            args.once_out.write_text(once_text(run, args.fake_gpus))
        if args.cpu_seconds > 0:
            writer = None
            if args.run_dir is None:
                writer = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        METRICS_WRITER,
                        str(run / "metrics.jsonl"),
                        str(len(gpus)),
                        str(3 * args.cpu_seconds + 30),
                    ]
                )
            try:
                for width in (200, 80):
                    write(measure_parts(run, args.fake_gpus, width))
                for mode, width in (("live", 200), ("live", 80), ("plain", 200)):
                    row = measure_loop(
                        run,
                        args.cpu_seconds,
                        args.interval,
                        mode,
                        width,
                        args.fake_gpus,
                        plain_every_s=30.0,
                    )
                    write(row)
                    print(json.dumps(row), file=sys.stderr)
            finally:
                if writer is not None:
                    writer.terminate()
    finally:
        for p in load:
            p.terminate()
        out.close()


def _card(gpus: list[GPUSample]) -> int:
    return max((g.memory_total_bytes or 0) for g in gpus) or 80 * GIB


def summary(rows: list[dict[str, Any]], load: bool) -> dict[str, Any]:
    """Per field: how many rounds x GPUs agreed."""
    agree: dict[str, list[bool]] = {}
    for row in rows:
        for name, check in row.get("checks", {}).items():
            agree.setdefault(name, []).append(bool(check["agree"]))
    return {
        "kind": "compare_summary",
        "load": load,
        "samples": len([r for r in rows if "checks" in r]),
        "agree": {k: f"{sum(v)}/{len(v)}" for k, v in agree.items()},
        "all_agree": all(all(v) for v in agree.values()) and bool(agree),
    }


if __name__ == "__main__":
    main()
