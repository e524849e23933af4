"""``zeroplan launch`` and ``zeroplan env``: parse, call ``zeroplan.launch``, render."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from zeroplan.commands.job import (
    JOB_OPTIONS,
    KERNEL_OPTIONS,
    LINK_OPTIONS,
    check_recipe_card,
    epochs_option,
    format_option,
    job_options,
    job_request,
    kernel_options,
    kernel_request,
    link_options,
    overlong_option,
    recipe_answer,
    recipe_job,
    recipe_options_with,
    refuse_adapter_options,
    system_prompt_option,
    tokenizer_option,
    with_data,
)
from zeroplan.commands.job import say as _say
from zeroplan.commands.params import FiniteFloat, OutPath
from zeroplan.launch.kernels import KERNELS
from zeroplan.launch.runner import LAUNCHERS, TrainOptions
from zeroplan.launch.trackers import TRACKERS
from zeroplan.planfiles import model_name

if TYPE_CHECKING:
    from zeroplan.errors import ZeroplanError
    from zeroplan.hardware import Cluster
    from zeroplan.launch.multinode import Rendezvous
    from zeroplan.launch.preflight import Preflight
    from zeroplan.launch.runner import Launch, Node
    from zeroplan.models import ModelSpec

GIB = 2**30


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.rstrip("/").split("/")[-1].lower()).strip("-") or "run"


@click.command()
@click.argument("model_or_plan", metavar="MODEL_OR_PLAN", required=False)
@recipe_options_with(
    "not with MODEL_OR_PLAN: the recipe names the model (--model: where the ranks load it)."
)
@click.option(
    "--data",
    required=True,
    metavar="PATH",
    help="Training records: .json / .jsonl / .parquet (alpaca, chat messages, ShareGPT, text).",
)
@click.option(
    "-o",
    "--out",
    "run_dir",
    type=OutPath(file_okay=False),
    default=None,
    help="Run folder: plan, logs, metrics, checkpoints. Default: runs/MODEL-DATE-TIME "
    "(with --resume and a run folder as MODEL_OR_PLAN: that folder).",
)
@click.option(
    "--gpus",
    default=None,
    metavar="N|SPEC",
    help="GPUs on this machine to use (4) or, to plan a model, a cluster (4x4090). "
    "Default: the plan's count; for a model, this machine's GPUs.",
)
@click.option(
    "--hostfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Several nodes: a DeepSpeed hostfile, one 'host slots=N' line per node.",
)
@click.option(
    "--include",
    default=None,
    metavar="HOSTS",
    help="Only these GPUs, DeepSpeed's syntax: localhost:0,1 or node0@node1:0,1.",
)
@click.option("--exclude", default=None, metavar="HOSTS", help="All but these GPUs (same syntax).")
@click.option(
    "--nnodes",
    type=int,
    default=None,
    help="Several nodes without a hostfile: run the same command on every node, each with its "
    "own --node-rank (as torchrun). Under SLURM (srun --ntasks-per-node 1) it is read from "
    "SLURM_JOB_NODELIST / SLURM_NODEID. RUN_DIR must be on a filesystem all nodes share.",
)
@click.option("--node-rank", type=int, default=None, help="This node's rank, 0 to --nnodes - 1.")
@click.option(
    "--master-addr",
    default=None,
    metavar="HOST",
    help="Node rank 0's host name or address (the rendezvous; SLURM: the first host).",
)
@click.option(
    "--master-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Rendezvous port (default 29500; SLURM: derived from the job id).",
)
@click.option(
    "--join-timeout",
    type=FiniteFloat(min=0),
    default=300.0,
    show_default=True,
    help="Several nodes: seconds to wait for the others to join in RUN_DIR and for the "
    "rendezvous to open; then one line naming the nodes that did not join, exit status 2.",
)
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default=None,
    help="Default: deepspeed when the plan uses ZeRO and DeepSpeed is installed, else torchrun.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the run folder's newest checkpoint, with the limits, logging and "
    "saving it was started with unless given again.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the commands, environment, files and checks; start nothing.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Start even if the estimate predicts out of memory (or there is no GPU).",
)
@click.option(
    "--no-dashboard",
    is_flag=True,
    help="zeroplan's plain progress lines instead of the dashboard (which also records GPU samples).",
)
@epochs_option("Passes over the data.")
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many optimizer steps.",
)
@click.option(
    "--lr", type=FiniteFloat(min=0, min_open=True), default=None, help="Peak learning rate."
)
@click.option(
    "--eval-fraction",
    type=FiniteFloat(min=0, max=1, max_open=True),
    default=None,
    help="Share of the records held out for evaluation.",
)
@overlong_option()
@format_option()
@system_prompt_option()
@tokenizer_option(
    "Planning a model from --data: the folder with its tokenizer.json (default: the "
    "model's folder, the HF cache, the Hub)."
)
@click.option(
    "--batching",
    type=click.Choice(("packed", "padded", "grouped")),
    default=None,
    help="packed (default): samples packed into micro-batches of the plan's shape, attention "
    "kept inside each sample; padded: padded to the longest of each micro-batch; grouped: "
    "padded, similar lengths together.",
)
@click.option(
    "--packed-attention",
    type=click.Choice(("auto", "varlen", "mask")),
    default=None,
    help="packed: varlen flash attention (auto on a GPU with torch >= 2.9) or an SDPA mask "
    "(auto for Gemma-2 and for sliding windows shorter than the records, as the plan counts).",
)
@click.option(
    "--kernels",
    type=click.Choice(KERNELS),
    default=None,
    help="auto (default): what the plan chose (its setup's kernels: Liger's RMSNorm, SwiGLU/GeGLU "
    "and RoPE, or the model's own modules; and its fused LoRA linears, or PEFT's layers); "
    "liger: Liger's whatever the plan said, or refuse; none: the model's own modules and "
    "PEFT's LoRA layers.",
)
@click.option(
    "--compile/--no-compile",
    "compile_layers",
    default=None,
    help="torch.compile each decoder layer (default: the plan's setup, which leaves it off); a "
    "failed compile falls back to eager.",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=None,
    help="capture the decoder's forward and backward once as CUDA graphs and replay them, so "
    "the host no longer sets the pace of small steps (default: the plan's choice; one GPU, "
    "LoRA/QLoRA, no DeepSpeed); a failed capture falls back to eager.",
)
@click.option(
    "--save-steps", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps."
)
@click.option(
    "--save-total-limit",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Keep the newest N checkpoints, deleting older ones (default 3; 0 keeps all). The "
    "Trainer deletes one only after a newer save is complete, so --resume always finds one, "
    "and the older two are there to go back to if the newest turns out bad.",
)
@click.option(
    "--logging-steps",
    type=click.IntRange(min=1),
    default=None,
    help="A metrics line every N steps (default 10).",
)
@click.option(
    "--report-to",
    type=click.Choice(TRACKERS),
    default="none",
    show_default=True,
    help="Experiment tracker the Trainer logs to, from rank 0: tensorboard (event files in "
    "RUN_DIR/tb: tensorboard --logdir RUN_DIR/tb), wandb (Weights & Biases, local files in "
    "RUN_DIR/wandb; needs `wandb login` or WANDB_API_KEY, or WANDB_MODE=offline; "
    "WANDB_PROJECT etc. as usual) or mlflow (a file store in RUN_DIR/mlruns unless "
    "MLFLOW_TRACKING_URI is set). Its package must be installed.",
)
@click.option(
    "--model",
    "weights",
    default=None,
    metavar="PATH_OR_ID",
    help="Where the ranks load the model from, when not where the plan says (a plan made from a config.json).",
)
@job_options
@link_options
@kernel_options
@click.option(
    "--grace",
    type=FiniteFloat(min=0),
    default=30.0,
    show_default=True,
    help="Seconds the ranks get after SIGTERM to save and exit before SIGKILL.",
)
@click.option(
    "--progress-every",
    type=FiniteFloat(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between plain progress lines.",
)
@click.option(
    "--rank-program", type=click.Path(exists=True, dir_okay=False), default=None, hidden=True
)
def launch(
    model_or_plan: str | None,
    recipe_path: str | None,
    recipe_format: str,
    data: str,
    run_dir: Path | None,
    gpus: str | None,
    hostfile: Path | None,
    include: str | None,
    exclude: str | None,
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    join_timeout: float,
    launcher: str | None,
    resume: bool,
    dry_run: bool,
    force: bool,
    no_dashboard: bool,
    epochs: float | None,
    max_steps: int | None,
    lr: float | None,
    eval_fraction: float | None,
    overlong: str | None,
    data_format: str | None,
    system_prompt: str | None,
    tokenizer: str | None,
    batching: str | None,
    packed_attention: str | None,
    kernels: str | None,
    compile_layers: bool | None,
    cuda_graphs: bool | None,
    save_steps: int | None,
    save_total_limit: int | None,
    logging_steps: int | None,
    report_to: str,
    weights: str | None,
    grace: float,
    progress_every: float,
    rank_program: str | None,
    p2p: bool | None,
    inter_node_gbs: float | None,
    cpu_cores_per_node: int | None,
    **job: Any,
) -> None:
    """Start fine-tuning on every GPU, supervised: per-rank logs, Ctrl-C stops every rank.

    \b
    zeroplan plan llama-3.1-8b-instruct --gpus 7x4090 --seq-len 2048 -o runs/plan
    zeroplan launch runs/plan --data train.jsonl -o runs/r1 --dry-run   # show, start nothing
    zeroplan launch runs/plan --data train.jsonl -o runs/r1
    zeroplan launch runs/r1 --data train.jsonl --resume                  # after Ctrl-C
    zeroplan launch Qwen/Qwen2.5-7B --data train.jsonl --method qlora    # plan here, then run
    zeroplan launch --recipe train.yaml --data train.jsonl --gpus 4      # a trainer's recipe
    zeroplan launch runs/plan70b --data train.jsonl --hostfile hosts --launcher deepspeed
    zeroplan launch runs/plan --data train.jsonl -o /shared/r1 --nnodes 2 --node-rank 0 \\
        --master-addr node0                # and --node-rank 1 on the other node
    srun --nodes 2 --ntasks-per-node 1 zeroplan launch runs/plan --data train.jsonl

    MODEL_OR_PLAN is a plan.json, a folder holding one (`zeroplan plan -o DIR`), or a model
    (then it is planned on --gpus, else on this machine's GPUs, for the job that --method,
    --seq-len, --global-batch, --lora-r, --lora-targets and --no-quantization describe, as
    `zeroplan plan` does). Or --recipe FILE instead: a LLaMA-Factory, axolotl or TRL
    recipe's model, method, LoRA settings, sequence length and global batch are the job,
    planned as `zeroplan plan --recipe` does (options beside it override it; its learning
    rate, epochs and data are not read: give --lr, --epochs, --data). Before anything starts, it
    checks the data file (its records, read and rendered as `zeroplan plan --data` does), the
    run folder (a run there needs --resume; --resume needs a checkpoint, the run's plan and
    something left to train), the model folder's tokenizer, the packages, the GPUs present
    and the estimate on them (a predicted out-of-memory is refused with the planner's fix
    unless --force), and that ssh reaches every hostfile host and sees RUN_DIR there.

    Several nodes (--hostfile, --nnodes or SLURM) need the same Python environment and
    working directory on each, and RUN_DIR on a filesystem they all share: with --nnodes
    and SLURM the nodes meet there before any rank starts. A node that refuses to start
    (one line, exit status 2) says so there, and the nodes waiting for it stop at once,
    naming it; a waiting node says what it waits for every --progress-every seconds and
    gives up after --join-timeout, naming the nodes that did not join. Ctrl-C stops the
    wait, here and, through RUN_DIR, on the other nodes.

    Every rank runs `python -m zeroplan.launch.sft` through torchrun or the deepspeed
    launcher and writes RUN_DIR/logs/rank{N}.log and RUN_DIR/metrics.jsonl. Ctrl-C or
    SIGTERM: SIGTERM to every rank, --grace seconds to save, then SIGKILL. A loss or
    gradient norm that turns NaN or infinite stops the run at that step, unsaved (the last
    checkpoint stays the last good one), and says so. Exit status: 0 done, 1 a rank failed
    or training diverged (named, with its last log lines), 130 Ctrl-C, 143 SIGTERM.
    """
    from zeroplan.errors import ZeroplanError
    from zeroplan.launch.preflight import preflight

    began = time.time()  # this node's start, to tell its session's markers from older ones
    if model_or_plan is None and recipe_path is None:
        raise click.UsageError("Missing argument 'MODEL_OR_PLAN' (or give --recipe FILE)")
    if model_or_plan is not None and recipe_path is not None:
        raise click.UsageError(
            f"MODEL_OR_PLAN {model_or_plan!r} and --recipe: give one (the recipe names its "
            "model; --model says where the ranks load it from)"
        )
    rdv = _rendezvous(hostfile, nnodes, node_rank, master_addr, master_port, run_dir, dry_run)
    try:
        # 1. resolve the plan: a plan.json, or a model (or a recipe's) planned here for the
        # job described
        plan_path = None
        if model_or_plan is not None:
            plan_path = _plan_file(model_or_plan, click.get_current_context())
        data_job = _data_job(data, tokenizer, data_format, system_prompt, overlong, epochs)
        links = {
            "p2p": p2p,
            "inter_node_gbs": inter_node_gbs,
            "cpu_cores_per_node": cpu_cores_per_node,
        }
        # what the planner may choose, as zeroplan plan's --no-liger etc. say
        switches = kernel_request(**{k: job.pop(k) for k in KERNEL_OPTIONS})
        # launching a model plans it: --no-cuda-graphs plans the eager step it will run
        switches["allow_cuda_graphs"] = cuda_graphs is not False
        resolved = _resolve_plan(
            model_or_plan, plan_path, gpus, hostfile, include, exclude, weights, job, data_job,
            links, rdv, (recipe_path, recipe_format) if recipe_path is not None else None,
            switches,
        )  # fmt: skip
        run_dir = _run_dir(run_dir, resume, plan_path, resolved.plan, rdv)
        # 2. prepare: the run folder's files, the ranks' commands and environment, and the
        # data and training options every rank gets
        train = TrainOptions(
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            eval_fraction=eval_fraction,
            resume=resume,
            overlong=overlong,
            data_format=data_format,
            system_prompt=system_prompt,
            save_steps=save_steps,
            save_total_limit=save_total_limit,
            logging_steps=logging_steps,
            batching=batching,
            packed_attention=packed_attention,
            report_to=None if report_to == "none" else report_to,
            kernels=kernels,
            compile=compile_layers,
            cuda_graphs=cuda_graphs,
        )
        the_launch = _prepare(
            resolved, run_dir, data, launcher, train, rank_program,
            filtered=bool(include or exclude), grace=grace, rdv=rdv,
        )  # fmt: skip
        # 3. preflight: every check before anything starts (a dry run shows them all)
        checks = preflight(
            the_launch, resolved.present, force=force, hosts=not dry_run, dry_run=dry_run
        )
        if dry_run:
            _render_dry_run(the_launch, checks, resolved.present, resolved.recipe)
            if checks.errors:  # everything was shown; the status says a real launch would stop
                raise checks.errors[0]
            return
        checks.raise_first()
    except ZeroplanError as exc:
        if rdv is not None and run_dir is not None and not dry_run:
            _refuse_for_the_others(run_dir, rdv, exc)
        raise
    # 4. start: say what the checks noted; with several nodes, meet the others in RUN_DIR
    # before any rank starts
    for note in (*the_launch.notes, *checks.notes):
        _say(f"note: {note}")
    if rdv is not None:
        _meet_the_other_nodes(the_launch, rdv, began, join_timeout, progress_every)
        if rdv.node_rank > 0 and not no_dashboard:
            _say("note: the dashboard runs on node rank 0; plain progress lines here")
            no_dashboard = True
    # 5. supervise: start every rank and see them to the end, Ctrl-C and SIGTERM forwarded
    code = _supervise(the_launch, rdv, grace, not no_dashboard, progress_every)
    sys.exit(code)  # (ctx.exit's status is dropped by main's standalone_mode=False)


@dataclass(frozen=True)
class Resolved:
    """What step 1 of a launch found: the plan JSON, where the ranks load the model from,
    the nodes that run them (with a rendezvous: this node only), this machine's GPUs; for a
    recipe, its mapping as ``plan --recipe --json`` answers it."""

    plan: dict[str, Any]
    model: str
    nodes: tuple[Node, ...]
    present: Cluster | None
    recipe: dict[str, Any] | None = None
    source: Path | None = None  # the plan.json read; None: planned here


def _rendezvous(
    hostfile: Path | None,
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    run_dir: Path | None,
    dry_run: bool,
) -> Rendezvous | None:
    """This node's place in a run of several started on each node (--nnodes, SLURM); None
    for one node or a --hostfile launch (which reaches the nodes itself: SLURM's variables
    do not apply to it, also from inside a SLURM job)."""
    from zeroplan.launch import multinode

    if hostfile is not None and nnodes is not None:
        from zeroplan.errors import BadRendezvousError

        raise BadRendezvousError(
            "--hostfile starts every node from here; --nnodes is the same command run on "
            "every node: pick one"
        )
    if hostfile is not None:
        return None
    rdv = multinode.resolve(nnodes, node_rank, master_addr, master_port)
    if rdv is not None and run_dir is not None and not dry_run:
        multinode.arrive(run_dir, rdv)  # what an earlier attempt of this node said is over
    return rdv


def _plan_file(model_or_plan: str, ctx: click.Context) -> Path | None:
    """The plan.json MODEL_OR_PLAN names, or None for a model; a plan given with the
    options that plan a model is refused (they would be silently ignored)."""
    from zeroplan.launch.runner import find_plan

    plan_path = find_plan(model_or_plan)
    if plan_path is None:
        return None
    given = [
        ("--p2p/--no-p2p" if p == "p2p" else "--" + p.replace("_", "-"))
        for p in (*JOB_OPTIONS, *LINK_OPTIONS, *KERNEL_OPTIONS)
        if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT
    ]
    if given:
        raise click.BadParameter(
            f"{', '.join(given)} plan a model; {plan_path} is already a plan "
            "(make another with zeroplan plan)",
            param_hint="MODEL_OR_PLAN",
        )
    return plan_path


def _data_job(
    data: str,
    tokenizer: str | None,
    data_format: str | None,
    system_prompt: str | None,
    overlong: str | None,
    epochs: float | None,
) -> dict[str, Any]:
    """The data and how its records are read, as ``job.with_data``'s keyword arguments: a
    model planned here is planned for the data's token lengths."""
    return {
        "data": data,
        "tokenizer": tokenizer,
        "fmt": data_format,
        "system": system_prompt,
        "overlong": overlong,
        "epochs": epochs,
    }


def _resolve_plan(
    model_or_plan: str | None,
    plan_path: Path | None,
    gpus: str | None,
    hostfile: Path | None,
    include: str | None,
    exclude: str | None,
    weights: str | None,
    job: dict[str, Any],
    data_job: dict[str, Any],
    links: dict[str, Any] | None = None,
    rdv: Rendezvous | None = None,
    recipe: tuple[str, str] | None = None,
    switches: dict[str, bool] | None = None,
) -> Resolved:
    """The plan to launch, from where MODEL_OR_PLAN says: a plan.json (``plan_path``), or a
    model planned here for the job the options describe; or, with ``recipe`` (--recipe FILE,
    --recipe-format), the recipe's job planned here. ``switches``: kernel_request's."""
    from zeroplan.hardware import local_cluster

    present = local_cluster()
    if plan_path is not None:
        return _from_plan_file(plan_path, gpus, hostfile, include, exclude, weights, present, rdv)
    cluster, nodes = _cluster_here(gpus, hostfile, include, exclude, present, links, rdv)
    switches = switches or {}
    if recipe is not None:
        return _from_recipe(*recipe, cluster, nodes, weights, job, data_job, present, switches)
    assert model_or_plan is not None  # launch() asked for one of the two
    return _planned_here(model_or_plan, cluster, nodes, weights, job, data_job, present, switches)


def _from_plan_file(
    plan_path: Path,
    gpus: str | None,
    hostfile: Path | None,
    include: str | None,
    exclude: str | None,
    weights: str | None,
    present: Cluster | None,
    rdv: Rendezvous | None,
) -> Resolved:
    """A plan.json: its setup on its GPU count (or --gpus), the model where it says (or
    --model)."""
    from zeroplan.errors import BadClusterSpecError
    from zeroplan.launch.multinode import check_node_count
    from zeroplan.launch.runner import gpu_count, plan_cluster, read_plan, resolve_nodes
    from zeroplan.planfiles import local_model, model_location

    plan = read_plan(plan_path)
    planned = plan_cluster(plan)
    if rdv is not None:
        node_gpus = check_node_count(planned, int(plan["world_size"]), rdv.nnodes, rdv.option)
        count = gpu_count(gpus) if gpus is not None else node_gpus
    elif gpus is not None:
        count = gpu_count(gpus)
    elif hostfile is None and planned is not None and planned.is_multi_node:
        raise BadClusterSpecError(
            f"the plan is for {planned.describe()}: pass --hostfile with one "
            "'host slots=N' line per node"
        )
    else:
        count = int(plan["world_size"])
    nodes = resolve_nodes(
        count=count, hostfile=hostfile, include=include, exclude=exclude, present=present
    )
    if hostfile is not None:
        check_node_count(planned, int(plan["world_size"]), len(nodes), "the hostfile")
    if weights is not None:
        model = local_model(weights, plan_path.parent) or weights
    else:
        model = model_location(plan, near=plan_path.parent)
    return Resolved(plan, model, nodes, present, source=plan_path)


def _cluster_here(
    gpus: str | None,
    hostfile: Path | None,
    include: str | None,
    exclude: str | None,
    present: Cluster | None,
    links: dict[str, Any] | None,
    rdv: Rendezvous | None,
) -> tuple[Cluster, tuple[Node, ...]]:
    """The cluster to plan on and the nodes that run it, for a job planned here: --gpus (a
    count: this machine's GPUs), else this machine's GPUs; a hostfile's nodes, identical."""
    from zeroplan.api import DEFAULT_GPUS
    from zeroplan.errors import BadClusterSpecError
    from zeroplan.hardware import Cluster, parse_cluster, usable_cpu_cores, with_links
    from zeroplan.launch.runner import gpu_count, is_gpu_count, resolve_nodes

    spec_gpu = None
    if gpus is not None and not is_gpu_count(gpus):
        spec_gpu = parse_cluster(gpus).gpu
    count = gpu_count(gpus) if gpus else (present.gpus_per_node if present else 1)
    nodes = resolve_nodes(
        count=count, hostfile=hostfile, include=include, exclude=exclude, present=present
    )
    per_node = {len(n.slots) for n in nodes}
    if len(per_node) > 1:
        raise BadClusterSpecError(
            "zeroplan plans identical nodes: give every host the same GPUs, or plan with "
            "zeroplan plan and launch the plan"
        )
    gpu = spec_gpu or (present.gpu if present else parse_cluster(DEFAULT_GPUS).gpu)
    cluster = with_links(
        Cluster(
            gpu,
            gpus_per_node=per_node.pop(),
            num_nodes=rdv.nnodes if rdv is not None else len(nodes),
            # NVML's note on this machine's P2P, when its GPUs are the ones planned on
            notes=present.notes if present is not None and gpu is present.gpu else (),
            # the ranks run here (or on nodes like this one), with launch_env's threads
            cpu_cores_per_node=usable_cpu_cores(),
        ),
        **(links or {}),
    )
    return cluster, nodes


def _planned_here(
    model: str,
    cluster: Cluster,
    nodes: tuple[Node, ...],
    weights: str | None,
    job: dict[str, Any],
    data_job: dict[str, Any],
    present: Cluster | None,
    switches: dict[str, bool],
) -> Resolved:
    """A model, planned as zeroplan plan does, for the job the options describe and the
    data's token lengths."""
    from zeroplan.models import load_model

    spec = load_model(model)
    refuse_adapter_options(str(job["method"]))
    plan = _plan_job(spec, cluster, job_request(**job), data_job, switches)
    return Resolved(plan, _weights_or_plans(weights, plan), nodes, present)


def _from_recipe(
    path: str,
    fmt: str,
    cluster: Cluster,
    nodes: tuple[Node, ...],
    weights: str | None,
    job: dict[str, Any],
    data_job: dict[str, Any],
    present: Cluster | None,
    switches: dict[str, bool],
) -> Resolved:
    """A trainer's recipe, planned as zeroplan plan --recipe does: its model, and its method,
    LoRA settings, sequence length and global batch as the job (options given override
    them); the plan chooses the setup."""
    from zeroplan.recipes import read_recipe

    recipe, spec = read_recipe(path, fmt)
    job, overridden, extra = recipe_job(recipe, job, cluster.world_size)
    check_recipe_card(recipe, overridden, cluster.gpu)
    refuse_adapter_options(str(job["method"]))
    # the recipe's own kernel choice over the options' (as zeroplan plan --recipe)
    plan = _plan_job(spec, cluster, job_request(**job), data_job, {**switches, **extra})
    answer = recipe_answer(recipe, overridden, job)
    return Resolved(plan, _weights_or_plans(weights, plan), nodes, present, answer)


def _plan_job(
    spec: ModelSpec,
    cluster: Cluster,
    request: dict[str, Any],
    data_job: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The plan JSON for ``request`` (job_request's fields, ``extra`` PlanRequest fields
    beside them) on ``cluster``, from the data's token lengths when the data file is here."""
    from zeroplan.errors import TokenizerNotFoundError
    from zeroplan.launch.data import data_exists
    from zeroplan.launch.runner import plan_model

    # a local data file: plan from its token lengths, as zeroplan plan --data does
    data = data_job["data"] if data_exists(data_job["data"]) else None
    try:
        fields = with_data(spec, request, **{**data_job, "data": data}, progress=_say)
    except TokenizerNotFoundError as exc:
        if not str(request["seq_len"] or "").strip().isdigit():
            raise
        # a length was given: plan full-length sequences of it, as without data
        _say(f"note: planning {request['seq_len']}-token sequences, not the data's lengths: {exc}")
        fields = with_data(spec, request, None)
    return plan_model(spec, cluster, {**fields, **(extra or {})})


def _weights_or_plans(weights: str | None, plan: dict[str, Any]) -> str:
    """Where the ranks load the model from: --model, else where the plan says."""
    from zeroplan.planfiles import local_model, model_location

    return (local_model(weights) or weights) if weights is not None else model_location(plan)


def _run_dir(
    run_dir: Path | None,
    resume: bool,
    plan_path: Path | None,
    plan: dict[str, Any],
    rdv: Rendezvous | None,
) -> Path:
    """-o, else: the plan's own folder when --resume names a run folder, runs/MODEL-slurmJOB
    under SLURM (the same on every node), runs/MODEL-DATE-TIME on one node."""
    from zeroplan.watch.runlog import LAUNCH_FILE

    if run_dir is not None:
        return run_dir
    if resume and plan_path is not None and (plan_path.parent / LAUNCH_FILE).is_file():
        return plan_path.parent
    if rdv is not None and rdv.source == "slurm":
        return Path("runs") / f"{_slug(model_name(plan))}-slurm{rdv.job_id}"
    if rdv is not None:
        from zeroplan.errors import BadRendezvousError

        raise BadRendezvousError(
            "--nnodes needs -o RUN_DIR, the same folder on every node, on a filesystem "
            "they all share"
        )
    return Path("runs") / f"{_slug(model_name(plan))}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare(
    resolved: Resolved,
    run_dir: Path,
    data: str,
    launcher: str | None,
    train: TrainOptions,
    rank_program: str | None,
    *,
    filtered: bool,
    grace: float,
    rdv: Rendezvous | None,
) -> Launch:
    """The launch, built and not started: the launcher (deepspeed for a ZeRO plan when it is
    installed, else torchrun; torchrun on each node of a rendezvous), the ranks' environment
    for this machine's GPU (else the plan's), RUN_DIR's files."""
    from zeroplan.launch.runner import build_launch, default_launcher, plan_cluster, setup_of

    present, plan, nodes = resolved.present, resolved.plan, resolved.nodes
    gpu = present.gpu if present is not None and any(n.local for n in nodes) else None
    if gpu is None:
        planned = plan_cluster(plan)
        gpu = planned.gpu if planned is not None else None
    return build_launch(
        plan,
        run_dir=run_dir,
        data=data,
        nodes=nodes,
        launcher=launcher or ("torchrun" if rdv is not None else default_launcher(setup_of(plan))),
        gpu=gpu,
        train=train,
        model=resolved.model,
        program=rank_program,
        filtered=filtered,
        grace_s=grace,
        rendezvous=rdv,
        source=resolved.source,
    )


def _refuse_for_the_others(run_dir: Path, rdv: Rendezvous, exc: ZeroplanError) -> None:
    """Say in RUN_DIR that this node refuses, so that the nodes waiting for it stop at once,
    naming it, instead of at the end of their --join-timeout."""
    from zeroplan.errors import ResumeError, RunDirExistsError
    from zeroplan.launch import multinode

    # what RUN_DIR holds is refused by every node alike (preflight.check_run_dir)
    alike = isinstance(exc, (RunDirExistsError, ResumeError))
    multinode.refuse(run_dir, rdv, str(exc), finished_run=alike)


def _meet_the_other_nodes(
    la: Launch, rdv: Rendezvous, began: float, join_timeout: float, progress_every: float
) -> None:
    """Wait in RUN_DIR until every node joined; a failed join leaves this node's ending
    there for the others to read. Ctrl-C or SIGTERM while waiting: no rank was started."""
    from zeroplan.launch import multinode

    _say(f"{rdv.describe()}: meeting the other nodes in {la.run_dir}")
    try:
        with multinode.stop_signals_interrupt():
            multinode.join(
                la.run_dir,
                rdv,
                timeout_s=join_timeout,
                say=_say,
                since=began,
                every_s=progress_every,
            )
    except KeyboardInterrupt as exc:
        sig = multinode.signal_of(exc)
        _say(f"stopped by {sig.name} while waiting for the other nodes: no rank was started")
        sys.exit(128 + sig)


def _supervise(
    la: Launch, rdv: Rendezvous | None, grace: float, dashboard: bool, progress_every: float
) -> int:
    """Run every rank to its end (the dashboard or plain progress lines); its exit status."""
    from zeroplan.launch import multinode
    from zeroplan.launch.supervise import run_launch

    try:
        result = run_launch(
            la, grace_s=grace, dashboard=dashboard, progress_every_s=progress_every, say=_say
        )
    finally:
        if rdv is not None:
            multinode.leave(la.run_dir, rdv)
    if result.exit_code == 0:
        _say(f"done: {result.message} in {result.seconds:.0f} s; run folder {la.run_dir}")
    else:
        _say(result.message)
    return result.exit_code


def _render_dry_run(
    la: Launch, checks: Preflight, present: Cluster | None, recipe: dict[str, Any] | None
) -> None:
    """Everything the launch would do, as text (computed elsewhere; printed here); with a
    recipe, first its mapping as zeroplan plan --recipe prints it."""
    from zeroplan.launch.runner import describe_files, describe_nodes
    from zeroplan.launch.trackers import where
    from zeroplan.planner import describe

    echo = click.echo
    best = la.plan["best"]
    echo("zeroplan launch --dry-run: nothing is started, nothing is written\n")
    if recipe is not None:
        from rich.console import Console

        from zeroplan.commands.render import render_recipe

        render_recipe(recipe, Console())
        echo()
    echo(f"plan       {la.plan['model']}: {best['family']}, {describe(la.setup)}")
    echo(
        f"           made for {la.plan['cluster']}: {best['required_bytes'] / GIB:.1f} GiB per "
        f"GPU, {best['tokens_per_s']:,.0f} tokens/s predicted"
    )
    if la.setup.is_lora:
        targets = ", ".join(la.setup.lora_targets)
        echo(
            f"adapter    LoRA r={la.setup.lora_r} on {targets}, {la.setup.seq_len} tokens a sequence"
        )
    echo(f"this host  {present.describe() if present is not None else 'no NVIDIA GPU'}")
    echo(
        f"ranks      {la.world_size} with {la.launcher} ({describe_nodes(la.nodes)}), "
        f"master port {la.port}"
    )
    if la.rendezvous is not None:
        last = la.first_rank + len(la.nodes[0].slots) - 1
        ranks = f"rank {last}" if last == la.first_rank else f"ranks {la.first_rank}-{last}"
        echo(f"this node  {la.rendezvous.host}: {la.rendezvous.describe()}; global {ranks}")
    echo(f"run dir    {la.run_dir}")
    if la.report_to != "none":
        echo(f"tracker    {where(la.report_to)}")
    for note in la.notes:
        echo(f"note       {note}")
    echo("\nenvironment (for every rank, on top of yours)")
    for k, v in la.env.items():
        echo(f"  {k}={v}")
    echo("\ncommands")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in la.env.items())
    for cmd in la.commands:
        local = cmd.argv[0] != "ssh"  # a remote command carries its environment inside
        echo(f"  [{cmd.host}] " + (f"{env} {cmd.shell()}" if local and env else cmd.shell()))
    echo("\neach rank runs")
    wrapper = [sys.executable, "-u", "-m", "zeroplan.launch.ranklog", str(la.log_dir), "--"]
    echo(f"  {shlex.join(wrapper)} \\")
    echo(f"    {shlex.join([sys.executable, '-u', *la.rank_argv])}")
    echo("\nfiles")
    for path, what in describe_files(la):
        echo(f"  {path}\n      {what}")
    echo("\npreflight")
    for err in checks.errors:
        echo(f"  refuses: {err}")
    for note in checks.notes:
        echo(f"  note: {note}")
    if checks.estimate is not None:
        est = checks.estimate
        verdict = "fits" if est.fits else "does not fit"
        echo(
            f"  estimate: {est.required_bytes / GIB:.1f} GiB of "
            f"{est.gpu_memory_bytes / GIB:.1f} GiB per GPU: {verdict}"
        )
    if not checks.errors:
        remote = not all(n.local for n in la.nodes)
        echo("  ok" + (" (ssh to the nodes is not tried in a dry run)" if remote else ""))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for bug reports).")
def env(as_json: bool) -> None:
    """This machine as a training run sees it: GPUs, driver, CUDA, and the versions of torch,
    DeepSpeed, bitsandbytes, flash-attn, transformers, PEFT and TRL, read without importing
    them, then the incompatibilities that can be told cheaply (a CPU-only torch, a driver
    older than torch's CUDA, bitsandbytes without CUDA, DeepSpeed ops that cannot compile).

    \b
    zeroplan env
    zeroplan env --json > env.json     # attach to a bug report
    """
    from zeroplan.launch.envcheck import collect

    report = collect()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    echo = click.echo
    mem = f" · {report.memory_bytes / GIB:.1f} GiB RAM" if report.memory_bytes else ""
    echo(
        f"{'host':<14}{report.host} · {report.platform} · Python {report.python} · {report.cpus} CPUs{mem}"
    )
    if report.gpus:
        first, *rest = [f"{g.index}: {g.name}, {g.memory_bytes / GIB:.1f} GiB" for g in report.gpus]
        echo(f"{'GPUs':<14}{first}")
        for line in rest:
            echo(f"{'':<14}{line}")
    else:
        echo(f"{'GPUs':<14}none" + (f" ({report.nvml})" if report.nvml else ""))
    if report.cuda_visible_devices is not None:
        echo(f"{'':<14}CUDA_VISIBLE_DEVICES={report.cuda_visible_devices}")
    echo(f"{'driver':<14}{report.driver or '-'}")
    torch_cuda = report.torch_cuda or (
        f"ROCm {report.torch_rocm}" if report.torch_rocm else "none (CPU-only)"
    )
    echo(f"{'CUDA':<14}driver supports {report.cuda_driver or '-'}; torch built for {torch_cuda}")
    for dist, version in report.packages.items():
        extra = ""
        if dist == "deepspeed" and version and report.deepspeed_ops is not None:
            extra = f" (pre-built ops: {', '.join(report.deepspeed_ops) or 'none'})"
        echo(f"{dist:<14}{version or 'not installed'}{extra}")
    for note in report.notes:
        echo(f"note: {note}")
    if report.problems:
        echo("problems:")
        for problem in report.problems:
            echo(f"  - {problem}")
    else:
        echo("no known incompatibility found")
