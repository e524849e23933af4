#!/bin/bash
# Stage Unsloth for the GPU call (issue 26, side by side): run here, on the CPU machine.
#
#   bash benchmarks/unsloth_stage.sh [DEST]     (DEST: /work/main/.stage-unsloth)
#
# The GPU image has python 3.12, torch 2.11 (CUDA 13), transformers 5.17, PEFT, accelerate,
# triton, torchvision, but no TRL, datasets, bitsandbytes, DeepSpeed or Liger. DEST gets:
#   site-unsloth.tar.gz  what `pip install unsloth` adds to that image at versions Unsloth
#                        2026.10.9 accepts (TRL <= 1.15, datasets < 5), less what training
#                        never imports: Unsloth Studio's web UI and CLI, diffusers (only its
#                        warnings are filtered), hf_transfer (downloads), torchao's tests
#   site-zp.tar.gz       the launches' stack as the earlier calls ran it (/work/main/.whl:
#                        TRL 1.16, datasets 5.2, DeepSpeed, Liger, pydantic), bitsandbytes
#                        cut to its CUDA 13 and CPU libraries
#   repo/                this tree (its benchmarks run there), run_gpu.sh (unsloth_gpu.sh)
# The call then carries [".stage-unsloth"] alone.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-/work/main/.stage-unsloth}
WHL=${WHL:-/work/main/.whl}
PIP=${PIP:-/work/venv/bin/python -m pip}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# the image is python 3.12 on x86_64 Linux: its wheels, whatever python runs pip here
PLATFORM="--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# Unsloth's and unsloth_zoo's requirements the image lacks (or has too new, fsspec; or
# perhaps too old, certifi: unsloth_gpu.sh keeps the image's where it satisfies them)
UNSLOTH_STACK="unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5
  xformers==0.0.35 torchao==0.18.0 cut_cross_entropy==25.1.1 tyro==1.0.17
  docstring-parser==0.18.0 typeguard==4.6.1 msgspec==0.23.0 structlog==26.1.0
  json5==0.17.3 nest-asyncio==1.6.0 certifi==2026.10.19.post1 fsspec==2026.2.0"

mkdir -p "$TMP/w" "$TMP/site-unsloth" "$TMP/site-zp" "$DEST"
# shellcheck disable=SC2086
$PIP download -q --no-deps $PLATFORM -d "$TMP/w" $UNSLOTH_STACK
for w in "$TMP"/w/*.whl; do unzip -q -o "$w" -d "$TMP/site-unsloth"; done
(cd "$TMP/site-unsloth" && rm -rf studio unsloth_cli test xformers/benchmarks)

for w in "$WHL"/*.whl; do
  case $w in *bitsandbytes*) continue ;; esac
  unzip -q -o "$w" -d "$TMP/site-zp"
done
# bitsandbytes' wheel carries a library per CUDA release (43 MB): keep CUDA 13's and the CPU's
unzip -q -o "$WHL"/bitsandbytes-*.whl -d "$TMP/site-zp"
find "$TMP/site-zp/bitsandbytes" -name 'libbitsandbytes_*.so' \
  ! -name 'libbitsandbytes_cuda130.so' ! -name 'libbitsandbytes_cpu.so' -delete

find "$TMP" -name __pycache__ -type d -prune -exec rm -rf {} +
tar czf "$DEST/site-unsloth.tar.gz" -C "$TMP/site-unsloth" .
tar czf "$DEST/site-zp.tar.gz" -C "$TMP/site-zp" .
rm -rf "$DEST/repo"
mkdir -p "$DEST/repo"
(cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$DEST/repo")
cp "$ROOT/benchmarks/unsloth_gpu.sh" "$DEST/run_gpu.sh"
du -sh "$DEST"/* | sed 's|^|staged: |'
du -sh "$DEST" | sed 's|^|carry: |'
