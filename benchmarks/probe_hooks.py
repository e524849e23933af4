"""Patch a module right after it is first imported: the hook the sitecustomize probes of
host_probe/, nan_probe/ and recipe_probe/ share.

A probe cannot import its target itself: importing transformers.trainer from
sitecustomize would run ahead of the trainers' own import-time patches (TRL, Unsloth).
So it installs a finder at the front of ``sys.meta_path`` that lets the normal finder
locate the module, wraps the loader's ``exec_module`` to run the patch after the module's
own code, and steps aside once every patched module has loaded.

The probes import it with benchmarks/ on ``sys.path`` for that import only: the training
process's path stays as the launch made it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``patches[name](module)`` right after module ``name`` executes, each once."""

    def __init__(self, patches: dict[str, Callable[[Any], None]]) -> None:
        self.pending = dict(patches)

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = self.pending.pop(name, None)
        if patch is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def run(module: Any) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = run  # type: ignore[method-assign]
        return spec


def patch_on_import(patches: dict[str, Callable[[Any], None]]) -> None:
    """Install a PatchOnImport for ``patches`` at the front of ``sys.meta_path``."""
    if patches:
        sys.meta_path.insert(0, PatchOnImport(patches))
