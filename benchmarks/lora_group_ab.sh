#!/bin/bash
# Issue 26 on one machine in one call, most wanted first (each part runs while BUDGET lasts):
# the host-bound 8B QLoRA job at 1 × 1,664 (host_speed.py's 8b-mb1, fused LoRA linears
# grouped, direct dequantization) under the host probe (memcpy callers, the Python line and
# thread behind each read of a GPU value); benchmarks/memcpy_probe.py (each part of the step
# alone, also as the launch runs it: fp32 adapters under autocast); the GPU-bound default
# QLoRA plan (kernels_speed.py's qlora-auto) beside Unsloth packed; that plan once more under
# the probe (where its GPU time goes); then the host-bound job with bitsandbytes'
# dequantize_4bit (ZEROPLAN_DIRECT_DEQUANT=0), as the issue measured it (8b-mb1-today, the
# before/ tree at 76691e3), each linear alone (ZEROPLAN_LORA_GROUP=0), and the GPU-bound plan
# alone. Staged by benchmarks/host_stage.sh as .stage-host/ (keep before/ at 76691e3):
#
#   run(command="bash .stage-host/repo/benchmarks/lora_group_ab.sh",
#       carry=[".stage-host", ".stage-unsloth"])
#
# BUDGET (seconds for everything, 480 by default) may be set. Writes $OUT/all_ab.tgz.
T0=$(date +%s)
BUDGET=${BUDGET:-480}
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/benchmarks/gpu_parts.sh"
one g1a 8b-mb1 1
# each part of the step alone, as the QLoRA launch runs it too (fp32 adapters under
# autocast): copies, syncs and the host's reads of GPU values (g1a unpacked the packages)
( cd "$REPO" && PYTHONPATH=$REPO:/tmp/s-zp timeout 90 python3 benchmarks/memcpy_probe.py \
    --out "$OUT/memcpy_probe.jsonl" > "$OUT/memcpy_probe.out" 2>&1; echo "memcpy_probe rc=$?" )
# beside Unsloth packed (4-bit) on this machine: the ratio the issue asks (≥ 1.5×)
gpu_bound kg1 1 18 60 150 RUNS=qlora-auto,unsloth-packed
# where the GPU-bound step's time goes: the grouped run again, 10 steps, under the host
# probe (kernels by kind, the top kernels, the memcpy callers); not timed
gpu_bound kgp 1 10 55 70 PYTHONPATH="$REPO/benchmarks/host_probe" \
  ZEROPLAN_HOST_PROBE="$OUT/probe-kgp.json" ZEROPLAN_HOST_PROBE_STEPS=6
# the same with bitsandbytes' own dequantize_4bit (launch/dequant.py off): what the direct
# calls save where the host sets the pace
one g1n 8b-mb1 1 ZEROPLAN_DIRECT_DEQUANT=0
# then what was measured before (host6_h100): the issue's tree, each linear alone, GPU-bound alone
one today 8b-mb1-today 1
one g0a 8b-mb1 0
gpu_bound kg0 0 18 60 75
python3 "$REPO/benchmarks/probe_summary.py" "$OUT"/*.jsonl "$OUT"/probe-*.json
pack all_ab
