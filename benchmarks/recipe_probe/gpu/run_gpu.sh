#!/bin/bash
# As it ran (from .stage-recipes-gpu/, beside the site-*.tar.gz folders of packages that
# benchmarks/results/recipes_gpu.md lists): bash run_gpu.sh [RUNS]
# recipes-gpu: unpack the trainers' package folders, then run benchmarks/recipe_trainers.py
S=$(cd "$(dirname "$0")" && pwd)
RUNS=${1:-trl-lora,trl-qlora,lf-lora,lf-qlora,ax-lora,ax-qlora}
for t in common trl lf ax axstubs; do mkdir -p /tmp/s-$t && tar xzf $S/site-$t.tar.gz -C /tmp/s-$t; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt
python3 -c "import importlib.util as u, importlib.metadata as m
for p in ['peft','numba','wandb','triton','pyarrow','xxhash','yaml','psutil','evaluate','fastcore','requests','httpx','posthog','addict','fire','dotenv','colorama','accelerate']:
    print(p, m.version(p) if u.find_spec(p) and p not in ('yaml','dotenv') else ('present' if u.find_spec(p) else 'MISSING'))" >> $OUT/gpu.txt 2>&1
# pip would keep what the image has, except the trainers' pinned packages
python3 $S/prune_site.py /tmp/s-ax axolotl trl peft >> $OUT/gpu.txt
python3 $S/prune_site.py /tmp/s-axstubs >> $OUT/gpu.txt
cat $OUT/gpu.txt
cd $S/repo
set -o pipefail
PYTHONUNBUFFERED=1 python3 benchmarks/recipe_trainers.py --work /tmp/rt --out $OUT/recipes_gpu.jsonl \
  --runs $RUNS --records 64 --timeout ${TIMEOUT:-150} \
  --site trl=/tmp/s-trl:/tmp/s-common --site lf=/tmp/s-lf:/tmp/s-common \
  --site ax=/tmp/s-ax:/tmp/s-axstubs:/tmp/s-common 2>&1 | grep -v Warning | tee $OUT/log.txt
tar czf $OUT/runs.tgz --exclude=output --exclude=prepared -C /tmp/rt runs
