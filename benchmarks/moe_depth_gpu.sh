#!/bin/bash
# Issue 29 on one GPU, one call of about four minutes after start-up: the host-bound MoE rows
# at several depths in two processes (opposite orders), then a launched 16-layer
# Qwen3-30B-A3B cut with attention and all-linear LoRA. Run from the repository root:
#
#   run(command="bash benchmarks/moe_depth_gpu.sh", carry=[".whl"])
#
# Writes $OUT/moe_speed3.jsonl, $OUT/launch_moe3.jsonl and their logs; fit_moe_speed.py reads
# them afterwards (skip rows whose bench is "moe_ops").
set -o pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
PYTHONPATH=$PWD timeout 75 python3 benchmarks/moe_depth.py --out "$OUT/moe_speed3.jsonl" \
  --budget-s 42 2>&1 | tee "$OUT/depth_a.log"
PYTHONPATH=$PWD timeout 75 python3 benchmarks/moe_depth.py --reverse \
  --out "$OUT/moe_speed3.jsonl" --budget-s 42 2>&1 | tee "$OUT/depth_b.log"
PYTHONPATH=$PWD:/tmp/site timeout 132 python3 benchmarks/launch_gpu_check.py --work /tmp/lc \
  --out "$OUT/launch_moe3.jsonl" --arch Qwen--Qwen3-30B-A3B --layers 16 \
  --runs moe-attn,moe-all --steps 15 --timeout 62 2>&1 | tee "$OUT/launch.log"
