"""The files a plan leaves for ``zeroplan launch``: plan.json, ds_config.json, launch.sh, and
for several nodes a hostfile and launch.sbatch.

Written into a fresh temporary folder beside the target and renamed into place, so that an
error or Ctrl-C leaves either the old folder's files or the complete new set, never half.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zeroplan.dsconfig import ds_config
from zeroplan.errors import ConfigWriteError
from zeroplan.models import NOT_LOCAL_SOURCES
from zeroplan.planner import Plan, plan_json

if TYPE_CHECKING:
    from zeroplan.recipes.common import Recipe


def model_name(plan: Mapping[str, Any]) -> str:
    """The plan's model as people call it (for display): plan.json's ``model``, or
    ``model_name`` in a run folder that an older ``zeroplan launch`` wrote."""
    return str(plan.get("model_name") or plan["model"])


def model_location(plan: Mapping[str, Any], near: Path | None = None) -> str:
    """Where the plan's model is loaded from: a local folder (or config file) or a Hub id.

    plan.json's ``model_path`` (an absolute path, or what ``zeroplan launch --model`` gave)
    when it has one. Older plan.json files did not keep it: there ``model`` is the location
    when ``model_name`` is beside it (``launch --model`` wrote it so); else the folder of a
    local ``model_source`` or of ``model``, looked up from the working directory, then
    from ``near`` (the plan's folder); else ``model``, a Hub id or alias.
    """
    if plan.get("model_path"):
        return str(plan["model_path"])
    if plan.get("model_name"):
        return str(plan["model"])
    source = plan.get("model_source")
    if isinstance(source, str) and source not in NOT_LOCAL_SOURCES:
        found = local_model(source, near)
        if found is not None:
            return found
    return local_model(str(plan["model"]), near) or str(plan["model"])


def local_model(model: str, near: Path | None = None) -> str | None:
    """The absolute folder the ranks load the model from when ``model`` is a local folder or
    a config.json inside one (looked up from the working directory, then from ``near``);
    None for a Hub id or alias."""
    for base in (Path.cwd(), near):
        if base is None:
            continue
        p = (base / Path(model).expanduser()).resolve()
        if p.is_dir():
            return str(p)
        if p.is_file() and p.suffix == ".json":
            return str(p.parent)
    return None


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


def sbatch_text(p: Plan, plan_path: Path) -> str:
    """A SLURM batch script that runs ``zeroplan launch`` once per node through srun; each
    node reads its rank and the rendezvous from SLURM's variables (``zeroplan.launch.multinode``)."""
    c = p.request.cluster
    launch = ["zeroplan", "launch", str(plan_path), "--data"]
    return "\n".join(
        [
            "#!/bin/bash",
            f"# zeroplan plan for {c.describe(times='x')}: sbatch launch.sbatch DATA.jsonl [launch options]",
            "# One zeroplan per node (srun --ntasks-per-node 1); each starts torchrun for its",
            "# GPUs with its SLURM_NODEID as node rank and the first host as the rendezvous.",
            "# The run folder (default runs/MODEL-slurmJOBID under the submit folder, or -o)",
            "# must be on a filesystem every node shares.",
            "#SBATCH --job-name=zeroplan",
            f"#SBATCH --nodes={c.num_nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={c.gpus_per_node}",
            "#SBATCH --exclusive",
            "set -euo pipefail",
            "DATA=${1:?usage: sbatch launch.sbatch DATA.jsonl [zeroplan launch options]}",
            "shift",
            f'srun --nodes={c.num_nodes} --ntasks-per-node=1 {shlex.join(launch)} "$DATA" "$@"',
            "",
        ]
    )


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
        files["launch.sbatch"] = sbatch_text(p, target.resolve() / "plan.json")
    files["launch.sh"] = "#!/bin/sh\n" + shlex.join(launch_command(p)) + ' "$@"\n'
    executable = ("launch.sh", "launch.sbatch")
    return write_folder(target, files, executable)


def write_recipe_plan(
    p: Plan, directory: str | os.PathLike[str], top: int, recipe: Recipe | None, emit: str | None
) -> tuple[list[Path], str]:
    """plan.json and, for ``recipe`` (a ``recipes.Recipe``), that recipe planned; for
    ``emit`` (a trainer's format), a fresh recipe; with the DeepSpeed JSON they name.
    Returns the paths written and the recipe's unified diff ("" without a recipe)."""
    from zeroplan.recipes.write import emit_files, planned_files

    if p.best is None:
        raise ConfigWriteError("nothing fits, so there is no plan to write (see the suggestion)")
    target = Path(directory)
    files = {"plan.json": json.dumps(plan_json(p, top=top), indent=2) + "\n"}
    diff = ""
    if recipe is not None:
        planned, diff = planned_files(recipe, p.best.setup, target)
        files.update(planned)
    if emit is not None:
        # what the trainer loads: a local model's folder, else the Hub id
        model = p.request.spec.local_path or p.request.spec.name
        files.update(emit_files(emit, model, p.best.setup, target))
    return write_folder(target, files), diff


def write_folder(
    directory: str | os.PathLike[str], files: dict[str, str], executable: tuple[str, ...] = ()
) -> list[Path]:
    """Write ``files`` (name -> text) into ``directory`` all at once: into a fresh temporary
    folder beside it, then renamed into place (the folder's other files stay)."""
    target = Path(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        for name, text in files.items():
            (tmp / name).write_text(text)
            if name in executable:
                (tmp / name).chmod(0o755)
        if target.exists():
            for name in files:
                os.replace(tmp / name, target / name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as exc:
        raise ConfigWriteError(f"cannot write the plan to {target}: {exc.strerror or exc}") from exc
    return [target / name for name in files]
