"""What ``zeroplan launch`` checks before anything starts.

Each failure is one ZeroplanError (one line in the CLI, exit status 2):

* the run folder already holds a run (a checkpoint, final weights, trained steps) and
  --resume was not given, or is another plan's folder (RunDirExistsError; on every node of
  a run of several, so that they all refuse it alike);
* --resume where the run folder holds no checkpoint, was trained with a plan that differs
  in what the run keeps, or on another number of GPUs under ZeRO-1, 2 or 3 (whose split
  optimizer state DeepSpeed loads on as many GPUs only), or completed what the limits ask
  (ResumeError);
* the data file does not exist (DataNotFoundError; a Hub data set id is left to the ranks),
  or holds nothing the ranks could train on: read and rendered as ``zeroplan plan --data``
  does, kept at the plan's sequence length (BadDataError, ChatTemplateError);
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
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroplan.errors import (
    BadDataError,
    DataNotFoundError,
    GPUCountError,
    HostUnreachableError,
    MissingDependencyError,
    NoGPUError,
    PredictedOOMError,
    ResumeError,
    RunDirExistsError,
    RunDirNotSharedError,
    TokenizerNotFoundError,
    ZeroplanError,
)
from zeroplan.hardware import Cluster
from zeroplan.launch import envcheck
from zeroplan.launch.multinode import check_rendezvous
from zeroplan.launch.runner import (
    SSH_OPTIONS,
    Launch,
    Node,
    plan_cluster,
    plan_here,
    read_plan,
    setup_of,
)
from zeroplan.launch.trackers import check_tracker
from zeroplan.memory import MemoryEstimate
from zeroplan.models import ModelSpec
from zeroplan.planfiles import model_name
from zeroplan.trainsetup import TrainSetup, cpu_refusal, refuse_cuda_graphs
from zeroplan.watch.runlog import LAUNCH_FILE, METRICS_FILE, PLAN_FILE, read_jsonl

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


def check_run_dir(launch: Launch) -> str | None:
    """RUN_DIR can take this launch; with --resume, the note that says where it resumes.

    Without --resume RUN_DIR is refused where an earlier run left something to keep
    (:func:`earlier_run`), and where it is another plan's folder (``zeroplan plan -o``'s
    plan.json, no launch record): the launch would replace that plan. A plan folder's own
    plan launched into it replaces nothing (the run then lives beside its plan), and a
    folder an earlier launch left without a step or a save (stopped or failed before it
    trained) takes the launch again: nothing there is lost. --resume: :func:`check_resume`.
    """
    run_dir = launch.run_dir
    if launch.resume:
        return check_resume(launch)
    if not run_dir.is_dir():
        return None
    held = earlier_run(run_dir)
    if held is not None:
        from zeroplan.launch.sft import last_checkpoint

        fix = (
            "--resume continues it, -o NEW_DIR starts another"
            if last_checkpoint(run_dir) is not None
            else "-o NEW_DIR starts another (or delete the folder to start again there)"
        )
        raise RunDirExistsError(f"{run_dir} already holds a run ({held}): {fix}")
    plan = run_dir / PLAN_FILE
    own = launch.source is not None and launch.source.resolve() == plan.resolve()
    if plan.is_file() and not (run_dir / LAUNCH_FILE).is_file() and not own:
        raise RunDirExistsError(
            f"{run_dir} holds another plan (its plan.json, from zeroplan plan -o), which this "
            f"launch would replace: give the run its own folder (-o NEW_DIR), or launch that "
            f"plan (zeroplan launch {run_dir} --data ...)"
        )
    return None


def earlier_run(run_dir: Path) -> str | None:
    """What an earlier run left in ``run_dir`` that a new one must neither mix with nor
    replace, as a phrase: its newest checkpoint, its final weights, or the steps it logged;
    None where it left none of them. (Its plan.json, launch.json, logs and GPU samples are
    replaced or appended to by the next launch: they describe a session, not a run.)"""
    from zeroplan.launch.sft import CHECKPOINTS, FINAL, last_checkpoint

    ckpt = last_checkpoint(run_dir)
    if ckpt is not None:
        return f"{CHECKPOINTS}/{ckpt.name}"
    if (run_dir / FINAL).is_dir():
        return f"{FINAL}/"
    if any(rec.get("event", "train") == "train" for rec in read_jsonl(run_dir / METRICS_FILE)):
        return f"the steps logged in {METRICS_FILE}, without a checkpoint"
    return None


def check_resume(launch: Launch) -> str:
    """--resume: RUN_DIR holds a checkpoint, was trained with this launch's plan (as far as
    :data:`STATE_FIELDS` go), on as many GPUs where its ZeRO stage needs them
    (:func:`check_world_size`), and has something left to train; the note naming the
    checkpoint. Each is refused here, before a rank starts and writes into the folder."""
    from zeroplan.launch import sft

    run_dir = launch.run_dir
    if not run_dir.is_dir():
        raise ResumeError(
            f"--resume: {run_dir} does not exist, so there is no run to continue; start one "
            "without --resume"
        )
    ckpt = sft.last_checkpoint(run_dir)
    if ckpt is None:
        held = earlier_run(run_dir)
        raise ResumeError(
            f"--resume: {run_dir} holds no checkpoint to continue from ({held}); -o NEW_DIR "
            "starts another run (or delete the folder to start again there)"
            if held
            else f"--resume: {run_dir} holds no checkpoint to continue from (its launch "
            "stopped before it saved one): start it again without --resume, the same -o"
        )
    if (run_dir / PLAN_FILE).is_file():
        differ = plan_differences(read_plan(run_dir / PLAN_FILE), launch.plan)
        if differ:
            raise ResumeError(
                f"--resume: {run_dir} was trained with another plan ({'; '.join(differ)}): "
                f"resume it with its own (zeroplan launch {run_dir} --resume --data ...), or "
                "give this plan a new folder (-o NEW_DIR)"
            )
    moved = check_world_size(launch, ckpt, sft.checkpoint_world_size(ckpt))
    train = launch.train
    epochs, max_steps = sft.resume_limits(run_dir, train.epochs, train.max_steps)
    done = sft.completed_step(run_dir, max_steps, 1.0 if epochs is None else epochs)
    if done is not None:
        raise ResumeError(
            f"nothing to resume: {run_dir} completed at step {done} (weights in "
            f"{run_dir / sft.FINAL}); pass a larger --max-steps or --epochs to train on"
        )
    return f"resuming from {ckpt} (step {sft.checkpoint_step(ckpt)}){moved}"


def check_world_size(launch: Launch, ckpt: Path, saved_by: int | None) -> str:
    """--resume on another number of GPUs than saved ``ckpt`` (``saved_by``; None: not
    told): refused under ZeRO-1, 2 and 3, allowed without ZeRO or at ZeRO-0, where it adds
    what changes to the resume's note ("" where nothing does).

    ZeRO-1 and up split the optimizer's state (and ZeRO-3 the weights) into one file per
    rank, and DeepSpeed loads them only on as many ranks: any other count raises "The
    checkpoint being loaded used a DP world size of 2 but the current world size is 1"
    in every rank (deepspeed/runtime/engine.py, _load_zero_checkpoint) after the model
    loaded. Only DeepSpeed's universal checkpoints reshard, and zeroplan writes none.
    Without ZeRO, and at ZeRO-0, rank 0 saves the whole optimizer state, which loads on
    any count; the global batch changes with it, and the Trainer skips the steps already
    trained as steps of the new batch (transformers' Trainer, steps_trained_in_current_epoch)."""
    now = launch.world_size
    if saved_by is None or saved_by == now:
        return ""
    setup, gpus = launch.setup, _gpu_count(saved_by)
    if setup.zero:
        raise ResumeError(
            f"--resume: {ckpt.name} in {launch.run_dir} was saved by {gpus} under "
            f"ZeRO-{setup.zero}, and this launch has {_gpu_count(now)}: DeepSpeed loads its "
            f"optimizer state, split one part per GPU, on {gpus} only; resume with the same "
            f"{gpus} (--gpus {saved_by}, or the hostfile it ran with), or start a new run "
            "folder (-o NEW_DIR)"
        )
    per_gpu = setup.micro_batch * setup.grad_accum
    lost = "skipped untrained" if now > saved_by else "trained twice"
    return (
        f", saved by {gpus}, on {now}: without ZeRO's split the optimizer state is whole "
        f"and loads on any count; the global batch becomes {setup.micro_batch} × "
        f"{setup.grad_accum} × {now} = {per_gpu * now} sequences ({per_gpu * saved_by} "
        "before), and the steps already trained count as steps of it, so some of this "
        f"epoch's data is {lost}"
    )


def _gpu_count(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


# What a resumed run keeps from the plan it started with, besides the model: what its
# checkpoint holds (the adapter's shape, the optimizer's state, DeepSpeed's layout) and what
# its batches are (their shape and order: the Trainer skips the batches it already trained
# by count), and the arithmetic of its steps (precision, dropout). The rest of a setup only
# changes how fast a step runs (activation checkpointing, attention, kernels, the fused
# loss and LoRA linears, buckets), and the rest of a plan describes it (predictions,
# alternatives, the request, the data's profile, notes): a plan that differs there resumes.
STATE_FIELDS = (
    "method",
    "lora_r",
    "lora_targets",
    "lora_dropout",
    "seq_len",
    "micro_batch",
    "grad_accum",
    "zero",
    "offload",
    "optim",
    "precision",
    "autocast",
    "lora_bf16",
)


def plan_differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How ``now`` differs from ``before`` in what a resumed run keeps (:data:`STATE_FIELDS`
    and the model), as ``lora_r 16 there, 4 here`` phrases; empty when it may resume."""
    was, new = model_name(before), model_name(now)
    differ = [f"model {was} there, {new} here"] if was != new else []
    a, b = setup_of(before), setup_of(now)
    for name in STATE_FIELDS:
        there, here = getattr(a, name), getattr(b, name)
        if there != here:
            differ.append(f"{name} {_shown(there)} there, {_shown(here)} here")
    return differ


def _shown(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_data(launch: Launch) -> str | None:
    """The data file holds records the ranks can train on; a note where that cannot be
    told here (a Hub data set, or no tokenizer on this machine).

    The records are read and rendered as ``zeroplan plan --data`` reads them
    (:func:`zeroplan.datatokens.profile_data`: the model's tokenizer and chat template,
    the launch's --format and --system-prompt; cached by the file's bytes, so a file the
    plan read is not tokenized again), then kept at the plan's sequence length as the
    ranks keep them (:func:`zeroplan.lengths.fit_to_cap`, --overlong, --eval-fraction).
    Whatever a rank would stop on (a file that is not JSON, a wrong suffix, no records,
    a record without its format's fields or an assistant message, nothing left to train
    on) is refused here, before a rank starts and writes into RUN_DIR."""
    from zeroplan.launch.data import data_exists, looks_like_hub_id

    data = launch.data
    if data_exists(data):
        return check_records(launch)
    if Path(data).expanduser().is_dir():
        raise DataNotFoundError(f"--data {data} is a folder: give a .json, .jsonl or .parquet file")
    if looks_like_hub_id(data):
        return f"--data {data} is not a file here: the ranks will load it as a Hub data set"
    raise DataNotFoundError(
        f"data file {data} does not exist; pass --data a .json, .jsonl or .parquet file "
        "(or a Hub data set id)"
    )


def check_records(launch: Launch) -> str | None:
    """:func:`check_data` for a local file."""
    from zeroplan.datatokens import profile_data
    from zeroplan.errors import MissingExtraError
    from zeroplan.launch.data import eval_count
    from zeroplan.lengths import fit_to_cap

    train = launch.train
    fmt, system = train.data_format or "auto", train.system_prompt
    name = str(launch.plan.get("model") or "")
    hub_id = name if name.count("/") == 1 else None
    try:
        profile, _ = profile_data(launch.data, launch.model, hub_id, fmt=fmt, system=system)
    except (TokenizerNotFoundError, MissingExtraError) as exc:
        # the records are still read; the ranks load the tokenizer and count the tokens
        read_as_training_does(launch.data, fmt, system)
        why = (
            f"no tokenizer for {launch.model} here"
            if isinstance(exc, TokenizerNotFoundError)
            else str(exc)
        )
        return f"--data {launch.data}: records read, their token lengths left to the ranks ({why})"
    fit = fit_to_cap(profile, launch.setup.seq_len, train.overlong or "drop")
    eval_count(fit.kept, train.eval_fraction or 0.0)
    return None


def read_as_training_does(data: str, fmt: str, system: str | None) -> None:
    """Read ``data``'s records and render each as training does
    (:func:`zeroplan.records.rendered`): every refusal of a record, no tokens."""
    from zeroplan.records import detect_format, read_records, rendered

    records = read_records(data)
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    # every record rendered (a list, not all()'s first answer), so that a bad one is found
    items = list(rendered(records, fmt, system))
    if all(item is None for item in items):  # only empty texts are None
        raise BadDataError(
            f"all {len(records)} records of {data} are empty texts, with nothing to learn: "
            "give records with text"
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
    # each reason is the subject of check_packages' "<why> needs <package>"
    need = {"torch": "training (every rank runs PyTorch)"}
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
        if module == "liger_kernel" and not envcheck.installed(module):
            raise MissingDependencyError(
                f"{why} needs liger-kernel, which is not installed here: "
                "pip install 'zeroplan[fused]', or re-plan with zeroplan plan --no-fused-loss"
            )
        envcheck.require(module, why)
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


def check_graphs(launch: Launch, gpu_here: bool) -> None:
    """``--cuda-graphs`` where the ranks would run the decoder eager anyway
    (trainsetup.cuda_graphs_refusal: no GPU, several processes, DeepSpeed, full
    fine-tuning, compiled layers). The plan's own choice is not refused: a rank that cannot
    capture says so and runs eager."""
    train = launch.train
    if not train.cuda_graphs:
        return
    compiled = train.compile if train.compile is not None else launch.setup.compile
    refuse_cuda_graphs(launch.setup, launch.world_size, gpu_here, compiled)


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
    dry_run: bool = False,
) -> Preflight:
    """Every check, in order; ``present``: this machine's GPUs (``local_cluster()``);
    ``dry_run``: the checks are for --dry-run's listing (its refusals do not offer it)."""
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
    attempt(lambda: check_run_dir(launch))
    attempt(lambda: check_data(launch))
    attempt(lambda: check_tokenizer(launch.model))
    attempt(lambda: check_packages(launch.setup, launch.launcher, launch.nodes))
    attempt(lambda: check_moe(launch))
    attempt(lambda: check_tracker(launch.report_to, login=launch.first_rank == 0))

    local = [n for n in launch.nodes if n.local]
    attempt(lambda: check_kernels(launch, gpu_here=present is not None or not local))
    attempt(lambda: check_graphs(launch, gpu_here=present is not None or not local))
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
            shows = "" if dry_run else "--dry-run shows the commands, "
            errors.append(
                NoGPUError(
                    "no NVIDIA GPU on this machine (NVML sees none, or the driver or "
                    f"nvidia-ml-py is missing): run on a GPU machine; {shows}--force starts "
                    "the ranks anyway (on CPU)"
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
