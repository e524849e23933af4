"""The files a plan leaves for ``zeroplan launch``: plan.json, ds_config.json, launch.sh, hostfile.

Written into a fresh temporary folder beside the target and renamed into place, so that an
error or Ctrl-C leaves either the old folder's files or the complete new set, never half.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from zeroplan.dsconfig import ds_config
from zeroplan.errors import ConfigWriteError
from zeroplan.planner import Plan, plan_json


def launch_command(p: Plan, plan_path: str = "plan.json") -> list[str]:
    """``zeroplan launch plan.json --data DATA`` (the launch issue's entry point)."""
    cmd = ["zeroplan", "launch", plan_path, "--data", "DATA.jsonl"]
    if p.request.cluster.num_nodes > 1:
        cmd += ["--hostfile", "hostfile"]
    return cmd


def hostfile_text(p: Plan) -> str:
    """DeepSpeed hostfile: one ``host slots=N`` line per node (host names to fill in)."""
    c = p.request.cluster
    return "".join(f"node{i} slots={c.gpus_per_node}\n" for i in range(c.num_nodes))


def write_plan(p: Plan, directory: str | os.PathLike[str], top: int = 8) -> list[Path]:
    """Write the plan's files into ``directory`` (created if missing); return their paths."""
    if p.best is None:
        raise ConfigWriteError("nothing fits, so there is no plan to write (see the suggestion)")
    target = Path(directory)
    files: dict[str, str] = {}
    data: dict[str, Any] = plan_json(p, top=top)
    files["plan.json"] = json.dumps(data, indent=2) + "\n"
    setup = p.best.setup
    if setup.zero is not None:
        files["ds_config.json"] = (
            json.dumps(ds_config(setup, p.request.cluster.world_size), indent=2) + "\n"
        )
    if p.request.cluster.num_nodes > 1:
        files["hostfile"] = hostfile_text(p)
    files["launch.sh"] = "#!/bin/sh\n" + shlex.join(launch_command(p)) + ' "$@"\n'
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        for name, text in files.items():
            (tmp / name).write_text(text)
        (tmp / "launch.sh").chmod(0o755)
        if target.exists():
            for name in files:
                os.replace(tmp / name, target / name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        raise ConfigWriteError(f"cannot write the plan to {target}: {exc.strerror or exc}") from exc
    return [target / name for name in files]
