#!/bin/bash
# Stage benchmarks/host_gpu.sh's call in /work/main/.stage-host (ignored by git; DEST names
# another): this tree (repo/), main's zeroplan package at its HEAD (before/, with COMMIT),
# and the launches' packages (site-zp.tar.gz, from .stage-unsloth: benchmarks/unsloth_stage.sh
# builds it; SITE=whl leaves it out, and host_gpu.sh installs the carried .whl/ instead).
set -e
HERE=$(cd "$(dirname "$0")/.." && pwd)
MAIN=${MAIN:-/work/main}
DEST=${DEST:-$MAIN/.stage-host}
mkdir -p "$DEST/before"
rm -rf "$DEST/repo" && mkdir -p "$DEST/repo"
# the tree as committed plus what is not yet (no .git, no results: they stay here)
git -C "$HERE" ls-files -co --exclude-standard | grep -v '^benchmarks/results/' \
  | tar -c -C "$HERE" -T - | tar -x -C "$DEST/repo"
rm -rf "$DEST/before/zeroplan"
git -C "$MAIN" archive HEAD zeroplan | tar -x -C "$DEST/before"
git -C "$MAIN" rev-parse HEAD > "$DEST/before/COMMIT"
if [ "${SITE:-}" = whl ]; then
  rm -f "$DEST/site-zp.tar.gz"
else
  cp "$MAIN/.stage-unsloth/site-zp.tar.gz" "$DEST/"
fi
du -sh "$DEST"
