"""The benchmarks' sitecustomize probes patch their module right after it loads, through
benchmarks/probe_hooks.py, and leave the training process's sys.path as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_patch_runs_after_the_module_and_the_hook_steps_aside() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
        "from probe_hooks import PatchOnImport, patch_on_import\n"
        "seen = []\n"
        "patch_on_import({'colorsys': lambda m: seen.append(hasattr(m, 'rgb_to_hsv'))})\n"
        "import colorsys\n"
        "print(seen, any(isinstance(f, PatchOnImport) for f in sys.meta_path))"
    )
    assert _python(code, {}) == "[True] False"


@pytest.mark.parametrize(
    ("probe", "env"),
    [
        ("host_probe", "ZEROPLAN_HOST_PROBE"),
        ("nan_probe", "ZP_NAN_PROBE"),
        ("recipe_probe", "RECIPE_PROBE_OUT"),
    ],
)
def test_each_probe_patches_the_trainer_on_import(probe: str, env: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    code = (
        "import sys, transformers.trainer as t\n"
        f"print(t.Trainer.__init__.__module__ == 'sitecustomize', {str(BENCH)!r} in sys.path)"
    )
    on = {"PYTHONPATH": f"{BENCH / probe}{os.pathsep}{ROOT}", env: str(tmp_path / "p.json")}
    assert _python(code, on) == "True False"
