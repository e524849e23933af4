#!/bin/bash
# The parts the one-call GPU drivers (lora_group_ab.sh, copies_gpu.sh, bf16_lora_gpu.sh)
# are made of, sourced by them; each part runs only while the call's BUDGET lasts (T0 and
# BUDGET set before):
#   one TAG RUNS GROUP [VAR=VALUE ...]       a host_speed.py run (host_gpu.sh) on the 8B
#                                            model an earlier part built, if one did
#   gpu_bound NAME GROUP STEPS ESTIMATE NEED [VAR=VALUE ...]
#                                            kernels_speed.py's RUNS (qlora-auto unless set)
#                                            through fused_lora_gpu.sh, NEED seconds left
#   pack NAME                                everything under $OUT into $OUT/NAME.tgz: the
#                                            device tool brings back only a few files a call
# REPO is the staged tree (.stage-host/repo); the working tree two levels up holds
# .stage-unsloth.
left() { echo $((BUDGET - $(date +%s) + T0)); }
# the 8B model an earlier part built, by host_speed.py (/tmp/h-TAG/model-8b) or by
# kernels_speed.py (/tmp/k/model), resolved; nothing where none was built yet
built_8b() {
  local d
  for d in /tmp/h-*/model-8b /tmp/k/model; do
    [ -e "$d/config.json" ] && { readlink -f "$d"; return; }
  done
}
one() {
  local tag=$1 runs=$2 group=$3; shift 3
  mkdir -p "/tmp/h-$tag"
  local built; built=$(built_8b)
  [ -n "$built" ] && [ ! -e "/tmp/h-$tag/model-8b" ] && ln -sfn "$built" "/tmp/h-$tag/model-8b"
  local L; L=$(left); [ "$L" -gt 80 ] || { echo "$tag: skipped, $L s left"; return; }
  ( export ZEROPLAN_LORA_GROUP=$group RUNS=$runs DEADLINE=$((L - 20)) TAG=$tag
    [ $# -eq 0 ] || export "$@"
    timeout $((L - 5)) bash "$REPO/benchmarks/host_gpu.sh" > "$OUT/$tag.out" 2>&1
    echo "$tag rc=$? at $(( $(date +%s) - T0 )) s" )
  grep '"run"' "$OUT/$tag.log" | cut -c1-200
}
gpu_bound() {
  local name=$1 g=$2 steps=$3 estimate=$4 need=$5; shift 5
  local L; L=$(left); [ "$L" -gt "$need" ] || { echo "$name: skipped, $L s left"; return; }
  # an 8B model built before (else kernels_speed.py builds its own)
  local built; built=$(built_8b)
  mkdir -p /tmp/k && [ -n "$built" ] && [ ! -e /tmp/k/model ] && ln -sfn "$built" /tmp/k/model
  # from the staged tree, as one() runs: the working tree may hold edits not staged
  ( cd "$REPO" && export STAGE="$REPO/../../.stage-unsloth" \
      ZEROPLAN_LORA_GROUP=$g RUNS=qlora-auto NAME=$name LINEAR=0 \
      DEADLINE=$((L - 15)) EXTRA="--steps $steps --run-estimate $estimate"
    [ $# -eq 0 ] || export "$@"
    timeout $((L - 5)) bash benchmarks/fused_lora_gpu.sh > "$OUT/$name.out" 2>&1
    echo "$name rc=$? at $(( $(date +%s) - T0 )) s" )
  grep '"run"' "$OUT/$name.log" | cut -c1-200
}
pack() {
  ( cd "$OUT" && tar czf "$1.tgz" --exclude "$1.tgz" ./* && find . -type f ! -name "$1.tgz" -delete
    ls -la "$OUT" )
}
