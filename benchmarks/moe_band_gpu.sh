#!/bin/bash
# Issue 29's MoE speed band, checked on launched runs it was not derived from (the
# fifteenth session's call, launch_moe4_h100.jsonl): a 24-layer Qwen3-30B-A3B cut
# (attention LoRA, and all-linear with checkpointing: its bank copies do not fit 80 GB
# without) and a 4-layer Mixtral-8x7B cut (attention and all-linear), 14 steps each, through
# benchmarks/moe_targets_gpu.sh with these launches. Staged by benchmarks/moe_band_stage.sh
# as /work/main/.stage-moeband/:
#
#   run(command="bash .stage-moeband/run_gpu.sh", carry=[".stage-moeband"])
#
# Writes $OUT/launch_moe4.jsonl and .log, moe_targets_env.txt and each cut's metrics.
S=$(cd "$(dirname "$0")" && pwd)
[ -d "$S/repo" ] || S=$(cd "$S/../.." && pwd)/.stage-moeband
export STAGE=$S TAG=launch_moe4 STEPS=${STEPS:-14} DEADLINE=${DEADLINE:-225}
export CUTS="q24 Qwen--Qwen3-30B-A3B 24 moe-attn,moe-all-ckpt 50;m4 mistralai--Mixtral-8x7B-v0.1 4 moe-attn,moe-all 0"
exec bash "$S/repo/benchmarks/moe_targets_gpu.sh"
