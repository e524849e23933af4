"""A stand-in for ``python -m zeroplan.launch.sft`` that behaves like one rank, in a blink.

Same arguments (``--plan --data --out [--resume] [--max-steps N] ...``). Each step it sleeps
``STANDIN_STEP_S`` seconds, prints a line and appends one record to ``OUT/metrics.jsonl``
(the launch contract's keys). On SIGTERM / SIGINT it finishes the step, writes
``OUT/checkpoint-rank{RANK}.json`` atomically (and rank 0 a finished
``OUT/checkpoints/checkpoint-N``, as the Trainer leaves it: what ``--resume`` looks for),
logs how many signals it got (a launch must deliver exactly one) and exits 0.
``STANDIN_CRASH_RANK`` / ``STANDIN_CRASH_STEP`` make that rank raise at that step.
``STANDIN_PG=1`` joins a gloo process group first (torchrun's MASTER_ADDR/PORT) and
all-reduces each step, as real ranks would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-fraction", type=float)
    args = p.parse_args()

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    out = Path(args.out)
    plan = json.loads(Path(args.plan).read_text())
    assert plan["best"]["setup"], "the plan must carry a setup"
    step_s = float(os.environ.get("STANDIN_STEP_S", "0.05"))
    crash_rank = int(os.environ.get("STANDIN_CRASH_RANK", "-1"))
    crash_step = int(os.environ.get("STANDIN_CRASH_STEP", "2"))

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))

    dist = None
    if os.environ.get("STANDIN_PG"):
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")

    start = 0
    marker = out / f"checkpoint-rank{rank}.json"
    if args.resume and marker.exists():
        start = json.loads(marker.read_text())["step"]
    print(f"rank {rank}/{world} starts at step {start} (pid {os.getpid()})", flush=True)

    step = start
    while step < args.max_steps and not stop:
        step += 1
        if rank == crash_rank and step == crash_step:
            raise RuntimeError(f"stand-in crash on rank {rank} at step {step}")
        time.sleep(step_s)
        if dist is not None:
            t = torch.ones(1)
            dist.all_reduce(t)
            assert int(t.item()) == world
        record = {
            "t": time.time(),
            "rank": rank,
            "step": step,
            "total_steps": args.max_steps,
            "loss": 2.0 / step,
            "lr": args.lr,
            "grad_norm": 1.0,
            "tokens_per_s": 1000.0,
            "mem_allocated_bytes": 0,
            "mem_reserved_bytes": 0,
            "event": "train",
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"rank {rank} step {step}/{args.max_steps} loss {record['loss']:.4f}", flush=True)

    if stop:
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": rank, "step": step}))
        os.replace(tmp, marker)
        if rank == 0:  # trainer_state.json last: the Trainer's sign of a finished save
            saved = out / "checkpoints" / f"checkpoint-{step}"
            saved.mkdir(parents=True, exist_ok=True)
            (saved / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        print(f"rank {rank}: signal {stop[0]}, checkpoint at step {step} saved", flush=True)
        time.sleep(0.3)  # a second signal would arrive by now: the launch must send one
        print(f"rank {rank}: signals received: {len(stop)}", flush=True)
        return 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"t": time.time(), "rank": rank, "step": step, "event": "end"}) + "\n")
    if dist is not None:
        dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
