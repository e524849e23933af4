#!/bin/bash
# Stage benchmarks/host_gpu.sh's call in /work/main/.stage-host (ignored by git): this tree
# (repo/), main's zeroplan package at its HEAD (before/, with COMMIT), and the launches'
# packages (site-zp.tar.gz, from .stage-unsloth: benchmarks/unsloth_stage.sh builds it).
set -e
HERE=$(cd "$(dirname "$0")/.." && pwd)
MAIN=${MAIN:-/work/main}
DEST=$MAIN/.stage-host
mkdir -p "$DEST/before"
rm -rf "$DEST/repo" && mkdir -p "$DEST/repo"
# the tree as committed plus what is not yet (no .git, no results: they stay here)
git -C "$HERE" ls-files -co --exclude-standard | grep -v '^benchmarks/results/' \
  | tar -c -C "$HERE" -T - | tar -x -C "$DEST/repo"
rm -rf "$DEST/before/zeroplan"
git -C "$MAIN" archive HEAD zeroplan | tar -x -C "$DEST/before"
git -C "$MAIN" rev-parse HEAD > "$DEST/before/COMMIT"
cp "$MAIN/.stage-unsloth/site-zp.tar.gz" "$DEST/"
du -sh "$DEST"
