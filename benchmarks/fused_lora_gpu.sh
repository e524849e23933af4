#!/bin/bash
# Issue 26, third step, on the GPU (one call): the fused LoRA linears alone
# (benchmarks/lora_linear_speed.py), then the default 8B QLoRA and bf16 LoRA launches on
# them beside Unsloth packed and their PEFT-layer twins (benchmarks/kernels_speed.py), same
# model, records and card. Run from the repo root with the launches' packages carried:
#
#   run(command="bash benchmarks/fused_lora_gpu.sh", carry=[".stage-unsloth"])
#
# (.stage-unsloth: site-zp.tar.gz and site-unsloth.tar.gz, benchmarks/unsloth_stage.sh.)
# RUNS, NAME, DEADLINE (seconds for kernels_speed.py) and EXTRA may be set before it;
# LINEAR=0 leaves out lora_linear_speed.py.
# Writes $OUT/lora_linear.jsonl, $OUT/$NAME.jsonl, $OUT/$NAME.log and $OUT/env.txt.
S=${STAGE:-.stage-unsloth}
RUNS=${RUNS:-qlora-auto,unsloth-packed,auto,qlora-auto-peft,auto-peft}
NAME=${NAME:-kernels5}
DEADLINE=${DEADLINE:-470}
mkdir -p /tmp/s-zp /tmp/s-unsloth
tar xzf "$S/site-zp.tar.gz" -C /tmp/s-zp && tar xzf "$S/site-unsloth.tar.gz" -C /tmp/s-unsloth || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version;
  git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
# the image's copies where they meet Unsloth's ranges (benchmarks/unsloth_site.py)
python3 benchmarks/unsloth_site.py /tmp/s-unsloth >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
export PYTHONPATH=$PWD:/tmp/s-zp${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
set -o pipefail
[ "${LINEAR:-1}" = 0 ] || timeout 120 python3 benchmarks/lora_linear_speed.py --out "$OUT/lora_linear.jsonl" --setups bf16,4bit --iters 10 2>&1 \
  | grep -v Warning | tee "$OUT/lora_linear.log"
timeout -k 10 $((DEADLINE + 30)) python3 benchmarks/kernels_speed.py --work /tmp/k \
  --out "$OUT/$NAME.jsonl" --runs "$RUNS" --no-parity --deadline "$DEADLINE" \
  --unsloth-site /tmp/s-unsloth $EXTRA 2>&1 | grep -v Warning | tee "$OUT/$NAME.log"
