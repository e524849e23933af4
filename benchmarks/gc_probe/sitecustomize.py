"""Log every full (generation 2) garbage collection of every zeroplan process: its wall
time, what it collected and how many objects the collector still walks. Put this folder
first on PYTHONPATH and name the log in GCPROBE:

    GCPROBE=/tmp/gc.log PYTHONPATH=benchmarks/gc_probe:$PWD zeroplan launch ... --force

Each line: unix time, "gen2", milliseconds, collected N, objects N (gc.get_objects()).
benchmarks/results/gc_freeze_cpu_*.txt: a CPU launch of tests/tinyllm's model on 2,000
records before and after hostloop.freeze_heap.
"""

import gc
import os
import time

if os.environ.get("GCPROBE"):
    _start: dict[str, float] = {}

    def _log(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _start["t"] = time.perf_counter()
        elif info.get("generation") == 2:
            ms = (time.perf_counter() - _start.get("t", time.perf_counter())) * 1e3
            with open(os.environ["GCPROBE"], "a") as f:
                f.write(
                    f"{time.time():.3f} gen2 {ms:.1f} ms collected {info.get('collected')} "
                    f"objects {len(gc.get_objects())} pid {os.getpid()}\n"
                )

    gc.callbacks.append(_log)
