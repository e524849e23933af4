"""A stand-in for the ``pynvml`` module: just the calls ``hardware.local_cluster`` makes, so
that a test can say which GPUs this machine has and nothing else is faked."""

from __future__ import annotations

import types


class FakeNVMLError(Exception):
    pass


def fake_pynvml(
    devices: list[tuple[str, int]], *, init_error: bool = False, shutdown_error: bool = False
) -> types.ModuleType:
    """``devices``: (NVML product name, total bytes) per GPU; ``mod.state["shutdown"]``
    counts nvmlShutdown calls."""
    mod = types.ModuleType("pynvml")
    state = {"shutdown": 0}

    def nvml_init() -> None:
        if init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvml_shutdown() -> None:
        state["shutdown"] += 1
        if shutdown_error:
            raise FakeNVMLError("Uninitialized")

    mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = nvml_init  # type: ignore[attr-defined]
    mod.nvmlShutdown = nvml_shutdown  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h:04d}"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: devices[h][0]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=devices[h][1], free=devices[h][1], used=0
    )
    mod.state = state  # type: ignore[attr-defined]
    return mod
