"""Run a named grid of measure_memory.py configurations, one fresh process per row.

    python benchmarks/run_grid.py h100-small --out $OUT/memory.jsonl
    python benchmarks/run_grid.py --list

A row that crashes or times out is recorded by measure_memory.py itself (OOM, error) or,
if the process dies without writing, reported here; the grid goes on with the next row.
Multi-GPU grids start each row with torchrun (one process per GPU).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
L1, L3, L8 = (
    "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B",
    "meta-llama/Llama-3.1-8B-Instruct",
)
Q05, Q15, Q7 = "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B"
M7, Q3 = "mistralai/Mistral-7B-v0.3", "Qwen/Qwen3-8B"
STORY_QLORA = "--lora-targets q_proj,k_proj,v_proj,o_proj --lora-r 16 --lora-dropout 0.05 --optim paged_adamw_8bit"

GRIDS: dict[str, list[str]] = {
    "h100-small": [
        f"{L1} --method lora --micro-batch 1 --seq-len 512",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L1} --method lora --micro-batch 8 --seq-len 4096 --grad-ckpt",
        f"{L1} --method full --micro-batch 2 --seq-len 1024",
        f"{L1} --method full --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L1} --method qlora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L1} --method lora --micro-batch 2 --seq-len 2048 --attn eager",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --lora-dropout 0 --lora-targets q_proj,v_proj",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --grad-ckpt --optim adamw_8bit",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --fused-loss",
        f"{L1} --method qlora --micro-batch 2 --seq-len 1024 {STORY_QLORA}",
        f"{Q05} --method lora --micro-batch 4 --seq-len 2048",
        f"{Q05} --method full --micro-batch 4 --seq-len 1024",
        f"{Q05} --method qlora --micro-batch 8 --seq-len 1024 --grad-ckpt",
        f"{Q05} --method full --micro-batch 8 --seq-len 4096 --grad-ckpt",
        f"{Q15} --method lora --micro-batch 2 --seq-len 4096 --grad-ckpt",
        f"{Q15} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt",
        f"{L3} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L3} --method qlora --micro-batch 2 --seq-len 4096",
        f"{L3} --method full --micro-batch 1 --seq-len 2048 --grad-ckpt",
    ],
    "h100-large": [
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048",
        f"{L8} --method qlora --micro-batch 1 --seq-len 768 {STORY_QLORA}",
        f"{L8} --method qlora --micro-batch 1 --seq-len 768 --grad-ckpt {STORY_QLORA}",
        f"{L8} --method lora --micro-batch 8 --seq-len 4096 --grad-ckpt",
        f"{L8} --method full --micro-batch 1 --seq-len 1024 --grad-ckpt",
        f"{L8} --method full --micro-batch 1 --seq-len 1024 --grad-ckpt --optim adamw_8bit",
        f"{L8} --method qlora --micro-batch 1 --seq-len 768 {STORY_QLORA} --memory-fraction 0.2941 --tag 4090-24GB",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --memory-fraction 0.2941 --tag 4090-24GB",
        f"{Q7} --method lora --micro-batch 2 --seq-len 2048 --grad-ckpt",
        f"{Q7} --method qlora --micro-batch 4 --seq-len 1024 --grad-ckpt",
        f"{Q7} --method lora --micro-batch 1 --seq-len 4096",
        f"{M7} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{M7} --method qlora --micro-batch 2 --seq-len 2048",
        f"{M7} --method full --micro-batch 1 --seq-len 512 --grad-ckpt --optim adamw_8bit",
        f"{Q3} --method lora --micro-batch 2 --seq-len 2048 --grad-ckpt",
    ],
    # DeepSpeed on one GPU: no partitioning, but the stages' own buffers and ZeRO-3's hooks.
    "h100-zero1gpu": [
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 3",
        f"{L1} --method lora --micro-batch 2 --seq-len 2048 --zero 3",
        f"{L1} --method full --micro-batch 2 --seq-len 2048 --zero 3",
        f"{Q05} --method lora --micro-batch 4 --seq-len 2048 --zero 3",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 2",
        f"{L1} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt --zero 2",
        f"{L1} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt --zero 1",
    ],
    # What zeroplan launch runs: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by the
    # caller), which takes most of the caching allocator's slack away.
    "h100-expandable": [
        f"{L1} --method lora --micro-batch 4 --seq-len 2048",
        f"{L1} --method lora --micro-batch 8 --seq-len 4096 --grad-ckpt",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --grad-ckpt --optim adamw_8bit",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --fused-loss",
        f"{Q05} --method full --micro-batch 8 --seq-len 4096 --grad-ckpt",
        f"{Q15} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt",
        f"{L3} --method full --micro-batch 1 --seq-len 2048 --grad-ckpt",
        f"{L3} --method qlora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L8} --method qlora --micro-batch 1 --seq-len 768 {STORY_QLORA}",
        f"{L8} --method qlora --micro-batch 4 --seq-len 2048 --grad-ckpt {STORY_QLORA}",
        f"{M7} --method lora --micro-batch 8 --seq-len 2048 --grad-ckpt",
        f"{Q7} --method qlora --micro-batch 2 --seq-len 4096 --grad-ckpt --fused-loss",
    ],
    # Speed on one H100 for the planner: the knobs of an 8B LoRA/QLoRA run at seq 2048,
    # 6 steps each (the first allocates the optimizer states and is not timed).
    "h100-plan": [
        f"{L8} --method lora --micro-batch 1 --seq-len 2048",
        f"{L8} --method lora --micro-batch 2 --seq-len 2048",
        f"{L8} --method lora --micro-batch 2 --seq-len 2048 --grad-ckpt",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt",
        f"{L8} --method lora --micro-batch 8 --seq-len 2048 --grad-ckpt",
        f"{L8} --method lora --micro-batch 16 --seq-len 2048 --grad-ckpt --fused-loss",
        f"{L8} --method qlora --micro-batch 2 --seq-len 2048",
        f"{L8} --method qlora --micro-batch 8 --seq-len 2048 --grad-ckpt",
    ],
    # The planner's 24 GB verdicts, checked on an H100 capped at 24 GiB (fraction of 80 GiB).
    "4090-plan": [
        # 7x4090 story: what it ran (OOM), and the plan's per-GPU choice
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --memory-fraction 0.2941 --tag 4090-story",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --fused-loss --optim adamw_8bit --memory-fraction 0.2941 --tag 4090-plan",
        # QLoRA story: what it ran, and the plan's choice
        f"{L8} --method qlora --micro-batch 1 --seq-len 768 {STORY_QLORA} --memory-fraction 0.2941 --tag 4090-story",
        f"{L8} --method qlora --micro-batch 8 --seq-len 768 --grad-ckpt --lora-targets q_proj,k_proj,v_proj,o_proj --lora-r 16 --memory-fraction 0.2941 --tag 4090-plan",
    ],
    # The planner on two GPUs (issue 4's check, not run yet; run with --steps 6): for
    # `zeroplan plan llama-3.1-8b-instruct --gpus 2xH100 --seq-len 2048 --global-batch 16`
    # the plan's choice (first row: QLoRA, DDP, micro-batch 4, no checkpointing, fused loss;
    # × 2 accumulation, timed per micro-batch) against what else it weighed.
    "2gpu-plan": [
        f"{L8} --method qlora --micro-batch 4 --seq-len 2048 --fused-loss --ddp",
        f"{L8} --method qlora --micro-batch 2 --seq-len 2048 --ddp",
        f"{L8} --method qlora --micro-batch 8 --seq-len 2048 --grad-ckpt --fused-loss --ddp",
        f"{L8} --method lora --micro-batch 2 --seq-len 2048 --ddp",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --fused-loss --ddp",
        f"{L8} --method lora --micro-batch 8 --seq-len 2048 --grad-ckpt --ddp",
        f"{L8} --method lora --micro-batch 2 --seq-len 2048 --zero 2",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 3",
    ],
    # Issue 12: the plain loop (foreach AdamW, no autocast, output kept through backward)
    # against its trainer-loop twin on the same GPU, and each switch alone. One H200, about
    # 4 minutes: python benchmarks/run_grid.py h200-loops --out $OUT/memory_h200_loops.jsonl
    "h200-loops": [
        f"{L1} --method lora --micro-batch 4 --seq-len 2048",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --loop plain",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --no-autocast",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --keep-outputs",
        f"{L1} --method full --micro-batch 2 --seq-len 1024",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --loop plain",
        # a short checkpointed step peaks at the optimizer step: foreach's temporaries show
        f"{L1} --method full --micro-batch 1 --seq-len 512 --grad-ckpt",
        f"{L1} --method full --micro-batch 1 --seq-len 512 --grad-ckpt --optim adamw_torch",
        f"{Q05} --method lora --micro-batch 4 --seq-len 2048",
        f"{Q05} --method lora --micro-batch 4 --seq-len 2048 --loop plain",
        f"{Q05} --method full --micro-batch 4 --seq-len 1024",
        f"{Q05} --method full --micro-batch 4 --seq-len 1024 --loop plain",
    ],
    # Issue 13: fp16 mixed precision forced on a bf16 card (what T4 / V100 users run): AMP on
    # an fp32 model for full fine-tuning, fp16 base + fp32 adapters for LoRA, DeepSpeed's fp16
    # section. One GPU (run with --gpus 1): python benchmarks/run_grid.py h200-fp16 --gpus 1
    "h200-fp16": [
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --precision fp16",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --precision fp16",
        f"{L1} --method full --micro-batch 1 --seq-len 512 --grad-ckpt --precision fp16",
        f"{L1} --method qlora --micro-batch 4 --seq-len 1024 --precision fp16",
        f"{Q05} --method full --micro-batch 4 --seq-len 1024 --precision fp16",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --zero 2 --precision fp16",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --zero 2 --precision fp16",
    ],
    # Issue 12 on two H200s: LoRA under ZeRO-3 with reentrant (what zeroplan launch and TRL
    # run), non-reentrant (what a hand-written loop gets from use_reentrant=False) and no
    # checkpointing; full fine-tuning under ZeRO-0/1/2 without checkpointing. Most telling first:
    # python benchmarks/run_grid.py h200x2-zero-loops --budget-s 330 --out $OUT/memory.jsonl
    "h200x2-zero-loops": [
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 3 --reentrant",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 3",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --zero 3",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --zero 0",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --zero 1",
        f"{L1} --method full --micro-batch 2 --seq-len 1024 --zero 2",
        f"{Q05} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 3 --reentrant",
        f"{Q05} --method lora --micro-batch 4 --seq-len 2048 --zero 3",
        f"{Q05} --method full --micro-batch 4 --seq-len 1024 --zero 0",
        f"{Q15} --method full --micro-batch 2 --seq-len 1024 --zero 2",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 3 --reentrant",
        f"{L8} --method lora --micro-batch 2 --seq-len 2048 --zero 3",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 2 --reentrant",
    ],
    "h200x2-zero": [
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --zero 0",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --zero 1",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --zero 2",
        f"{L1} --method lora --micro-batch 4 --seq-len 2048 --zero 3",
        f"{L1} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt --zero 1",
        f"{L1} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt --zero 2",
        f"{L1} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt --zero 3",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 2",
        f"{L8} --method lora --micro-batch 4 --seq-len 2048 --grad-ckpt --zero 3",
        f"{L8} --method full --micro-batch 1 --seq-len 2048 --grad-ckpt --zero 3",
        f"{Q15} --method full --micro-batch 2 --seq-len 2048 --grad-ckpt --zero 2",
    ],
}


def process(cmd: list[str], line: str, gpus: int) -> list[str]:
    """The command that runs a grid line: under torchrun with ``gpus`` processes when the
    line asks for DeepSpeed (``--zero``) or DDP, else one Python process."""
    if "--zero" in line or "--ddp" in line:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", *cmd]
    return [sys.executable, *cmd]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid", nargs="?", choices=sorted(GRIDS))
    p.add_argument("--out", default=str(HERE / "results" / "memory.jsonl"))
    p.add_argument("--gpus", type=int, default=2, help="processes per row for --zero / --ddp rows")
    p.add_argument("--timeout", type=int, default=240)
    p.add_argument("--only", default="", help="run rows whose text contains this")
    p.add_argument("--start", type=int, default=1, help="first row to run (1-based)")
    p.add_argument("--tag", default="", help="tag every row (e.g. the allocator setting)")
    p.add_argument("--steps", type=int, default=3, help="training steps per row")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no row after this (0: all)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list or not args.grid:
        for name, rows in GRIDS.items():
            print(f"{name}: {len(rows)} rows")
        return
    rows = [r for r in GRIDS[args.grid] if args.only in r][args.start - 1 :]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    began = time.time()
    for n, row in enumerate(rows, 1):
        if args.budget_s and time.time() - began > args.budget_s:
            print(f"budget of {args.budget_s:.0f}s spent: rows {n}-{len(rows)} not run", flush=True)
            break
        cmd = [str(HERE / "measure_memory.py"), *shlex.split(row), "--out", args.out]
        cmd += ["--steps", str(args.steps)]
        if args.tag:
            cmd += ["--tag", args.tag]
        cmd = process(cmd, row, args.gpus)
        start = time.time()
        print(f"[{n}/{len(rows)}] {row}", flush=True)
        try:
            done = subprocess.run(
                cmd, env=env, timeout=args.timeout, capture_output=True, text=True
            )
            out = (done.stdout + done.stderr).strip().splitlines()
            # a failing row keeps its traceback in the log, not only its last lines
            keep = 40 if done.returncode != 0 or any("Traceback" in line for line in out) else 3
            tail = "\n".join(out[-keep:])
            print(f"    rc={done.returncode} {time.time() - start:.0f}s {tail}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"    TIMEOUT after {args.timeout}s", flush=True)


if __name__ == "__main__":
    main()
