"""Tests for zeroplan.hardware: catalog, cluster specs, hostfiles and NVML mapping."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from fakenvml import FakeNVMLError, fake_pynvml

from zeroplan.errors import (
    BadClusterSpecError,
    BadLinkOptionError,
    UnknownGPUError,
    ZeroplanError,
)
from zeroplan.hardware import (
    GPU_CATALOG,
    MIB,
    PCIE_EFFECTIVE_GBS,
    Cluster,
    _cluster_from_devices,
    _visible_indices,
    get_gpu,
    gpu_from_nvml_name,
    known_gpu_names,
    local_cluster,
    parse_cluster,
    parse_hostfile,
    with_links,
)

# --------------------------------------------------------------------------- catalog


@pytest.mark.parametrize(
    ("name", "mib"),
    [
        ("RTX-4090", 24564),
        ("RTX-3090", 24576),
        ("RTX-A6000", 49140),
        ("L40S", 46068),
        ("A100-SXM-40GB", 40960),
        ("A100-SXM-80GB", 81920),
        ("H100-SXM-80GB", 81559),
        ("H100-PCIE-80GB", 81559),
        ("H200-SXM-141GB", 143771),
        ("B200-SXM-180GB", 183359),
        ("L4", 23034),
        ("T4", 15360),
        ("V100-SXM2-16GB", 16160),
        ("RTX-5090", 32607),
        ("H100-NVL", 95830),
    ],
)
def test_catalog_memory_is_driver_reported_total(name: str, mib: int) -> None:
    assert GPU_CATALOG[name].memory_bytes == mib * MIB


def test_catalog_entries_are_consistent() -> None:
    assert known_gpu_names() == tuple(GPU_CATALOG)
    for name, gpu in GPU_CATALOG.items():
        assert gpu.name == name
        assert gpu.known
        assert gpu.fp16_tflops > 0 and gpu.memory_bandwidth_gbs > 0
        # Every card with bf16 runs fp16 at the same tensor rate; without it, bf16 is 0.
        assert gpu.bf16_tflops == (gpu.fp16_tflops if gpu.bf16 else 0.0)
        assert gpu.tensor_tflops == gpu.fp16_tflops
        # NVLink parts must advertise more peer bandwidth than any PCIe link could give.
        if gpu.interconnect == "nvlink":
            assert gpu.p2p and gpu.link_bandwidth_gbs > 64
        else:
            assert gpu.link_bandwidth_gbs <= 64
            assert gpu.link_bandwidth_gbs == PCIE_EFFECTIVE_GBS[gpu.pcie_gen]
        assert gpu.pcie_gen in (3, 4, 5)
        # GeForce boards have no peer access; data-center and professional boards do.
        assert gpu.p2p == (not gpu.name.startswith("RTX-") or "6000" in gpu.name)
        # every card names its SM count (the default is an unknown card's, a T4's 40)
        assert gpu.multiprocessors >= 40 and (gpu.multiprocessors == 40) == (name == "T4")


def test_issue_13_gpus_are_in_the_catalog() -> None:
    for name in (
        "L4", "A10G", "A10", "T4", "V100-SXM2-16GB", "V100-SXM2-32GB", "A40", "L40",
        "RTX-3080", "RTX-4080", "RTX-5090", "RTX-6000-Ada", "RTX-PRO-6000", "H20",
        "H100-NVL", "GH200-96GB", "B200-SXM-180GB",
    ):  # fmt: skip
        assert name in GPU_CATALOG


@pytest.mark.parametrize("name", ["T4", "V100-SXM2-16GB", "V100-SXM2-32GB"])
def test_cards_without_bf16_say_so(name: str) -> None:
    gpu = GPU_CATALOG[name]
    assert gpu.bf16 is False and gpu.bf16_tflops == 0.0
    assert gpu.tensor_tflops == gpu.fp16_tflops > 0
    assert all(GPU_CATALOG[n].bf16 for n in ("L4", "A10G", "RTX-3080", "H20"))


def test_a_card_without_bf16_cannot_claim_bf16_speed() -> None:
    with pytest.raises(ValueError, match="bf16_tflops must be 0"):
        dataclasses.replace(GPU_CATALOG["T4"], bf16_tflops=65.0)


def test_dense_bf16_not_sparse_figures() -> None:
    # Datasheets headline the 2:4-sparse number; the catalog must hold half of it.
    assert GPU_CATALOG["H100-SXM-80GB"].bf16_tflops == pytest.approx(989.4)
    assert GPU_CATALOG["A100-SXM-80GB"].bf16_tflops == pytest.approx(312.0)
    assert GPU_CATALOG["B200-SXM-180GB"].bf16_tflops == pytest.approx(2250.0)
    assert GPU_CATALOG["L4"].bf16_tflops == pytest.approx(121.0)
    assert GPU_CATALOG["L40"].bf16_tflops == pytest.approx(181.05)
    assert GPU_CATALOG["H100-NVL"].bf16_tflops == pytest.approx(835.5)
    # GeForce: the FP32-accumulate column, half the FP16-accumulate one
    assert GPU_CATALOG["RTX-5090"].bf16_tflops == pytest.approx(209.5)


def test_consumer_cards_have_no_p2p() -> None:
    assert GPU_CATALOG["RTX-4090"].p2p is False
    assert GPU_CATALOG["RTX-4090"].interconnect == "pcie"
    assert GPU_CATALOG["H100-SXM-80GB"].interconnect == "nvlink"
    assert GPU_CATALOG["H100-PCIE-80GB"].interconnect == "pcie"


def test_gpu_is_frozen_and_validated() -> None:
    gpu = GPU_CATALOG["H100-SXM-80GB"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        gpu.memory_bytes = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="memory_bytes"):
        dataclasses.replace(gpu, memory_bytes=0)
    with pytest.raises(ValueError, match="bf16_tflops"):
        dataclasses.replace(gpu, bf16_tflops=0.0)
    assert gpu.memory_gib == pytest.approx(81559 / 1024)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("4090", "RTX-4090"),
        ("rtx4090", "RTX-4090"),
        ("RTX 4090", "RTX-4090"),
        ("3090", "RTX-3090"),
        ("a6000", "RTX-A6000"),
        ("l40s", "L40S"),
        ("a100", "A100-SXM-80GB"),
        ("a100-40gb", "A100-SXM-40GB"),
        ("a100-80gb", "A100-SXM-80GB"),
        ("A100_80GB", "A100-SXM-80GB"),
        ("h100", "H100-SXM-80GB"),
        ("h100-sxm", "H100-SXM-80GB"),
        ("H100 SXM", "H100-SXM-80GB"),
        ("h100-pcie", "H100-PCIE-80GB"),
        ("h200", "H200-SXM-141GB"),
        ("b200", "B200-SXM-180GB"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("l4", "L4"),
        ("a10g", "A10G"),
        ("a10", "A10"),
        ("t4", "T4"),
        ("Tesla T4", "T4"),
        ("v100", "V100-SXM2-16GB"),
        ("v100-32gb", "V100-SXM2-32GB"),
        ("a40", "A40"),
        ("l40", "L40"),
        ("3080", "RTX-3080"),
        ("4080", "RTX-4080"),
        ("5090", "RTX-5090"),
        ("rtx 5090", "RTX-5090"),
        ("rtx-6000-ada", "RTX-6000-Ada"),
        ("rtx-pro-6000", "RTX-PRO-6000"),
        ("pro6000", "RTX-PRO-6000"),
        ("h20", "H20"),
        ("h100-nvl", "H100-NVL"),
        ("gh200", "GH200-96GB"),
    ],
)
def test_aliases(alias: str, canonical: str) -> None:
    assert get_gpu(alias).name == canonical


@pytest.mark.parametrize("name", list(GPU_CATALOG))
def test_canonical_names_resolve(name: str) -> None:
    assert get_gpu(name) is GPU_CATALOG[name]
    assert get_gpu(name.lower()) is GPU_CATALOG[name]


# --------------------------------------------------------------------------- parse_cluster


@pytest.mark.parametrize(
    ("spec", "gpu", "per_node", "nodes", "world"),
    [
        ("7x4090", "RTX-4090", 7, 1, 7),
        ("1xH100", "H100-SXM-80GB", 1, 1, 1),
        ("2x8xH100", "H100-SXM-80GB", 8, 2, 16),
        ("8xA100-80GB", "A100-SXM-80GB", 8, 1, 8),
        ("H100", "H100-SXM-80GB", 1, 1, 1),
        ("4090", "RTX-4090", 1, 1, 1),
        ("7×4090", "RTX-4090", 7, 1, 7),
        ("2×8×H100", "H100-SXM-80GB", 8, 2, 16),
        ("7*4090", "RTX-4090", 7, 1, 7),
        ("2*8*h200", "H200-SXM-141GB", 8, 2, 16),
        ("7X4090", "RTX-4090", 7, 1, 7),
        ("  8 x a100 40gb  ", "A100-SXM-40GB", 8, 1, 8),
        ("4xH100-PCIE", "H100-PCIE-80GB", 4, 1, 4),
        ("8xB200", "B200-SXM-180GB", 8, 1, 8),
        ("2xL40S", "L40S", 2, 1, 2),
        ("4xA6000", "RTX-A6000", 4, 1, 4),
        ("2x3090", "RTX-3090", 2, 1, 2),
        ("3xRTX4090", "RTX-4090", 3, 1, 3),
        ("16x8xH100-SXM-80GB", "H100-SXM-80GB", 8, 16, 128),
    ],
)
def test_parse_cluster_forms(spec: str, gpu: str, per_node: int, nodes: int, world: int) -> None:
    cluster = parse_cluster(spec)
    assert cluster.gpu.name == gpu
    assert cluster.gpus_per_node == per_node
    assert cluster.num_nodes == nodes
    assert cluster.world_size == world
    assert cluster.is_multi_node == (nodes > 1)
    assert cluster.inter_node_gbs is None


def test_parse_cluster_inter_node_bandwidth() -> None:
    assert parse_cluster("2x8xH100", inter_node_gbs=50.0).inter_node_gbs == 50.0


def test_describe() -> None:
    assert parse_cluster("7x4090").describe() == "7×RTX-4090"
    assert parse_cluster("H100").describe() == "1×H100-SXM-80GB"
    assert parse_cluster("2x8xH100").describe() == "2×8×H100-SXM-80GB"


@pytest.mark.parametrize("name", list(GPU_CATALOG))
@pytest.mark.parametrize(("per_node", "nodes"), [(1, 1), (8, 1), (8, 4)])
def test_describe_round_trips(name: str, per_node: int, nodes: int) -> None:
    cluster = Cluster(GPU_CATALOG[name], gpus_per_node=per_node, num_nodes=nodes)
    assert parse_cluster(cluster.describe()) == cluster


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("3x", "names no GPU"),
        ("0x4090", "at least 1"),
        ("2x0xH100", "at least 1"),
        ("0x8xH100", "at least 1"),
        ("-1x4090", "at least 1"),
        ("1.5x4090", "whole number"),
        ("1x2x3x4090", "at most 2"),
        ("H100x8", "write it first, e.g. '8xH100'"),
        ("4090 x 7", "write it first, e.g. '7x4090'"),
        ("4090x7", "write it first, e.g. '7x4090'"),
    ],
)
def test_parse_cluster_malformed(spec: str, needle: str) -> None:
    with pytest.raises(BadClusterSpecError) as info:
        parse_cluster(spec)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message  # the CLI prints it as one line
    # Every message says how to write a spec (or shows the corrected one).
    assert "e.g." in message


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("4", 4),
        (" -1 ", -1),
        ("+2", 2),
        ("auto", None),
        ("p95", None),
        ("1.5", None),
        ("4x4090", None),
    ],
)
def test_a_count_reads_alike_in_every_option(text: str, number: int | None) -> None:
    """launch --gpus, --seq-len and a cluster spec's counts read whole numbers by one rule
    (signed: -1 is told it is too small, not that it is not a name)."""
    from zeroplan.commands.job import seq_len_number
    from zeroplan.launch.runner import is_gpu_count
    from zeroplan.wholenumbers import whole_number

    assert whole_number(text) == seq_len_number(text) == number
    assert is_gpu_count(text) is (number is not None)


@pytest.mark.parametrize(
    "spec", ["7x4091", "8x7", "2x8xH300", "P100", "tpu", "8xH200 NVL", "a100-90gb", "4090D"]
)
def test_parse_cluster_unknown_gpu(spec: str) -> None:
    with pytest.raises(UnknownGPUError) as info:
        parse_cluster(spec)
    message = str(info.value)
    for name in known_gpu_names():
        assert name in message
    assert "2x8xH100" in message and "7x4090" in message
    assert "\n" not in message


def test_unknown_gpu_suggests_close_name() -> None:
    with pytest.raises(UnknownGPUError, match=r"did you mean RTX-4090\?"):
        parse_cluster("7x4091")


def test_errors_are_zeroplan_errors() -> None:
    assert issubclass(UnknownGPUError, ZeroplanError)
    assert issubclass(BadClusterSpecError, ZeroplanError)


def test_cluster_validates_counts() -> None:
    gpu = GPU_CATALOG["RTX-4090"]
    with pytest.raises(BadClusterSpecError):
        Cluster(gpu, gpus_per_node=0)
    with pytest.raises(BadClusterSpecError):
        Cluster(gpu, gpus_per_node=1, num_nodes=0)
    with pytest.raises(BadClusterSpecError):
        Cluster(gpu, gpus_per_node=1, num_nodes=2, inter_node_gbs=0.0)
    assert Cluster(gpu, gpus_per_node=7).world_size == 7


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("99999999999999999999x4090", "a node holds at most 64 GPUs, got 99,999,999,999,"),
        ("65xH100", "at most 64 GPUs, got 65"),
        ("4097x8xH100", "a cluster has at most 4,096 nodes, got 4,097"),
    ],
)
def test_cluster_counts_past_any_machine_are_refused(spec: str, needle: str) -> None:
    """A typo's count was planned as a cluster: absurd tokens/s, a config's batch size of
    10^20. The bounds sit in Cluster, so specs, hostfiles and launch's nodes share them."""
    with pytest.raises(BadClusterSpecError, match=needle):
        parse_cluster(spec)
    assert parse_cluster("4096x64xH100").world_size == 4096 * 64


# --------------------------------------------------------------------------- hostfile


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text, encoding="utf-8")
    return path


def test_hostfile_basic(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "# cluster A\n\nworker-1 slots=8\n   worker-2 slots=8   # spare PSU\n"
        "\n# worker-3 slots=4\n",
    )
    h100 = get_gpu("h100")
    cluster = parse_hostfile(path, h100)
    assert cluster == Cluster(h100, gpus_per_node=8, num_nodes=2)
    assert cluster.world_size == 16
    assert cluster.describe() == "2×8×H100-SXM-80GB"


def test_hostfile_single_host_and_str_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "localhost slots=7\n")
    cluster = parse_hostfile(str(path), get_gpu("4090"), inter_node_gbs=12.5)
    assert (cluster.num_nodes, cluster.gpus_per_node, cluster.world_size) == (1, 7, 7)
    assert cluster.inter_node_gbs == 12.5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a slots=8\nb slots=4\n", "same slots"),
        ("a slots=8\na slots=8\n", "listed twice"),
        ("a slots=0\n", "at least 1"),
        ("a slots=-2\n", "line 1"),
        ("a\n", "'hostname slots=N'"),
        ("a slots=8\nb gpus=8\n", "line 2"),
        ("a slots = 8\n", "is not"),
        ("a slots=eight\n", "is not"),
        ("", "lists no hosts"),
        ("# only comments\n\n", "lists no hosts"),
    ],
)
def test_hostfile_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(BadClusterSpecError) as info:
        parse_hostfile(path, get_gpu("h100"))
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_hostfile_missing(tmp_path: Path) -> None:
    with pytest.raises(BadClusterSpecError, match="does not exist"):
        parse_hostfile(tmp_path / "nope", get_gpu("h100"))


def test_hostfile_is_directory(tmp_path: Path) -> None:
    with pytest.raises(BadClusterSpecError, match="cannot read hostfile"):
        parse_hostfile(tmp_path, get_gpu("h100"))


def test_a_hostfile_node_past_any_machine_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadClusterSpecError, match="at most 64 GPUs, got 128"):
        parse_hostfile(_write(tmp_path, "a slots=128\n"), get_gpu("h100"))


# --------------------------------------------------------------------------- NVML mapping


@pytest.mark.parametrize(
    ("nvml_name", "canonical"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM-80GB"),
        ("NVIDIA H100 PCIe", "H100-PCIE-80GB"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA GeForce RTX 3090", "RTX-3090"),
        ("GeForce RTX 3090", "RTX-3090"),  # pre-2021 drivers had no "NVIDIA " prefix
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA H200", "H200-SXM-141GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-SXM-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-SXM-40GB"),
        ("A100-SXM4-40GB", "A100-SXM-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-PCIE-40GB"),
        ("NVIDIA A100 80GB PCIe", "A100-PCIE-80GB"),
        ("NVIDIA B200", "B200-SXM-180GB"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100-SXM2-16GB"),
        ("Tesla V100-SXM2-32GB", "V100-SXM2-32GB"),
        ("NVIDIA A40", "A40"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA GeForce RTX 3080", "RTX-3080"),
        ("NVIDIA GeForce RTX 4080", "RTX-4080"),
        ("NVIDIA GeForce RTX 5090", "RTX-5090"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTX-PRO-6000"),
        ("NVIDIA H20", "H20"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("NVIDIA GH200 480GB", "GH200-96GB"),
    ],
)
def test_gpu_from_nvml_name_known(nvml_name: str, canonical: str) -> None:
    measured = 81_000 * MIB + 123
    gpu = gpu_from_nvml_name(nvml_name, measured)
    catalog = GPU_CATALOG[canonical]
    assert gpu.name == canonical
    assert gpu.known
    assert gpu.memory_bytes == measured  # NVML's figure wins over the catalog's
    assert dataclasses.replace(gpu, memory_bytes=catalog.memory_bytes) == catalog


def test_gpu_from_nvml_name_accepts_bytes() -> None:
    assert gpu_from_nvml_name(b"NVIDIA H200", 1).name == "H200-SXM-141GB"


@pytest.mark.parametrize(
    ("nvml_name", "label"),
    [
        ("NVIDIA H200 NVL", "H200-NVL"),  # PCIe part: must not inherit SXM speeds
        ("NVIDIA GeForce RTX 4090 D", "GeForce-RTX-4090-D"),
        (
            "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition",
            "RTX-PRO-6000-Blackwell-Max-Q-Workstation-Edition",
        ),
        ("Tesla V100-PCIE-16GB", "Tesla-V100-PCIE-16GB"),  # no NVLink: not the SXM2 entry
        ("   ", "unknown-GPU"),
    ],
)
def test_gpu_from_nvml_name_unknown(nvml_name: str, label: str) -> None:
    gpu = gpu_from_nvml_name(nvml_name, 16 * 2**30)
    assert gpu.name == label
    assert gpu.known is False
    assert gpu.memory_bytes == 16 * 2**30
    # Pessimistic: slower than anything in the catalog, and no peer access.
    assert gpu.tensor_tflops < min(g.tensor_tflops for g in GPU_CATALOG.values())
    assert gpu.memory_bandwidth_gbs < min(g.memory_bandwidth_gbs for g in GPU_CATALOG.values())
    assert gpu.interconnect == "pcie" and gpu.p2p is False


def test_gpu_from_nvml_name_rejects_bad_memory() -> None:
    with pytest.raises(ValueError):
        gpu_from_nvml_name("NVIDIA H100 80GB HBM3", 0)


UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, [0, 1, 2]),
        ("", []),
        ("1", [1]),
        ("2,0", [2, 0]),
        ("0, 1", [0, 1]),
        ("0,7,1", [0]),  # CUDA stops at the first invalid index
        ("0,0,1", [0]),  # ...and at a repeat
        ("GPU-bbbb", [1]),
        ("gpu-cccc3333-0000,0", [2, 0]),
        ("GPU-", []),  # ambiguous prefix
        ("MIG-1234", []),
        ("-1", []),
    ],
)
def test_visible_indices(env: str | None, expected: list[int]) -> None:
    assert _visible_indices(env, UUIDS) == expected


def test_cluster_from_devices() -> None:
    assert _cluster_from_devices([]) is None
    one = _cluster_from_devices([("NVIDIA H100 80GB HBM3", 81559 * MIB)] * 8)
    assert one is not None
    assert one.describe() == "8×H100-SXM-80GB"
    mixed = _cluster_from_devices(
        [("NVIDIA H100 80GB HBM3", 81559 * MIB), ("NVIDIA GeForce RTX 4090", 24564 * MIB)]
    )
    assert mixed is not None
    assert mixed.gpu.name == "RTX-4090"  # the smallest card bounds the per-GPU plan
    assert mixed.world_size == 2


# --------------------------------------------------------------------------- local_cluster


def test_local_cluster_does_not_raise() -> None:
    result = local_cluster()
    assert result is None or isinstance(result, Cluster)
    if result is not None:
        assert result.world_size >= 1 and result.num_nodes == 1


def test_local_cluster_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert local_cluster() is None


def test_local_cluster_without_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error=True))
    assert local_cluster() is None


def test_local_cluster_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([]))
    assert local_cluster() is None


def test_local_cluster_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [("NVIDIA H100 80GB HBM3", 85_520_809_984)] * 4
    fake = fake_pynvml(devices, shutdown_error=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cluster = local_cluster()
    assert cluster is not None
    assert cluster.describe() == "4×H100-SXM-80GB"
    assert cluster.gpu.memory_bytes == 85_520_809_984
    assert fake.state["shutdown"] == 1

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    cluster = local_cluster()
    assert cluster is not None and cluster.world_size == 2

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_cluster() is None


def test_local_cluster_unknown_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_pynvml([("NVIDIA RTX PRO 4500", 32_000 * MIB)] * 2)
    )
    cluster = local_cluster()
    assert cluster is not None
    assert cluster.gpu.known is False
    assert cluster.gpu.memory_bytes == 32_000 * MIB
    assert cluster.describe() == "2×RTX-PRO-4500"


# --------------------------------------------------------------------------- links


def _with_p2p(mod: types.ModuleType, status: Callable[[int, int], int] | None) -> types.ModuleType:
    """The fake pynvml with nvmlDeviceGetP2PStatus (0 = OK) or, with None, one that raises.

    As in nvidia-ml-py 12/13, the capability constant is a one-element tuple (a trailing
    comma in its source), and the call, like ctypes, refuses anything but an int: on a
    2×H200 machine passing the constant as it is raised ctypes.ArgumentError."""
    mod.NVML_P2P_CAPS_INDEX_READ = (0,)  # type: ignore[attr-defined]
    mod.NVML_P2P_STATUS_OK = 0  # type: ignore[attr-defined]

    def get(a: int, b: int, cap: int) -> int:
        if status is None:
            raise FakeNVMLError("Not Supported")
        if type(cap) is not int:
            raise TypeError("argument 3: Don't know how to convert parameter 3")
        assert cap == 0
        return status(a, b)

    mod.nvmlDeviceGetP2PStatus = get  # type: ignore[attr-defined]
    return mod


def test_local_cluster_reads_p2p_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # the catalog says a 4090 has no P2P; NVML, asked about this machine, says it has
    devices = [("NVIDIA GeForce RTX 4090", 24_564 * MIB)] * 4
    monkeypatch.setitem(sys.modules, "pynvml", _with_p2p(fake_pynvml(devices), lambda a, b: 0))
    cluster = local_cluster()
    assert cluster is not None and cluster.gpu.p2p is True and cluster.notes == ()
    # one pair without it: the node has none (a ring runs over every pair)
    h100 = [("NVIDIA H100 80GB HBM3", 85_520_809_984)] * 4
    no_pair = _with_p2p(fake_pynvml(h100), lambda a, b: 2 if (a, b) == (1, 3) else 0)
    monkeypatch.setitem(sys.modules, "pynvml", no_pair)
    cluster = local_cluster()
    assert cluster is not None and cluster.gpu.p2p is False


def test_local_cluster_falls_back_to_the_catalog_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from zeroplan.api import estimate
    from zeroplan.models import load_model
    from zeroplan.planner import PlanRequest, plan

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    devices = [("NVIDIA GeForce RTX 4090", 24_564 * MIB)] * 2
    for fake in (fake_pynvml(devices), _with_p2p(fake_pynvml(devices), None)):
        monkeypatch.setitem(sys.modules, "pynvml", fake)  # no such call; a call that raises
        cluster = local_cluster()
        assert cluster is not None and cluster.gpu.p2p is False  # the catalog's
        assert len(cluster.notes) == 1 and "NVML could not read" in cluster.notes[0]
        assert "catalog's for RTX-4090 (no)" in cluster.notes[0]
    est = estimate("llama-3.2-1b", micro_batch=1)  # on this machine's GPUs
    assert est.cluster["world_size"] == 2 and any("NVML could not read" in n for n in est.notes)
    p = plan(PlanRequest(spec=load_model("llama-3.2-1b"), cluster=cluster))
    assert any("NVML could not read" in a for a in p.assumptions)
    # the user's word replaces the fallback, and its note
    told = estimate("llama-3.2-1b", micro_batch=1, p2p=True)
    assert told.cluster["p2p"] is True and not any("NVML" in n for n in told.notes)
    # one GPU: P2P does not matter, no note
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices[:1]))
    single = local_cluster()
    assert single is not None and single.notes == ()


def test_links_set_the_speed_models_bandwidth() -> None:
    from zeroplan.speed import DEFAULT_INTER_NODE_GBS, FITTED, link_gbs

    # no P2P: NCCL stages through host memory, at the rate measured on two H200s
    staged = FITTED.host_staged_gbs
    pcie = parse_cluster("7x4090")
    assert link_gbs(pcie) == min(25.0, staged)
    assert link_gbs(with_links(pcie, p2p=True)) == 25.0
    nvl = parse_cluster("8xH100")
    assert link_gbs(with_links(nvl, p2p=False)) == staged
    two = parse_cluster("2x8xH100")
    assert link_gbs(two) == DEFAULT_INTER_NODE_GBS
    assert link_gbs(with_links(two, inter_node_gbs=50)) == 50.0
    assert link_gbs(with_links(two, inter_node_gbs=1e4)) == nvl.gpu.link_bandwidth_gbs
    assert with_links(pcie) == pcie
    for bad in (
        lambda: with_links(parse_cluster("1xH100"), p2p=False),
        lambda: with_links(parse_cluster("2x1xH100"), p2p=True),
        lambda: with_links(two, inter_node_gbs=0),
        lambda: with_links(two, inter_node_gbs=-1.0),
    ):
        with pytest.raises(BadLinkOptionError):
            bad()


def test_cpu_cores_set_the_threads_each_rank_gets() -> None:
    from zeroplan.hardware import DEFAULT_CPU_CORES_PER_GPU

    seven = parse_cluster("7x4090")
    assert seven.cpu_cores_per_node is None  # a catalog cluster: unknown
    assert seven.cpu_threads_per_rank == DEFAULT_CPU_CORES_PER_GPU
    assert with_links(seven, cpu_cores_per_node=32).cpu_threads_per_rank == 4  # ⌊32 / 7⌋
    assert with_links(seven, cpu_cores_per_node=3).cpu_threads_per_rank == 1
    assert with_links(parse_cluster("1xH200"), cpu_cores_per_node=16).cpu_threads_per_rank == 16
    for cores in (0, -4):
        with pytest.raises(BadLinkOptionError, match="--cpu-cores-per-node"):
            with_links(seven, cpu_cores_per_node=cores)


def test_this_machines_cluster_has_its_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroplan import hardware

    devices = [("NVIDIA H100 80GB HBM3", 85_520_809_984)] * 2
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices))
    monkeypatch.setattr(hardware, "usable_cpu_cores", lambda: 24)
    here = local_cluster()
    assert here is not None and here.cpu_cores_per_node == 24
    assert here.cpu_threads_per_rank == 12


def test_cli_links_change_the_predicted_speed() -> None:
    import json

    from click.testing import CliRunner

    from zeroplan.commands.cli import cli
    from zeroplan.speed import FITTED

    def speed(*extra: str) -> dict[str, float]:
        args = ["estimate", "llama-3.1-8b-instruct", "--zero", "3", "--json", *extra]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["speed"]  # type: ignore[no-any-return]

    # no P2P: the host-staged rate measured on two H200s
    assert speed("--gpus", "7x4090")["link_gbs"] == FITTED.host_staged_gbs
    fast = speed("--gpus", "7x4090", "--p2p")
    assert fast["link_gbs"] == 25.0
    slow = speed("--gpus", "7x4090")
    assert fast["comm_seconds"] == pytest.approx(slow["comm_seconds"] * slow["link_gbs"] / 25.0)
    assert speed("--gpus", "2x8xH100", "--inter-node-gbs", "50")["link_gbs"] == 50.0
    # a CPU-offloaded optimizer steps faster on more cores per GPU
    off = ("--gpus", "2xH100", "--method", "full", "--offload", "optimizer")
    few = speed(*off, "--cpu-cores-per-node", "4")["offload_seconds"]
    many = speed(*off, "--cpu-cores-per-node", "64")["offload_seconds"]
    assert few > 2 * many > 0
    args = ["estimate", "llama-3.2-1b", "--zero", "2", *off, "--cpu-cores-per-node", "64"]
    shown = CliRunner().invoke(cli, [*args, "--json"])
    told = json.loads(shown.output)["cluster"]
    assert told["cpu_cores_per_node"] == 64 and told["cpu_threads_per_rank"] == 32
    assert "CPU Adam on 32 threads per GPU" in " ".join(
        CliRunner().invoke(cli, args).output.split()
    )
    bad = CliRunner().invoke(cli, ["estimate", "llama-3.2-1b", "--cpu-cores-per-node", "0"])
    assert isinstance(bad.exception, BadLinkOptionError)  # main() prints it, exit status 2
    assert "--cpu-cores-per-node must be at least 1" in str(bad.exception)
    # plan: the same setup's communication over the faster link (25 GB/s with P2P against
    # the host-staged rate without)
    args = ["plan", "llama-3.1-8b-instruct", "--gpus", "7x4090", "--method", "full", "--json"]
    slow_plan = json.loads(CliRunner().invoke(cli, args).output)["best"]
    fast_plan = json.loads(CliRunner().invoke(cli, [*args, "--p2p"]).output)["best"]
    assert slow_plan["setup"] == fast_plan["setup"]
    ratio = slow["link_gbs"] / 25.0
    assert fast_plan["comm_seconds"] == pytest.approx(slow_plan["comm_seconds"] * ratio)
