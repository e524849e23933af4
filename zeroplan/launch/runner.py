"""``zeroplan launch``: from a plan to the exact commands that start every rank.

Nothing here starts a process (that is ``supervise.run_launch``); everything returns data:

* ``find_plan`` / ``read_plan`` — a plan.json written by ``zeroplan plan -o DIR``, or
  ``plan_model`` — plan a model id on the cluster at hand;
* ``resolve_nodes`` — which hosts and GPU slots run ranks (``--gpus``, ``--hostfile``,
  DeepSpeed's ``--include`` / ``--exclude`` syntax);
* ``launch_env`` — the variables zeroplan sets for the ranks;
* ``build_launch`` — the launcher command(s) and the files written into RUN_DIR.

Every rank runs ``python -m zeroplan.launch.ranklog RUN_DIR/logs -- -m zeroplan.launch.sft
--plan RUN_DIR/plan.json --data DATA --out RUN_DIR [--resume] [--epochs ...]``: the wrapper
gives each rank ``RUN_DIR/logs/rank{N}.log`` and ``rank{N}.exit.json`` (see ranklog.py).

Launchers:

* ``torchrun`` (``python -m torch.distributed.run``): one command per node, static
  rendezvous at the first node (``--nnodes --node-rank --master-addr --master-port``);
  nodes other than this machine are started over ``ssh -tt`` so that ending the ssh client
  hangs up the remote torchrun, which then stops its ranks.
* ``deepspeed`` (``python -m deepspeed.launcher.runner``): one command; several nodes go
  through the hostfile written to RUN_DIR and DeepSpeed's pdsh runner. The variables zeroplan
  sets reach remote nodes through ``RUN_DIR/deepspeed_env`` (``DS_ENV_FILE``).

Several nodes assume what DeepSpeed's launcher assumes: the same Python environment and
working directory on every node, and RUN_DIR on a filesystem they share.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zeroplan.errors import BadClusterSpecError, BadPlanError, PredictedOOMError, ZeroplanError
from zeroplan.hardware import (
    GPU,
    MAX_GPUS_PER_NODE,
    Cluster,
    parse_cluster,
    read_hostfile,
    threads_per_rank,
    usable_cpu_cores,
)
from zeroplan.launch import envcheck
from zeroplan.launch.multinode import Rendezvous
from zeroplan.launch.ranklog import EXIT_NAME, LOG_NAME
from zeroplan.outputs import write_atomic
from zeroplan.planfiles import PLAN_KEYS, model_location, model_name
from zeroplan.trainsetup import TrainSetup
from zeroplan.watch.runlog import LAUNCH_FILE, METRICS_FILE, PLAN_FILE
from zeroplan.wholenumbers import whole_number

if TYPE_CHECKING:
    from zeroplan.models import ModelSpec
    from zeroplan.planner import Plan

LAUNCHERS = ("torchrun", "deepspeed")
SFT_PROGRAM = ("-m", "zeroplan.launch.sft")
LOG_DIR = "logs"
LAUNCHER_LOG = "launcher.log"
HOSTFILE = "hostfile"
DS_ENV_FILE = "deepspeed_env"
DS_CONFIG = "ds_config.json"
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=5")
# SIGTERM to SIGKILL when stopping a run; torchrun and DeepSpeed's launcher also wait 30 s
DEFAULT_GRACE_S = 30.0
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


# -- the plan -----------------------------------------------------------------------------


def find_plan(model_or_plan: str) -> Path | None:
    """The plan.json that MODEL_OR_PLAN names (a plan file or a folder holding one), or None
    when it names a model (a Hub id, an alias, a model folder or its config.json)."""
    p = Path(model_or_plan).expanduser()
    if p.is_dir():
        return p / PLAN_FILE if (p / PLAN_FILE).is_file() else None
    if not (p.is_file() and p.suffix == ".json"):
        return None
    if p.name == PLAN_FILE:
        return p
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not a plan; load_model will say what is wrong with it as a config
    if not isinstance(data, dict):
        return None
    # a model's config.json always names its model_type; an object that is neither that nor
    # a whole plan is read as a plan, whose check says it is neither
    plan = "best" in data and "world_size" in data
    return p if plan or "model_type" not in data else None


def read_plan(path: Path) -> dict[str, Any]:
    """A plan.json, checked: it must be a plan zeroplan wrote, with a setup that fits."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadPlanError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise BadPlanError(
            f"{path} is not JSON; write a plan with: zeroplan plan MODEL --gpus SPEC -o DIR"
        ) from None
    keys = set(PLAN_KEYS)
    if not isinstance(data, dict) or not keys <= data.keys():
        # MODEL_OR_PLAN may have meant a model: say it is not one of those either
        config = isinstance(data, dict) and "model_type" in data
        nor = "" if config else " nor a model's config.json (it has no model_type)"
        raise BadPlanError(
            f"{path} is not a plan zeroplan wrote (it needs {', '.join(sorted(keys))}){nor}; "
            "write one with: zeroplan plan MODEL --gpus SPEC -o DIR"
        )
    if data["best"] is None:
        raise BadPlanError(
            f"{path} has no setup that fits, so there is nothing to launch"
            + (f" ({data['suggestion']})" if data.get("suggestion") else "")
        )
    try:
        setup = setup_of(data)
    except (TypeError, KeyError, ZeroplanError) as exc:
        raise BadPlanError(f"{path}: the plan's setup is not valid ({exc})") from None
    if setup.keep_outputs:
        raise BadPlanError(f"{path}: {KEEP_OUTPUTS_REFUSAL}")
    return data


# zeroplan launch trains through the HF Trainer, whose compute_loss drops the model's
# output before backward: a plan that keeps it describes a loop launch does not run.
KEEP_OUTPUTS_REFUSAL = (
    "the plan keeps the model's output through backward (--keep-outputs / --loop plain), "
    "but zeroplan launch runs the HF Trainer loop, which drops it; plan without it"
)


def setup_of(plan: Mapping[str, Any]) -> TrainSetup:
    """The chosen setup of a plan JSON object."""
    from zeroplan.api import make_setup

    return make_setup(**dict(plan["best"]["setup"]))


def plan_cluster(plan: Mapping[str, Any]) -> Cluster | None:
    """The cluster the plan was made for, when its GPU is in the catalog."""
    try:
        return parse_cluster(str(plan["cluster"]))
    except ZeroplanError:
        return None


def plan_here(spec: ModelSpec, cluster: Cluster, job: Mapping[str, Any] | None = None) -> Plan:
    """The planner's answer for ``job`` (``PlanRequest`` fields: method, seq_len, ...; the
    request's defaults for the rest) on ``cluster``, for ranks started from this machine:
    the fused loss and Liger's kernels are chosen only when liger-kernel is installed here."""
    from zeroplan.planner import PlanRequest, plan

    # a plan made for this machine may choose Liger's fused loss and kernels only where the
    # ranks can run them (preflight refuses them otherwise)
    here = envcheck.installed("liger_kernel")
    fields = dict(job or {})
    # a recipe's job keeps the model's own kernels (commands.job.recipe_job says why), and
    # --no-liger / --no-fused-loss leave them out as zeroplan plan's do
    kernels = fields.pop("allow_kernels", True) and here
    fused = fields.pop("allow_fused_loss", True) and here
    return plan(
        PlanRequest(
            spec=spec, cluster=cluster, **fields, allow_fused_loss=fused, allow_kernels=kernels
        )
    )


def plan_model(
    model: str | ModelSpec, cluster: Cluster, job: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Plan ``model`` on ``cluster`` for ``job`` (as :func:`plan_here`) and return the plan
    JSON (as plan.json holds it); nothing fitting is an error."""
    from zeroplan.models import load_model
    from zeroplan.planner import plan_json

    spec = load_model(model) if isinstance(model, str) else model
    result = plan_here(spec, cluster, job)
    if result.best is None:
        raise PredictedOOMError(
            f"nothing fits {result.request.spec.name} on {cluster.describe()}: {result.suggestion}"
        )
    return plan_json(result)


# -- where the ranks run ------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One host and the GPU indices (CUDA device numbers) its ranks use."""

    host: str
    slots: tuple[int, ...]
    local: bool


def is_local_host(host: str) -> bool:
    name = socket.gethostname()
    return host in _LOCAL_NAMES or host in (name, name.split(".")[0])


def parse_filter(text: str, option: str) -> dict[str, tuple[int, ...] | None]:
    """DeepSpeed's ``--include`` / ``--exclude`` syntax: ``host[:slot,slot][@host...]``.

    ``worker-0:0,2@worker-1`` → {"worker-0": (0, 2), "worker-1": None (all slots)}.
    """
    out: dict[str, tuple[int, ...] | None] = {}
    for part in text.split("@"):
        host, _, slots = part.strip().partition(":")
        if not host or (slots and not re.fullmatch(r"\d+(,\d+)*", slots.replace(" ", ""))):
            raise BadClusterSpecError(
                f"{option} {text!r}: write host[:gpu,gpu][@host...], e.g. localhost:0,1 or "
                "worker-0@worker-1:0,2 (DeepSpeed's syntax)"
            )
        out[host] = tuple(int(s) for s in slots.replace(" ", "").split(",")) if slots else None
    return out


def select_nodes(
    pool: Mapping[str, int], include: str | None = None, exclude: str | None = None
) -> tuple[Node, ...]:
    """Apply ``--include`` / ``--exclude`` (DeepSpeed's semantics) to ``{host: slot count}``."""
    if include and exclude:
        raise BadClusterSpecError("--include and --exclude cannot be used together; pick one")
    chosen: dict[str, tuple[int, ...]] = {h: tuple(range(n)) for h, n in pool.items()}
    option, spec = ("--include", include) if include else ("--exclude", exclude)
    if spec:
        wanted = parse_filter(spec, option)
        for host, slots in wanted.items():
            if host not in pool:
                raise BadClusterSpecError(
                    f"{option} names host {host!r}, which is not in {', '.join(pool)}"
                )
            bad = [s for s in slots or () if s >= pool[host]]
            if bad:
                raise BadClusterSpecError(
                    f"{option} names GPU {bad[0]} on {host}, which has GPUs 0-{pool[host] - 1}"
                )
        if include:
            chosen = {h: tuple(sorted(set(s))) if s else chosen[h] for h, s in wanted.items()}
        else:
            for host, slots in wanted.items():
                keep = tuple(s for s in chosen[host] if slots is not None and s not in slots)
                chosen[host] = keep
    nodes = tuple(Node(h, s, is_local_host(h)) for h, s in chosen.items() if s)
    if not nodes:
        raise BadClusterSpecError(f"{option} {spec!r} leaves no GPU to run on")
    return nodes


def is_gpu_count(gpus: str) -> bool:
    """Whether launch's ``--gpus`` is a bare count (``4``), signed ones too, so that ``-1``
    is told it is too few rather than looked up as a GPU name."""
    return whole_number(gpus) is not None


def gpu_count(gpus: str) -> int:
    """``--gpus`` for launch: a count (``4``) or a one-node cluster spec (``4x4090``)."""
    n = whole_number(gpus)
    if n is not None:
        if n < 1:
            raise BadClusterSpecError(f"--gpus must be at least 1, got {n}")
        if n > MAX_GPUS_PER_NODE:
            raise BadClusterSpecError(
                f"--gpus {n} is more GPUs than a node holds (at most {MAX_GPUS_PER_NODE}); "
                "give this machine's count, or --hostfile for several nodes"
            )
        return n
    cluster = parse_cluster(gpus)
    if cluster.is_multi_node:
        raise BadClusterSpecError(
            f"--gpus {gpus} is {cluster.num_nodes} nodes: pass --hostfile with one "
            "'host slots=N' line per node"
        )
    return cluster.gpus_per_node


def resolve_nodes(
    *,
    count: int,
    hostfile: str | os.PathLike[str] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    present: Cluster | None = None,
) -> tuple[Node, ...]:
    """The hosts and GPUs that run ranks: the hostfile's, else ``count`` GPUs of this machine."""
    if hostfile is not None:
        return select_nodes(read_hostfile(hostfile), include, exclude)
    slots = count
    if (include or exclude) and present is not None:
        slots = max(count, present.gpus_per_node)  # --include may pick any GPU here
    return select_nodes({"localhost": slots}, include, exclude)


# -- what the ranks get -------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """Options passed through to the per-rank program (None: its default)."""

    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    eval_fraction: float | None = None
    resume: bool = False
    overlong: str | None = None  # drop | truncate
    data_format: str | None = None  # auto | messages | sharegpt | alpaca | text
    system_prompt: str | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None  # the newest checkpoints kept; 0: all
    logging_steps: int | None = None
    batching: str | None = None  # packed | padded | grouped
    packed_attention: str | None = None  # auto | varlen | mask
    report_to: str | None = None  # trackers.TRACKERS
    kernels: str | None = None  # auto | liger | none (zeroplan.launch.kernels)
    compile: bool | None = None  # regional torch.compile of the decoder layers
    cuda_graphs: bool | None = None  # the decoder as CUDA graphs (launch/graphs.py)

    def argv(self) -> list[str]:
        out = ["--resume"] if self.resume else []
        if self.compile is not None:
            out.append("--compile" if self.compile else "--no-compile")
        if self.cuda_graphs is not None:
            out.append("--cuda-graphs" if self.cuda_graphs else "--no-cuda-graphs")
        for flag, value in (
            ("--epochs", self.epochs),
            ("--max-steps", self.max_steps),
            ("--lr", self.lr),
            ("--eval-fraction", self.eval_fraction),
            ("--overlong", self.overlong),
            ("--format", self.data_format),
            ("--system-prompt", self.system_prompt),
            ("--save-steps", self.save_steps),
            ("--save-total-limit", self.save_total_limit),
            ("--logging-steps", self.logging_steps),
            ("--batching", self.batching),
            ("--packed-attention", self.packed_attention),
            ("--report-to", self.report_to),
            ("--kernels", self.kernels),
        ):
            if value is not None:
                out += [flag, str(value)]
        return out


def launch_env(
    gpu: GPU | None,
    nodes: tuple[Node, ...],
    run_dir: Path,
    inherited: Mapping[str, str] | None = None,
    num_nodes: int | None = None,
    cpu_cores: int | None = None,
) -> dict[str, str]:
    """The variables zeroplan sets for the ranks (a variable already set is left alone).

    * ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: SFT batches change shape from
      step to step (unpadded lengths), which fragments the caching allocator's fixed-size
      segments; expandable segments let a segment grow instead. (On our fixed-shape
      calibration rows it did not change the peak, so the estimate holds either way.)
    * ``NCCL_P2P_DISABLE=1`` for GPUs without peer-to-peer (GeForce cards): NCCL would
      otherwise try P2P and can hang or fail; ``NCCL_IB_DISABLE=1`` too on one node (no
      InfiniBand between the cards of one box; accelerate does the same for RTX 40xx).
      Several nodes keep IB, their path to each other.
    * ``NCCL_NVLS_ENABLE`` is not touched: nothing measured here justifies turning NVLink
      SHARP off.
    * ``OMP_NUM_THREADS``: this machine's usable cores (``cpu_cores``, default
      ``hardware.usable_cpu_cores``) shared among a node's ranks (``threads_per_rank``; the
      most ranks any node runs). torchrun sets
      1 for several processes, which leaves a CPU-offloaded optimizer (DeepSpeed's CPU Adam
      spreads over OpenMP threads) on one core: measured on one H200's host, Llama-3.2-1B's
      CPU Adam step took 3.1 s on 1 thread and 0.5 s on 16. The speed model plans with the
      same rule (``Cluster.cpu_threads_per_rank``).
    * ``PYTHONUNBUFFERED=1`` so the rank logs are current; ``ZEROPLAN_RUN_DIR``.

    ``num_nodes``: the run's node count when ``nodes`` is only this one (--nnodes, SLURM).
    """
    inherited = os.environ if inherited is None else inherited
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1", "ZEROPLAN_RUN_DIR": str(run_dir)}
    cores = usable_cpu_cores() if cpu_cores is None else cpu_cores
    env["OMP_NUM_THREADS"] = str(threads_per_rank(cores, max(len(n.slots) for n in nodes)))
    if "PYTORCH_CUDA_ALLOC_CONF" not in inherited and "PYTORCH_ALLOC_CONF" not in inherited:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    count = len(nodes) if num_nodes is None else num_nodes
    world = sum(len(n.slots) for n in nodes) * (count // len(nodes))
    if gpu is not None and not gpu.p2p and world > 1:
        env["NCCL_P2P_DISABLE"] = "1"
        if count == 1:
            env["NCCL_IB_DISABLE"] = "1"
    return {k: v for k, v in env.items() if k not in inherited}


def default_launcher(setup: TrainSetup) -> str:
    """deepspeed when the plan uses ZeRO and DeepSpeed is installed, else torchrun."""
    if setup.zero is not None and envcheck.installed("deepspeed"):
        return "deepspeed"
    return "torchrun"


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Command:
    """One process zeroplan starts: on ``host``, locally or over ssh (already in ``argv``)."""

    host: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # extra, for a local command

    def shell(self) -> str:
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, shlex.join(self.argv)])


@dataclass(frozen=True)
class Launch:
    """Everything ``zeroplan launch`` would do, before it does it."""

    run_dir: Path
    launcher: str
    nodes: tuple[Node, ...]
    commands: tuple[Command, ...]
    env: Mapping[str, str]  # set by zeroplan for every rank, on top of the inherited ones
    files: Mapping[str, str]  # name in run_dir -> content, written before anything starts
    rank_argv: tuple[str, ...]  # what each rank runs after `python -u`
    plan: Mapping[str, Any]
    data: str
    resume: bool
    port: int
    notes: tuple[str, ...] = ()
    rendezvous: Rendezvous | None = None  # this node's place in a run of several (--nnodes, SLURM)
    report_to: str = "none"  # the experiment tracker rank 0 logs to (trackers.TRACKERS)
    train: TrainOptions = TrainOptions()  # what the ranks are told beside the plan
    source: Path | None = None  # the plan.json it was read from; None: planned here

    @property
    def world_size(self) -> int:
        here = sum(len(n.slots) for n in self.nodes)
        return here * self.rendezvous.nnodes if self.rendezvous is not None else here

    @property
    def num_nodes(self) -> int:
        return self.rendezvous.nnodes if self.rendezvous is not None else len(self.nodes)

    @property
    def first_rank(self) -> int:
        """The global rank of this launch's first rank (0 unless a node rank > 0)."""
        if self.rendezvous is None:
            return 0
        return self.rendezvous.node_rank * sum(len(n.slots) for n in self.nodes)

    @property
    def record_name(self) -> str:
        """launch.json, or launch.node{R}.json for a node rank R > 0 (node 0 writes the rest)."""
        rdv = self.rendezvous
        return LAUNCH_FILE if rdv is None or rdv.node_rank == 0 else node_record(rdv.node_rank)

    def host_of(self, rank: int) -> str:
        """The host that runs global rank ``rank``."""
        per = len(self.nodes[0].slots)
        if self.rendezvous is not None:
            return self.rendezvous.node_host(rank // per) if per else "?"
        first = 0
        for node in self.nodes:
            if rank < first + len(node.slots):
                return node.host
            first += len(node.slots)
        return "?"

    @property
    def setup(self) -> TrainSetup:
        return setup_of(self.plan)

    @property
    def model(self) -> str:
        """Where the ranks load the model from: a local folder or a Hub id."""
        return model_location(self.plan)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / LOG_DIR

    def rank_log(self, rank: int) -> Path:
        return self.log_dir / LOG_NAME.format(rank=rank)


def node_record(node_rank: int) -> str:
    return f"launch.node{node_rank}.json"


def _range_text(slots: tuple[int, ...]) -> str:
    if slots == tuple(range(slots[0], slots[0] + len(slots))) and len(slots) > 2:
        return f"{slots[0]}-{slots[-1]}"
    return ",".join(map(str, slots))


def describe_nodes(nodes: tuple[Node, ...]) -> str:
    """``localhost: GPUs 0-6`` / ``node0: GPUs 0-7; node1: GPUs 0-7``."""
    return "; ".join(
        f"{n.host}: GPU{'s' if len(n.slots) > 1 else ''} {_range_text(n.slots)}" for n in nodes
    )


def _torchrun(
    nodes: tuple[Node, ...],
    port: int,
    wrapped: list[str],
    env: Mapping[str, str],
    filtered: bool,
    grace_s: float,
    rdv: Rendezvous | None = None,
) -> tuple[Command, ...]:
    """One torchrun per node; with ``rdv``, only this node's (``nodes`` is this node)."""
    per_node = {len(n.slots) for n in nodes}
    if len(per_node) > 1:
        raise BadClusterSpecError(
            f"torchrun runs the same number of ranks on every node, these differ "
            f"({describe_nodes(nodes)}); use --launcher deepspeed or even the nodes out"
        )
    master = "127.0.0.1" if len(nodes) == 1 and nodes[0].local else nodes[0].host
    nnodes, first = len(nodes), 0
    if rdv is not None:
        master, port, nnodes, first = rdv.master_addr, rdv.master_port, rdv.nnodes, rdv.node_rank
    commands = []
    for rank, node in enumerate(nodes, start=first):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes)]
        if nnodes > 1:
            argv += ["--node-rank", str(rank)]
        argv += [
            "--nproc-per-node",
            str(len(node.slots)),
            "--master-addr",
            master,
            "--master-port",
            str(port),
            *(
                # SIGTERM to the ranks, then this long before torchrun's SIGKILL (default
                # 30 s); torchrun of torch 2.11 does not know the option
                ["--shutdown-timeout", str(max(1, round(grace_s)))]
                if torchrun_knows("--shutdown-timeout")
                else []
            ),
            "--module",
            *wrapped,
        ]
        node_env = dict(env)
        if filtered:
            node_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, node.slots))
        if node.local:
            visible = {"CUDA_VISIBLE_DEVICES": node_env["CUDA_VISIBLE_DEVICES"]} if filtered else {}
            commands.append(Command(node.host, tuple(argv), visible))
        else:
            remote = f"cd {shlex.quote(os.getcwd())} && exec env " + " ".join(
                [*(f"{k}={shlex.quote(v)}" for k, v in node_env.items()), shlex.join(argv)]
            )
            # -tt: a pseudo-terminal, so that ending ssh hangs up the remote torchrun
            commands.append(Command(node.host, ("ssh", "-tt", *SSH_OPTIONS, node.host, remote)))
    return tuple(commands)


def _deepspeed(
    nodes: tuple[Node, ...], port: int, wrapped: list[str], run_dir: Path, filtered: bool
) -> Command:
    argv = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if len(nodes) == 1 and nodes[0].local:
        node = nodes[0]
        argv += (
            ["--include", f"localhost:{','.join(map(str, node.slots))}"]
            if filtered
            else ["--num_gpus", str(len(node.slots))]
        )
    else:
        argv += ["--hostfile", str(run_dir / HOSTFILE), "--master_addr", nodes[0].host]
        if filtered:
            argv += [
                "--include",
                "@".join(f"{n.host}:{','.join(map(str, n.slots))}" for n in nodes),
            ]
        if len(nodes) == 1:
            argv.append("--force_multi")  # one remote node: DeepSpeed would run it here
    argv += ["--master_port", str(port), "--no_local_rank", "--module", *wrapped]
    return Command(nodes[0].host, tuple(argv))


def build_launch(
    plan: Mapping[str, Any],
    *,
    run_dir: Path,
    data: str,
    nodes: tuple[Node, ...],
    launcher: str,
    gpu: GPU | None,
    train: TrainOptions,
    model: str | None = None,
    program: str | None = None,
    filtered: bool = False,
    port: int | None = None,
    inherited: Mapping[str, str] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    rendezvous: Rendezvous | None = None,
    source: Path | None = None,
) -> Launch:
    """The launcher command(s), the ranks' environment and RUN_DIR's files; starts nothing.

    ``model``: where the ranks load the model from, when not where the plan says (written
    as plan.json's ``model_path``; ``model`` stays the name). ``program``: a Python script to run on
    every rank instead of ``-m zeroplan.launch.sft`` (same arguments). ``filtered``: the
    GPU slots came from --include/--exclude and must be passed on exactly. ``rendezvous``:
    this node's place in a run of several (--nnodes, SLURM); ``nodes`` is then this node
    only, one torchrun is built for it, and a node rank > 0 writes only its own record
    (node 0 writes plan.json and the rest into the shared RUN_DIR). ``source``: the
    plan.json the plan was read from (preflight tells a plan folder's own plan from another).
    """
    if launcher not in LAUNCHERS:
        raise BadClusterSpecError(f"--launcher must be one of {', '.join(LAUNCHERS)}")
    if rendezvous is not None and (launcher != "torchrun" or len(nodes) != 1):
        from zeroplan.errors import BadRendezvousError

        raise BadRendezvousError(
            "--nnodes and SLURM runs start torchrun on each node for its own GPUs; DeepSpeed's "
            "launcher reaches the nodes itself: use --hostfile with --launcher deepspeed"
            if launcher != "torchrun"
            else "--nnodes and SLURM runs take this node's GPUs only, not a --hostfile"
        )
    run_dir = run_dir.resolve()
    port = free_port() if port is None else port
    plan_out = copy.deepcopy(dict(plan))  # the Launch owns its plan
    # the ranks read RUN_DIR/plan.json from their own working directory: the name for
    # display, the location as one key (an older plan's model_name / relative paths resolved)
    location = model or model_location(plan)
    plan_out.pop("model_name", None)
    plan_out["model"] = model_name(plan)
    plan_out["model_path"] = location if location != plan_out["model"] else None
    setup = setup_of(plan_out)
    data_arg = str(Path(data).expanduser().resolve()) if Path(data).expanduser().exists() else data
    rank_argv = (
        *(SFT_PROGRAM if program is None else (str(Path(program).resolve()),)),
        "--plan",
        str(run_dir / PLAN_FILE),
        "--data",
        data_arg,
        "--out",
        str(run_dir),
        *train.argv(),
    )
    wrapped = ["zeroplan.launch.ranklog", str(run_dir / LOG_DIR), "--", *rank_argv]
    num_nodes = rendezvous.nnodes if rendezvous is not None else len(nodes)
    world = sum(len(n.slots) for n in nodes) * (num_nodes // len(nodes))
    if rendezvous is not None:
        port = rendezvous.master_port
    env = launch_env(gpu, nodes, run_dir, inherited, num_nodes=num_nodes)
    remote = any(not n.local for n in nodes)
    if launcher == "torchrun":
        commands = _torchrun(nodes, port, wrapped, env, filtered, grace_s, rendezvous)
    else:
        commands = (_deepspeed(nodes, port, wrapped, run_dir, filtered),)

    files: dict[str, str] = {PLAN_FILE: json.dumps(plan_out, indent=2) + "\n"}
    if setup.zero is not None:
        from zeroplan.dsconfig import ds_config

        files[DS_CONFIG] = json.dumps(ds_config(setup, world), indent=2) + "\n"
    if remote:
        files[HOSTFILE] = "".join(f"{n.host} slots={len(n.slots)}\n" for n in nodes)
    if remote and launcher == "deepspeed":
        files[DS_ENV_FILE] = "".join(f"{k}={v}\n" for k, v in env.items())
        env = {**env, "DS_ENV_FILE": str(run_dir / DS_ENV_FILE)}

    if rendezvous is not None and rendezvous.node_rank > 0:
        files = {}  # node 0 writes them into the shared RUN_DIR
    notes = []
    if world != plan.get("world_size"):
        global_batch = setup.micro_batch * setup.grad_accum * world
        notes.append(
            f"the plan was made for {plan.get('world_size')} GPUs ({plan.get('cluster')}); this "
            f"run has {world}: the global batch becomes {setup.micro_batch} × "
            f"{setup.grad_accum} × {world} = {global_batch} sequences"
        )
    launch = Launch(
        run_dir=run_dir,
        launcher=launcher,
        nodes=nodes,
        commands=commands,
        env=env,
        files=files,
        rank_argv=rank_argv,
        plan=plan_out,
        data=data_arg,
        resume=train.resume,
        port=port,
        notes=tuple(notes),
        rendezvous=rendezvous,
        report_to=train.report_to or "none",
        train=train,
        source=source,
    )
    return _with_record(launch)


def _with_record(launch: Launch) -> Launch:
    """Add launch.json: what was started, where and with what (the supervisor adds the end)."""
    record = {
        "launcher": launch.launcher,
        "world_size": launch.world_size,
        "nodes": [{"host": n.host, "gpus": list(n.slots)} for n in launch.nodes],
        "commands": [
            {"host": c.host, "argv": list(c.argv), "env": dict(c.env)} for c in launch.commands
        ],
        "env": dict(launch.env),
        "rank_argv": list(launch.rank_argv),
        "model": launch.model,
        "data": launch.data,
        "resume": launch.resume,
        "cwd": os.getcwd(),
        "python": sys.executable,
    }
    if launch.rendezvous is not None:
        record["rendezvous"] = launch.rendezvous.to_json()
    files = {**launch.files, launch.record_name: json.dumps(record, indent=2) + "\n"}
    return replace(launch, files=files)


def write_files(launch: Launch) -> list[Path]:
    """Write RUN_DIR's files (each atomically), make RUN_DIR/logs, and clear the exit files
    of an earlier run so that they cannot be mistaken for this one's."""
    launch.log_dir.mkdir(parents=True, exist_ok=True)
    if launch.first_rank == 0:  # node 0 clears every node's (before any node starts ranks)
        for old in launch.log_dir.glob(EXIT_NAME.format(rank="*")):
            old.unlink(missing_ok=True)
    written = []
    for name, text in launch.files.items():
        path = launch.run_dir / name
        write_atomic(path, text)
        written.append(path)
    return written


def describe_files(launch: Launch) -> list[tuple[str, str]]:
    """(path, what it holds) for everything a launch writes or has written into RUN_DIR."""
    what = {
        PLAN_FILE: f"the plan every rank trains with (model: {launch.model})",
        LAUNCH_FILE: "the commands and environment; the result is added at the end",
        DS_CONFIG: f"the DeepSpeed config for {launch.world_size} GPU{'' if launch.world_size == 1 else 's'}",
        HOSTFILE: "one 'host slots=N' line per node",
        DS_ENV_FILE: "zeroplan's variables, for DeepSpeed's remote nodes",
    }
    if launch.record_name != LAUNCH_FILE:
        what[launch.record_name] = "this node's commands and environment; its result at the end"
    out = [(str(launch.run_dir / name), what.get(name, "")) for name in launch.files]
    last = launch.world_size - 1
    ranks = "rank0.log" + (f" … rank{last}.log" if last else "")
    out += [
        (f"{launch.log_dir}/{ranks}", "each rank's stdout and stderr, written by the rank"),
        (f"{launch.log_dir}/rank{{N}}.exit.json", "each rank's exit status"),
        (f"{launch.log_dir}/{LAUNCHER_LOG}", f"{launch.launcher}'s own output"),
        (str(launch.run_dir / METRICS_FILE), "one JSON line per logged step, from every rank"),
    ]
    return out


@functools.cache
def torchrun_knows(option: str) -> bool:
    """Whether this torch's torchrun accepts ``option``: its source is read, not imported."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    source = Path(spec.origin).parent / "distributed" / "run.py"
    try:
        return f'"{option}"' in source.read_text(encoding="utf-8")
    except OSError:
        return False
