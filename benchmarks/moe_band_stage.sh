#!/bin/bash
# Stage benchmarks/moe_band_gpu.sh's call in /work/main/.stage-moeband (ignored by git; DEST
# names another), as benchmarks/moe_targets_stage.sh stages its own.
HERE=$(cd "$(dirname "$0")" && pwd)
SCRIPT=moe_band_gpu.sh DEST=${DEST:-${MAIN:-/work/main}/.stage-moeband} exec bash "$HERE/moe_targets_stage.sh"
