#!/bin/bash
# Issue 26 on the GPU: Unsloth beside zeroplan's QLoRA plan and TRL, same model, records and
# card, one call. Staged by benchmarks/unsloth_stage.sh as .stage-unsloth/run_gpu.sh:
#
#   run(command="bash .stage-unsloth/run_gpu.sh", carry=[".stage-unsloth"])
#
# RUNS, NAME (the JSONL's name under $OUT), DEADLINE (seconds for kernels_speed.py) and EXTRA
# (more of its options) may be set before it. Writes $OUT/NAME.jsonl, $OUT/NAME.log, $OUT/env.txt
# and $OUT/NAME_runs.tgz (each zeroplan launch's metrics, applied.json, result.json and logs).
S=$(cd "$(dirname "$0")" && pwd)
RUNS=${RUNS:-qlora-auto,unsloth-notebook,unsloth-packed,trl-users}
NAME=${NAME:-kernels4}
DEADLINE=${DEADLINE:-520}
mkdir -p /tmp/s-zp /tmp/s-unsloth
tar xzf "$S/site-zp.tar.gz" -C /tmp/s-zp && tar xzf "$S/site-unsloth.tar.gz" -C /tmp/s-unsloth || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version; } \
  > "$OUT/env.txt" 2>&1
# the image's copies where they meet Unsloth's ranges (benchmarks/unsloth_site.py)
python3 "$S/repo/benchmarks/unsloth_site.py" /tmp/s-unsloth >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
cd "$S/repo" || exit 1
export PYTHONPATH=$PWD:/tmp/s-zp${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
set -o pipefail
python3 benchmarks/kernels_speed.py --work /tmp/k --out "$OUT/$NAME.jsonl" --runs "$RUNS" \
  --no-parity --deadline "$DEADLINE" --unsloth-site /tmp/s-unsloth $EXTRA 2>&1 \
  | grep -v Warning | tee "$OUT/$NAME.log"
rc=$?
cd /tmp/k && timeout 60 tar czf "$OUT/${NAME}_runs.tgz" run-*/metrics.jsonl run-*/applied.json \
  run-*/result.json run-*/logs 2>/dev/null
exit $rc
