"""How long ``zeroplan plan MODEL --data FILE`` takes on 100k records: the first time
(reading, rendering with the chat template, tokenizing, packing) and again from the cache.

    python benchmarks/plan_data_time.py --records 100000 --out benchmarks/results/plan_data_time.jsonl

Runs on the CPU (no torch in the planner). The model folder is the tests' tiny Llama with
its tokenizer built in code: a 320-token byte-level BPE, about 2 characters a token — a slow
case for the tokenizer (a real model's tokenizer makes about half as many tokens of the same
text). Records: alpaca answers of log-normal length (``realdata_speed.lognormal_records``).
One JSON line: seconds of each run, peak RSS, records, tokens, CPU model and core count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tinyllm  # noqa: E402
from realdata_speed import lognormal_records  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zp-plan-time-"))
    model = tinyllm.build_model_dir(work / "model")
    data = tinyllm.write_jsonl(work / "data.jsonl", lognormal_records(args.records, 700, seed=3))
    env = {**os.environ, "ZEROPLAN_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "zeroplan", "plan", str(model), "--data", str(data)]
    cmd += ["--gpus", "1xH100", "--seq-len", "p99", "--json"]
    runs = []
    for _ in ("first", "cached"):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        runs.append(time.perf_counter() - start)
        if done.returncode:
            raise SystemExit(done.stderr)
    data_section = json.loads(done.stdout)["data"]
    row = {
        "records": data_section["records"],
        "tokens_total": data_section["tokens_total"],
        "first_s": round(runs[0], 2),
        "cached_s": round(runs[1], 2),
        "peak_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "data_file_bytes": data.stat().st_size,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
