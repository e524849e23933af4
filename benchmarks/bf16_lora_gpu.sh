#!/bin/bash
# Issue 26 on one GPU machine in one call: the default 8B bf16 LoRA plan on one GPU, which
# now runs without DeepSpeed (fp32 adapters under autocast on the fused LoRA linears, priced
# as DeepSpeed bf16's step; torch's fused AdamW) beside Unsloth packed in 16-bit, the same
# plan under DeepSpeed ZeRO-0 (the plan's family before), then the default QLoRA plan beside
# Unsloth packed in 4-bit, and, while time is left, the host-bound 8B QLoRA job at
# 1 × 1,664 (the host's pace beside it, applied.json's host_pace at 301616a-5bfe76b). Staged by
# benchmarks/host_stage.sh and benchmarks/unsloth_stage.sh:
#
#   run(command="bash .stage-host/repo/benchmarks/bf16_lora_gpu.sh",
#       carry=[".stage-host", ".stage-unsloth"])
#
# BUDGET (seconds for everything, 570 by default), RUNS and PROBE may be set. Writes $OUT/bf16_lora.tgz.
T0=$(date +%s)
BUDGET=${BUDGET:-570}
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/benchmarks/gpu_parts.sh"
gpu_bound kl1 1 20 80 300 \
  RUNS="${RUNS:-auto,unsloth-packed-bf16,auto-zero0,qlora-auto,unsloth-packed}"
# PROBE=1: the bf16 LoRA plan once more under the host probe (where its GPU time goes, what
# launched its copy kernels: copy_kernel_callers), 10 steps, not timed
[ "${PROBE:-0}" = 1 ] && gpu_bound kbp 1 10 55 70 RUNS=auto \
  PYTHONPATH="$REPO/benchmarks/host_probe" ZEROPLAN_HOST_PROBE="$OUT/probe-kbp.json" \
  ZEROPLAN_HOST_PROBE_STEPS=6 && python3 "$REPO/benchmarks/probe_summary.py" "$OUT"/probe-kbp.json
one p3 8b-mb1 1
pack bf16_lora
