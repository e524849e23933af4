"""Which of Liger's elementwise kernels each architecture gets: the plan's ``kernels`` choice.

A core module (no torch, no liger-kernel import): the planner, the memory model and the
speed model read this table; ``zeroplan.launch.kernels`` applies the same kernels on the
ranks, checking them against the liger-kernel actually installed there.

The table is read off liger-kernel 0.8.5 (``transformers/monkey_patch.py``: the keyword
arguments of each ``apply_liger_kernel_to_<family>`` in ``MODEL_TYPE_TO_APPLY_LIGER_FN``)
for the architectures zeroplan's catalog holds. Every one of them takes RMSNorm and RoPE;
the gated MLP is SwiGLU except Gemma's GeGLU. Liger patches every RMSNorm of the model
(the q/k norms of Qwen3 and Gemma 3 too) and, under mixture of experts, the experts' MLP
modules, which transformers 5 no longer runs (it runs grouped_mm over the expert banks):
for MoE layers the model counts the norms and RoPE only.
"""

from __future__ import annotations

from zeroplan.errors import KernelsUnsupportedError

LIGER_VERSION = "0.8.5"
# the plan's values of TrainSetup.kernels
KERNEL_CHOICES = ("none", "liger")
# the keyword arguments of liger-kernel's apply_liger_kernel_to_<family> that turn on the
# elementwise kernels around the linears (each family names those it has)
LIGER_KERNELS = ("rms_norm", "swiglu", "geglu", "rope")
_SWIGLU = ("rms_norm", "swiglu", "rope")
_GEGLU = ("rms_norm", "geglu", "rope")
# config model_type -> the kernels liger-kernel 0.8.5 has for it
LIGER_FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": _SWIGLU,
    "mistral": _SWIGLU,
    "ministral": _SWIGLU,
    "mixtral": _SWIGLU,
    "qwen2": _SWIGLU,
    "qwen3": _SWIGLU,
    "qwen3_moe": _SWIGLU,
    "phi3": _SWIGLU,
    "granite": _SWIGLU,
    "olmo2": _SWIGLU,
    "glm4": _SWIGLU,
    "smollm3": _SWIGLU,
    "gemma": _GEGLU,
    "gemma2": _GEGLU,
    "gemma3_text": _GEGLU,
    "gemma3": _GEGLU,
}


def liger_kernels(model_type: str) -> tuple[str, ...]:
    """The Liger kernels a ``model_type`` gets; () where liger-kernel patches none."""
    return LIGER_FAMILIES.get(model_type, ())


def check_kernels(model_type: str, kernels: str) -> None:
    """Refuse ``kernels='liger'`` for an architecture Liger has no kernels for."""
    if kernels not in KERNEL_CHOICES:
        raise KernelsUnsupportedError(
            f"--kernels must be one of {', '.join(KERNEL_CHOICES)}; got '{kernels}'"
        )
    if kernels == "liger" and not liger_kernels(model_type):
        raise KernelsUnsupportedError(
            f"--kernels liger: liger-kernel {LIGER_VERSION} has no kernels for the "
            f"'{model_type}' architecture; use --kernels none"
        )


def runs(model_type: str, kernels: str, *names: str) -> bool:
    """Whether a setup's ``kernels`` runs any of Liger's kernels ``names`` on ``model_type``."""
    return kernels == "liger" and any(n in liger_kernels(model_type) for n in names)
