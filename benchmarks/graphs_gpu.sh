#!/bin/bash
# The decoder as CUDA graphs on a GPU, one call (launch/graphs.py): the GPU half of
# tests/test_graphs.py (graphed training equals eager; a capture that cannot work falls
# back), then host_speed.py's graph runs against the same jobs eager. Staged by
# benchmarks/host_stage.sh, with pytest's packages in .stage-host/site-pytest.tar.gz (the GPU
# image has no pytest; from a venv that has it: tar czf .stage-host/site-pytest.tar.gz -C
# VENV/lib/python3.*/site-packages pytest _pytest pluggy iniconfig py.py and their dist-info):
#
#   run(command="bash .stage-host/repo/benchmarks/graphs_gpu.sh", carry=[".stage-host"])
#
# Writes $OUT/graphs_pytest.log and what host_gpu.sh writes under TAG (graphs_h100 unless set).
S=$(cd "$(dirname "$0")/../.." && pwd)
SITE=${SITE_DIR:-/tmp/s-zp}
mkdir -p $SITE
timeout 120 tar xzf "$S/site-zp.tar.gz" -C $SITE || exit 1
timeout 60 tar xzf "$S/site-pytest.tar.gz" -C $SITE || exit 1
(cd "$S/repo" && PYTHONPATH=$PWD:$PWD/tests:$SITE timeout -k 5 ${PYTEST_S:-150} \
  python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -40) \
  | tee "$OUT/graphs_pytest.log"
export TAG=${TAG:-graphs_h100}
export RUNS=${RUNS:-8b-mb1,8b-mb1-graphs,1b-mb1-fused,1b-mb1-graphs,8b-lora-graphs,8b-lora,1b-mb4-graphs,1b-mb4}
export DEADLINE=${DEADLINE:-400}
exec bash "$S/repo/benchmarks/host_gpu.sh"
