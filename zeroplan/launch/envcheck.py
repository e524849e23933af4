"""``zeroplan env``: this machine as a training run sees it, without importing the heavy
packages (torch alone takes seconds to import and may crash on a broken CUDA install).

Versions come from ``importlib.metadata``; torch's CUDA version from its ``version.py``
and DeepSpeed's pre-built ops from its ``git_version_info_installed.py``, both read as text;
GPUs, driver and the CUDA version the driver supports from NVML. ``collect`` returns data;
the CLI renders it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zeroplan.errors import MissingDependencyError

# Libraries that log a warning of their own when merely imported on a CPU machine, before
# anything of ours runs: bitsandbytes >= 0.49 on a CPU with AVX512-BF16 asks the Hub's
# `kernels` (a requirement of transformers >= 5.2x) for a CPU 4-bit kernel, and offline both
# it and `kernels` say they could not. Nothing a zeroplan user runs needs that kernel (4-bit
# training needs a GPU); their errors still show.
IMPORT_NOISE_LOGGERS = ("bitsandbytes", "kernels")


def quiet_import_noise() -> None:
    """Keep IMPORT_NOISE_LOGGERS to errors, so a refusal stays one line on stderr."""
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# (distribution, module) in display order
PACKAGES = (
    ("torch", "torch"),
    ("deepspeed", "deepspeed"),
    ("bitsandbytes", "bitsandbytes"),
    ("flash-attn", "flash_attn"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("trl", "trl"),
    ("accelerate", "accelerate"),
    ("datasets", "datasets"),
    ("liger-kernel", "liger_kernel"),
    ("nvidia-ml-py", "pynvml"),
)


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    memory_bytes: int
    in_catalog: bool


@dataclass(frozen=True)
class EnvReport:
    host: str
    platform: str
    python: str
    cpus: int
    memory_bytes: int | None
    gpus: tuple[GPUInfo, ...]
    nvml: str | None  # None when NVML answered, else why not
    driver: str | None
    cuda_driver: str | None  # the newest CUDA the driver supports
    cuda_visible_devices: str | None
    packages: dict[str, str | None]  # distribution -> version, None when not installed
    torch_cuda: str | None  # the CUDA torch was built for (None: CPU-only or ROCm)
    torch_rocm: str | None
    deepspeed_ops: tuple[str, ...] | None  # pre-built ops; None when unknown
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, told without importing it (torch takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, why: str) -> None:
    """MissingDependencyError, one line naming the ``[train]`` extra, unless ``module`` is
    installed; ``why`` is the sentence's subject: "<why> needs <package>"."""
    if not installed(module):
        raise MissingDependencyError(
            f"{why} needs {module.replace('_', '-')}, which is not installed here: "
            "pip install 'zeroplan[train]'"
        )


def _package_file(module: str, name: str) -> Path | None:
    """A file inside a package's folder, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def _assigned(path: Path | None, name: str) -> tuple[bool, Any]:
    """(found, value) of a top-level ``name = <literal>`` in a Python file, never executed."""
    if path is None:
        return False, None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return False, None
    for node in tree.body:
        target = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == name:
            try:
                return True, ast.literal_eval(value)
            except ValueError:
                return False, None
    return False, None


def torch_build() -> tuple[bool, str | None, str | None]:
    """(known, the CUDA and the ROCm version torch was built for; both None: CPU-only)."""
    path = _package_file("torch", "version.py")
    found, cuda = _assigned(path, "cuda")
    _, hip = _assigned(path, "hip")
    return found, cuda if isinstance(cuda, str) else None, hip if isinstance(hip, str) else None


def deepspeed_prebuilt_ops() -> tuple[str, ...] | None:
    found, value = _assigned(
        _package_file("deepspeed", "git_version_info_installed.py"), "installed_ops"
    )
    if not found or not isinstance(value, dict):
        return None
    return tuple(sorted(k for k, v in value.items() if v))


def _numbers(version: str) -> tuple[int, ...]:
    m = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def minimum_versions() -> dict[str, str]:
    """distribution -> the lowest version zeroplan's requirements accept (``>=`` only)."""
    out: dict[str, str] = {}
    try:
        requires = importlib.metadata.requires("zeroplan") or []
    except importlib.metadata.PackageNotFoundError:
        return out
    for req in requires:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _nvml() -> tuple[tuple[GPUInfo, ...], str | None, str | None, str | None]:
    """(gpus, why NVML did not answer, driver version, CUDA version the driver supports)."""
    from zeroplan.hardware import gpu_from_nvml_name

    try:
        import pynvml
    except ImportError:
        return (), "nvidia-ml-py is not installed", None, None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        return (), f"no NVIDIA driver ({exc})", None, None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        cuda_int = int(pynvml.nvmlSystemGetCudaDriverVersion())
        cuda = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}"
        gpus = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            gpus.append(GPUInfo(i, name, total, gpu_from_nvml_name(name, total).known))
        return tuple(gpus), None, driver, cuda
    except (pynvml.NVMLError, OSError) as exc:
        return (), f"NVML failed ({exc})", None, None
    finally:
        with contextlib.suppress(pynvml.NVMLError, OSError):
            pynvml.nvmlShutdown()


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def problems_and_notes(
    packages: dict[str, str | None],
    gpus: tuple[GPUInfo, ...],
    nvml: str | None,
    cuda_driver: str | None,
    torch_build: tuple[bool, str | None, str | None],
    deepspeed_ops: tuple[str, ...] | None,
    minimums: dict[str, str],
    tools: dict[str, bool],
) -> tuple[list[str], list[str]]:
    """The incompatibilities that can be told without importing anything heavy."""
    problems: list[str] = []
    notes: list[str] = []
    torch = packages.get("torch")
    known, built_for, hip = torch_build
    cpu_only = torch is not None and known and built_for is None and hip is None
    for dist, version in packages.items():
        low = minimums.get(dist)
        if version is not None and low is not None and _numbers(version) < _numbers(low):
            problems.append(f"{dist} {version} is older than zeroplan needs (>= {low})")
    if torch is None:
        problems.append("torch is not installed: the ranks need it (pip install 'zeroplan[train]')")
    elif cpu_only:
        problems.append(
            f"torch {torch} is a CPU-only build: training needs a CUDA build "
            "(https://pytorch.org/get-started/locally/)"
        )
    if packages.get("nvidia-ml-py") is None:
        problems.append("nvidia-ml-py is not installed: zeroplan cannot see the GPUs")
    if built_for and cuda_driver and _numbers(cuda_driver)[:1] < _numbers(built_for)[:1]:
        problems.append(
            f"the driver supports CUDA up to {cuda_driver}, torch was built for CUDA "
            f"{built_for}: update the NVIDIA driver or install a torch built for CUDA {cuda_driver}"
        )
    for dist, what in (
        ("bitsandbytes", "qlora and the 8-bit optimizers"),
        ("flash-attn", "flash_attention_2"),
    ):
        if packages.get(dist) and cpu_only:
            problems.append(
                f"{dist} {packages[dist]} without a CUDA build of torch: {what} cannot run"
            )
    if packages.get("deepspeed") and deepspeed_ops == ():
        if not (tools["ninja"] and tools["c++"]):
            missing = " and ".join(t for t in ("ninja", "c++") if not tools[t])
            problems.append(
                "DeepSpeed's ops are not pre-built and cannot be compiled here (no "
                f"{missing}): ZeRO-Offload (CPU Adam) will fail; ZeRO without offload works"
            )
        else:
            notes.append("DeepSpeed compiles its ops (CPU Adam for ZeRO-Offload) on first use")
    if nvml is None and not gpus:
        notes.append("NVML answered but sees no GPU")
    for g in gpus:
        if not g.in_catalog:
            notes.append(
                f"GPU {g.index} ({g.name}) is not in zeroplan's catalog: memory checks are "
                "exact, speed estimates are placeholders"
            )
    return problems, notes


def collect() -> EnvReport:
    packages = {dist: _version(dist) for dist, _ in PACKAGES}
    gpus, nvml, driver, cuda_driver = _nvml()
    build = torch_build()
    ops = deepspeed_prebuilt_ops() if packages.get("deepspeed") else None
    tools = {
        "ninja": shutil.which("ninja") is not None or _version("ninja") is not None,
        "c++": shutil.which("c++") is not None or shutil.which("g++") is not None,
    }
    problems, notes = problems_and_notes(
        packages, gpus, nvml, cuda_driver, build, ops, minimum_versions(), tools
    )
    return EnvReport(
        host=socket.gethostname(),
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=sys.version.split()[0],
        cpus=os.cpu_count() or 0,
        memory_bytes=_memory_bytes(),
        gpus=gpus,
        nvml=nvml,
        driver=driver,
        cuda_driver=cuda_driver,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        packages=packages,
        torch_cuda=build[1],
        torch_rocm=build[2],
        deepspeed_ops=ops,
        problems=tuple(problems),
        notes=tuple(notes),
    )
