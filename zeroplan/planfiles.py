"""The files a plan leaves for ``zeroplan launch``: plan.json, ds_config.json, launch.sh, and
for several nodes a hostfile and launch.sbatch.

Written into a fresh temporary folder and renamed into place, after every target name was
checked: an error or Ctrl-C leaves the old folder's files or the new set, and no temporary.
Re-planning into a folder that holds an earlier plan removes that plan's files (PLAN_FILES)
which the new one does not write, so that none of them is taken for the new plan's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zeroplan.dsconfig import ds_config
from zeroplan.errors import ConfigWriteError
from zeroplan.models import NOT_LOCAL_SOURCES
from zeroplan.outputs import check_can_create, made_parents, read_json_object, umask
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


# Every file write_plan may write. Re-planning into a folder that holds a plan removes the
# ones the new plan does not write; recipes (--recipe, --emit) are not among them, as a
# recipe's name may be one of the user's own files.
PLAN_FILES = ("plan.json", "ds_config.json", "launch.sh", "hostfile", "launch.sbatch")
PLAN_KEYS = ("model", "cluster", "world_size", "best")  # what makes a plan.json a plan
RUN_RECORD = "launch.json"  # watch.runlog.LAUNCH_FILE (runlog imports this module)


def launch_script(p: Plan) -> str:
    """launch.sh: ``zeroplan launch`` on the plan.json (and hostfile) beside the script, so
    that it runs from any folder; data and other paths stay the caller's (no cd)."""
    args = ['"$here/plan.json"', "--data", "DATA.jsonl"]
    if p.request.cluster.num_nodes > 1:
        args += ["--hostfile", '"$here/hostfile"']
    return "\n".join(
        [
            "#!/bin/sh",
            "# zeroplan launch on the plan beside this script, from any folder:",
            "#   sh path/to/launch.sh --data train.jsonl [zeroplan launch options]",
            'here=$(dirname "$0")',
            f'exec zeroplan launch {" ".join(args)} "$@"',
            "",
        ]
    )


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


def write_plan(
    p: Plan,
    directory: str | os.PathLike[str],
    top: int = 8,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the plan's files into ``directory`` (created if missing); return their paths.
    ``say`` is told which files of an earlier plan there were removed."""
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
    files["launch.sh"] = launch_script(p)
    executable = ("launch.sh", "launch.sbatch")
    return write_folder(target, files, executable, say)


def write_recipe_plan(
    p: Plan,
    directory: str | os.PathLike[str],
    top: int,
    recipe: Recipe | None,
    emit: str | None,
    say: Callable[[str], None] | None = None,
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
    if recipe is not None:
        _keep_the_recipe(recipe, target, files)
    return write_folder(target, files, say=say), diff


def _keep_the_recipe(recipe: Recipe, target: Path, files: Mapping[str, str]) -> None:
    """Refuse a plan that would write over the recipe it plans, or the DeepSpeed file that
    recipe reads: ``-o`` at the recipe's own folder would replace the user's files with the
    plan's (the planned recipe keeps the recipe's name)."""
    own = {recipe.path.resolve(): "the recipe being planned"}
    if recipe.deepspeed is not None and recipe.deepspeed["path"] != "(inline)":
        own[Path(recipe.deepspeed["path"]).resolve()] = "the DeepSpeed file the recipe reads"
    for name in files:
        what = own.get((target / name).resolve())
        if what is not None:
            raise ConfigWriteError(
                f"-o {target}: its {name} is {what}, which the plan would overwrite: give -o "
                "another folder"
            )


def write_folder(
    directory: str | os.PathLike[str],
    files: dict[str, str],
    executable: tuple[str, ...] = (),
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``files`` (name -> text) into ``directory`` all at once: into a fresh temporary
    folder, then renamed into place (a new folder whole, else file by file; the folder's
    other files stay, but an earlier plan's that this one does not write go: ``say`` is
    told which)."""
    target = Path(directory)
    _check_targets(target, files)
    stale = earlier_plan_files(target, files)
    exists = target.is_dir()
    mode = 0o777 & ~umask()
    current = target
    try:
        with made_parents(target.parent):
            # inside an existing folder: the renames then stay in it, whatever its parent allows
            home = target if exists else target.parent
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.resolve().name}.", dir=home))
            try:
                for name, text in files.items():
                    (tmp / name).write_text(text)
                    if name in executable:
                        (tmp / name).chmod(mode)
                if exists:
                    for name in files:
                        current = target / name
                        os.replace(tmp / name, current)
                else:
                    tmp.chmod(mode)  # mkdtemp's 0700, not the umask's
                    os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already after a folder's rename
    except OSError as exc:
        raise ConfigWriteError(
            f"cannot write the plan to {current}: {exc.strerror or exc}"
        ) from exc
    for name in stale:
        (target / name).unlink(missing_ok=True)
    if stale and say is not None:
        said = ", ".join(stale)
        say(f"removed {said} of the earlier plan in {target}: this plan does not use them")
    return [target / name for name in files]


def _check_targets(target: Path, files: Iterable[str]) -> None:
    """Refuse before anything is written: a name the plan writes that is a folder there, or
    a folder that cannot be written (or made)."""
    if target.exists() and not target.is_dir():
        raise ConfigWriteError(f"cannot write the plan to {target}: it is a file, not a folder")
    for name in files:
        if (target / name).is_dir():
            raise ConfigWriteError(
                f"cannot write the plan to {target / name}: it is a folder; remove it or give "
                "-o another folder"
            )
    check_can_create(target / "plan.json", "the plan")


def earlier_plan_files(target: Path, new: Iterable[str]) -> list[str]:
    """The files a plan written into ``target`` before left there that the new plan (``new``,
    its file names) does not write. None unless target/plan.json is a zeroplan plan and
    ``target`` is not a run folder (a run's ds_config.json and hostfile are the run's)."""
    if (target / RUN_RECORD).exists():
        return []
    old = read_json_object(target / "plan.json")
    if old is None or not set(PLAN_KEYS) <= old.keys():
        return []
    keep = set(new)
    return [name for name in PLAN_FILES if name not in keep and (target / name).is_file()]
