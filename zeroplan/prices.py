"""Typical on-demand cloud prices per GPU-hour, so that a plan can show a cost unasked.

One dated table, keyed by the GPU catalog's canonical names. A figure is what one GPU of
that kind typically costs on demand (no commitment, no spot) in November 2026: the middle of
the range between the GPU clouds (Lambda, RunPod, CoreWeave and the like, lower) and the
hyperscalers (AWS, GCP, Azure, higher), in US dollars, per GPU (an 8-GPU instance's price
divided by 8). Prices move by tens of percent in a year and differ by region: the table is
a starting point for "what would this cost", never a quote, and ``zeroplan plan`` says so
next to every cost it prints. ``--price-per-gpu-hour`` replaces it.

GPUs absent from the table (consumer cards other than the RTX 3090/4090/5090, which the
community clouds rent; the H20; the V100's PCIe boards) get no default cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

PRICES_DATED = "2026-11"
TYPICAL_LABEL = f"typical on-demand price, dated {PRICES_DATED}"

# USD per GPU-hour, on demand. Reference points (per GPU): AWS g4dn.xlarge (T4) 0.53,
# g5.xlarge (A10G) 1.01, g6.xlarge (L4) 0.80, p3.2xlarge (V100 16 GB) 3.06, p3dn (V100
# 32 GB) 3.90; GPU clouds list H100 SXM at 2-3.5, A100 80 GB at 1.3-2, GH200 at 1.5-2.
TYPICAL_PRICE_PER_GPU_HOUR: Mapping[str, float] = MappingProxyType(
    {
        "RTX-3090": 0.25,
        "RTX-4090": 0.40,
        "RTX-5090": 0.70,
        "RTX-A6000": 0.50,
        "RTX-6000-Ada": 0.80,
        "RTX-PRO-6000": 1.50,
        "T4": 0.50,
        "V100-SXM2-16GB": 2.50,
        "V100-SXM2-32GB": 3.20,
        "A10": 0.75,
        "A10G": 1.00,
        "A40": 0.45,
        "L4": 0.75,
        "L40": 1.00,
        "L40S": 1.30,
        "A100-SXM-40GB": 1.40,
        "A100-SXM-80GB": 1.80,
        "A100-PCIE-40GB": 1.30,
        "A100-PCIE-80GB": 1.60,
        "H100-SXM-80GB": 3.00,
        "H100-PCIE-80GB": 2.50,
        "H100-NVL": 2.80,
        "GH200-96GB": 1.80,
        "H200-SXM-141GB": 3.80,
        "B200-SXM-180GB": 5.50,
    }
)


@dataclass(frozen=True)
class GPUPrice:
    """A price per GPU-hour and where it came from (shown next to every cost)."""

    per_gpu_hour: float
    source: str


def typical_price(gpu_name: str) -> GPUPrice | None:
    """The table's price for a catalog GPU, or None when the table has none."""
    price = TYPICAL_PRICE_PER_GPU_HOUR.get(gpu_name)
    return None if price is None else GPUPrice(price, TYPICAL_LABEL)
