"""What ``zeroplan launch`` checks before anything starts.

Each failure is one ZeroplanError (one line in the CLI, exit status 2):

* the run folder already holds a run and --resume was not given (RunDirExistsError; on
  every node of a run of several, so that they all refuse it alike);
* the data file does not exist (DataNotFoundError; a Hub data set id is left to the ranks);
* a local model folder has no tokenizer files (TokenizerNotFoundError);
* a package the plan or the launcher needs is missing (MissingDependencyError), or the
  --report-to tracker's package, or its login (TrackerLoginError);
* a mixture-of-experts setup PEFT cannot run (LoRA dropout on the router or the expert
  banks: ExpertDropoutError) or that was never measured (UnmeasuredMoEError; zeroplan.moe);
* ``--kernels liger`` without liger-kernel (MissingDependencyError), without a GPU or for an
  architecture it does not patch (KernelsUnsupportedError); ``--compile`` where torch cannot
  compile (CompilerUnavailableError);
* no GPU on this machine (NoGPUError; ``--force`` runs the ranks anyway, on CPU);
* more GPUs, or other GPU indices, than this machine has (GPUCountError);
* the estimate on the GPUs actually present says out of memory (PredictedOOMError, with
  the planner's choice for this machine; ``--force`` starts anyway);
* a hostfile host ssh cannot reach without a prompt (HostUnreachableError), or one that
  cannot see RUN_DIR (RunDirNotSharedError: the nodes need a shared filesystem);
* several nodes through --nnodes or SLURM: a rendezvous host that does not resolve, is not
  node rank 0's machine, or whose port is taken there (RendezvousUnreachableError).

``preflight`` collects every finding, so that ``--dry-run`` can show them all; the real
launch raises the first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zeroplan.errors import (
    DataNotFoundError,
    GPUCountError,
    HostUnreachableError,
    MissingDependencyError,
    NoGPUError,
    PredictedOOMError,
    RunDirExistsError,
    RunDirNotSharedError,
    TokenizerNotFoundError,
    ZeroplanError,
)
from zeroplan.hardware import Cluster
from zeroplan.launch.multinode import check_rendezvous
from zeroplan.launch.runner import (
    LOG_DIR,
    SSH_OPTIONS,
    Launch,
    Node,
    plan_cluster,
    plan_here,
)
from zeroplan.launch.trackers import check_tracker
from zeroplan.memory import MemoryEstimate
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup, cpu_refusal
from zeroplan.watch.runlog import METRICS_FILE

# Files any one of which makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
SSH_WAIT_S = 15.0
GIB = 2**30


@dataclass(frozen=True)
class Preflight:
    errors: tuple[ZeroplanError, ...]
    notes: tuple[str, ...]
    estimate: MemoryEstimate | None  # the setup on the GPUs at hand, when it could be made

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def check_run_dir(run_dir: Path, resume: bool) -> None:
    if resume or not run_dir.is_dir():
        return
    held = [name for name in (METRICS_FILE, LOG_DIR) if (run_dir / name).exists()] + sorted(
        p.name for p in run_dir.glob("checkpoint*")
    )[:1]
    if held:
        raise RunDirExistsError(
            f"{run_dir} already holds a run ({', '.join(held)}): --resume continues it, "
            "-o NEW_DIR starts another"
        )


def check_data(data: str) -> str | None:
    """None when ``data`` is a file; a note when it is a Hub data set id (not checked here)."""
    from zeroplan.launch.data import data_exists, looks_like_hub_id

    if data_exists(data):
        return None
    if Path(data).expanduser().is_dir():
        raise DataNotFoundError(f"--data {data} is a folder: give a .json, .jsonl or .parquet file")
    if looks_like_hub_id(data):
        return f"--data {data} is not a file here: the ranks will load it as a Hub data set"
    raise DataNotFoundError(
        f"data file {data} does not exist; pass --data a .json, .jsonl or .parquet file "
        "(or a Hub data set id)"
    )


def check_tokenizer(model: str) -> None:
    folder = Path(model)
    if not folder.is_dir():
        return  # a Hub id: the ranks download config, weights and tokenizer together
    if any((folder / f).is_file() for f in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise TokenizerNotFoundError(
        f"model folder {folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}): copy "
        "the base model's tokenizer files next to its config.json"
    )


def needed_packages(setup: TrainSetup, launcher: str) -> dict[str, str]:
    """module -> why the run needs it."""
    need = {"torch": "every rank runs PyTorch"}
    if launcher == "deepspeed" or setup.zero is not None:
        need["deepspeed"] = (
            "the deepspeed launcher" if launcher == "deepspeed" else f"ZeRO-{setup.zero}"
        )
    if setup.method == "qlora":
        need["bitsandbytes"] = "the 4-bit (qlora) base"
    elif "8bit" in setup.optim:
        need["bitsandbytes"] = f"the {setup.optim} optimizer"
    if setup.fused_loss:
        need["liger_kernel"] = "the fused loss (Liger)"
    return need


def check_packages(setup: TrainSetup, launcher: str, nodes: tuple[Node, ...]) -> None:
    for module, why in needed_packages(setup, launcher).items():
        if importlib.util.find_spec(module) is None:
            package = module.replace("_", "-")
            if module == "liger_kernel":
                raise MissingDependencyError(
                    f"{why} needs liger-kernel, which is not installed here: "
                    "pip install 'zeroplan[fused]', or re-plan with zeroplan plan --no-fused-loss"
                )
            raise MissingDependencyError(
                f"{why} needs {package}, which is not installed here: pip install 'zeroplan[train]'"
            )
    remote = [n for n in nodes if not n.local]
    if remote and shutil.which("ssh") is None:
        raise MissingDependencyError("ssh is not installed: other nodes are started over ssh")
    if remote and launcher == "deepspeed" and shutil.which("pdsh") is None:
        raise MissingDependencyError(
            "the deepspeed launcher starts other nodes with pdsh, which is not installed: "
            "install pdsh, or use --launcher torchrun (plain ssh)"
        )


def check_moe(launch: Launch) -> None:
    """An MoE plan that PEFT would fail on at start, or that was never measured, is refused
    before any rank starts (also with --force and without a GPU)."""
    from zeroplan import moe
    from zeroplan.models import load_model

    moe.check(load_model(launch.model), launch.setup)


def check_kernels(launch: Launch, gpu_here: bool) -> None:
    """``--kernels liger`` and ``--compile`` where the ranks could not run them (``gpu_here``:
    the ranks get a CUDA GPU). Imports liger-kernel or torch only when one is asked for."""
    from zeroplan.launch import kernels

    train = launch.train
    requested = train.kernels or kernels.DEFAULT_KERNELS
    planned = launch.setup.kernels == "liger"  # auto follows the plan
    if requested == "liger" or (requested == "auto" and planned):
        from zeroplan.models import load_model

        try:
            supported = kernels.liger_model_types()
        except ImportError as exc:
            raise MissingDependencyError(
                f"Liger's kernels (--kernels {requested}): liger-kernel does not import here "
                f"({exc}): {kernels.LIGER_FIX}"
            ) from None
        try:
            model_type = load_model(launch.model).model_type
        except ZeroplanError:
            model_type = None  # the memory check says why; the ranks check the architecture
        kernels.check_kernels(requested, model_type, gpu_here, supported, planned)
    # unset: the plan's choice
    if train.compile or (train.compile is None and launch.setup.compile):
        kernels.check_compiler(gpu_here)


def _ranks(n: int) -> str:
    return "the rank" if n == 1 else f"the {n} ranks"


def check_cpu(setup: TrainSetup) -> None:
    """Ranks started on the CPU (``--force`` without a GPU) refuse each part of the setup that
    runs on a CUDA GPU only; say so before they start, all parts at once."""
    refusal = cpu_refusal(setup)
    if refusal is not None:
        raise MissingDependencyError(f"no GPU here: {refusal}")


def check_gpu_count(nodes: tuple[Node, ...], present: Cluster) -> None:
    for node in nodes:
        if not node.local:
            continue
        have = present.gpus_per_node
        if len(node.slots) > have:
            raise GPUCountError(
                f"this run needs {len(node.slots)} GPUs on this machine, which has {have} "
                f"({present.describe()}): launch with --gpus {have} (the planner re-checks "
                f"the memory) or on a machine with {len(node.slots)}"
            )
        if max(node.slots) >= have:
            raise GPUCountError(
                f"GPU {max(node.slots)} does not exist on this machine, which has GPUs "
                f"0-{have - 1} ({present.describe()}); fix --include / --exclude"
            )


NOT_SHARED = "cannot see the run folder"


def unreachable_hosts(
    hosts: list[str], timeout_s: float = SSH_WAIT_S, marker: Path | None = None
) -> dict[str, str]:
    """host -> why ``ssh -o BatchMode=yes -o ConnectTimeout=5 HOST true`` failed (in parallel).
    With ``marker``, each host runs ``test -e MARKER`` instead; a host where it is missing
    gets NOT_SHARED."""
    remote = "true" if marker is None else f"test -e {shlex.quote(str(marker))}"
    procs = {
        h: subprocess.Popen(
            ["ssh", *SSH_OPTIONS, h, remote],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in hosts
    }
    bad = {}
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            bad[host] = f"no answer in {timeout_s:.0f} s"
            continue
        if proc.returncode == 1 and marker is not None:
            bad[host] = NOT_SHARED
        elif proc.returncode != 0:
            lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
            bad[host] = lines[-1] if lines else f"ssh exit status {proc.returncode}"
    return bad


def check_hosts(nodes: tuple[Node, ...], run_dir: Path | None = None) -> None:
    """ssh reaches every remote node; with ``run_dir``, each of them also sees a file
    written there now (RUN_DIR must be on a filesystem the nodes share)."""
    hosts = [n.host for n in nodes if not n.local]
    marker, made = None, False
    if run_dir is not None:
        made = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            marker = run_dir / f".zeroplan-shared-{secrets.token_hex(4)}"
            marker.write_text("written by zeroplan launch to check that the nodes see it\n")
        except OSError:
            marker = None  # writing RUN_DIR fails later, with its own message
    try:
        bad = unreachable_hosts(hosts, marker=marker)
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # type: ignore[union-attr]
    blind = sorted(h for h, why in bad.items() if why == NOT_SHARED)
    if blind:
        raise RunDirNotSharedError(
            f"{', '.join(blind)} cannot see the run folder {run_dir} (a file written there "
            "now is missing on that node): RUN_DIR must be on a filesystem every node shares"
        )
    if bad:
        which = "; ".join(f"{h}: {why}" for h, why in bad.items())
        raise HostUnreachableError(
            f"{'host' if len(bad) == 1 else 'hosts'} not reachable over ssh ({which}); fix the "
            "hostfile or set up key-based ssh so that `ssh HOST true` needs no prompt"
        )


def planner_fix(spec: ModelSpec, cluster: Cluster, launch: Launch, setup: TrainSetup) -> str:
    """What the planner would run on ``cluster`` instead, as a sentence."""
    from zeroplan.planner import describe

    request = launch.plan.get("request") or {}
    global_batch = request.get("global_batch")
    if global_batch is not None and global_batch % cluster.world_size:
        global_batch = None
    method = request.get("method") or ("lora" if setup.method == "qlora" else setup.method)
    try:
        job = {
            "method": method,
            "seq_len": setup.seq_len,
            "global_batch": global_batch,
            "lora_r": setup.lora_r,
            "lora_targets": setup.lora_targets,
        }
        result = plan_here(spec, cluster, job)
    except ZeroplanError as exc:
        return f"the planner cannot suggest a fix ({exc})"
    if result.best is None:
        return f"nothing fits on {cluster.describe()}: {result.suggestion}"
    best = result.best
    return (
        f"the planner's choice for {cluster.describe()} is {best.family}, {describe(best.setup)} "
        f"({best.estimate.required_bytes / GIB:.1f} GiB): zeroplan plan {launch.model} "
        f"--gpus {cluster.describe(times='x')} -o DIR, then zeroplan launch DIR"
    )


def check_memory(
    launch: Launch, cluster: Cluster, force: bool
) -> tuple[MemoryEstimate, str | None]:
    """The estimate on ``cluster``; raises PredictedOOMError unless it fits or ``force``."""
    from zeroplan.memory import estimate
    from zeroplan.models import load_model
    from zeroplan.planner import describe

    spec = load_model(launch.model)
    setup = launch.setup
    est = estimate(spec, cluster, setup)
    if est.fits:
        return est, None
    what = (
        f"predicted out of memory on {cluster.describe()}: {describe(setup)} needs "
        f"{est.required_bytes / GIB:.1f} GiB per GPU, the card has {est.gpu_memory_bytes / GIB:.1f} GiB"
    )
    if force:
        return est, f"{what}; --force starts it anyway"
    raise PredictedOOMError(
        f"{what}; {planner_fix(spec, cluster, launch, setup)}; --force starts it anyway"
    )


def preflight(
    launch: Launch,
    present: Cluster | None,
    *,
    force: bool = False,
    hosts: bool = True,
) -> Preflight:
    """Every check, in order; ``present``: this machine's GPUs (``local_cluster()``)."""
    errors: list[ZeroplanError] = []
    notes: list[str] = []
    est: MemoryEstimate | None = None

    def attempt(check: Callable[[], str | None]) -> None:
        try:
            note = check()
        except ZeroplanError as exc:
            errors.append(exc)
            return
        if note:
            notes.append(note)

    # every node, so that all of them refuse an earlier run alike (one that went on alone
    # would wait for the others): none of this session's ranks has written anything yet,
    # since node 0 writes RUN_DIR's files only after every node joined, after this check
    attempt(lambda: check_run_dir(launch.run_dir, launch.resume))
    attempt(lambda: check_data(launch.data))
    attempt(lambda: check_tokenizer(launch.model))
    attempt(lambda: check_packages(launch.setup, launch.launcher, launch.nodes))
    attempt(lambda: check_moe(launch))
    attempt(lambda: check_tracker(launch.report_to, login=launch.first_rank == 0))

    local = [n for n in launch.nodes if n.local]
    attempt(lambda: check_kernels(launch, gpu_here=present is not None or not local))
    gpu_cluster: Cluster | None = None
    per_node = max(len(n.slots) for n in launch.nodes)
    if local and present is None:
        if force:
            notes.append(
                f"no NVIDIA GPU on this machine (NVML sees none): --force starts "
                f"{_ranks(launch.world_size)} anyway, on CPU; the memory check is skipped"
            )
            attempt(lambda: check_cpu(launch.setup))
        else:
            errors.append(
                NoGPUError(
                    "no NVIDIA GPU on this machine (NVML sees none, or the driver or "
                    "nvidia-ml-py is missing): run on a GPU machine; --dry-run shows the "
                    "commands, --force starts the ranks anyway (on CPU)"
                )
            )
    elif local and present is not None:
        before = len(errors)
        attempt(lambda: check_gpu_count(launch.nodes, present))
        if len(errors) == before:
            gpu_cluster = Cluster(present.gpu, per_node, launch.num_nodes)
            planned = plan_cluster(launch.plan)
            if planned is not None and planned.gpu.name != present.gpu.name:
                notes.append(
                    f"the plan was made for {planned.gpu.name}, this machine has "
                    f"{present.gpu.name}: the memory check uses {present.gpu.name}"
                )
    else:
        planned = plan_cluster(launch.plan)
        if planned is not None:
            gpu_cluster = Cluster(planned.gpu, per_node, launch.num_nodes)
            notes.append(
                f"the nodes' GPUs cannot be seen from here: the memory check assumes the "
                f"plan's {planned.gpu.name}"
            )

    if gpu_cluster is not None:
        try:
            est, note = check_memory(launch, gpu_cluster, force)
        except ZeroplanError as exc:
            errors.append(exc)
        else:
            if note:
                notes.append(note)

    if launch.rendezvous is not None:
        rdv = launch.rendezvous
        attempt(lambda: check_rendezvous(rdv))
    if hosts and any(not n.local for n in launch.nodes):
        attempt(lambda: check_hosts(launch.nodes, launch.run_dir))
    return Preflight(tuple(errors), tuple(notes), est)
