"""Delete from a site folder the top-level packages the image's python already imports,
except those named on the command line (the trainer's pinned ones): pip, given the image's
packages, would keep them too."""

import importlib.util
import shutil
import sys
from pathlib import Path

site, keep = Path(sys.argv[1]), set(sys.argv[2:])
for p in sorted(site.iterdir()):
    if not p.is_dir() or p.name.endswith((".dist-info", ".data")) or p.name in keep:
        continue
    if importlib.util.find_spec(p.name) is not None:
        shutil.rmtree(p)
        for d in site.glob(p.name.replace("-", "_") + "-*.dist-info"):
            shutil.rmtree(d)
        print("pruned (image has it):", p.name)
