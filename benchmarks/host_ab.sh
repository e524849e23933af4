#!/bin/bash
# Issue 26, where the host sets the pace, on one GPU machine in one call: the host's
# microseconds of Liger's kernels and of the LoRA linears on CUDA (benchmarks/host_timing.py),
# then the host-bound 8B QLoRA job (1 × 1,664, host_speed.py) on main's tree (before/,
# 8b-mb1-main) and on this one (repo/, 8b-mb1) in turn, A B A B, so that a drift of the
# machine shows in each pair. Staged by benchmarks/host_stage.sh as .stage-host/:
#
#   run(command="bash .stage-host/repo/benchmarks/host_ab.sh", carry=[".stage-host"])
#
# PAIRS (2 by default) may be set. Writes $OUT/host_ab.tgz (each part's rows, logs and run
# folders): the device tool brings back only a few files a call.
S=$(cd "$(dirname "$0")/../.." && pwd)
R=$S/repo
mkdir -p /tmp/s-zp && tar xzf "$S/site-zp.tar.gz" -C /tmp/s-zp || exit 1
( cd "$R" && PYTHONPATH=$R:/tmp/s-zp timeout 150 python3 benchmarks/host_timing.py \
    --out "$OUT/host_timing.jsonl" 2>&1 | grep -v Warning | tail -12 )
tags=()
for i in $(seq "${PAIRS:-2}"); do tags+=("m$i 8b-mb1-main" "a$i 8b-mb1"); done
for t in "${tags[@]}"; do
  set -- $t
  mkdir -p "/tmp/h-$1"
  # the first run builds the 8B model; the others use it
  [ "$1" != m1 ] && ln -sfn /tmp/h-m1/model-8b "/tmp/h-$1/model-8b"
  ( export ZEROPLAN_LORA_GROUP=1 RUNS=$2 DEADLINE=130 TAG=$1
    timeout 150 bash "$R/benchmarks/host_gpu.sh" > "$OUT/$1.out" 2>&1; echo "$1 rc=$?" )
  grep '"run"' "$OUT/$1.log" | cut -c1-200
done
cd "$OUT" && tar czf host_ab.tgz ./* && find . -type f ! -name host_ab.tgz -delete
ls -la "$OUT"
