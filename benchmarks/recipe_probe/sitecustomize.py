"""The probe that benchmarks/recipe_trainers.py puts into a trainer's own process.

Python imports ``sitecustomize`` at start-up from the first folder on sys.path that has it;
recipe_trainers.py puts this folder first on PYTHONPATH and sets RECIPE_PROBE_OUT, so the
trainer's CLI (and any process it launches, e.g. through ``accelerate launch``) runs as its
users run it, with one addition: when ``transformers.trainer`` is imported, every Trainer
gets a callback that times each optimizer step (CUDA-synchronised), counts the tokens each
micro-batch carries (padded, real, in the loss), records the CUDA allocator's peaks, and at
the end reads off the trainer and model what the loop actually did: collator, optimizer,
autocast, gradient checkpointing, and the dtype of every kind of parameter. It writes one
JSON file to $RECIPE_PROBE_OUT. Without that variable it does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from probe_hooks import patch_on_import  # benchmarks/probe_hooks.py

del sys.path[0]  # the launch's sys.path, as it was

_OUT = os.environ.get("RECIPE_PROBE_OUT")


def _kind(name: str) -> str:
    """Which part of the model a parameter belongs to, by its name."""
    low = name.lower()
    if "lora_" in low:
        return "lora"
    if "embed" in low or "wte" in low:
        return "embedding"
    if "lm_head" in low:
        return "lm_head"
    if "norm" in low:
        return "norm"
    return "linear"


def _params(model: Any) -> dict[str, Any]:
    """Per kind of parameter: count, elements, bytes, dtypes, trainable elements."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied embeddings / lm_head: counted once
            continue
        seen.add(id(p))
        row = out.setdefault(
            _kind(name), {"tensors": 0, "elements": 0, "bytes": 0, "dtypes": {}, "trainable": 0}
        )
        row["tensors"] += 1
        row["elements"] += p.numel()
        row["bytes"] += p.numel() * p.element_size()
        dt = str(p.dtype).replace("torch.", "")
        if type(p).__name__ == "Params4bit":
            dt = "nf4(" + dt + ")"
        row["dtypes"][dt] = row["dtypes"].get(dt, 0) + 1
        if p.requires_grad:
            row["trainable"] += p.numel()
    return out


def _ckpt(model: Any) -> dict[str, Any]:
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            base = getattr(base, attr)()
    kwargs = getattr(base, "_gradient_checkpointing_kwargs", None)
    return {
        "enabled": bool(getattr(base, "is_gradient_checkpointing", False)),
        "training_mode": bool(getattr(base, "training", False)),
        "use_reentrant": None if not isinstance(kwargs, dict) else kwargs.get("use_reentrant"),
        "attn_implementation": getattr(getattr(base, "config", None), "_attn_implementation", None),
        "use_cache": getattr(getattr(base, "config", None), "use_cache", None),
    }


def _collator(coll: Any) -> dict[str, Any]:
    keep = (
        "padding_free",
        "pad_to_multiple_of",
        "padding",
        "max_length",
        "return_position_ids",
        "completion_only_loss",
        "block_diag_attn",
        "multiple_of",
    )
    out: dict[str, Any] = {"class": type(coll).__module__ + "." + type(coll).__name__}
    for k in keep:
        if hasattr(coll, k):
            v = getattr(coll, k)
            out[k] = v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
    return out


def _optimizer(opt: Any) -> dict[str, Any]:
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    import torch

    state_bytes = 0
    for st in inner.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.is_cuda:
                state_bytes += v.numel() * v.element_size()
    d = getattr(inner, "defaults", {})
    return {
        "class": type(inner).__module__ + "." + type(inner).__name__,
        "fused": d.get("fused"),
        "foreach": d.get("foreach"),
        "lr": d.get("lr"),
        "state_bytes_cuda": state_bytes,
    }


ARG_KEYS = (
    "optim",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "packing",
    "padding_free",
    "max_length",
    "max_seq_length",
    "completion_only_loss",
    "assistant_only_loss",
    "use_liger_kernel",
    "torch_compile",
    "group_by_length",
    "dataloader_num_workers",
    "remove_unused_columns",
    "average_tokens_across_devices",
    "activation_offloading",
    "sample_packing",
)


def _args(args: Any) -> dict[str, Any]:
    out = {}
    for k in ARG_KEYS:
        if hasattr(args, k):
            v = getattr(args, k)
            out[k] = v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
    return out


class _NoCuda:
    """torch.cuda's memory calls where there is no GPU (a CPU dry run): zeros."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: 0


def _make_callback(trainer: Any) -> Any:
    import torch
    from transformers import TrainerCallback

    cuda: Any = torch.cuda if torch.cuda.is_available() else _NoCuda()

    class Probe(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.micro: list[dict[str, Any]] = []
            self.t0 = 0.0
            self.start: dict[str, Any] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            cuda.synchronize()
            self.start = {
                "allocated_at_train_begin": cuda.memory_allocated(),
                "peak_allocated_before_train": cuda.max_memory_allocated(),
                "reserved_at_train_begin": cuda.memory_reserved(),
            }
            cuda.reset_peak_memory_stats()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            cuda.synchronize()
            self.t0 = time.perf_counter()
            self.micro = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            cuda.synchronize()
            dt = time.perf_counter() - self.t0
            row: dict[str, Any] = {
                "step": state.global_step,
                "seconds": dt,
                "peak_allocated": cuda.max_memory_allocated(),
                "peak_reserved": cuda.max_memory_reserved(),
            }
            for k in ("padded", "real", "loss_tokens"):
                row[k] = sum(m[k] for m in self.micro)
            row["shapes"] = [m["shape"] for m in self.micro]
            self.steps.append(row)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            cuda.synchronize()
            model = kw.get("model") or trainer.model
            res = {
                **self.start,
                "peak_allocated_train": cuda.max_memory_allocated(),
                "peak_reserved_train": cuda.max_memory_reserved(),
                "allocated_at_train_end": cuda.memory_allocated(),
                "steps": self.steps,
                "trainer_class": type(trainer).__module__ + "." + type(trainer).__name__,
                "model_class": type(model).__name__,
                "args": _args(trainer.args),
                "mixed_precision": str(getattr(trainer.accelerator, "mixed_precision", None)),
                "collator": _collator(trainer.data_collator),
                "optimizer": _optimizer(trainer.optimizer),
                "checkpointing": _ckpt(model),
                "params": _params(model),
                "argv": sys.argv,
            }
            # the trainer's config, where it keeps one (LLaMA-Factory, axolotl)
            for attr in ("finetuning_args", "cfg"):
                if hasattr(trainer, attr):
                    res[attr] = repr(getattr(trainer, attr))[:4000]
            assert _OUT is not None
            with open(_OUT + ".tmp", "w") as f:
                json.dump(res, f, default=repr)
            os.replace(_OUT + ".tmp", _OUT)

    return Probe()


def _count(inputs: Any) -> dict[str, Any]:
    ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask")
    labels = inputs.get("labels")
    padded = int(ids.numel()) if ids is not None else 0
    real = int(mask.sum()) if mask is not None and mask.dim() == 2 else padded
    loss = int((labels[..., 1:] != -100).sum()) if labels is not None else 0
    return {
        "padded": padded,
        "real": real,
        "loss_tokens": loss,
        "shape": list(ids.shape) if ids is not None else None,
    }


def _patch(module: Any) -> None:
    cls = module.Trainer
    init = cls.__init__

    def __init__(self: Any, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        probe = _make_callback(self)
        self.add_callback(probe)
        step = self.training_step  # the subclass's, bound

        def training_step(*sa: Any, **skw: Any) -> Any:
            inputs = sa[1] if len(sa) > 1 else skw["inputs"]
            probe.micro.append(_count(inputs))
            return step(*sa, **skw)

        self.training_step = training_step

    cls.__init__ = __init__


if _OUT:
    patch_on_import({"transformers.trainer": _patch})
