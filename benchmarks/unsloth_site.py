"""Leave the GPU image's copy of a package where it meets Unsloth's range: pip stages a
requirement the image already satisfies alone, and the staged copy may not be the one the
image's other packages expect (certifi older, fsspec newer than Unsloth accepts).

    python3 benchmarks/unsloth_site.py /tmp/s-unsloth

Prints, for each, which copy the Unsloth runs will import.
"""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet

# the requirements Unsloth 2026.10.9 pins that the image may already meet
RANGES = (("certifi", ">=2026.10.19"), ("fsspec", ">=2023.1.0,<=2026.2.0"))


def main(site: Path) -> None:
    for dist, spec in RANGES:
        try:
            have: str | None = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = None
        keep = have is None or have not in SpecifierSet(spec)
        print(f"{dist}: image {have}, Unsloth wants {spec}:", "staged copy" if keep else "image's")
        if not keep:
            shutil.rmtree(site / dist, ignore_errors=True)
            for info in site.glob(f"{dist}-*.dist-info"):
                shutil.rmtree(info)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
