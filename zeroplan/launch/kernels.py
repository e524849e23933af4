"""Which kernels the launched step runs, and a regional ``torch.compile`` of its layers.

``--kernels``:

- ``auto`` (default): what the plan chose (its setup's ``kernels``, zeroplan.liger: Liger's
  RMSNorm, SwiGLU / GeGLU and RoPE where liger-kernel was installed when it planned and
  the architecture has them, else the model's own modules), so the run keeps the
  activations and the speed the plan assumed; a plan that chose Liger is refused at
  preflight where its kernels cannot run.
- ``liger``: those kernels whatever the plan said, refused where they cannot run.
- ``none``: the model's own PyTorch modules and PEFT's own LoRA layers, whatever the plan
  said (over its memory where it chose Liger).

The LoRA linears (``auto`` and ``liger``): where the plan's setup says ``fused_lora``, each
adapted linear runs zeroplan.launch.loralinear's one autograd function (base matmul,
adapter, and their sum in place) instead of PEFT's layer; the same tensors are kept.

The fused linear cross-entropy stays the plan's choice (``setup.fused_loss``) on every path.

What Liger's kernels keep for the backward, and what that does to the memory and speed
models: ``memory.activations._norm`` / ``_mlp`` and ``speed.LIGER_NORM_BYTES`` /
``LIGER_ACT_BYTES``; measured on one H100, 8B LoRA: 71.52 → 63.40 GB peak, 1.19× the real
tokens/s (benchmarks/results/kernels_h100.jsonl).

``--compile``: each decoder layer's forward goes through ``torch.compile`` (regional
compilation: the layers share one code object, so the graph compiled for the first serves
the rest; packed micro-batches keep one shape). A compile that fails on a forward falls back
to eager for every layer, with one warning line; the run goes on. One that fails in the
backward is caught by the trainer (``sft.lean_trainer_class``), which runs the micro-batch
again in eager mode. Unset, the plan's setup decides (``compile``), and plans leave it off:
on the 8B LoRA default plan (Liger, 16 × 704 packed, one H100) it compiled 7 graphs in 7.4 s
with no recompile, and ran 1.5% faster (inside the step-to-step spread) with 2.6 GB more
peak memory, since dynamo cannot tell which inputs Liger's Triton kernels mutate and assumes
all (kernels2_h100.jsonl); where the host sets the pace (8B QLoRA, 1 × 1,664, the model's
own modules) 1.08-1.13x after a 20 s compile, inside the host-bound repeat spread
(hostc_h100.jsonl).
"""

from __future__ import annotations

import inspect
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from zeroplan.errors import (
    CompilerUnavailableError,
    KernelsUnsupportedError,
    MissingDependencyError,
)
from zeroplan.launch import envcheck
from zeroplan.liger import LIGER_KERNELS

KERNELS = ("auto", "liger", "none")
DEFAULT_KERNELS = "auto"
LIGER_FIX = "pip install liger-kernel, or pass --kernels none"
# torch.compile's backend for --compile (tests swap in "eager" or one that fails)
COMPILE_BACKEND: Any = "inductor"
# torch.compile's mode for --compile: None (inductor's default). A benchmark may set
# "reduce-overhead" (CUDA graphs) or "max-autotune-no-cudagraphs" to measure them.
COMPILE_MODE: str | None = None
RECOMPILE_LIMIT = 64
# layer inputs whose first dimension changes from batch to batch under packing
VARYING = ("cu_seq_lens_q", "cu_seq_lens_k")


@dataclass(frozen=True)
class KernelPath:
    """What the step runs: recorded in applied.json and shown on the dashboard."""

    requested: str  # auto | liger | none
    liger: tuple[str, ...]  # Liger kernels applied around the linears, () for none
    fused_loss: bool  # Liger's fused linear cross-entropy (the plan's choice)
    compile: bool  # regional torch.compile of the decoder layers asked for
    why_plain: str | None = None  # auto: why no Liger kernel runs
    liger_version: str | None = None
    # the LoRA linears: zeroplan.launch.loralinear's fused function, or PEFT's own layers
    fused_lora: bool = False
    why_peft_lora: str | None = None

    @property
    def label(self) -> str:
        """A few words for the dashboard."""
        parts = [f"Liger {'/'.join(self.liger)}" if self.liger else "plain kernels"]
        if self.fused_lora:
            parts.append("fused LoRA")
        if self.compile:
            parts.append("compiled layers")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "liger": list(self.liger),
            "fused_loss": self.fused_loss,
            "compile": "regional (each decoder layer)" if self.compile else "off",
            "why_plain": self.why_plain,
            "liger_version": self.liger_version,
            "lora": "fused linears (zeroplan)" if self.fused_lora else "PEFT's layers",
            "why_peft_lora": self.why_peft_lora,
        }


def liger_version() -> str | None:
    try:
        return metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        return None


def liger_model_types() -> frozenset[str] | None:
    """The config ``model_type`` values the installed liger-kernel patches (None: not
    installed). Imports liger-kernel (and so torch and triton)."""
    if not envcheck.installed("liger_kernel"):
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def check_kernels(
    requested: str,
    model_type: str | None,
    cuda: bool,
    supported: frozenset[str] | None,
    planned: bool = False,
) -> None:
    """Refuse Liger's kernels where they cannot run: ``--kernels liger``, or ``auto`` when the
    plan chose them (``planned``: its setup's ``kernels`` is liger; its memory assumed them).
    ``supported``: liger_model_types(); ``model_type`` None: not known here (the architecture
    is not checked)."""
    if requested not in KERNELS:
        raise KernelsUnsupportedError(f"--kernels must be one of {', '.join(KERNELS)}")
    if requested == "none" or (requested == "auto" and not planned):
        return
    # who asked (one flag, or the plan's kernels: the verbs agree) and how to do without
    if requested == "liger":
        what, needs, runs, fix = "--kernels liger", "needs", "runs", "pass --kernels none"
    else:
        what, needs, runs = "the plan's Liger kernels", "need", "run"
        fix = "plan again with --no-liger, or pass --kernels none (over the plan's memory)"
    if supported is None:
        raise MissingDependencyError(
            f"{what} {needs} liger-kernel, which is not installed here: "
            f"pip install liger-kernel, or {fix}"
        )
    if not cuda:
        raise KernelsUnsupportedError(
            f"{what} {runs} Triton kernels, which need a CUDA GPU: {fix} to train on the CPU"
        )
    if model_type is not None and model_type not in supported:
        raise KernelsUnsupportedError(
            f"{what}: liger-kernel {liger_version() or ''} has no kernels for the "
            f"'{model_type}' architecture: {fix}"
        )


def choose(
    requested: str,
    model_type: str,
    cuda: bool,
    supported: frozenset[str] | None,
    fused_loss: bool,
    compile_layers: bool = False,
    planned: bool = False,
    why_peft_lora: str | None = "no adapters",
) -> KernelPath:
    """The path a rank takes (after ``check_kernels``, which refuses Liger where it cannot
    run): Liger's kernels for ``liger``, and for ``auto`` where the plan chose them
    (``planned``), so that the run keeps the activations and speed the plan assumed; else
    the plain path and why. The LoRA linears: fused where ``why_peft_lora`` is None (the
    plan chose them and they can run; else it says why not), PEFT's under ``none``."""
    check_kernels(requested, model_type, cuda, supported, planned)
    why: str | None = None
    if requested == "none":
        why = "--kernels none"
    elif requested == "auto" and not planned:
        why = "the plan chose the model's own modules (--kernels liger overrides)"
    # the kernel names are filled in when applied (each family has its own subset)
    liger = () if why is not None else LIGER_KERNELS
    why_lora = "--kernels none" if requested == "none" else why_peft_lora
    return KernelPath(
        requested,
        liger,
        fused_loss,
        compile_layers,
        why,
        liger_version(),
        fused_lora=why_lora is None,
        why_peft_lora=why_lora,
    )


def liger_kwargs(apply_fn: Callable[..., Any], path: KernelPath) -> dict[str, bool]:
    """Keyword arguments for liger-kernel's ``apply_liger_kernel_to_<family>``: the kernels of
    ``path`` that this family has, the fused loss as planned, everything else off (a family's
    other switches, such as its plain cross-entropy, are not part of any zeroplan path)."""
    out: dict[str, bool] = {}
    for name, param in inspect.signature(apply_fn).parameters.items():
        if name == "fused_linear_cross_entropy":
            out[name] = path.fused_loss
        elif name in LIGER_KERNELS:
            out[name] = name in path.liger
        elif isinstance(param.default, bool):
            out[name] = False
    return out


def apply(model: Any, path: KernelPath) -> KernelPath:
    """Patch ``model`` (before PEFT wraps it) as ``path`` says; returns the path with the
    Liger kernels this family actually got."""
    if not path.liger and not path.fused_loss:
        return path
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model.config.model_type)
    if apply_fn is None:  # the fused loss on an unpatched family: preflight refused it
        raise KernelsUnsupportedError(
            f"liger-kernel has no kernels for '{model.config.model_type}': plan again with "
            "--no-fused-loss"
        )
    kw = liger_kwargs(apply_fn, path)
    apply_fn(model=model, **kw)
    return replace(path, liger=tuple(k for k in LIGER_KERNELS if kw.get(k)))


# --------------------------------------------------------------------------- compile


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def check_compiler(cuda: bool) -> None:
    """Refuse ``--compile`` where torch cannot compile: dynamo unsupported on this Python,
    Triton missing (inductor's GPU code), no C++ compiler (inductor's CPU code)."""
    import torch
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        raise CompilerUnavailableError(
            f"--compile: torch {torch.__version__} cannot compile on this Python "
            "(torch.compile is not supported here): upgrade torch, or pass --no-compile"
        )
    if cuda and not envcheck.installed("triton"):
        raise CompilerUnavailableError(
            "--compile needs Triton for GPU code, which is not installed: pip install triton, "
            "or pass --no-compile"
        )
    if not cuda and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise CompilerUnavailableError(
            "--compile on the CPU needs a C++ compiler (g++ or clang++), none found: install "
            "one, or pass --no-compile"
        )


def layer_list_name(model: Any) -> str | None:
    """Where a causal LM (before or after PEFT wraps it) keeps its decoder layers: the
    dotted name of the ModuleList of ``config.num_hidden_layers`` modules named ``layers``
    (None: it has none). --compile wraps its layers; CUDA graphs capture its parent."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and len(module) == n:
            return str(name)
    return None


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a causal LM (layer_list_name)."""
    name = layer_list_name(model)
    if name is None:
        raise KernelsUnsupportedError(
            f"--compile: no decoder layer list in '{model.config.model_type}' to compile: "
            "pass --no-compile"
        )
    return list(model.get_submodule(name))


@dataclass
class RegionalCompile:
    """Each decoder layer's forward through ``torch.compile``, eager after a failure."""

    warn: Callable[[str], None]
    backend: Any = None  # None: COMPILE_BACKEND
    layers: int = 0
    failed: str | None = None
    first_call_s: float | None = None  # the first compiled call: tracing + compiling included
    forwards: int = 0  # model forwards seen (calls of the first layer)
    graphs_first_forward: int | None = None  # dynamo graphs once the first forward had run
    _started: bool = field(default=False, repr=False)

    def wrap(self, layers: list[Any]) -> None:
        import torch
        import torch._dynamo.config as dynamo

        # every frame of the layer is one code object for all layers (and the first layer,
        # whose input needs no gradient, one graph more): past dynamo's default of 8 graphs a
        # code object it would run the rest eager without saying so
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        for i, layer in enumerate(layers):
            eager = layer.forward
            backend = COMPILE_BACKEND if self.backend is None else self.backend
            compiled = torch.compile(eager, backend=backend, mode=COMPILE_MODE)
            layer.forward = self._forward(eager, compiled, first_layer=i == 0)
            self.layers += 1

    def _forward(
        self, eager: Callable[..., Any], compiled: Callable[..., Any], first_layer: bool
    ) -> Any:
        import torch

        def forward(*args: Any, **kwargs: Any) -> Any:
            if first_layer:
                self.forwards += 1
                if self.forwards == 2:
                    self.graphs_first_forward = _graphs()
            if self.failed is None:
                for name in VARYING:  # the segments of a packed row: their count varies
                    if kwargs.get(name) is not None:
                        torch._dynamo.mark_dynamic(kwargs[name], 0)
                first = not self._started
                self._started = True
                t = time.perf_counter()
                try:
                    out = compiled(*args, **kwargs)
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:  # a compiler failure of any kind: eager from here
                    self.fail(exc)
                else:
                    if first:
                        self.first_call_s = time.perf_counter() - t
                    return out
            return eager(*args, **kwargs)

        return forward

    def fail(self, exc: BaseException) -> None:
        if self.failed is not None:
            return
        # dynamo wraps the compiler's error: name the wrapper, quote the cause's first line
        root: BaseException = exc
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner
        lines = [x for x in str(root).strip().splitlines() if x.strip()]
        cause = f"{type(root).__name__}: {lines[0] if lines else ''}"
        name = type(exc).__name__
        self.failed = (cause if root is exc else f"{name}, {cause}")[:300]
        self.warn(
            f"warning: torch.compile of the decoder layers failed ({self.failed}); "
            "the run goes on in eager mode"
        )

    def stats(self) -> dict[str, Any]:
        """What the compile did, for result.json: graphs, recompiles, graph breaks, time."""
        out: dict[str, Any] = {
            "layers": self.layers,
            "fell_back_to_eager": self.failed,
            "first_compiled_call_s": self.first_call_s,
        }
        try:
            from torch._dynamo.utils import compilation_time_metrics, counters
        except ImportError:
            return out
        # the first forward compiles a few graphs per frame (the first layer's input needs no
        # gradient, the others' do); graphs after it are recompiles for new shapes or guards
        graphs = int(counters["stats"].get("unique_graphs", 0))
        out["graphs"] = graphs
        out["graphs_first_forward"] = self.graphs_first_forward
        first = self.graphs_first_forward
        out["recompiles_after_first_forward"] = graphs - first if first is not None else None
        out["graph_breaks"] = sum(counters["graph_break"].values())
        # dynamo keys its graph-break counter by reason: the few most frequent, shortened
        reasons = counters["graph_break"].most_common(4)
        out["graph_break_reasons"] = {str(k)[:200]: int(v) for k, v in reasons}
        out["mode"] = COMPILE_MODE
        # dynamo's whole compile of each frame (tracing, AOT autograd, inductor)
        seconds = compilation_time_metrics.get("_compile.compile_inner", [])
        out["compile_s"] = round(sum(seconds), 2)
        return out
