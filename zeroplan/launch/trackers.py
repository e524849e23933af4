"""``zeroplan launch --report-to``: the experiment tracker the launched Trainer logs to,
where it writes inside the run folder, and what must be in place before any rank starts.

Each tracker is the Trainer's own integration (``report_to``); zeroplan only points it at
the run folder, through the variables the integration reads, unless the user set them:

* ``tensorboard``: event files in RUN/tb (``TENSORBOARD_LOGGING_DIR``; transformers 4
  reads ``logging_dir``, which the rank program sets to the same folder);
* ``wandb``: its local files in RUN/wandb (``WANDB_DIR``); the run goes to the W&B server
  unless ``WANDB_MODE=offline``; ``WANDB_PROJECT`` / ``WANDB_ENTITY`` / ``WANDB_NAME`` as usual;
* ``mlflow``: a file store in RUN/mlruns (``MLFLOW_TRACKING_URI``), or the user's server.

The checks need no import of the tracker: a missing package or a missing W&B login is one
line before anything starts, not a crash on rank 0 after the model has loaded.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from zeroplan.errors import MissingDependencyError, TrackerLoginError

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
TB_DIR = "tb"

# tracker -> (modules any one of which the Trainer's integration accepts, what to pip install)
_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
}
# WANDB_MODE values under which wandb needs no login
_WANDB_LOCAL = ("offline", "dryrun", "disabled")


def tracker_env(tracker: str, run_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that point ``tracker`` into ``run_dir``, less those ``environ`` sets."""
    wanted = {
        "tensorboard": {"TENSORBOARD_LOGGING_DIR": str(run_dir / TB_DIR)},
        "wandb": {"WANDB_DIR": str(run_dir)},
        "mlflow": {"MLFLOW_TRACKING_URI": (run_dir / "mlruns").as_uri()},
    }.get(tracker, {})
    return {k: v for k, v in wanted.items() if not environ.get(k)}


def where(tracker: str) -> str:
    """Where in the run folder ``tracker`` writes, as a phrase (for --dry-run and notes)."""
    return {
        "tensorboard": f"TensorBoard event files in RUN/{TB_DIR}",
        "wandb": "Weights & Biases (local files in RUN/wandb)",
        "mlflow": "MLflow (a file store in RUN/mlruns unless MLFLOW_TRACKING_URI is set)",
    }.get(tracker, "no tracker")


def check_tracker(
    tracker: str, environ: Mapping[str, str] | None = None, *, login: bool = True
) -> None:
    """Raises MissingDependencyError when the tracker's package is not installed here (every
    rank builds the integration), and with ``login`` (the process that logs: global rank 0)
    TrackerLoginError for wandb without a login and without WANDB_MODE=offline."""
    if tracker == "none":
        return
    env = os.environ if environ is None else environ
    modules, package = _PACKAGES[tracker]
    if not any(importlib.util.find_spec(m) is not None for m in modules):
        raise MissingDependencyError(
            f"--report-to {tracker} needs {package}, which is not installed here: "
            f"pip install {package}"
        )
    if login and tracker == "wandb" and not wandb_logged_in(env):
        raise TrackerLoginError(
            "--report-to wandb: not logged in to Weights & Biases (no WANDB_API_KEY, no "
            f"{_wandb_host(env)} entry in {_netrc_path(env)}): run `wandb login`, set "
            "WANDB_API_KEY, or set WANDB_MODE=offline to keep the run in RUN/wandb"
        )


def wandb_logged_in(environ: Mapping[str, str]) -> bool:
    """Whether wandb can start a run without a prompt: an API key in the environment or in
    the netrc file ``wandb login`` writes, or a mode that stays local."""
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_MODE", "").lower() in _WANDB_LOCAL:
        return True
    try:
        found = netrc.netrc(str(_netrc_path(environ))).authenticators(_wandb_host(environ))
    except (OSError, netrc.NetrcParseError):
        return False
    return found is not None


def _wandb_host(environ: Mapping[str, str]) -> str:
    return urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""


def _netrc_path(environ: Mapping[str, str]) -> Path:
    home = Path(environ.get("HOME") or Path.home())
    return Path(environ["NETRC"]) if environ.get("NETRC") else home / ".netrc"
