"""Where a launched run's first non-finite value appears (issue 29's NaN loss; benchmarks/
moe_nan.py puts this folder first on PYTHONPATH; it does nothing unless ZP_NAN_PROBE names a
JSON file to write).

Per optimizer step of the launched rank it records, without a host wait inside the step
(GPU scalars, read at the step's end, where the Trainer's logging reads the loss anyway):

- the batch: the sum, min and max of input_ids, the largest position id, cu_seq_lens' end;
- per decoder layer, forward: the largest |value| of the layer's output, its attention's,
  its MoE block's, the router's logits, the experts' input and output; the router's
  empty experts and largest expert load; backward: the largest |grad| reaching each of
  those outputs, in the order the backward produced them;
- after the backward (clipped): trainable parameters whose gradient is not finite, the
  largest |grad|; after the optimizer step: trainable parameters that are not finite, and
  frozen parameters whose sum changed since the step began (something wrote into them).

Switches for the variants (read once):
    ZP_NAN_OLD_LOOP=1    the Trainer's own loop (zeroplan.launch.hostloop off, as
                         tests/test_hostloop.py turns it off)
    ZP_NAN_EXPERTS=eager transformers' experts implementation (default: grouped_mm)
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

PATH = os.environ.get("ZP_NAN_PROBE")
OLD_LOOP = os.environ.get("ZP_NAN_OLD_LOOP") == "1"
EXPERTS = os.environ.get("ZP_NAN_EXPERTS")


def _absmax(x: Any) -> Any:
    return x.detach().float().abs().amax()


class Probe:
    def __init__(self) -> None:
        self.step = 0
        self.pending: list[tuple[str, str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {"old_loop": OLD_LOOP, "experts_env": EXPERTS}
        self.sums: dict[str, Any] = {}
        self.model: Any = None
        self.pad_mask: Any = None
        self.t0 = time.time()

    # ---- hooks
    def rec(self, name: str, kind: str, value: Any) -> None:
        self.pending.append((name, kind, value))

    def out_hook(self, name: str) -> Any:
        import torch

        def hook(module: Any, args: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            if not isinstance(t, torch.Tensor):
                return
            self.rec(name, "fwd", _absmax(t))
            pad = self.pad_mask
            if pad is not None and pad.numel() == t.shape[:-1].numel():
                rows = t.reshape(-1, t.shape[-1])
                if bool(pad.any()):
                    self.rec(name, "fwd_pad", _absmax(rows[pad]))
            if t.requires_grad:
                t.register_hook(lambda g: self.grad(name, g))

        return hook

    def grad(self, name: str, g: Any) -> None:
        """The largest |grad| at real tokens and at padding (batch_pre's pad_mask)."""
        self.rec(name, "bwd", _absmax(g))
        pad = self.pad_mask
        if pad is not None and pad.numel() == g.shape[:-1].numel():
            rows = g.reshape(-1, g.shape[-1])
            self.rec(name, "bwd_real", _absmax(rows[~pad]))
            if bool(pad.any()):
                self.rec(name, "bwd_pad", _absmax(rows[pad]))

    def gate_hook(self, name: str) -> Any:
        import torch

        def hook(module: Any, args: Any, out: Any) -> None:
            logits, _, idx = out
            self.rec(name, "fwd", _absmax(logits))
            counts = torch.bincount(idx.reshape(-1), minlength=module.num_experts)
            self.rec(name, "empty_experts", (counts == 0).sum().float())
            self.rec(name, "max_load", counts.max().float())
            self.rec(name, "routed", counts.sum().float())

        return hook

    def experts_pre(self, name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            self.rec(name, "fwd_in", _absmax(args[0]))

        return hook

    def batch_pre(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.step == 1 and "batch_keys" not in self.info:
            self.info["batch_keys"] = sorted(k for k, v in kwargs.items() if v is not None)
            dump = os.environ.get("ZP_NAN_DUMP")
            if dump:
                torch.save({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}, dump)
        pad_id = getattr(getattr(module, "config", None), "pad_token_id", None)
        if isinstance(ids, torch.Tensor) and pad_id is not None:
            self.pad_mask = (ids == pad_id).reshape(-1)
            self.rec("batch", "pad_tokens", self.pad_mask.sum().double())
        if isinstance(ids, torch.Tensor):
            self.rec("batch", "ids_sum", ids.double().sum())
            self.rec("batch", "ids_min", ids.min().double())
            self.rec("batch", "ids_max", ids.max().double())
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            self.rec("batch", "pos_max", pos.max().double())
        cu = kwargs.get("cu_seq_lens_q")
        if isinstance(cu, torch.Tensor):
            self.rec("batch", "cu_end", cu[-1].double())
            self.rec("batch", "cu_len", torch.tensor(float(cu.numel())))

    def loss_hook(self, module: Any, args: Any, out: Any) -> None:
        loss = getattr(out, "loss", None)
        if loss is not None:
            self.rec("model", "loss", loss.detach().float())
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            self.rec("model", "aux_loss", aux.detach().float())

    def install(self, model: Any) -> None:
        import torch

        self.model = model
        inner = None
        for name, m in model.named_modules():
            cls = type(m).__name__
            if inner is None and hasattr(m, "layers") and cls.endswith("Model"):
                inner = m
            tail = name.split("layers.")[-1] if "layers." in name else None
            if tail is None:
                continue
            parts = tail.split(".")
            if not parts[0].isdigit():
                continue
            short = f"L{parts[0]}" + ("." + ".".join(parts[1:]) if len(parts) > 1 else "")
            if len(parts) == 1 or parts[1:] in (["self_attn"], ["mlp"]):
                m.register_forward_hook(self.out_hook(short))
            elif parts[1:] == ["mlp", "gate"] and hasattr(m, "num_experts"):
                m.register_forward_hook(self.gate_hook(short))
            elif parts[1:] == ["mlp", "experts"]:
                m.register_forward_pre_hook(self.experts_pre(short))
                m.register_forward_hook(self.out_hook(short))
        if inner is not None:
            inner.register_forward_pre_hook(self.batch_pre, with_kwargs=True)
        model.register_forward_hook(self.loss_hook)
        cfg = getattr(model, "config", None)
        if EXPERTS:
            for m in model.modules():
                c = getattr(m, "config", None)
                if c is not None and hasattr(c, "_experts_implementation"):
                    c._experts_implementation = EXPERTS
        impl = getattr(cfg, "_experts_implementation", None) if cfg is not None else None
        self.info.update(
            experts_implementation=str(impl),
            attn_implementation=str(getattr(cfg, "_attn_implementation", None)),
            model_class=type(model).__name__,
            cuda=torch.cuda.is_available(),
            torch=torch.__version__,
        )
        self.info["nonfinite_params_at_start"] = [
            n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())
        ]

    # ---- step boundaries
    def begin(self) -> None:
        self.step += 1
        self.pending = []
        # the frozen parameters' sums: did anything write into them during the step?
        self.sums = {
            n: p.detach().float().sum()
            for n, p in self.model.named_parameters()
            if not p.requires_grad
        }

    def before_optimizer(self) -> None:
        import torch

        bad, top = [], 0.0
        for n, p in self.model.named_parameters():
            if p.requires_grad and p.grad is not None:
                if not bool(torch.isfinite(p.grad).all()):
                    bad.append(n)
                top = max(top, float(p.grad.detach().float().abs().amax()))
        self.current = {"nonfinite_grads": bad[:40], "n_nonfinite_grads": len(bad),
                        "grad_absmax": top}  # fmt: skip

    def after_optimizer(self) -> None:
        import torch

        bad = [
            n
            for n, p in self.model.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p).all())
        ]
        changed = []
        for n, p in self.model.named_parameters():
            before = self.sums.get(n)
            if before is not None:
                after = p.detach().float().sum()
                if not bool(torch.isclose(after, before, equal_nan=True)):
                    changed.append(n)
        self.current.update(
            nonfinite_params=bad[:40], n_nonfinite_params=len(bad), frozen_changed=changed[:40]
        )

    def end(self) -> None:
        rows = [(n, k, float(v)) for n, k, v in self.pending]
        row = {"step": self.step, "t": time.time() - self.t0, **getattr(self, "current", {})}
        row["records"] = rows
        bad = [(n, k) for n, k, v in rows if v != v or v in (float("inf"), float("-inf"))]
        row["first_nonfinite"] = bad[:5]
        self.steps.append(row)
        self.current = {}
        self.write()

    def write(self) -> None:
        if PATH:
            with open(PATH, "w") as f:
                json.dump({"info": self.info, "steps": self.steps}, f)


PROBE = Probe()


def _patch_trainer(module: Any) -> None:
    trainer_cls = module.Trainer
    init = trainer_cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        from transformers import TrainerCallback

        class NanCallback(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **k: Any) -> None:
                PROBE.install(k["model"])

            def on_step_begin(self, *a: Any, **k: Any) -> None:
                PROBE.begin()

            def on_pre_optimizer_step(self, *a: Any, **k: Any) -> None:
                PROBE.before_optimizer()

            def on_optimizer_step(self, *a: Any, **k: Any) -> None:
                PROBE.after_optimizer()

            def on_step_end(self, *a: Any, **k: Any) -> None:
                PROBE.end()

        self.add_callback(NanCallback())

    trainer_cls.__init__ = __init__


def _patch_hostloop(module: Any) -> None:
    module.sync_free_kwargs = lambda cuda: {}
    module.trainable = lambda model: None
    module.LeanWalks.install = lambda self, model: None


PATCHES = {"transformers.trainer": _patch_trainer}
if OLD_LOOP:
    PATCHES["zeroplan.launch.hostloop"] = _patch_hostloop


if PATH:
    patch_on_import(PATCHES)
