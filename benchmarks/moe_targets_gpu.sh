#!/bin/bash
# Issue 29: launches of the MoE target sets the plan offers that nothing had launched, in
# one call of at most 420 s on one H100 80GB or one H200 (each plan is made on the card
# that runs). In order of value, each skipped when the deadline would cut it:
#   1. Mixtral-8x7B, 4-layer cut: all-linear LoRA, dropout 0 (moe-all: fits without
#      checkpointing, 27.4 GiB planned)
#   2. Qwen3-30B-A3B, 8-layer cut: QLoRA on attention (moe-qlora-attn; banks stay bf16)
#   3. the same cut: attention + router, dropout 0 (moe-attn-router)
#   4. the same cut: a host-bound step, micro-batch 1 × 1024 (moe-host, 40 steps)
#   5. Mixtral-8x7B again (rebuilt): QLoRA on attention and attention + router
# Each through `zeroplan launch` on variable-length alpaca records (packed), 16 steps (13
# timed after 3 warm-up). Staged by benchmarks/moe_targets_stage.sh as
# /work/main/.stage-moe5/ (this tree in repo/, the launches' packages in site-zp.tar.gz):
#
#   run(command="bash .stage-moe5/run_gpu.sh", carry=[".stage-moe5"], timeout_s=450)
#
# Writes to $OUT: moe_targets_env.txt, $TAG.jsonl (launch_moe5.jsonl: one row per run: peak against the
# plan, tokens/s against the plan's and its band, losses, GPU, driver and versions),
# $TAG.log, and metrics_<cut>.tar.gz (each run's metrics.jsonl, plan and applied.json).
# Every part runs under a timeout; each cut's weights are deleted before the next is built.
# STEPS, DEADLINE (seconds for everything after unpacking), EXTRA (more
# launch_gpu_check.py options, e.g. --tiny for the CPU's rehearsal with SITE=none), CUTS
# (other launches, below), TAG (the output files' name) and STAGE (the staged folder) may be
# set; benchmarks/moe_band_gpu.sh is this script with its own CUTS.
S=${STAGE:-$(cd "$(dirname "$0")" && pwd)}
[ -d "$S/repo" ] || S=$(cd "$S/../.." && pwd)/.stage-moe5
TAG=${TAG:-launch_moe5}
STEPS=${STEPS:-16}
HOST_STEPS=${HOST_STEPS:-40}
DEADLINE=${DEADLINE:-390}
# the weights in memory where /dev/shm holds them (an earlier call: 16 layers took 44 s to
# save to disk); the largest cut here is Mixtral's 4 layers, about 11 GB
if [ -z "${WORK:-}" ]; then
  shm=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)
  if [ "${shm:-0}" -gt 31457280 ]; then WORK=/dev/shm/moe5; else WORK=/tmp/moe5; fi
fi
trap 'rm -rf "$WORK"' EXIT  # nothing of it stays on the machine for the calls after
began=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - began))); }
SITE=${SITE:-/tmp/s-zp-moe5}
if [ "$SITE" != none ]; then
  mkdir -p "$SITE" && timeout 60 tar xzf "$S/site-zp.tar.gz" -C "$SITE" || exit 1
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version;
  df -h /tmp /dev/shm | tail -2; echo "work: $WORK"; } > "$OUT/moe_targets_env.txt" 2>&1
cat "$OUT/moe_targets_env.txt"
cd "$S/repo" || exit 1
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ "$SITE" = none ] || PYTHONPATH=$PWD:$SITE${PYTHONPATH#"$PWD"}
export PYTHONPATH PYTHONUNBUFFERED=1
echo "PYTHONPATH=$PYTHONPATH"
set -o pipefail
LOG="$OUT/$TAG.log"
# cut TAG ARCH LAYERS RUNS RESERVE: build the cut, launch RUNS with RESERVE seconds of the
# deadline kept for what follows, keep each run's metrics, delete the cut
cut() {
  local tag=$1 arch=$2 layers=$3 runs=$4 reserve=$5
  local L=$(($(left) - reserve))
  if [ "$L" -lt 45 ]; then echo "$tag: skipped, $L s of the deadline left" | tee -a "$LOG"; return; fi
  echo "== $tag: $arch, $layers layers, $runs ($L s)" | tee -a "$LOG"
  timeout -k 5 $((L + 10)) python3 benchmarks/launch_gpu_check.py --work "$WORK/$tag" \
    --out "$OUT/$TAG.jsonl" --arch "$arch" --layers "$layers" --runs "$runs" \
    --steps "$STEPS" --timeout 90 --deadline "$L" $EXTRA 2>&1 \
    | grep -v -e Warning -e "it/s]" | tee -a "$LOG"
  (cd "$WORK/$tag" 2>/dev/null && timeout 30 tar czf "$OUT/metrics_$tag.tar.gz" \
    --ignore-failed-read ./*-plan.json ./*/metrics.jsonl ./*/applied.json 2>/dev/null)
  rm -rf "${WORK:?}/$tag"
}
# 1 first; the Qwen3 cut keeps nothing back; Mixtral's QLoRA and router runs take what is left
# CUTS="tag catalog layers runs reserve;...": other launches (a later call's blind check)
if [ -n "${CUTS:-}" ]; then
  IFS=';' read -ra cuts <<< "$CUTS"
  for c in "${cuts[@]}"; do
    # shellcheck disable=SC2086
    cut $c
  done
else
  cut m4 mistralai--Mixtral-8x7B-v0.1 4 moe-all 240
  cut q8 Qwen--Qwen3-30B-A3B 8 "moe-qlora-attn,moe-attn-router,moe-host:$HOST_STEPS" 0
  cut m4b mistralai--Mixtral-8x7B-v0.1 4 moe-qlora-attn,moe-attn-router 0
fi
echo "moe_targets_gpu.sh: $(($(date +%s) - began)) s" | tee -a "$LOG"
