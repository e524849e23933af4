"""The Python API: the same answers as the CLI, for notebooks and other tools.

>>> from zeroplan import estimate
>>> est = estimate("llama-3.1-8b-instruct", gpus="7x4090", method="lora", micro_batch=4, seq_len=2048)
>>> est.fits, est.peak_allocated_bytes / 2**30
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zeroplan.hardware import Cluster, local_cluster, parse_cluster, with_links
from zeroplan.memory import MemoryEstimate
from zeroplan.memory import estimate as _estimate
from zeroplan.models import ModelSpec, load_model
from zeroplan.packing import PaddedBatches
from zeroplan.speed import family_note, gpu_note, link_gbs, padded_step_time, step_time
from zeroplan.trainsetup import TrainSetup, parse_targets, refuse_cuda_graphs, resolve_attention

DEFAULT_GPUS = "1xH100"


def resolve_cluster(
    gpus: str | Cluster | None,
    p2p: bool | None = None,
    inter_node_gbs: float | None = None,
    cpu_cores_per_node: int | None = None,
) -> Cluster:
    """A Cluster from a spec string; None means this machine's GPUs (peer-to-peer as NVML
    reads it, its usable CPU cores), else 1×H100. ``p2p``, ``inter_node_gbs`` (GB/s per
    GPU) and ``cpu_cores_per_node`` say what the links and hosts are, over the catalog's
    (``hardware.with_links``)."""
    if isinstance(gpus, Cluster):
        cluster = gpus
    elif gpus is None:
        cluster = local_cluster() or parse_cluster(DEFAULT_GPUS)
    else:
        cluster = parse_cluster(gpus)
    return with_links(cluster, p2p, inter_node_gbs, cpu_cores_per_node)


def make_setup(**options: Any) -> TrainSetup:
    """A TrainSetup from CLI-style options (``lora_targets`` may be a comma string)."""
    targets = options.pop("lora_targets", None)
    if isinstance(targets, str):
        options["lora_targets"] = parse_targets(targets)
    elif targets is not None:
        options["lora_targets"] = tuple(targets)
    return TrainSetup(**options)


def estimate(
    model: str | ModelSpec,
    gpus: str | Cluster | None = None,
    setup: TrainSetup | None = None,
    p2p: bool | None = None,
    inter_node_gbs: float | None = None,
    fill: float = 1.0,
    cpu_cores_per_node: int | None = None,
    padded: PaddedBatches | None = None,
    **options: Any,
) -> MemoryEstimate:
    """Estimate per-GPU memory and the predicted speed (``.speed``, a ``StepTime``);
    ``options`` are TrainSetup fields (method, micro_batch, ...); ``p2p``,
    ``inter_node_gbs`` and ``cpu_cores_per_node`` as ``resolve_cluster`` takes them;
    ``fill``: the share of real tokens in a micro-batch (packed real data), which the
    speed's tokens/s counts; ``padded``: micro-batches padded to their longest instead
    (a trainer's loop that does not pack: speed.padded_step_time)."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    cluster = resolve_cluster(gpus, p2p, inter_node_gbs, cpu_cores_per_node)
    chosen = resolve_attention(setup if setup is not None else make_setup(**options), spec)
    if chosen.cuda_graphs:  # priced only where zeroplan launch can capture them
        refuse_cuda_graphs(chosen, cluster.world_size, fix="drop it")
    est = _estimate(spec, cluster, chosen)
    unchecked = tuple(n for n in (family_note(spec), gpu_note(cluster.gpu.name)) if n)
    return dataclasses.replace(
        est,
        speed=step_time(spec, chosen, cluster, fill)
        if padded is None
        else padded_step_time(spec, chosen, cluster, padded),
        link_gbs=link_gbs(cluster),
        notes=est.notes + unchecked,
    )
