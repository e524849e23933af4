#!/bin/bash
# Issue 26: what grouping the fused LoRA linears (loralinear.LoRAGroup) does where the host
# sets the pace, on one machine in one call: the 8B QLoRA job at 1 × 1,664 (host_speed.py's
# 8b-mb1) grouped, alone (ZEROPLAN_LORA_GROUP=0) and as the issue measured it (8b-mb1-today,
# the before/ tree at 76691e3), each with the host probe (memcpy callers included); then the
# GPU-bound default QLoRA plan grouped and alone (kernels_speed.py's qlora-auto) while time
# is left, and that run once more under the probe (where its GPU time goes). Staged by benchmarks/host_stage.sh as .stage-host/ (keep before/ at 76691e3):
#
#   run(command="bash .stage-host/repo/benchmarks/lora_group_ab.sh",
#       carry=[".stage-host", ".stage-unsloth"])
#
# BUDGET (seconds for everything, 400 by default) may be set. Writes $OUT/all_ab.tgz.
T0=$(date +%s)
BUDGET=${BUDGET:-400}
REPO=$(cd "$(dirname "$0")/.." && pwd)
left() { echo $((BUDGET - $(date +%s) + T0)); }
one() {  # TAG RUNS GROUP: one host_speed.py run, the first one's 8B model shared
  mkdir -p /tmp/h-$1
  [ "$1" != g1a ] && [ -e /tmp/h-g1a/model-8b ] && ln -sfn /tmp/h-g1a/model-8b /tmp/h-$1/model-8b
  local L; L=$(left); [ "$L" -gt 80 ] || { echo "$1: skipped, $L s left"; return; }
  ( export ZEROPLAN_LORA_GROUP=$3 RUNS=$2 DEADLINE=$((L - 20)) TAG=$1
    timeout $((L - 5)) bash "$REPO/benchmarks/host_gpu.sh" > "$OUT/$1.out" 2>&1
    echo "$1 rc=$? at $(( $(date +%s) - T0 )) s" )
  grep '"run"' "$OUT/$1.log" | cut -c1-200
}
one g1a 8b-mb1 1
one g0a 8b-mb1 0
one today 8b-mb1-today 1
mkdir -p /tmp/k && ln -sfn /tmp/h-g1a/model-8b /tmp/k/model
for g in 1 0; do
  L=$(left); [ "$L" -gt 75 ] || { echo "kg$g: skipped, $L s left"; continue; }
  ( cd "$REPO/../.." && export ZEROPLAN_LORA_GROUP=$g RUNS=qlora-auto NAME=kg$g \
      DEADLINE=$((L - 15)) LINEAR=0 EXTRA="--steps 18 --run-estimate 60"
    timeout $((L - 5)) bash benchmarks/fused_lora_gpu.sh > "$OUT/kg$g.out" 2>&1
    echo "kg$g rc=$? at $(( $(date +%s) - T0 )) s" )
  grep '"run"' "$OUT/kg$g.log" | cut -c1-200
done
# where the GPU-bound step's time goes: the grouped qlora-auto run again, 10 steps, under
# the host probe (kernels by kind, the top kernels, the memcpy callers); not timed
L=$(left)
if [ "$L" -gt 70 ]; then
  ( cd "$REPO/../.." && export ZEROPLAN_LORA_GROUP=1 RUNS=qlora-auto NAME=kgp LINEAR=0 \
      DEADLINE=$((L - 15)) EXTRA="--steps 10 --run-estimate 55" \
      PYTHONPATH=$REPO/benchmarks/host_probe ZEROPLAN_HOST_PROBE=$OUT/probe-kgp.json \
      ZEROPLAN_HOST_PROBE_STEPS=6
    timeout $((L - 5)) bash benchmarks/fused_lora_gpu.sh > "$OUT/kgp.out" 2>&1
    echo "kgp rc=$? at $(( $(date +%s) - T0 )) s" )
else echo "kgp: skipped, $L s left"; fi
python3 "$REPO/benchmarks/probe_summary.py" "$OUT"/*.jsonl "$OUT"/probe-*.json
cd "$OUT" && tar czf all_ab.tgz ./* && find . -type f ! -name all_ab.tgz -delete
ls -la "$OUT"
