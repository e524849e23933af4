#!/bin/bash
# Issue 26 on one GPU machine in one call: q/k/v as one matrix (loralinear.LoRAStack) against
# each base its own matmul (LoRAGroup) and PEFT's layers, alone (lora_stack_speed.py), then
# the default 8B bf16 LoRA and QLoRA plans launched with it beside Unsloth packed (16-bit and
# 4-bit), the same two plans with it off (ZEROPLAN_LORA_STACK=0, the default until this
# call times it) on the same machine, and the
# host-bound 8B QLoRA job at 1 × 1,664 and the host's time per LoRA adapter while time is left. Staged by benchmarks/host_stage.sh
# and benchmarks/unsloth_stage.sh:
#
#   run(command="bash .stage-host/repo/benchmarks/stack_gpu.sh",
#       carry=[".stage-host", ".stage-unsloth"])
#
# BUDGET (seconds for everything, 560 by default) may be set. Writes $OUT/stack.tgz.
T0=$(date +%s)
BUDGET=${BUDGET:-560}
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/benchmarks/gpu_parts.sh"
mkdir -p /tmp/s-zp && tar xzf "$REPO/../../.stage-unsloth/site-zp.tar.gz" -C /tmp/s-zp
( cd "$REPO" && PYTHONPATH=$REPO:/tmp/s-zp timeout 120 python3 benchmarks/lora_stack_speed.py \
    --out "$OUT/lora_stack.jsonl" --iters 20 2>&1 | grep -v Warning | tee "$OUT/lora_stack.log"
  echo "lora_stack rc=$? at $(( $(date +%s) - T0 )) s" )
gpu_bound ks1 1 17 80 300 RUNS=auto,unsloth-packed-bf16,qlora-auto,unsloth-packed \
  ZEROPLAN_LORA_STACK=1
gpu_bound ks0 1 17 80 130 RUNS=auto,qlora-auto ZEROPLAN_LORA_STACK=0
one hs 8b-mb1 1 ZEROPLAN_LORA_STACK=1
# what a LoRA adapter asks of the host now, PEFT's and fused (hostops.FUSED_ADAPTER_HOST_US
# holds LoRAGroup's), while time is left
L=$(left); [ "$L" -gt 40 ] && ( cd "$REPO" && PYTHONPATH=$REPO:/tmp/s-zp timeout $((L - 10)) \
  python3 benchmarks/host_timing.py --out "$OUT/host_timing.jsonl" --skip-liger 2>&1 \
  | grep -v Warn | tail -4 )
pack stack
