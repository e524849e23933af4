#!/bin/bash
# Issue 26 on one GPU machine in one call: where the GPU-bound default plans' copy kernels
# come from (the 8B QLoRA and bf16 LoRA launches under the host probe: copy_kernel_callers),
# the host's pace that each launch timed at 301616a (applied.json's host_pace; now
# benchmarks/host_pace.py, which tabulates it from the run folders) beside the host-bound 8B QLoRA job at 1 × 1,664, once first and once last, host_timing.py
# again (its variants now in turn), and a host-bound 1B LoRA at 1 × 1,664 on the fused LoRA
# linears and on PEFT's (the fused share the plan now takes from host_timing_h100.jsonl).
# Staged by benchmarks/host_stage.sh and benchmarks/unsloth_stage.sh:
#
#   run(command="bash .stage-host/repo/benchmarks/copies_gpu.sh",
#       carry=[".stage-host", ".stage-unsloth"])
#
# BUDGET (seconds for everything, 560 by default) may be set. Writes $OUT/copies.tgz.
T0=$(date +%s)
BUDGET=${BUDGET:-560}
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/benchmarks/gpu_parts.sh"
PROBE=$REPO/benchmarks/host_probe
one p1 8b-mb1 1
gpu_bound kqp 1 10 55 70 PYTHONPATH="$PROBE" ZEROPLAN_HOST_PROBE="$OUT/probe-kqp.json" \
  ZEROPLAN_HOST_PROBE_STEPS=6
gpu_bound kbp 1 10 55 70 RUNS=auto PYTHONPATH="$PROBE" ZEROPLAN_HOST_PROBE="$OUT/probe-kbp.json" \
  ZEROPLAN_HOST_PROBE_STEPS=6
[ "$(left)" -gt 150 ] && ( cd "$REPO" && PYTHONPATH=$REPO:/tmp/s-zp timeout 90 \
  python3 benchmarks/host_timing.py --out "$OUT/host_timing.jsonl" 2>&1 | grep -v Warning | tail -8 )
one l1 1b-mb1-fused,1b-mb1-peft 1
one p2 8b-mb1 1
python3 "$REPO/benchmarks/probe_summary.py" "$OUT"/probe-*.json 2>&1 | tail -60
pack copies
