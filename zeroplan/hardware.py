"""GPUs, clusters, and how zeroplan learns about them.

Three ways in:

* ``parse_cluster("2x8xH100")`` — a spec typed by a user: ``[NODES x] [GPUS_PER_NODE x] GPU``.
* ``parse_hostfile(path, gpu)`` — a DeepSpeed hostfile (``hostname slots=N`` per line).
* ``local_cluster()`` — the GPUs on this machine, read through NVML (``nvidia-ml-py``).

Every number in ``GPU_CATALOG`` carries its source next to it. Conventions:

* ``memory_bytes`` is the total the CUDA driver reports (``nvidia-smi`` "MiB" × 2**20), not the
  marketing figure: an "80 GB" H100 reports 81559 MiB = 79.6 GiB, and planning against 80 GiB
  would over-promise by ~0.4 GiB per GPU.
* ``bf16_tflops`` is the dense (no 2:4 sparsity) BF16 tensor-core peak with FP32 accumulate,
  which is what mixed-precision training uses. Datasheets quote the sparse figure with an
  asterisk; we halve it. ``fp16_tflops`` is the same for FP16 inputs (FP32 accumulate); on
  every card with BF16 the two are equal. Cards before Ampere (T4, V100, RTX 20xx) have no
  BF16 at all: ``bf16`` is False and ``bf16_tflops`` is 0; a setup there defaults to fp16
  mixed precision (``TrainSetup.precision``; memory in ``memory/precision.py``).
* GeForce boards (RTX 30xx/40xx/50xx) run FP32-accumulate at half their FP16-accumulate
  rate; the whitepapers list both, we take the FP32-accumulate column.
* ``link_bandwidth_gbs`` is per GPU, one direction, to its peers. NVLink datasheets quote the
  bidirectional total (e.g. 900 GB/s for H100), so we halve it. PCIe is the effective rate of a
  x16 link after protocol overhead, see ``PCIE_EFFECTIVE_GBS``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from zeroplan.errors import BadClusterSpecError, BadLinkOptionError, UnknownGPUError
from zeroplan.wholenumbers import whole_number

__all__ = [
    "DEFAULT_CPU_CORES_PER_GPU",
    "GPU",
    "GPU_CATALOG",
    "MAX_GPUS_PER_NODE",
    "MAX_NODES",
    "PCIE_EFFECTIVE_GBS",
    "Cluster",
    "Interconnect",
    "get_gpu",
    "gpu_from_nvml_name",
    "known_gpu_names",
    "local_cluster",
    "parse_cluster",
    "parse_hostfile",
    "read_hostfile",
    "threads_per_rank",
    "usable_cpu_cores",
    "with_links",
]

Interconnect = Literal["nvlink", "pcie"]

MIB = 2**20
GIB = 2**30

# Effective one-direction bandwidth of a PCIe x16 link, GB/s. Raw rate per direction is
# lanes × GT/s × 128/130 / 8: gen3 15.8, gen4 31.5, gen5 63.0 GB/s. TLP/DLLP overhead and
# DMA engine limits leave ~80% in practice (cudaMemcpy / nccl-tests busbw on real boxes),
# so plan with the derated figure rather than the raw one.
PCIE_EFFECTIVE_GBS: Mapping[int, float] = MappingProxyType({3: 12.0, 4: 25.0, 5: 50.0})

# Used for GPUs NVML reports that the catalog does not know. Deliberately below every catalog
# entry (slowest: RTX 3080 at 59.5 TFLOPS, L4 at 300 GB/s) so that time estimates err long
# rather than promise a speed the card may not have; ``GPU.known`` is False so reports can say
# so.
UNKNOWN_GPU_BF16_TFLOPS = 50.0
UNKNOWN_GPU_MEMORY_BANDWIDTH_GBS = 250.0
UNKNOWN_GPU_PCIE_GEN = 4
# A T4's: few SMs make a row loop long, so an unknown card's norms err long as its speeds do.
UNKNOWN_GPU_MULTIPROCESSORS = 40


@dataclass(frozen=True)
class GPU:
    """One GPU model.

    Attributes:
        name: canonical name, e.g. ``"H100-SXM-80GB"``; also accepted by ``parse_cluster``.
        memory_bytes: total device memory as the driver reports it (nvidia-smi MiB × 2**20).
        bf16_tflops: dense BF16 tensor-core peak, FP32 accumulate, no sparsity; 0 when the
            card has no BF16 (``bf16`` False).
        fp16_tflops: dense FP16 tensor-core peak, FP32 accumulate, no sparsity.
        memory_bandwidth_gbs: HBM/GDDR bandwidth, GB/s (10**9 bytes/s).
        interconnect: ``"nvlink"`` when GPUs of a node talk over NVLink/NVSwitch, else ``"pcie"``.
        p2p: whether CUDA peer-to-peer works between two such GPUs in one node. Without it NCCL
            stages every transfer through host memory, which planners should treat as a
            slower link than ``link_bandwidth_gbs`` says.
        link_bandwidth_gbs: per-GPU one-direction bandwidth to peers in the node, GB/s.
        pcie_gen: PCIe generation of the host link (bounds CPU offload traffic).
        known: False for a GPU built from NVML data alone; its speeds are placeholders.
        bf16: whether the card computes in BF16 (Ampere and later). Without it training runs
            fp16 mixed precision (the default precision there; bf16 is refused).
        multiprocessors: streaming multiprocessors (the architecture whitepaper's SM count
            for the board): kernels that start one program per SM and loop over their rows
            take ⌈rows / SMs⌉ turns (speed.liger_norm_seconds).
    """

    name: str
    memory_bytes: int
    bf16_tflops: float
    fp16_tflops: float
    memory_bandwidth_gbs: float
    interconnect: Interconnect
    p2p: bool
    link_bandwidth_gbs: float
    pcie_gen: int
    known: bool = True
    bf16: bool = True
    multiprocessors: int = UNKNOWN_GPU_MULTIPROCESSORS

    def __post_init__(self) -> None:
        # A catalog typo (e.g. a bandwidth of 0) would otherwise surface as a division by
        # zero deep inside a time estimate; these are programming errors, hence ValueError.
        if not self.name:
            raise ValueError("GPU.name must not be empty")
        if self.memory_bytes <= 0:
            raise ValueError(f"GPU {self.name}: memory_bytes must be positive")
        for field_name in ("fp16_tflops", "memory_bandwidth_gbs", "link_bandwidth_gbs"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"GPU {self.name}: {field_name} must be positive")
        if self.bf16 and self.bf16_tflops <= 0:
            raise ValueError(f"GPU {self.name}: bf16_tflops must be positive")
        if not self.bf16 and self.bf16_tflops != 0:
            raise ValueError(f"GPU {self.name}: bf16_tflops must be 0 for a card without BF16")
        if self.interconnect not in ("nvlink", "pcie"):
            raise ValueError(f"GPU {self.name}: interconnect must be 'nvlink' or 'pcie'")
        if self.multiprocessors <= 0:
            raise ValueError(f"GPU {self.name}: multiprocessors must be positive")

    @property
    def tensor_tflops(self) -> float:
        """The peak of the card's default precision: BF16's, or FP16's on a card without
        BF16, where training runs fp16 mixed precision (``speed.peak_tflops`` picks by the
        setup's precision)."""
        return self.bf16_tflops if self.bf16 else self.fp16_tflops

    @property
    def memory_gib(self) -> float:
        """Total memory in GiB (2**30 bytes), the unit PyTorch's memory reports use."""
        return self.memory_bytes / GIB


def _mib(n: int) -> int:
    return n * MIB


_CATALOG_ENTRIES: tuple[GPU, ...] = (
    GPU(
        name="RTX-3080",
        # 10240 MiB: nvidia-smi on a GeForce RTX 3080 (10 GB board; the 12 GB board is not
        # this entry, local_cluster() takes NVML's figure anyway).
        memory_bytes=_mib(10240),
        # Ampere GA102 whitepaper, RTX 3080 column: FP16 tensor with FP32 accumulate 59.5
        # dense (119 with FP16 accumulate); BF16 runs at the same rate.
        bf16_tflops=59.5,
        fp16_tflops=59.5,
        memory_bandwidth_gbs=760.0,  # datasheet: 320-bit GDDR6X @ 19 Gbps
        interconnect="pcie",
        p2p=False,  # GeForce: no peer access over PCIe (as RTX 3090)
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=68,
    ),
    GPU(
        name="RTX-3090",
        # 24576 MiB: nvidia-smi on a GeForce RTX 3090 (e.g. github.com/noonghunna/club-3090#178).
        memory_bytes=_mib(24576),
        bf16_tflops=71.0,  # Ampere GA102 whitepaper: BF16 tensor, FP32 accumulate, dense
        fp16_tflops=71.0,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=936.0,  # datasheet
        interconnect="pcie",
        # No peer access over PCIe with the stock driver (NVIDIA/nccl#1127,
        # p2pBandwidthLatencyTest "CANNOT Access Peer"). A pair joined by an NVLink bridge
        # does get P2P, but bridges join only two boards, so a cluster cannot rely on it.
        p2p=False,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=82,
    ),
    GPU(
        name="RTX-4080",
        # 16376 MiB: nvidia-smi on a GeForce RTX 4080 (16 GB GDDR6X).
        memory_bytes=_mib(16376),
        # Ada whitepaper (AD103), RTX 4080 column: FP16/BF16 tensor with FP32 accumulate 97.5
        # dense (194.9 with FP16 accumulate).
        bf16_tflops=97.5,
        fp16_tflops=97.5,
        memory_bandwidth_gbs=716.8,  # datasheet: 256-bit GDDR6X @ 22.4 Gbps
        interconnect="pcie",
        p2p=False,  # GeForce 40-series: no peer access (as RTX 4090)
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=76,
    ),
    GPU(
        name="RTX-4090",
        # 24564 MiB: nvidia-smi on a GeForce RTX 4090.
        memory_bytes=_mib(24564),
        # Ada whitepaper (AD102), FP16/BF16 tensor with FP32 accumulate: 165.2 dense. GeForce
        # boards run FP32-accumulate at half the FP16-accumulate rate (330.3).
        bf16_tflops=165.2,
        fp16_tflops=165.2,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=1008.0,  # datasheet: 384-bit GDDR6X @ 21 Gbps
        interconnect="pcie",
        # The driver reports no peer access between GeForce 40-series boards; NCCL falls back
        # to host-staged copies (accelerate disables NCCL P2P/IB for them for this reason).
        p2p=False,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=128,
    ),
    GPU(
        name="RTX-5090",
        # 32607 MiB: nvidia-smi on a GeForce RTX 5090 (32 GB GDDR7).
        memory_bytes=_mib(32607),
        # Blackwell GB202 whitepaper, RTX 5090 column: FP16/BF16 tensor with FP32 accumulate
        # 209.5 dense (419 with FP16 accumulate; 3352 "AI TOPS" is FP4 with sparsity).
        bf16_tflops=209.5,
        fp16_tflops=209.5,
        memory_bandwidth_gbs=1792.0,  # datasheet: 512-bit GDDR7 @ 28 Gbps
        interconnect="pcie",
        p2p=False,  # GeForce: no peer access with the stock driver
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[5],
        pcie_gen=5,
        multiprocessors=170,
    ),
    GPU(
        name="RTX-A6000",
        memory_bytes=_mib(49140),  # nvidia-smi on an RTX A6000 (ECC off)
        bf16_tflops=154.8,  # datasheet: 309.7 TFLOPS tensor with sparsity, halved
        fp16_tflops=154.8,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=768.0,  # datasheet
        interconnect="pcie",
        p2p=True,  # professional boards keep PCIe peer access enabled
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=84,
    ),
    GPU(
        name="RTX-6000-Ada",
        memory_bytes=_mib(49140),  # nvidia-smi on "NVIDIA RTX 6000 Ada Generation" (ECC off)
        # RTX 6000 Ada datasheet: 1457 TFLOPS FP8 tensor with sparsity; FP16/BF16 runs at half
        # the FP8 rate and dense at half the sparse one: 364.25 (professional boards
        # accumulate in FP32 at the full rate).
        bf16_tflops=364.25,
        fp16_tflops=364.25,
        memory_bandwidth_gbs=960.0,  # datasheet
        interconnect="pcie",  # no NVLink on Ada boards
        p2p=True,  # professional boards keep PCIe peer access enabled
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=142,
    ),
    GPU(
        name="RTX-PRO-6000",
        # 97887 MiB: nvidia-smi on "NVIDIA RTX PRO 6000 Blackwell Server Edition" (96 GB
        # GDDR7); the 300 W Max-Q workstation board clocks lower and is not this entry.
        memory_bytes=_mib(97887),
        # RTX PRO 6000 Blackwell datasheet: 4 PFLOPS FP4 with sparsity; FP16/BF16 with FP32
        # accumulate is 1/8 of it, dense: 4000 / 2 (sparsity) / 4 (FP4 -> FP16) = 500.
        bf16_tflops=500.0,
        fp16_tflops=500.0,
        memory_bandwidth_gbs=1792.0,  # datasheet: 512-bit GDDR7
        interconnect="pcie",  # no NVLink
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[5],
        pcie_gen=5,
        multiprocessors=188,
    ),
    GPU(
        name="T4",
        memory_bytes=_mib(15360),  # nvidia-smi on "Tesla T4" (16 GB GDDR6, ECC on)
        bf16_tflops=0.0,  # Turing has no BF16
        fp16_tflops=65.0,  # T4 datasheet: mixed precision (FP16/FP32) 65 TFLOPS, dense
        memory_bandwidth_gbs=320.0,  # datasheet
        interconnect="pcie",
        p2p=True,  # data-center board: PCIe peer access enabled
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[3],
        pcie_gen=3,
        bf16=False,
        multiprocessors=40,
    ),
    GPU(
        name="V100-SXM2-16GB",
        memory_bytes=_mib(16160),  # nvidia-smi on "Tesla V100-SXM2-16GB" (AWS p3)
        bf16_tflops=0.0,  # Volta has no BF16
        fp16_tflops=125.0,  # V100 datasheet, SXM2: tensor performance 125 TFLOPS
        memory_bandwidth_gbs=900.0,  # datasheet (HBM2)
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=150.0,  # NVLink 2: 300 GB/s bidirectional per GPU, halved
        pcie_gen=3,
        bf16=False,
        multiprocessors=80,
    ),
    GPU(
        name="V100-SXM2-32GB",
        memory_bytes=_mib(32510),  # nvidia-smi on "Tesla V100-SXM2-32GB" (AWS p3dn)
        bf16_tflops=0.0,  # Volta has no BF16
        fp16_tflops=125.0,  # V100 datasheet, SXM2: tensor performance 125 TFLOPS
        memory_bandwidth_gbs=900.0,  # datasheet (HBM2)
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=150.0,  # NVLink 2: 300 GB/s bidirectional per GPU, halved
        pcie_gen=3,
        bf16=False,
        multiprocessors=80,
    ),
    GPU(
        name="A10",
        memory_bytes=_mib(23028),  # nvidia-smi on "NVIDIA A10" (24 GB GDDR6, ECC on)
        bf16_tflops=125.0,  # A10 datasheet: BF16 tensor 125 dense / 250 sparse
        fp16_tflops=125.0,  # A10 datasheet: FP16 tensor 125 dense / 250 sparse
        memory_bandwidth_gbs=600.0,  # datasheet
        interconnect="pcie",  # no NVLink
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=72,
    ),
    GPU(
        name="A10G",
        memory_bytes=_mib(23028),  # nvidia-smi on "NVIDIA A10G" (AWS g5, 24 GB GDDR6)
        # AWS-only variant of the A10 with no public NVIDIA datasheet. AWS's G5 page gives no
        # dense tensor figure; third-party comparisons of A10 and A10G (e.g. Baseten's) list
        # 70 TFLOPS FP16/BF16 tensor for the A10G. Treat as approximate.
        bf16_tflops=70.0,
        fp16_tflops=70.0,
        memory_bandwidth_gbs=600.0,  # AWS G5 documentation: 600 GB/s
        interconnect="pcie",  # g5 instances have no NVLink
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=80,
    ),
    GPU(
        name="A40",
        memory_bytes=_mib(46068),  # nvidia-smi on "NVIDIA A40" (48 GB GDDR6, ECC on)
        bf16_tflops=149.7,  # A40 datasheet: BF16 tensor 149.7 dense / 299.4 sparse
        fp16_tflops=149.7,  # A40 datasheet: FP16 tensor 149.7 dense / 299.4 sparse
        memory_bandwidth_gbs=696.0,  # datasheet
        interconnect="pcie",  # an NVLink bridge joins pairs only
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=84,
    ),
    GPU(
        name="L4",
        memory_bytes=_mib(23034),  # nvidia-smi on "NVIDIA L4" (24 GB GDDR6, ECC on)
        bf16_tflops=121.0,  # L4 datasheet: BF16 tensor 242 with sparsity, halved
        fp16_tflops=121.0,  # L4 datasheet: FP16 tensor 242 with sparsity, halved
        memory_bandwidth_gbs=300.0,  # datasheet
        interconnect="pcie",  # no NVLink
        p2p=True,  # data-center board; some cloud VMs do not expose peer access
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=58,
    ),
    GPU(
        name="L40",
        memory_bytes=_mib(46068),  # nvidia-smi on "NVIDIA L40" (48 GB GDDR6, ECC on)
        bf16_tflops=181.05,  # L40 datasheet: BF16 tensor 362.1 with sparsity, halved
        fp16_tflops=181.05,  # L40 datasheet: FP16 tensor 362.1 with sparsity, halved
        memory_bandwidth_gbs=864.0,  # datasheet
        interconnect="pcie",  # no NVLink on L40
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=142,
    ),
    GPU(
        name="L40S",
        # 46068 MiB: nvidia-smi on L40S (github.com/modal-labs/modal-client#2797).
        memory_bytes=_mib(46068),
        bf16_tflops=362.05,  # datasheet: 362.05 dense / 733 sparse
        fp16_tflops=362.05,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=864.0,  # datasheet
        interconnect="pcie",  # no NVLink on L40S
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=142,
    ),
    GPU(
        name="A100-SXM-40GB",
        # 40960 MiB: nvidia-smi on A100-SXM4-40GB (modal-labs/modal-client#2797).
        memory_bytes=_mib(40960),
        bf16_tflops=312.0,  # A100 datasheet: 312 dense / 624 sparse
        fp16_tflops=312.0,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=1555.0,  # datasheet (HBM2)
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=300.0,  # NVLink 3: 600 GB/s bidirectional per GPU, halved
        pcie_gen=4,
        multiprocessors=108,
    ),
    GPU(
        name="A100-SXM-80GB",
        # 81920 MiB: nvidia-smi on A100-SXM4-80GB (modal-labs/modal-client#2797).
        memory_bytes=_mib(81920),
        bf16_tflops=312.0,  # A100 datasheet
        fp16_tflops=312.0,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=2039.0,  # datasheet (HBM2e)
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=300.0,  # NVLink 3: 600 GB/s bidirectional, halved
        pcie_gen=4,
        multiprocessors=108,
    ),
    # The PCIe A100s are not in the user-facing list but NVML reports them, and mapping them
    # to the SXM entries would claim NVLink they do not have.
    GPU(
        name="A100-PCIE-40GB",
        # 40960 MiB with current drivers (older ones showed 40536 MiB); local_cluster()
        # replaces this with what NVML reports anyway.
        memory_bytes=_mib(40960),
        bf16_tflops=312.0,  # A100 datasheet
        fp16_tflops=312.0,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=1555.0,  # datasheet
        interconnect="pcie",  # an NVLink bridge joins pairs only
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=108,
    ),
    GPU(
        name="A100-PCIE-80GB",
        memory_bytes=_mib(81920),  # nvidia-smi on "NVIDIA A100 80GB PCIe"
        bf16_tflops=312.0,  # A100 datasheet
        fp16_tflops=312.0,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=1935.0,  # datasheet (PCIe variant)
        interconnect="pcie",
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[4],
        pcie_gen=4,
        multiprocessors=108,
    ),
    GPU(
        name="H20",
        memory_bytes=_mib(97871),  # nvidia-smi on "NVIDIA H20" (96 GB HBM3)
        bf16_tflops=148.0,  # H20 datasheet: FP16/BF16 tensor 148 dense
        fp16_tflops=148.0,
        memory_bandwidth_gbs=4000.0,  # datasheet: 4.0 TB/s
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=450.0,  # NVLink 4: 900 GB/s bidirectional, halved
        pcie_gen=5,
        multiprocessors=78,
    ),
    GPU(
        name="H100-SXM-80GB",
        # 81559 MiB: nvidia-smi on "NVIDIA H100 80GB HBM3" (NVIDIA/nccl#1264,
        # modal-labs/modal-client#2797).
        memory_bytes=_mib(81559),
        bf16_tflops=989.4,  # H100 datasheet: 1979 sparse, halved
        fp16_tflops=989.4,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=3350.0,  # datasheet: 3.35 TB/s
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=450.0,  # NVLink 4: 900 GB/s bidirectional, halved
        pcie_gen=5,
        multiprocessors=132,
    ),
    GPU(
        name="H100-PCIE-80GB",
        # 81559 MiB: nvidia-smi on "NVIDIA H100 PCIe" (NVIDIA/TensorRT-LLM test reports).
        memory_bytes=_mib(81559),
        bf16_tflops=756.5,  # H100 datasheet, PCIe column: 1513 sparse, halved
        fp16_tflops=756.5,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=2000.0,  # datasheet: 2 TB/s (HBM2e)
        interconnect="pcie",  # NVLink bridge joins pairs only
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[5],
        pcie_gen=5,
        multiprocessors=114,
    ),
    GPU(
        name="H100-NVL",
        memory_bytes=_mib(95830),  # nvidia-smi on "NVIDIA H100 NVL" (94 GB HBM3)
        bf16_tflops=835.5,  # H100 datasheet, NVL column: 1671 sparse, halved
        fp16_tflops=835.5,
        memory_bandwidth_gbs=3900.0,  # datasheet: 3.9 TB/s
        # NVLink bridges join pairs of boards only (600 GB/s), so a node of them is planned
        # over PCIe, as the PCIe A100/H100 are.
        interconnect="pcie",
        p2p=True,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[5],
        pcie_gen=5,
        multiprocessors=132,
    ),
    GPU(
        name="GH200-96GB",
        # 97871 MiB: nvidia-smi on "NVIDIA GH200 480GB" (96 GB HBM3 + 480 GB LPDDR5X on the
        # Grace side). The 144 GB HBM3e variant is not this entry.
        memory_bytes=_mib(97871),
        bf16_tflops=989.4,  # GH200 datasheet: same Hopper GPU as H100 SXM, 1979 sparse
        fp16_tflops=989.4,
        memory_bandwidth_gbs=4000.0,  # datasheet: 4 TB/s (HBM3)
        interconnect="nvlink",  # several GH200s of a system join over NVLink 4
        p2p=True,
        link_bandwidth_gbs=450.0,  # NVLink 4: 900 GB/s bidirectional, halved
        # The CPU link is NVLink-C2C (450 GB/s each way), far above PCIe; CPU offload is
        # planned at PCIe gen5 speed, which errs long.
        pcie_gen=5,
        multiprocessors=132,
    ),
    GPU(
        name="H200-SXM-141GB",
        memory_bytes=_mib(143771),  # nvidia-smi on "NVIDIA H200"
        bf16_tflops=989.4,  # H200 datasheet: same Hopper die as H100 SXM, 1979 sparse
        fp16_tflops=989.4,  # same tensor rate for FP16 inputs
        memory_bandwidth_gbs=4800.0,  # datasheet: 4.8 TB/s (HBM3e)
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=450.0,  # NVLink 4: 900 GB/s bidirectional, halved
        pcie_gen=5,
        multiprocessors=132,
    ),
    GPU(
        name="B200-SXM-180GB",
        # 183359 MiB: nvidia-smi on "NVIDIA B200" (NVIDIA/TensorRT-LLM#10278).
        memory_bytes=_mib(183359),
        bf16_tflops=2250.0,  # HGX B200 datasheet: 4.5 PFLOPS sparse per GPU, halved
        fp16_tflops=2250.0,  # same tensor rate for FP16 inputs
        # Datasheet says 8 TB/s; the driver reports a 7680-bit bus at 3996 MHz, i.e.
        # 7680/8 × 3996e6 × 2 = 7.67 TB/s (pytorch/ao#4002). Use the figure the part delivers.
        memory_bandwidth_gbs=7680.0,
        interconnect="nvlink",
        p2p=True,
        link_bandwidth_gbs=900.0,  # NVLink 5: 1.8 TB/s bidirectional, halved
        pcie_gen=5,
        multiprocessors=148,
    ),
)

GPU_CATALOG: Mapping[str, GPU] = MappingProxyType({g.name: g for g in _CATALOG_ENTRIES})
"""Canonical name → GPU, in display order (consumer → data-center, oldest → newest)."""


def _normalize(name: str) -> str:
    """Lower-case, drop '-', '_' and whitespace, and drop an 'nvidia'/'geforce'/'tesla' prefix.

    The prefixes go because NVML names carry them ("NVIDIA GeForce RTX 4090", "Tesla T4")
    and users sometimes copy those; nothing in the catalog is distinguished by them.
    """
    key = re.sub(r"[\s\-_]+", "", name.lower())
    for prefix in ("nvidia", "geforce", "tesla"):
        key = key.removeprefix(prefix)
    return key


# Aliases, as a user would type them; normalised at import. NVML's own product names are
# included so that gpu_from_nvml_name() needs no separate table. Deliberately absent: names
# of different parts that share a prefix ("H200 NVL", "RTX 4090 D", "RTX 3080 12GB", "RTX PRO
# 6000 Blackwell Max-Q", "GH200 144G"), which must not silently inherit another board's speeds.
_ALIASES: Mapping[str, tuple[str, ...]] = {
    "RTX-3080": ("3080", "rtx3080", "rtx-3080"),
    "RTX-3090": ("3090", "rtx3090", "rtx-3090"),
    "RTX-4080": ("4080", "rtx4080", "rtx-4080"),
    "RTX-4090": ("4090", "rtx4090", "rtx-4090"),
    "RTX-5090": ("5090", "rtx5090", "rtx-5090"),
    "RTX-A6000": ("a6000", "rtx-a6000"),
    "RTX-6000-Ada": ("6000ada", "rtx6000ada", "rtx-6000-ada", "RTX 6000 Ada Generation"),
    "RTX-PRO-6000": (
        "pro6000",
        "rtxpro6000",
        "rtx-pro-6000",
        "rtx-pro-6000-blackwell",
        "RTX PRO 6000 Blackwell Server Edition",
        "RTX PRO 6000 Blackwell Workstation Edition",
    ),
    "T4": ("t4", "tesla-t4"),
    "V100-SXM2-16GB": ("v100", "v100-16gb", "v100-sxm2", "v100-sxm2-16gb"),
    "V100-SXM2-32GB": ("v100-32gb", "v100-sxm2-32gb"),
    "A10": ("a10",),
    "A10G": ("a10g",),
    "A40": ("a40",),
    "L4": ("l4",),
    "L40": ("l40",),
    "L40S": ("l40s",),
    "A100-SXM-40GB": ("a100-40gb", "a100-sxm-40gb", "A100-SXM4-40GB"),
    "A100-SXM-80GB": ("a100", "a100-80gb", "a100-sxm", "a100-sxm-80gb", "A100-SXM4-80GB"),
    "A100-PCIE-40GB": ("a100-pcie-40gb",),
    "A100-PCIE-80GB": ("a100-pcie", "a100-pcie-80gb", "A100 80GB PCIe"),
    "H20": ("h20",),
    "H100-SXM-80GB": ("h100", "h100-sxm", "h100-80gb", "h100-sxm-80gb", "H100 80GB HBM3"),
    "H100-PCIE-80GB": ("h100-pcie", "h100-pcie-80gb", "H100 PCIe"),
    "H100-NVL": ("h100-nvl", "h100nvl", "h100-94gb"),
    "GH200-96GB": ("gh200", "gh200-96gb", "GH200 480GB"),
    "H200-SXM-141GB": ("h200", "h200-sxm", "h200-141gb", "h200-sxm-141gb"),
    "B200-SXM-180GB": ("b200", "b200-sxm", "b200-180gb", "b200-sxm-180gb"),
}

_ALIAS_TO_NAME: Mapping[str, str] = MappingProxyType(
    {
        _normalize(alias): canonical
        for canonical, aliases in _ALIASES.items()
        for alias in (canonical, *aliases)
    }
)

# Short names shown in error messages: the first alias of each catalog entry.
_SHORT_NAMES: tuple[str, ...] = tuple(aliases[0] for aliases in _ALIASES.values())

_SPEC_HELP = (
    "write a cluster as [NODES x] [GPUS_PER_NODE x] GPU, e.g. '7x4090', '8xA100-80GB', "
    "'2x8xH100' or 'H100'"
)


def known_gpu_names() -> tuple[str, ...]:
    """Canonical names of every catalog GPU, in catalog order."""
    return tuple(GPU_CATALOG)


def _unknown_gpu_message(text: str) -> str:
    close = difflib.get_close_matches(_normalize(text), list(_ALIAS_TO_NAME), n=1, cutoff=0.75)
    hint = f" (did you mean {_ALIAS_TO_NAME[close[0]]}?)" if close else ""
    return (
        f"unknown GPU {text.strip()!r}{hint}; known GPUs: {', '.join(known_gpu_names())} "
        f"(short names {', '.join(_SHORT_NAMES)} also work); {_SPEC_HELP}"
    )


def get_gpu(name: str) -> GPU:
    """Look a GPU up by canonical name or alias (case, '-', '_' and spaces ignored).

    Raises:
        UnknownGPUError: the name matches no catalog entry; the message lists the known ones.
    """
    canonical = _ALIAS_TO_NAME.get(_normalize(name))
    if canonical is None:
        raise UnknownGPUError(_unknown_gpu_message(name))
    return GPU_CATALOG[canonical]


# CPU cores per GPU assumed when a node's are unknown (a catalog cluster): the low end of
# what GPU hosts have (8-32 per GPU in the clouds); --cpu-cores-per-node says what yours has.
DEFAULT_CPU_CORES_PER_GPU = 8


def usable_cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what a container or
    ``taskset`` allows, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_rank(cores: int, ranks: int) -> int:
    """CPU threads each of a node's ranks gets: ⌊cores / ranks⌋, at least 1 (what
    ``zeroplan launch`` sets ``OMP_NUM_THREADS`` to, and what the speed model plans with)."""
    return max(1, cores // ranks)


# Upper bounds on a cluster's counts. They keep a typo ("80000x4090") from being planned as a
# real cluster: its batch sizes and tokens/s would be absurd, and config would write them. The
# largest nodes sold hold 8-16 GPUs (HGX, DGX-2); 64 leaves room for any single host. 4,096
# nodes of 8 is 32,768 GPUs, past any fine-tuning run; pre-training fleets are not planned here.
MAX_GPUS_PER_NODE = 64
MAX_NODES = 4096


@dataclass(frozen=True)
class Cluster:
    """``num_nodes`` identical nodes of ``gpus_per_node`` identical GPUs.

    ``inter_node_gbs`` is the per-GPU one-direction network bandwidth between nodes (GB/s), or
    None when unknown; it is irrelevant for a single node. Whether the GPUs of a node reach
    each other peer-to-peer is ``gpu.p2p`` (the catalog's, NVML's for this machine, or the
    user's: ``with_links``). ``cpu_cores_per_node``: the CPU cores a node's ranks share (this
    machine's, the user's, or None: unknown), which sets how fast a CPU-offloaded optimizer
    steps. ``notes`` say where a figure is a fallback.
    """

    gpu: GPU
    gpus_per_node: int
    num_nodes: int = 1
    inter_node_gbs: float | None = None
    notes: tuple[str, ...] = ()
    cpu_cores_per_node: int | None = None

    def __post_init__(self) -> None:
        # Counts reach here from user input (specs, hostfiles), so a bad one is a user mistake.
        if self.gpus_per_node < 1:
            raise BadClusterSpecError(
                f"a node needs at least 1 GPU, got {self.gpus_per_node}; {_SPEC_HELP}"
            )
        if self.num_nodes < 1:
            raise BadClusterSpecError(
                f"a cluster needs at least 1 node, got {self.num_nodes}; {_SPEC_HELP}"
            )
        if self.gpus_per_node > MAX_GPUS_PER_NODE:
            raise BadClusterSpecError(
                f"a node holds at most {MAX_GPUS_PER_NODE} GPUs, got {self.gpus_per_node:,}; "
                f"{_SPEC_HELP}"
            )
        if self.num_nodes > MAX_NODES:
            raise BadClusterSpecError(
                f"a cluster has at most {MAX_NODES:,} nodes, got {self.num_nodes:,}; {_SPEC_HELP}"
            )
        if self.inter_node_gbs is not None and self.inter_node_gbs <= 0:
            raise BadClusterSpecError(
                f"inter-node bandwidth must be positive GB/s, got {self.inter_node_gbs}; "
                "leave it unset if unknown"
            )
        if self.cpu_cores_per_node is not None and self.cpu_cores_per_node < 1:
            raise BadClusterSpecError(
                f"a node needs at least 1 CPU core, got {self.cpu_cores_per_node}; "
                "leave it unset if unknown"
            )

    @property
    def world_size(self) -> int:
        """Total GPUs (= data-parallel ranks for pure ZeRO/DDP): nodes × GPUs per node."""
        return self.num_nodes * self.gpus_per_node

    @property
    def is_multi_node(self) -> bool:
        return self.num_nodes > 1

    @property
    def cpu_threads_per_rank(self) -> int:
        """CPU threads each rank gets: the node's cores shared among its GPUs
        (``threads_per_rank``); DEFAULT_CPU_CORES_PER_GPU when the node's cores are unknown."""
        if self.cpu_cores_per_node is None:
            return DEFAULT_CPU_CORES_PER_GPU
        return threads_per_rank(self.cpu_cores_per_node, self.gpus_per_node)

    def describe(self, times: str = "×") -> str:
        """Short form such as ``"7×RTX-4090"`` or ``"2×8×H100-SXM-80GB"``; with ``times="x"``
        the ``--gpus`` spelling a user types (``7xRTX-4090``).

        The output parses back with ``parse_cluster`` for catalog GPUs.
        """
        counts = (
            [self.gpus_per_node] if self.num_nodes == 1 else [self.num_nodes, self.gpus_per_node]
        )
        return times.join([*map(str, counts), self.gpu.name])


# A leading count and its separator: "7x", "2 × ", "8*". Signs and decimals are matched so
# that "-1x4090" or "1.5x4090" get a "bad count" message rather than "unknown GPU '-1x4090'".
_COUNT_PREFIX = re.compile(r"\s*([+-]?\d+(?:\.\d*)?)\s*[x×*]\s*", re.IGNORECASE)
# "H100x8": the count written after the GPU; caught only to say which order is expected.
_COUNT_SUFFIX = re.compile(r"(.+?)\s*[x×*]\s*(\d+)\s*", re.IGNORECASE)


def parse_cluster(text: str, *, inter_node_gbs: float | None = None) -> Cluster:
    """Parse ``[NODES x] [GPUS_PER_NODE x] GPU``.

    Examples: ``"H100"`` (1 GPU), ``"7x4090"``, ``"8xA100-80GB"``, ``"2x8xH100"`` (2 nodes of
    8). Separators ``x``, ``×`` or ``*``, case-insensitive, spaces allowed.

    Raises:
        BadClusterSpecError: empty spec, more than two counts, or a count that is not a
            positive whole number.
        UnknownGPUError: the GPU part names no catalog GPU.
    """
    rest = text
    counts: list[str] = []
    while (m := _COUNT_PREFIX.match(rest)) is not None:
        counts.append(m.group(1))
        rest = rest[m.end() :]
    gpu_text = rest.strip()

    if not text.strip():
        raise BadClusterSpecError(f"empty cluster spec; {_SPEC_HELP}")
    if not gpu_text:
        raise BadClusterSpecError(f"cluster spec {text.strip()!r} names no GPU; {_SPEC_HELP}")
    if len(counts) > 2:
        raise BadClusterSpecError(
            f"cluster spec {text.strip()!r} has {len(counts)} counts, at most 2 "
            f"(nodes and GPUs per node) are allowed; {_SPEC_HELP}"
        )
    values: list[int] = []
    for raw in counts:
        count = whole_number(raw)
        if count is None or count < 1:
            raise BadClusterSpecError(
                f"count {raw!r} in cluster spec {text.strip()!r} must be a whole number "
                f"of at least 1; {_SPEC_HELP}"
            )
        values.append(count)

    # "4090x7": the GPU is itself a number, so the prefix loop took it as a count.
    if (
        re.fullmatch(r"\d+", gpu_text)
        and _normalize(gpu_text) not in _ALIAS_TO_NAME
        and counts
        and _normalize(counts[-1]) in _ALIAS_TO_NAME
    ):
        fixed = "x".join([*counts[:-1], gpu_text, counts[-1]])
        raise BadClusterSpecError(
            f"cluster spec {text.strip()!r} puts the count after the GPU; write it first, "
            f"e.g. '{fixed}'"
        )
    suffix = _COUNT_SUFFIX.fullmatch(gpu_text)
    if (
        _normalize(gpu_text) not in _ALIAS_TO_NAME
        and suffix is not None
        and _normalize(suffix.group(1)) in _ALIAS_TO_NAME
    ):
        raise BadClusterSpecError(
            f"cluster spec {text.strip()!r} puts the count after the GPU; write it first, "
            f"e.g. '{suffix.group(2)}x{suffix.group(1)}'"
        )
    gpu = get_gpu(gpu_text)

    if len(values) == 2:
        num_nodes, per_node = values
    elif len(values) == 1:
        num_nodes, per_node = 1, values[0]
    else:
        num_nodes, per_node = 1, 1
    return Cluster(gpu, gpus_per_node=per_node, num_nodes=num_nodes, inter_node_gbs=inter_node_gbs)


# DeepSpeed's launcher (deepspeed/launcher/runner.py, _parse_hostfile) matches
# r"^(\S+)\s+slots=(\d+)" on each stripped line and skips blank and '#' lines. We accept the
# same lines, plus a trailing '# comment', and reject anything the launcher would reject.
_HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=(\d+)")


def parse_hostfile(
    path: str | os.PathLike[str], gpu: GPU, *, inter_node_gbs: float | None = None
) -> Cluster:
    """Read a DeepSpeed hostfile: one ``hostname slots=N`` line per node.

    ``#`` starts a comment; blank lines are skipped. Every host must have the same slot count,
    because zeroplan plans one per-GPU layout for identical nodes.

    Raises:
        BadClusterSpecError: missing/unreadable file, a malformed line, a duplicate host,
            a zero slot count, unequal slot counts, or no hosts at all.
    """
    slots = read_hostfile(path)
    return Cluster(
        gpu,
        gpus_per_node=next(iter(slots.values())),
        num_nodes=len(slots),
        inter_node_gbs=inter_node_gbs,
    )


def read_hostfile(path: str | os.PathLike[str]) -> dict[str, int]:
    """The hosts of a DeepSpeed hostfile and their slot counts, in file order.

    Checked as ``parse_hostfile`` describes (every host with the same slot count).
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BadClusterSpecError(
            f"hostfile {str(p)!r} does not exist; pass a DeepSpeed hostfile with one "
            "'hostname slots=N' line per node"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadClusterSpecError(
            f"cannot read hostfile {str(p)!r} ({exc}); pass a readable text file with one "
            "'hostname slots=N' line per node"
        ) from None

    slots: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOSTFILE_LINE.fullmatch(line)
        if m is None:
            raise BadClusterSpecError(
                f"hostfile {str(p)!r} line {lineno}: {raw.strip()!r} is not "
                "'hostname slots=N'; fix or comment out that line"
            )
        host, n = m.group(1), int(m.group(2))
        if host in slots:
            raise BadClusterSpecError(
                f"hostfile {str(p)!r} line {lineno}: host {host!r} is listed twice; "
                "list each node once"
            )
        if n < 1:
            raise BadClusterSpecError(
                f"hostfile {str(p)!r} line {lineno}: host {host!r} has slots={n}; "
                "each node needs at least 1 GPU slot (drop the line to exclude the host)"
            )
        slots[host] = n

    if not slots:
        raise BadClusterSpecError(
            f"hostfile {str(p)!r} lists no hosts; add one 'hostname slots=N' line per node"
        )
    distinct = sorted(set(slots.values()))
    if len(distinct) > 1:
        detail = ", ".join(f"{h}={n}" for h, n in slots.items())
        raise BadClusterSpecError(
            f"hostfile {str(p)!r} mixes slot counts ({detail}); zeroplan plans identical "
            f"nodes, so give every host the same slots (e.g. slots={distinct[0]})"
        )
    return slots


def gpu_from_nvml_name(name: str | bytes, memory_bytes: int) -> GPU:
    """Map an NVML product name to a catalog GPU with the memory NVML reported.

    Examples: "NVIDIA H100 80GB HBM3" → H100-SXM-80GB, "NVIDIA GeForce RTX 4090" → RTX-4090,
    "NVIDIA A100-SXM4-80GB" → A100-SXM-80GB, "NVIDIA H200" → H200-SXM-141GB.

    The measured ``memory_bytes`` replaces the catalog's, since it is what allocations actually
    face (ECC on/off and driver versions shift it by tens of MiB). A name the catalog does not
    know yields a GPU with ``known=False`` and deliberately pessimistic speeds
    (``UNKNOWN_GPU_*``, PCIe without P2P), so fit checks stay exact and time estimates err long.
    """
    if memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be positive, got {memory_bytes}")
    # Old pynvml releases return bytes.
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    canonical = _ALIAS_TO_NAME.get(_normalize(text))
    if canonical is not None:
        return replace(GPU_CATALOG[canonical], memory_bytes=memory_bytes)
    # "NVIDIA RTX 6000 Ada Generation" → "RTX-6000-Ada-Generation": one token, so that
    # Cluster.describe() stays readable.
    label = re.sub(r"^nvidia\s+", "", text.strip(), flags=re.IGNORECASE)
    label = re.sub(r"\s+", "-", label) or "unknown-GPU"
    return GPU(
        name=label,
        memory_bytes=memory_bytes,
        bf16_tflops=UNKNOWN_GPU_BF16_TFLOPS,
        fp16_tflops=UNKNOWN_GPU_BF16_TFLOPS,
        memory_bandwidth_gbs=UNKNOWN_GPU_MEMORY_BANDWIDTH_GBS,
        interconnect="pcie",
        p2p=False,
        link_bandwidth_gbs=PCIE_EFFECTIVE_GBS[UNKNOWN_GPU_PCIE_GEN],
        pcie_gen=UNKNOWN_GPU_PCIE_GEN,
        known=False,
    )


def _visible_indices(env: str | None, uuids: Sequence[str]) -> list[int]:
    """NVML indices of the devices a CUDA process would see under ``CUDA_VISIBLE_DEVICES``.

    NVML ignores that variable, but a training job does not, so ``local_cluster`` applies it.
    Mirrors CUDA: unset → all; "" → none; entries are indices or (prefixes of) "GPU-" UUIDs;
    the first invalid or repeated entry ends the list. MIG entries ("MIG-...") also end it,
    because a MIG slice's memory is not the board's and we do not model slices.
    """
    if env is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for token in (t.strip() for t in env.split(",")):
        idx: int | None = None
        if re.fullmatch(r"\d+", token):
            idx = int(token)
            if idx >= len(uuids):
                idx = None
        elif token.upper().startswith("GPU-"):
            hits = [i for i, u in enumerate(uuids) if u.lower().startswith(token.lower())]
            idx = hits[0] if len(hits) == 1 else None
        if idx is None or idx in chosen:
            break
        chosen.append(idx)
    return chosen


def with_links(
    cluster: Cluster,
    p2p: bool | None = None,
    inter_node_gbs: float | None = None,
    cpu_cores_per_node: int | None = None,
) -> Cluster:
    """``cluster`` with what the user says about its links and hosts: peer-to-peer between
    the GPUs of a node (``--p2p`` / ``--no-p2p``; None keeps the catalog's or NVML's), the
    per-GPU bandwidth between nodes in GB/s (``--inter-node-gbs``; None keeps the
    cluster's) and the CPU cores of a node (``--cpu-cores-per-node``; None keeps this
    machine's or leaves them unknown).

    Raises:
        BadLinkOptionError: p2p given for a single GPU, a bandwidth that is not positive, a
            core count below 1.
    """
    if p2p is not None and cluster.gpus_per_node == 1:
        flag = "--p2p" if p2p else "--no-p2p"
        raise BadLinkOptionError(
            f"{flag} describes the link between the GPUs of a node; {cluster.describe()} has "
            "one GPU per node: leave it out"
        )
    if inter_node_gbs is not None and not inter_node_gbs > 0:
        raise BadLinkOptionError(
            f"--inter-node-gbs must be a positive bandwidth per GPU in GB/s (12.5 for 100 Gb/s "
            f"Ethernet), got {inter_node_gbs:g}"
        )
    if cpu_cores_per_node is not None and cpu_cores_per_node < 1:
        raise BadLinkOptionError(
            f"--cpu-cores-per-node must be at least 1, got {cpu_cores_per_node}: the CPU cores "
            "one node's GPUs share (nproc on it)"
        )
    if p2p is not None:
        # the user's word replaces the catalog's and any note about where it came from
        cluster = replace(cluster, gpu=replace(cluster.gpu, p2p=p2p), notes=())
    if inter_node_gbs is not None:
        cluster = replace(cluster, inter_node_gbs=inter_node_gbs)
    if cpu_cores_per_node is not None:
        cluster = replace(cluster, cpu_cores_per_node=cpu_cores_per_node)
    return cluster


def _cluster_from_devices(
    devices: Sequence[tuple[str | bytes, int]], p2p: bool | None = None
) -> Cluster | None:
    """One node holding ``devices`` (NVML name, total bytes), or None if there are none.

    A mixed box is planned as if every GPU were its smallest one: the per-GPU layout has to
    fit on each rank, so the smallest card sets the limit. ``p2p``: whether every pair of
    them reaches the other peer-to-peer, as NVML read it; None (unread) keeps the catalog's
    and says so in a note when there are several GPUs.
    """
    if not devices:
        return None
    gpus = [gpu_from_nvml_name(name, total) for name, total in devices]
    smallest = min(gpus, key=lambda g: (g.memory_bytes, g.bf16_tflops))
    notes: tuple[str, ...] = ()
    if p2p is not None:
        smallest = replace(smallest, p2p=p2p)
    elif len(gpus) > 1:
        notes = (
            "NVML could not read the peer-to-peer topology of this machine's GPUs: P2P is "
            f"the catalog's for {smallest.name} ({'yes' if smallest.p2p else 'no'}); "
            "--p2p / --no-p2p to say",
        )
    return Cluster(
        smallest,
        gpus_per_node=len(gpus),
        num_nodes=1,
        notes=notes,
        cpu_cores_per_node=usable_cpu_cores(),
    )


def _p2p_from_nvml(pynvml: Any, handles: Sequence[Any]) -> bool | None:
    """Whether every pair of ``handles`` can read each other's memory peer-to-peer
    (``nvmlDeviceGetP2PStatus`` with the READ capability: OK for all pairs), or None when
    NVML cannot tell (an old nvidia-ml-py without the call, a driver that refuses it)."""
    if len(handles) < 2:
        return None
    read = _enum(getattr(pynvml, "NVML_P2P_CAPS_INDEX_READ", 0))
    ok = _enum(getattr(pynvml, "NVML_P2P_STATUS_OK", 0))
    try:
        for i, a in enumerate(handles):
            for b in handles[i + 1 :]:
                if pynvml.nvmlDeviceGetP2PStatus(a, b, read) != ok:
                    return False
    except Exception:  # NVMLError, ctypes' ArgumentError, a missing symbol: NVML cannot tell
        return None
    return True


def _enum(value: Any) -> int:
    """An NVML constant as an int: nvidia-ml-py 12/13 define some with a trailing comma
    (``NVML_P2P_CAPS_INDEX_READ = 0,``, a tuple), which ctypes then refuses."""
    if isinstance(value, tuple):
        value = value[0] if value else 0
    return int(value)


def local_cluster() -> Cluster | None:
    """The GPUs on this machine (honouring ``CUDA_VISIBLE_DEVICES``), or None.

    None means: ``nvidia-ml-py`` not installed, no NVIDIA driver/library, no GPUs, or none
    visible. Those are normal on CPU machines, so they never raise.
    """
    try:
        import pynvml  # lazy: the package (and libnvidia-ml) is only needed here
    except ImportError:
        return None

    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return None
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_as_str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        visible = _visible_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
        devices: list[tuple[str | bytes, int]] = [
            (
                pynvml.nvmlDeviceGetName(handles[i]),
                int(pynvml.nvmlDeviceGetMemoryInfo(handles[i]).total),
            )
            for i in visible
        ]
        p2p = _p2p_from_nvml(pynvml, [handles[i] for i in visible])
    except (pynvml.NVMLError, OSError):
        return None
    finally:
        # Shutting down can itself fail on a half-initialised driver; nothing to do about it.
        with contextlib.suppress(pynvml.NVMLError, OSError):
            pynvml.nvmlShutdown()
    return _cluster_from_devices(devices, p2p)


def _as_str(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
