"""Why one shape runs up to 1.7x apart between processes: one speed_grid.py line run in
several processes, alternately free and pinned to a fixed set of cores (``taskset``), with
the GPU's SM clock, power and utilization and the host's CPU clock sampled while each runs.

    python benchmarks/process_spread.py --processes 12 --pin 2-5 \\
        --line "Qwen/Qwen2.5-0.5B --method full --shapes 1x512,4x512" --out $OUT/spread.jsonl

Each row is speed_grid.py's row for one shape of one process, plus ``process`` (its index),
``pinned`` (the cores, or null) and ``samples`` (median and range of what was sampled over
the process's life: the SM clock also while the GPU is busy, and the share of CPU time the
hypervisor stole for other guests). If pinned processes agree where free ones do not, the
spread is the host's scheduling; if the GPU's clock or the steal moves with the step time,
it is the GPU's or the neighbours'.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class Sampler(threading.Thread):
    """Polls NVML (GPU 0 of this process's view) and /proc/cpuinfo until stopped; reads
    /proc/stat's CPU times at its start and stop."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.values: dict[str, list[float]] = {
            "sm_mhz": [],
            "sm_mhz_busy": [],
            "power_w": [],
            "gpu_util": [],
            "cpu_mhz": [],
        }
        self.cpu_start = cpu_times()
        self.cpu_end: list[int] = []

    def run(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self.stop.is_set():
            self.values["sm_mhz"].append(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
            self.values["power_w"].append(pynvml.nvmlDeviceGetPowerUsage(h) / 1000)
            util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            self.values["gpu_util"].append(util)
            if util > 0:  # the clock while the GPU works, not while the model is built
                self.values["sm_mhz_busy"].append(self.values["sm_mhz"][-1])
            mhz = [
                float(x.split(":")[1])
                for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("cpu MHz")
            ]
            if mhz:
                self.values["cpu_mhz"].append(statistics.mean(mhz))
            time.sleep(self.interval_s)
        self.cpu_end = cpu_times()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in self.values.items()
            if v
        }
        # the share of the host's CPU time the hypervisor gave to others (steal): a noisy
        # neighbour on a shared host shows here and nowhere else inside the VM
        delta = [b - a for a, b in zip(self.cpu_start, self.cpu_end, strict=True)]
        if sum(delta):
            out["steal_share"] = delta[7] / sum(delta)
            out["busy_share"] = 1 - (delta[3] + delta[4]) / sum(delta)
        return out


def cpu_times() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal ... (ticks)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--line", required=True, help="a speed_grid.py line: MODEL --method ... --shapes ..."
    )
    p.add_argument(
        "--processes", type=int, default=12, help="processes in all, half of them pinned"
    )
    p.add_argument(
        "--pin",
        default="2-5",
        help="the cores every other process runs on (taskset -c); '' pins none",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    for i in range(args.processes):
        pinned = args.pin if args.pin and i % 2 else None
        with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as tmp:
            rows_file = tmp.name
        cmd = [
            sys.executable,
            str(HERE / "speed_grid.py"),
            *shlex.split(args.line),
            "--out",
            rows_file,
        ]
        if pinned:
            cmd = ["taskset", "-c", pinned, *cmd]
        sampler = Sampler()
        sampler.start()
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sampler.stop.set()
        sampler.join()
        samples = sampler.summary()
        rows = [json.loads(x) for x in Path(rows_file).read_text().splitlines() if x.strip()]
        Path(rows_file).unlink()
        with open(args.out, "a", encoding="utf-8") as f:
            for r in rows:
                r.update(process=i, pinned=pinned, samples=samples)
                f.write(json.dumps(r) + "\n")
        med = ", ".join(
            f"{r['micro_batch']}x{r['seq_len']} {statistics.median(r['step_seconds']):.3f} s"
            for r in rows
            if r.get("step_seconds")
        )
        sm = samples.get("sm_mhz_busy", {}).get("median")
        steal = samples.get("steal_share", 0.0)
        print(
            f"process {i} {'pinned ' + pinned if pinned else 'free'}: {med} "
            f"(SM {sm} MHz while busy, steal {steal:.1%}, {time.time() - t:.0f} s, "
            f"exit {proc.returncode})",
            flush=True,
        )
        if proc.returncode:
            print(proc.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
