#!/bin/bash
# Issues 26 and 30 on the GPU: host-paced launched steps before and after, plain and
# compiled, and the plan's choice among five measured setups, one call
# (benchmarks/host_speed.py). Staged by benchmarks/host_stage.sh as .stage-host/ (this tree
# in repo/, main's zeroplan in before/, the launches' packages in site-zp.tar.gz, or, where
# that is not staged, installed from the repo root's .whl/):
#
#   run(command="bash .stage-host/repo/benchmarks/host_gpu.sh", carry=[".stage-host"])
#
# RUNS, DEADLINE (seconds for host_speed.py), EXTRA (more of its options) and TAG (the
# output files' name, host_h100 by default) may be set before it. Writes $OUT/$TAG.jsonl,
# $OUT/$TAG.log, $OUT/$TAG_env.txt and $OUT/$TAG_runs.tgz (each run's metrics,
# applied.json, result.json, probe and rank log). Every part runs under a timeout.
S=$(cd "$(dirname "$0")/../.." && pwd)
DEADLINE=${DEADLINE:-400}
TAG=${TAG:-host_h100}
SITE=${SITE_DIR:-/tmp/s-zp}
if [ -f "$S/site-zp.tar.gz" ]; then
  mkdir -p $SITE && timeout 120 tar xzf "$S/site-zp.tar.gz" -C $SITE || exit 1
elif [ ! -d $SITE/liger_kernel ] && [ ! -f $SITE/.installed ]; then
  WHL=$(cd "$S/.." && pwd)/.whl
  timeout 180 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target $SITE "$WHL"/*.whl || exit 1
  touch $SITE/.installed
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 --version;
  nproc; cat "$S/before/COMMIT"; } > "$OUT/${TAG}_env.txt" 2>&1
cat "$OUT/${TAG}_env.txt"
cd "$S/repo" || exit 1
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1
set -o pipefail
timeout -k 10 $((${DEADLINE%.*} + 30)) python3 benchmarks/host_speed.py --work /tmp/h-$TAG \
  --out "$OUT/$TAG.jsonl" --before "$S/before" --deadline "$DEADLINE" ${RUNS:+--runs "$RUNS"} \
  $EXTRA 2>&1 | tee "$OUT/$TAG.log"
rc=$?
cd /tmp/h-$TAG && timeout 60 tar czf "$OUT/${TAG}_runs.tgz" probe-*.json run-*/metrics.jsonl \
  run-*/applied.json run-*/result.json run-*/logs 2>/dev/null
exit $rc
