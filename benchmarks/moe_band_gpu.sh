#!/bin/bash
# Issue 29's MoE speed band, checked on launched runs it was not derived from: one call of
# at most 240 s. A 24-layer Qwen3-30B-A3B cut (attention LoRA, and all-linear with
# checkpointing: its bank copies do not fit 80 GB without) and a 4-layer Mixtral-8x7B cut
# (attention and all-linear), each through `zeroplan launch` on variable-length packed
# records, 14 steps (11 timed after 3 warm-up). Staged by benchmarks/moe_band_stage.sh as
# /work/main/.stage-moeband/ (this tree in repo/, the launches' packages in site-zp.tar.gz):
#
#   run(command="bash .stage-moeband/run_gpu.sh", carry=[".stage-moeband"])
#
# Writes $OUT/moe_band_env.txt, $OUT/launch_moe4.jsonl (one row per run: peak against the
# plan, tokens/s against the plan's, losses, GPU and versions) and $OUT/launch_moe4.log.
# Every part runs under a timeout; the Qwen3 cut's 28 GB of weights are deleted before the
# Mixtral cut is built. STEPS, DEADLINE (seconds for both launch drivers) and EXTRA (more
# launch_gpu_check.py options, e.g. --tiny for the CPU's rehearsal) may be set before it.
S=$(cd "$(dirname "$0")" && pwd)
[ -d "$S/repo" ] || S=$(cd "$S/../.." && pwd)/.stage-moeband
STEPS=${STEPS:-14}
DEADLINE=${DEADLINE:-225}
# the models' weights in memory where /dev/shm holds them (45 GB free): the 16-layer cut
# took 44 s to save to disk in an earlier call, most of it writing
if [ -z "${WORK:-}" ]; then
  shm=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)
  if [ "${shm:-0}" -gt 47185920 ]; then WORK=/dev/shm/moeband; else WORK=/tmp/moeband; fi
fi
trap 'rm -rf "$WORK"' EXIT  # nothing of it stays on the machine for the calls after
began=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - began))); }
# SITE=none: the packages of the python that runs it (the CPU's rehearsal: site-zp is the
# GPU image's python 3.12)
SITE=${SITE:-/tmp/s-zp-moeband}
if [ "$SITE" != none ]; then
  mkdir -p "$SITE" && timeout 60 tar xzf "$S/site-zp.tar.gz" -C "$SITE" || exit 1
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version;
  df -h /tmp /dev/shm | tail -2; echo "work: $WORK"; } > "$OUT/moe_band_env.txt" 2>&1
cat "$OUT/moe_band_env.txt"
cd "$S/repo" || exit 1
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ "$SITE" = none ] || PYTHONPATH=$PWD:$SITE${PYTHONPATH#"$PWD"}
export PYTHONPATH PYTHONUNBUFFERED=1
echo "PYTHONPATH=$PYTHONPATH"
set -o pipefail
# the deeper cut first (the unseen depth), 50 s kept for Mixtral's build and attention run
L=$(($(left) - 50))
timeout -k 5 $((L + 10)) python3 benchmarks/launch_gpu_check.py --work "$WORK/q24" \
  --out "$OUT/launch_moe4.jsonl" --arch Qwen--Qwen3-30B-A3B --layers 24 \
  --runs moe-attn,moe-all-ckpt --steps "$STEPS" --timeout 70 --deadline "$L" $EXTRA 2>&1 \
  | grep -v -e Warning -e "it/s]" | tee "$OUT/launch_moe4.log"
rm -rf "$WORK/q24"
L=$(($(left) - 3))
[ "$L" -gt 30 ] || { echo "no time left for Mixtral ($L s)" | tee -a "$OUT/launch_moe4.log"; exit 0; }
timeout -k 5 $((L + 5)) python3 benchmarks/launch_gpu_check.py --work "$WORK/m4" \
  --out "$OUT/launch_moe4.jsonl" --arch mistralai--Mixtral-8x7B-v0.1 --layers 4 \
  --runs moe-attn,moe-all --steps "$STEPS" --timeout 40 --deadline "$L" $EXTRA 2>&1 \
  | grep -v -e Warning -e "it/s]" | tee -a "$OUT/launch_moe4.log"
rm -rf "$WORK/m4"
echo "moe_band_gpu.sh: $(($(date +%s) - began)) s" | tee -a "$OUT/launch_moe4.log"
