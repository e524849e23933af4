"""The data an estimate hands to renderers, the planner and the dashboard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zeroplan.speed import StepTime


@dataclass(frozen=True)
class Term:
    """One memory term on one GPU: its size in bytes and the formula that gave it.

    ``formula`` is the docstring formula with this estimate's numbers filled in, for
    ``zeroplan estimate --explain``. ``in_allocator`` is False for memory PyTorch's caching
    allocator never sees (bitsandbytes paged optimizer states live in CUDA managed memory):
    it counts towards what nvidia-smi shows but not towards ``max_memory_allocated``.
    """

    name: str
    bytes: int
    formula: str
    in_allocator: bool = True


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of one setup on one cluster, for the worst-loaded rank.

    ``terms`` holds each term's full size; ``at_peak`` how much of each is alive at the
    moment of the peak (``peak_phase``), so that ``sum(at_peak.values())`` is
    ``peak_allocated_bytes``. ``device_used_bytes`` is what nvidia-smi shows on a card with
    room to spare; ``required_bytes`` what the card must hold (the allocator gives its cache
    back under pressure), on which ``fits`` is decided.

    ``speed`` is the predicted step time of the same setup on the same cluster
    (``zeroplan.speed.step_time``: one optimizer step, all micro-batches), when the caller
    asked for it (``zeroplan.api.estimate`` does); ``link_gbs`` the per-GPU bandwidth its
    communication term used.
    """

    model: dict[str, Any]
    setup: dict[str, Any]
    cluster: dict[str, Any]
    terms: dict[str, Term]
    at_peak: dict[str, int]
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_used_bytes: int
    required_bytes: int
    gpu_memory_bytes: int
    cpu_bytes_per_node: int
    calibrated: bool
    notes: tuple[str, ...] = field(default=())
    speed: StepTime | None = None
    link_gbs: float | None = None

    @property
    def headroom_bytes(self) -> int:
        """Card memory left over ``required_bytes``: negative means it does not fit."""
        return self.gpu_memory_bytes - self.required_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def to_json(self) -> dict[str, Any]:
        """The estimate contract of DESIGN.md: one JSON object, integer bytes per GPU."""
        per_gpu: dict[str, Any] = {f"{name}_bytes": term.bytes for name, term in self.terms.items()}
        per_gpu.update(
            peak_allocated_bytes=self.peak_allocated_bytes,
            peak_reserved_bytes=self.peak_reserved_bytes,
            device_used_bytes=self.device_used_bytes,
            required_bytes=self.required_bytes,
            gpu_memory_bytes=self.gpu_memory_bytes,
            headroom_bytes=self.headroom_bytes,
            fits=self.fits,
            peak_phase=self.peak_phase,
            at_peak_bytes=dict(self.at_peak),
        )
        out = {
            "model": self.model,
            "setup": self.setup,
            "cluster": self.cluster,
            "per_gpu": per_gpu,
            "cpu_bytes": self.cpu_bytes_per_node,
            "calibrated": self.calibrated,
            "notes": list(self.notes),
        }
        if self.speed is not None:
            out["speed"] = self.speed_json()
        return out

    def speed_json(self) -> dict[str, Any] | None:
        """The predicted speed: seconds per optimizer step (compute + exposed communication
        + offload + the launched trainer's own cost), its split, and tokens/s of the whole
        cluster and per GPU (full-length sequences, every position counted)."""
        if self.speed is None:
            return None
        world = int(self.cluster["world_size"])
        return {
            **self.speed.to_json(),
            "tokens_per_s_per_gpu": self.speed.tokens_per_s / world,
            "link_gbs": self.link_gbs,
            "gpu_seconds_per_micro_batch": self.speed.gpu_micro_s,
            "host_seconds_per_micro_batch": self.speed.host_micro_s,
        }
