#!/bin/bash
# Issues 26 and 30 on the GPU: host-paced launched steps before and after, and the plan's
# choice among five measured setups, one call (benchmarks/host_speed.py). Staged by
# benchmarks/host_stage.sh as .stage-host/ (this tree in repo/, main's zeroplan in before/,
# the launches' packages in site-zp.tar.gz):
#
#   run(command="bash .stage-host/repo/benchmarks/host_gpu.sh", carry=[".stage-host"])
#
# RUNS, DEADLINE (seconds for host_speed.py) and EXTRA (more of its options) may be set
# before it. Writes
# $OUT/host_h100.jsonl, $OUT/host_h100.log, $OUT/env.txt and $OUT/host_runs.tgz (each run's
# metrics, applied.json, probe and rank log).
S=$(cd "$(dirname "$0")/../.." && pwd)
DEADLINE=${DEADLINE:-400}
mkdir -p /tmp/s-zp && tar xzf "$S/site-zp.tar.gz" -C /tmp/s-zp || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version;
  nproc; cat "$S/before/COMMIT"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
cd "$S/repo" || exit 1
export PYTHONPATH=$PWD:/tmp/s-zp PYTHONUNBUFFERED=1
set -o pipefail
python3 benchmarks/host_speed.py --work /tmp/h --out "$OUT/host_h100.jsonl" \
  --before "$S/before" --deadline "$DEADLINE" ${RUNS:+--runs "$RUNS"} $EXTRA 2>&1 | tee "$OUT/host_h100.log"
rc=$?
cd /tmp/h && tar czf "$OUT/host_runs.tgz" probe-*.json run-*/metrics.jsonl run-*/applied.json \
  run-*/result.json run-*/logs 2>/dev/null
exit $rc
