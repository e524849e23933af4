"""Shared fixtures: keep model resolution away from the user's HF cache and the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def isolated_hf(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME, HF cache and HF_HOME, offline: only the catalog and local paths resolve.

    Without this a model sitting in the developer's ``~/.cache/huggingface/hub`` would
    shadow the catalog (the cache is searched first) and an unknown Hub id would go online.
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub-cache"))
    monkeypatch.setenv("HF_HOME", str(home / "hf-home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return home


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without HF settings, offline, HOME and HF caches in ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HOME=str(home),
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(home / "hub-cache"),
        HF_HOME=str(home / "hf-home"),
        **extra,
    )
    return env


@pytest.fixture
def subprocess_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for a ``zeroplan`` subprocess: offline, empty HOME and HF caches."""
    return offline_env(tmp_path_factory.mktemp("subhome"), COLUMNS="200")
