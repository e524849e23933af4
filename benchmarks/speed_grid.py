"""Time training steps over many shapes with one model build per process: the rows
benchmarks/fit_speed.py fits zeroplan.speed on.

    python benchmarks/speed_grid.py --grid h200 --shard 0/2 --out $OUT/speed_h200.jsonl
    python benchmarks/speed_grid.py MODEL --method lora --shapes 1x512,4x2048c,8x2048a2
    torchrun --nproc-per-node 2 benchmarks/speed_grid.py MODEL --zero 2 --shapes 4x2048a4
    python benchmarks/speed_grid.py --list

The step is measure_memory.py's lean step (same model build, LoRA, optimizer, autocast,
DeepSpeed config); what differs is that the model is built once and the shapes are swept in
the same process, so a grid of dozens of shapes costs one model build per line, not one per
shape. A shape is ``MICROxSEQ`` with suffixes: ``c`` gradient checkpointing, ``f`` fused
loss (Liger, patched in for good: put ``f`` shapes last), ``aN`` N micro-batches per
optimizer step (DDP skips the gradient all-reduce on all but the last, DeepSpeed
accumulates at its boundary). Each shape runs ``--warmup`` optimizer steps (allocation,
autotuning, ZeRO-3's module trace), then ``--steps`` timed ones: wall clock between two
``cuda.synchronize()``, every step kept in the row (``step_seconds``), with the peak
allocated memory of the shape's steps. An OOM is a result: the row says so and the grid
goes on (under DeepSpeed the process stops, its engine is not trusted after one).

``--offload optimizer`` moves the optimizer to the CPU: with ``--ds-adam`` DeepSpeed
builds its compiled CPU Adam (``DeepSpeedCPUAdam``, a C++ op compiled at first use: the
row records the build seconds, the CPU and the cores), without it PyTorch's AdamW runs on
the CPU. The row records ``p2p`` (false when ``NCCL_P2P_DISABLE=1``).

``--grid NAME`` runs a named list of lines, one process each (torchrun for lines with
``--zero`` or ``--ddp``), ``--shard K/N`` only every N-th line from the K-th (to run a
single-GPU grid on N GPUs at once, ``CUDA_VISIBLE_DEVICES`` per shard), and stops starting
shapes once ``--budget-s`` seconds have passed (the rows already written stay).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import measure_memory as mm  # noqa: E402  (the lean step's pieces)
from run_grid import process  # noqa: E402  (how a grid line becomes a process)

from zeroplan.dsconfig import ZERO_TESTED_OPTIMIZERS  # noqa: E402
from zeroplan.models import load_model  # noqa: E402

L1, L3, L8 = "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B"
Q05, Q15, Q7 = "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B"
Q14, Q32, Q3 = "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B", "Qwen/Qwen3-8B"
M7 = "mistralai/Mistral-7B-v0.3"

GRIDS: dict[str, list[str]] = {
    # One GPU: per-micro-batch fixed costs (micro-batch 1-16 at seq 512), attention by
    # sequence length (the same tokens at 512-4096), checkpointing, accumulation, fused loss,
    # LoRA vs QLoRA vs full on the same model, five families from 0.5B to 32B. Ordered so
    # that --shard 0/2 and 1/2 take about the same time.
    "h200": [
        f"{L1} --method lora --shapes 1x512,2x512,4x512,8x512,16x512,1x2048,2x2048,4x2048,"
        "8x2048,1x4096,4x4096,16x512c,4x2048c,1x512a8,4x2048a4,8x2048f,4x2048cf",
        f"{L8} --method lora --shapes 1x512,4x512,1x2048,2x2048,4x2048,2x4096,8x2048c,"
        "1x2048a4,4x2048c",
        f"{L8} --method qlora --shapes 1x768,4x768,8x768,1x2048,4x2048,8x2048c,1x768a4",
        f"{L1} --method qlora --shapes 1x512,4x512,16x512,1x2048,4x2048,8x2048,4x2048c,4x4096",
        f"{L1} --method full --shapes 1x512,4x512,16x512,2x2048,4x2048,1x4096,4x2048c,4x2048a4",
        f"{M7} --method lora --shapes 1x512,4x512,1x2048,4x2048,8x1024c,4x2048c",
        f"{M7} --method qlora --shapes 1x512,1x2048,4x2048,4x2048c",
        f"{Q05} --method lora --shapes 1x512,4x512,16x512,4x2048,2x4096,8x2048c",
        f"{Q05} --method full --shapes 1x512,4x1024,8x2048c,2x4096",
        f"{Q14} --method qlora --shapes 1x1024,2x2048,4x2048c",
        f"{Q32} --method qlora --shapes 1x1024,2x2048c",
        f"{L3} --method lora --shapes 1x512,4x1024,2x2048,8x2048c",
        f"{L3} --method qlora --shapes 1x512,4x1024,4x2048c",
        f"{Q3} --method lora --shapes 1x512,2x2048,4x2048c",
        f"{Q7} --method lora --shapes 1x1024,4x2048c,2x4096",
        f"{L8} --method full --optim adamw_8bit --shapes 1x1024c,2x2048c,1x2048",
    ],
    # Two GPUs of one host: the three jobs of issue 11's plan check at their own global
    # batch (8B LoRA seq 2048 global 32; 1B full seq 2048 global 32; 8B QLoRA seq 2048
    # global 16) across DDP and ZeRO 0-3, NVLink on. Most telling lines first.
    "h200x2": [
        f"{L8} --method lora --ddp --shapes 4x2048a4,8x2048ca2",
        f"{L1} --method full --ddp --shapes 8x2048a2",
        f"{L8} --method lora --zero 3 --shapes 8x2048ca2",
        f"{L1} --method full --zero 2 --shapes 8x2048a2,16x2048c",
        f"{L8} --method lora --zero 2 --shapes 4x2048a4",
        f"{L1} --method full --zero 3 --shapes 8x2048a2",
        f"{L8} --method qlora --ddp --shapes 2x2048a4,8x2048c",
        f"{L1} --method full --zero 1 --shapes 8x2048a2",
    ],
    # The same with NCCL_P2P_DISABLE=1 (PCIe consumer cards): the lines whose traffic is big.
    "h200x2-nop2p": [
        f"{L1} --method full --ddp --shapes 8x2048a2",
        f"{L8} --method lora --zero 3 --shapes 8x2048ca2",
        f"{L1} --method full --zero 2 --shapes 8x2048a2",
        f"{L8} --method lora --ddp --shapes 4x2048a4",
        f"{L1} --method full --zero 3 --shapes 8x2048a2",
    ],
    # Issue 11's plan check: each of the three 2-GPU jobs (zeroplan plan MODEL --gpus 2xH200
    # --seq-len 2048: 8B LoRA global 32, 1B full global 32, 8B QLoRA global 16) timed at the
    # plan's choice and at the setups it weighed against it (DDP, ZeRO 0-2, micro-batch,
    # fused loss). Run once with NVLink and once with NCCL_P2P_DISABLE=1. Most telling first.
    "h200x2-plan": [
        f"{L8} --method lora --zero 0 --shapes 2x2048fa8,4x2048fa4,4x2048a4",
        f"{L8} --method lora --ddp --shapes 2x2048fa8,4x2048fa4",
        f"{L1} --method full --ddp --shapes 4x2048fa4,16x2048f,8x2048a2",
        f"{L1} --method full --zero 1 --shapes 4x2048fa4,16x2048f",
        f"{L8} --method qlora --zero 0 --shapes 4x2048fa2,2x2048fa4",
        f"{L8} --method qlora --ddp --shapes 4x2048fa2,8x2048cf",
        f"{L8} --method lora --zero 2 --shapes 2x2048fa8",
        f"{L1} --method full --zero 2 --shapes 16x2048f",
    ],
    # Without P2P the gradient traffic is what changes: 1B full (2.5 GB per all-reduce) in
    # full, and the 8B LoRA choice against DDP (its 84 MB of adapter gradients should not).
    "h200x2-plan-nop2p": [
        f"{L1} --method full --ddp --shapes 16x2048f,4x2048fa4",
        f"{L1} --method full --zero 1 --shapes 16x2048f,4x2048fa4",
        f"{L1} --method full --zero 2 --shapes 16x2048f",
        f"{L8} --method lora --zero 0 --shapes 2x2048fa8",
        f"{L8} --method lora --ddp --shapes 2x2048fa8",
    ],
    # What the first no-P2P run left (its budget): the 8B LoRA DDP line again, and the QLoRA
    # job's choice against its neighbour.
    "h200x2-plan-nop2p-rest": [
        f"{L8} --method lora --ddp --shapes 2x2048fa8,4x2048a4",
        f"{L8} --method qlora --ddp --shapes 4x2048a2,4x2048fa2",
        f"{L8} --method qlora --zero 0 --shapes 4x2048fa2",
    ],
    # The 1B full job's plan after the 8-bit per-tensor term went in: DDP 16 x 1 without the
    # fused loss (untimed), beside the fused twin that was the measured best; run with NVLink
    # and again under NCCL_P2P_DISABLE=1.
    "h200x2-plan-unfused": [f"{L1} --method full --ddp --shapes 16x2048,16x2048f"],
    # ZeRO-3 handing bitsandbytes' 8-bit AdamW its flat partitions: the launched 1B run of
    # realdata_2xh200_1b_zero3.jsonl at its planned shape, which the model then rated 19-23% too
    # fast and no grid row had.
    "h200x2-zero3-8bit": [f"{L1} --method full --zero 3 --optim adamw_8bit --shapes 8x2048c"],
    # What ZeRO-3's hooks cost as the tokens per micro-batch change: its constant is read
    # off one 8B LoRA shape (8 x 2048, checkpointing, accumulation 2), where it adds to the
    # GPU's time; the 1B full 8-bit row above runs 17% faster than that predicts and the
    # launched 1B job at 8 x 704 22-25% slower. Each ZeRO-3 line beside its DDP twin.
    "h200x2-zero3-shape": [
        f"{L1} --method full --zero 3 --shapes 8x512c,8x2048c,8x2048",
        f"{L1} --method full --ddp --shapes 8x512c,8x2048c,8x2048",
        f"{L1} --method full --zero 3 --optim adamw_8bit --shapes 8x512c",
        f"{L8} --method lora --zero 3 --shapes 1x2048c,4x2048c",
        f"{L8} --method lora --ddp --shapes 1x2048c,4x2048c",
    ],
    # Never fitted: models the speed rows have never held (Gemma 3, and Qwen3 below 8B), as a
    # check of speed.py on families and sizes it has not seen; written to check_*.jsonl so
    # that fit_speed.py does not read them (it reads speed_*.jsonl).
    "h200-unseen": [
        "google/gemma-3-1b-it --method lora --shapes 1x512,4x1024",
        "Qwen/Qwen3-1.7B --method full --optim adamw_8bit --shapes 4x1024",
        "Qwen/Qwen3-1.7B --method full --shapes 4x1024",
    ],
    # 8-bit AdamW on other families than Llama (whose 8B full rows are the only ones): with
    # Llama held out the fit has no row for the 8-bit optimizer's cost.
    "h200-8bit": [
        f"{Q05} --method full --optim adamw_8bit --shapes 4x1024,2x2048c",
        f"{Q15} --method full --optim adamw_8bit --shapes 2x2048c,4x1024",
        f"{M7} --method full --optim adamw_8bit --shapes 1x1024c,2x2048c",
        f"{Q3} --method full --optim adamw_8bit --shapes 1x1024c",
    ],
    # One GPU, nothing else running (the "h200" grid ran as two shards at once, and the
    # host-bound shapes of one shard moved by up to a third with what the other did): the
    # host-bound shapes again, the small one after a larger one, and once more at the end.
    "h200-host": [
        f"{L3} --method lora --shapes 4x512,1x512,1x2048,2x512,1x512",
        f"{Q05} --method lora --shapes 4x512,1x512,1x2048,2x512,1x512",
        f"{Q05} --method full --shapes 4x512,1x512,1x2048,2x512,1x512",
        f"{Q3} --method lora --shapes 4x512,1x512,1x2048,2x512,1x512",
        f"{L8} --method lora --shapes 4x512,1x512,1x2048,2x512,1x512",
        f"{M7} --method qlora --shapes 4x512,1x512,1x2048,2x512,1x512",
        f"{L1} --method qlora --shapes 4x512,1x512,1x2048,2x512,1x512",
        f"{L1} --method lora --shapes 4x512,1x512,1x2048,2x512,1x512",
    ],
    # One GPU: DeepSpeed ZeRO-0 against the plain loop for bf16 LoRA (the planner picks
    # ZeRO-0 there: DeepSpeed keeps bf16 adapters, PEFT's plain loop fp32 ones), and CPU
    # optimizer offload with DeepSpeed's CPU Adam on a one-GPU host (16 cores).
    "h200-zero0": [
        f"{L1} --method lora --zero 0 --shapes 4x2048,1x512,16x1024f",
        f"{L1} --method lora --shapes 4x2048,1x512,16x1024f",
        f"{L8} --method lora --zero 0 --shapes 4x2048,1x2048",
        f"{L1} --method full --zero 2 --offload optimizer --ds-adam --shapes 4x2048a4",
    ],
    # One GPU: what a DeepSpeed optimizer step costs the host beyond the plain loop's (the
    # twins, with accumulation spreading it over micro-batches), LoRA and full.
    "h200-ds-step": [
        f"{L1} --method lora --zero 0 --shapes 1x512a4,4x2048a2,1x1024",
        f"{L1} --method lora --shapes 1x512a4,4x2048a2,1x1024",
        f"{L1} --method full --zero 0 --shapes 1x512,4x2048,1x512a4",
        f"{L1} --method full --shapes 1x512,4x2048,1x512a4",
    ],
    # One GPU: shapes that the held-out fits lacked (fit_speed.py holds out a sequence
    # length, a micro-batch size or a family at a time): checkpointing and the 8-bit
    # optimizer away from seq 2048, QLoRA at micro-batch 2 and 8.
    "h200-spread": [
        f"{Q05} --method full --shapes 2x512c,1x1024c,4x1024c",
        f"{L1} --method lora --shapes 1x512c,2x1024c,1x4096c",
        f"{Q05} --method full --optim adamw_8bit --shapes 1x512,2x4096,1x1024c",
        f"{L3} --method qlora --shapes 2x2048,8x768,1x1024c",
        f"{M7} --method qlora --shapes 2x768,1x1024",
    ],
    # CPU optimizer offload, DeepSpeed's compiled CPU Adam against PyTorch's AdamW on the CPU.
    "h200x2-offload": [
        f"{L1} --method full --zero 2 --offload optimizer --ds-adam --shapes 4x2048a4,8x2048a2",
        f"{L8} --method lora --zero 2 --offload optimizer --ds-adam --shapes 4x2048a4",
        f"{L1} --method full --zero 2 --offload optimizer --optim adamw_torch --shapes 4x2048a4",
    ],
}

# The host-bound one-GPU shapes again, twice more each in separate processes, so that the fit
# and its held-out check read the median of three or more (17 shapes measured in separate
# processes differed by a median 12%, up to 46%). Chosen by a rule, not by their error:
# every H200 fit shape measured fewer than three times where speed.py (2026-11-30) put the
# host's time at 0.8 of the GPU's or more. The second process runs the shapes in reverse, so
# no shape is always the first of its process. Small models first: a cut budget loses the
# large builds.
REPEAT_GROUPS: list[tuple[str, str, str, str]] = [
    (
        L1,
        "lora",
        "",
        "1x512,2x512,4x512,8x512,1x2048,2x2048,1x4096,16x512c,4x2048c,1x512a8,4x2048cf,1x512a4,1x1024,1x512c,2x1024c,1x4096c",
    ),
    (Q05, "full", "", "4x1024,4x512,1x2048,2x512,2x512c,1x1024c,4x1024c"),
    (L3, "qlora", "", "1x512,4x1024,4x2048c,2x2048,8x768,1x1024c"),
    (L8, "qlora", "", "1x768,4x768,1x2048,1x768a4"),
    (Q05, "full", "adamw_8bit", "4x1024,2x2048c,1x512,1x1024c"),
    (L1, "qlora", "", "1x512,4x512,16x512,1x2048,4x2048,4x2048c,2x512"),
    (Q05, "lora", "", "4x512,16x512,4x2048,2x4096,8x2048c,1x2048,2x512"),
    (M7, "qlora", "", "1x2048,4x512,2x512"),
    (L3, "lora", "", "4x1024,2x2048,4x512,1x2048,2x512"),
    (L8, "lora", "", "4x512,1x2048,1x2048a4,2x512"),
    (L1, "full", "", "1x512,4x512,1x512a4"),
    (M7, "lora", "", "1x512,4x512,1x2048"),
    (Q3, "lora", "", "4x512,1x2048,2x512"),
    (Q15, "full", "adamw_8bit", "2x2048c"),
    (Q7, "lora", "", "1x1024"),
    (L8, "full", "adamw_8bit", "1x1024c"),
    (M7, "full", "adamw_8bit", "1x1024c"),
    (Q3, "full", "adamw_8bit", "1x1024c"),
    (Q14, "qlora", "", "1x1024"),
    (Q32, "qlora", "", "1x1024"),
]


def repeat_lines(groups: list[tuple[str, str, str, str]]) -> list[str]:
    out = []
    for model, method, optim, shapes in groups:
        head = f"{model} --method {method}" + (f" --optim {optim}" if optim else "")
        order = shapes.split(",")
        out += [f"{head} --shapes {','.join(order)}", f"{head} --shapes {','.join(order[::-1])}"]
    return out


GRIDS["h200-repeat"] = repeat_lines(REPEAT_GROUPS)
# Five readings where three or four disagree: every one-GPU fit shape whose readings (after
# h200-repeat) differed by more than 40% (max/min - 1), chosen by that rule, not by the
# model's error. Processes run all their shapes slow or fast together (per-process factors
# 0.8-1.4), so the median of three can still sit 20-30% from a shape's typical step.
GRIDS["h200-repeat5"] = [
    *repeat_lines(
        [
            (Q05, "full", "", "4x512,1x2048,1x512"),
            (L3, "qlora", "", "1x1024c"),
            (L8, "qlora", "", "1x768,1x2048"),
            (Q05, "lora", "", "2x512"),
            (L8, "lora", "", "2x512"),
        ]
    ),
    # Four readings each already: one more.
    f"{L1} --method qlora --shapes 1x2048,4x512,1x512",
    f"{M7} --method qlora --shapes 1x2048",
    f"{L1} --method full --shapes 1x512",
]
# One GPU, 128-token micro-batches, where the host sets the step for every method: full,
# LoRA and QLoRA twins of one model tell the host's cost per layer, per adapter and per 4-bit
# linear apart. Today only the micro-batch-1 QLoRA shapes show the 4-bit cost: fitted without
# them (the micro-batch-1 fold), host_4bit_s halves and two of them come out 41-43% too fast,
# while with it held at the full fit's value no held-out prediction passes 35%. Each model's
# methods alternate over three processes (the host-bound spread between processes is
# 20-40%), the middle round in reverse order.
_HOST_TWIN = "1x128,2x128,1x128c"


def host_twin_lines(models: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    out = []
    for model, methods in models:
        for round_ in range(3):
            order = methods if round_ != 1 else methods[::-1]
            shapes = _HOST_TWIN if round_ != 1 else ",".join(_HOST_TWIN.split(",")[::-1])
            out += [f"{model} --method {m} --shapes {shapes}" for m in order]
    return out


GRIDS["h200-host-twins"] = host_twin_lines(
    [(L1, ("qlora", "lora", "full")), (L3, ("qlora", "lora", "full")), (L8, ("qlora", "lora"))]
)
# The rule of h200-repeat5 applied again after it and h200-host-twins: every one-GPU fit
# shape whose readings still differ by more than 40% gets two more, one process in each
# order (13 of the 14 are the repeat5 shapes; the fourteenth is a twin with three).
GRIDS["h200-repeat7"] = repeat_lines(
    [
        (Q05, "full", "", "4x512,1x2048,1x512"),
        (L8, "qlora", "", "1x768,1x2048"),
        (L1, "qlora", "", "1x2048,4x512,1x512"),
        (L3, "qlora", "", "1x1024c"),
        (M7, "qlora", "", "1x2048"),
        (Q05, "lora", "", "2x512"),
        (L8, "lora", "", "2x512"),
        (L1, "full", "", "1x512"),
        (L1, "lora", "", "2x128"),
    ]
)
# The same rule at a lower bar, after h200-repeat7: every one-GPU fit shape with three
# readings or fewer that still differ by more than 30% (max/min - 1) gets two more, one
# process in each order: 16 shapes, chosen by their spread, not by the model's error. A
# median of three that far apart can sit 15% from the shape's typical step, which alone
# puts a held-out prediction near the 35% the issue allows.
GRIDS["h200-repeat9"] = repeat_lines(
    [
        (L1, "lora", "", "2x512,1x2048,1x512a8,1x512a4,1x128c"),
        (L3, "lora", "", "4x512,2x128,1x128c"),
        (L3, "qlora", "", "2x2048,1x128"),
        (Q05, "full", "", "2x512"),
        (Q05, "lora", "", "16x512"),
        (L1, "qlora", "", "2x512"),
        (L8, "qlora", "", "1x768a4"),
        (Q7, "lora", "", "1x1024"),
        (Q3, "lora", "", "4x512"),
    ]
)
# One GPU: 8-bit AdamW on small models of another family than Qwen2.5. Its step costs more
# than its bytes on a 0.5 B model (about 0.1 ms per parameter tensor, by Qwen2.5-0.5B's and
# -1.5B's rows against the 7-8 B models'), and with Qwen2.5 held out only 7-8 B models are
# left to tell a per-tensor cost from a per-byte one. Each line twice, in separate processes.
GRIDS["h200-8bit-small"] = repeat_lines(
    [
        (L1, "full", "adamw_8bit", "1x512,4x1024,2x2048c,1x1024"),
        (L3, "full", "adamw_8bit", "1x512,4x1024,2x2048c"),
    ]
)
# Host-bound shapes of architectures whose layers run more (or fewer) operations than
# Llama's, as a check of the host clock's counted operations (count_host_ops.py): Gemma 3
# (six RMSNorms a layer), Gemma 2 (four, eager attention), Qwen3 (q/k norms) and Phi-3 (fused
# q/k/v and gate/up: four adapters a layer). None of these models is in a fitted row:
# written to check_*.jsonl. Each line twice, one process per order.
GRIDS["h200-arch"] = repeat_lines(
    [
        ("google/gemma-3-1b-it", "lora", "", "1x128,1x512,4x512"),
        ("Qwen/Qwen3-0.6B", "lora", "", "1x128,1x512,4x512"),
        ("microsoft/Phi-3-mini-4k-instruct", "lora", "", "1x128,1x512,4x512"),
        ("google/gemma-3-1b-it", "full", "", "1x128,1x512"),
        ("Qwen/Qwen3-0.6B", "full", "", "1x128,1x512"),
        ("microsoft/Phi-3-mini-4k-instruct", "full", "", "1x128,1x512"),
        ("google/gemma-2-9b", "lora", "", "1x128,1x512"),
    ]
)
# A mixture-of-experts model (none was timed before): Qwen3-30B-A3B LoRA on one H200, never
# fitted. PEFT wraps the expert banks (3-D parameters) only without dropout.
GRIDS["h200-moe"] = repeat_lines(
    [("Qwen/Qwen3-30B-A3B --lora-dropout 0", "lora", "", "1x128,1x512,4x512")]
)
# The same shapes on Llama-3.2-1B in the same machine call, run before h200-arch: the
# reference those readings are compared with (fitted rows, written to speed_*.jsonl).
GRIDS["h200-arch-ref"] = [
    f"{L1} --method lora --shapes 1x128,1x512,4x512",
    f"{L1} --method full --shapes 1x128,1x512",
]

# Extra untimed steps for the first shape of each process (see sweep).
FIRST_SHAPE_EXTRA_WARMUP = 3

_SHAPE = re.compile(r"^(\d+)x(\d+)([cf]*)(?:a(\d+))?([cf]*)$")


@dataclass(frozen=True)
class Shape:
    """One point of the sweep: tokens per micro-batch and the switches that change speed."""

    micro_batch: int
    seq_len: int
    grad_ckpt: bool
    fused_loss: bool
    grad_accum: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        m = _SHAPE.match(text.strip())
        if not m:
            raise SystemExit(f"bad shape {text!r}: MICROxSEQ[c][f][aN], e.g. 4x2048ca2")
        flags = m.group(3) + m.group(5)
        return cls(
            int(m.group(1)), int(m.group(2)), "c" in flags, "f" in flags, int(m.group(4) or 1)
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="catalog name, Hub id or config.json path")
    p.add_argument("--shapes", default="4x2048", help="comma-separated MICROxSEQ[c][f][aN]")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed optimizer steps per shape (the first shape of a process: 3 more)",
    )
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per shape")
    p.add_argument("--offload", choices=["none", "optimizer"], default="none")
    p.add_argument("--ds-adam", action="store_true", help="DeepSpeed's compiled CPU Adam")
    p.add_argument(
        "--deadline", type=float, default=0.0, help="epoch seconds: start no shape after"
    )
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the loop (tests)")
    p.add_argument("--grid", choices=sorted(GRIDS))
    p.add_argument("--shard", default="0/1", help="K/N: every N-th line of the grid from K")
    p.add_argument("--start", type=int, default=1, help="grid: first line to run (1-based)")
    p.add_argument("--budget-s", type=float, default=540.0, help="grid: stop starting shapes after")
    p.add_argument("--gpus", type=int, default=2, help="grid: processes per --zero/--ddp line")
    p.add_argument("--list", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "speed.jsonl"))
    mm.add_setup_options(p)
    args = p.parse_args(argv)
    args.grad_ckpt = args.fused_loss = False  # per shape, below
    args.micro_batch = Shape.parse(args.shapes.split(",")[0]).micro_batch
    return mm.resolve_loop(args)


def ds_config(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """measure_memory's stage defaults, plus the optimizer offload and DeepSpeed's own
    optimizer (what builds the compiled CPU Adam) when asked."""
    cfg = mm.default_ds_config(args)
    if args.offload == "optimizer":
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if args.ds_adam:
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}}
        else:
            cfg["zero_force_ds_cpu_optimizer"] = False
    if args.zero >= 1 and args.optim not in ZERO_TESTED_OPTIMIZERS:
        cfg["zero_allow_untested_optimizer"] = True  # as zeroplan's own configs say it
    cfg["train_batch_size"] = args.micro_batch * world
    return cfg


def cpu_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"cpu": model, "cpu_count": os.cpu_count(), "cpu_usable": usable}


class Stepper:
    """One optimizer step of a shape, whatever runs it (plain, DDP, DeepSpeed)."""

    def __init__(self, args: argparse.Namespace, model: Any, optimizer: Any, engine: Any):
        import torch

        self.args, self.model, self.optimizer, self.engine = args, model, optimizer, engine
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.scaler = (
            torch.amp.GradScaler(args.device)
            if args.precision == "fp16" and engine is None and args.autocast
            else None
        )

    def step(self, batches: list[Any]) -> None:
        import torch

        if self.engine is not None:
            for ids in batches:
                loss = self.engine(input_ids=ids, labels=ids).loss
                self.engine.backward(loss)
                self.engine.step()
            return
        for i, ids in enumerate(batches):
            last = i == len(batches) - 1
            sync = self.model.no_sync() if (self.args.ddp and not last) else nullcontext()
            with sync:
                with torch.autocast(
                    self.args.device, dtype=mm.half(self.args), enabled=bool(self.args.autocast)
                ):
                    loss = self.model(input_ids=ids, labels=ids).loss / len(batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def hf_model(model: Any) -> Any:
    """The transformers model under DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def set_checkpointing(model: Any, on: bool) -> None:
    inner = hf_model(model)
    if on and not getattr(inner, "is_gradient_checkpointing", False):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif not on and getattr(inner, "is_gradient_checkpointing", False):
        inner.gradient_checkpointing_disable()


def sweep(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig

    spec = load_model(args.model)
    config = AutoConfig.for_model(**spec.config)
    cuda = args.device == "cuda"
    rank, world, local_rank = 0, 1, int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    cfg = None
    if args.ddp:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif args.zero is not None:
        import deepspeed

        deepspeed.init_distributed()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        cfg = ds_config(args, world)
    torch.manual_seed(0)
    t0 = time.time()
    model = mm.build_model(args, config, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if (cfg and args.ds_adam) else mm.make_optimizer(args, trainable)
    engine = None
    build_s = time.time() - t0
    t1 = time.time()
    if args.ddp:
        ids = [local_rank] if cuda else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    elif cfg is not None:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=cfg, model_parameters=trainable
        )
        engine.train()
    engine_s = time.time() - t1
    stepper = Stepper(args, engine or model, optimizer, engine)
    base = {
        "bench": "speed_grid",
        "model": spec.name,
        "model_type": spec.model_type,
        "method": args.method,
        "lora_r": args.lora_r,
        "lora_targets": args.lora_targets,
        "lora_dropout": args.lora_dropout,
        "optim": "deepspeed_cpu_adam" if (cfg and args.ds_adam) else args.optim,
        "loop": args.loop,
        "autocast": args.autocast,
        "keep_outputs": False,
        "attn": args.attn,
        "precision": args.precision,
        "zero": args.zero,
        "ddp": args.ddp,
        "offload": args.offload,
        "world_size": world,
        "p2p": os.environ.get("NCCL_P2P_DISABLE", "0") != "1",
        "warmup_steps": args.warmup,
        "build_seconds": build_s,
        "engine_seconds": engine_s,
        "ds_config": cfg,
        "tag": args.tag,
        "env": (mm.environment() if cuda else {}) | cpu_info(),
        # what CPU Adam spreads over (torchrun sets 1 for several processes unless told)
        "omp_threads": torch.get_num_threads(),
    }
    gen = torch.Generator(device=args.device).manual_seed(rank)
    for i, text in enumerate(args.shapes.split(",")):
        # the first shape of a process warms more up (allocator, kernel choices, lazy
        # imports): measured with the same warm-up as the rest, the first shapes of the
        # one-GPU grids read 4% slower at the median than the model, the others 1% faster
        # (fit_speed.py prints it)
        warmup = args.warmup + (FIRST_SHAPE_EXTRA_WARMUP if i == 0 else 0)
        if args.deadline and time.time() > args.deadline:
            if rank == 0:
                print(f"  budget spent: {text} and later shapes not run", flush=True)
            break
        shape = Shape.parse(text)
        row = base | {
            "micro_batch": shape.micro_batch,
            "seq_len": shape.seq_len,
            "grad_ckpt": shape.grad_ckpt,
            "fused_loss": shape.fused_loss,
            "grad_accum": shape.grad_accum,
            "warmup_steps": warmup,
        }
        if shape.fused_loss:
            mm.apply_fused_loss(hf_model(model))
        set_checkpointing(model, shape.grad_ckpt)
        if engine is not None:
            engine.set_train_micro_batch_size(shape.micro_batch)
            engine.set_train_batch_size(shape.micro_batch * shape.grad_accum * world)
        times: list[float] = []
        error, oom = None, False
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            for n in range(warmup + args.steps):
                batches = [
                    torch.randint(
                        0,
                        spec.vocab_size,
                        (shape.micro_batch, shape.seq_len),
                        device=args.device,
                        generator=gen,
                    )
                    for _ in range(shape.grad_accum)
                ]
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                stepper.step(batches)
                if cuda:
                    torch.cuda.synchronize()
                if n >= warmup:
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError as exc:
            oom, error = True, str(exc).splitlines()[0][:300]
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        tokens = shape.micro_batch * shape.seq_len * shape.grad_accum
        row |= {
            "oom": oom,
            "error": error,
            "steps": len(times),
            "step_seconds": times,
            "tokens_per_s_per_gpu": tokens / statistics.median(times) if times else None,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        }
        if rank == 0:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            rate = f"{row['tokens_per_s_per_gpu']:,.0f} tok/s/GPU" if times else "no steps"
            spread = f" (steps {min(times):.3f}-{max(times):.3f} s)" if times else ""
            state = "OOM" if oom else (f"ERROR {error}" if error else rate + spread)
            print(f"  {spec.name} {args.method} {text}: {state}", flush=True)
        if error:
            if engine is not None or not oom:
                break  # a DeepSpeed engine after an OOM, or a crash: the process is not trusted
            stepper.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if args.ddp or args.zero is not None:
        torch.distributed.destroy_process_group()


def run_grid(args: argparse.Namespace) -> None:
    k, n = (int(x) for x in args.shard.split("/"))
    lines = GRIDS[args.grid][k::n][args.start - 1 :]
    deadline = time.time() + args.budget_s
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i, line in enumerate(lines, 1):
        if time.time() > deadline:
            print(f"budget spent: {len(lines) - i + 1} lines not run", flush=True)
            break
        cmd = [str(HERE / "speed_grid.py"), *shlex.split(line), "--out", args.out]
        cmd += [
            "--deadline",
            str(deadline),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
        ]
        if args.tag:
            cmd += ["--tag", args.tag]
        cmd = process(cmd, line, args.gpus)
        print(f"[{args.grid} {args.shard} {i}/{len(lines)}] {line}", flush=True)
        t = time.time()
        proc = subprocess.run(cmd, env=env)
        print(f"  ({time.time() - t:.0f} s, exit {proc.returncode})", flush=True)


def main() -> None:
    args = parse_args()
    if args.list:
        for name, lines in GRIDS.items():
            print(
                f"{name}: {len(lines)} lines, {sum(len(x.split('--shapes')[1].split(',')) for x in lines)} shapes"
            )
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.grid:
        run_grid(args)
    elif args.model:
        sweep(args)
    else:
        raise SystemExit("give a MODEL with --shapes, or --grid NAME (--list shows them)")


if __name__ == "__main__":
    main()
