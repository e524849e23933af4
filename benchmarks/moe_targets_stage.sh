#!/bin/bash
# Stage benchmarks/moe_targets_gpu.sh's call in /work/main/.stage-moe5 (ignored by git; DEST
# names another, SCRIPT another benchmarks/ script as its run_gpu.sh): this tree (repo/,
# without results), run_gpu.sh, and the launches' packages (site-zp.tar.gz, from
# .stage-unsloth: benchmarks/unsloth_stage.sh builds it).
set -e
HERE=$(cd "$(dirname "$0")/.." && pwd)
MAIN=${MAIN:-/work/main}
DEST=${DEST:-$MAIN/.stage-moe5}
rm -rf "$DEST/repo" && mkdir -p "$DEST/repo"
git -C "$HERE" ls-files -co --exclude-standard | grep -v '^benchmarks/results/' \
  | tar -c -C "$HERE" -T - | tar -x -C "$DEST/repo"
cp "$HERE/benchmarks/${SCRIPT:-moe_targets_gpu.sh}" "$DEST/run_gpu.sh"
cp "$MAIN/.stage-unsloth/site-zp.tar.gz" "$DEST/"
du -sh "$DEST"
