"""A LoRA linear's forward and backward as one autograd function: the launch's LoRA path.

PEFT's LoRA layer (peft.tuners.lora: ``Linear``, and ``Linear4bit`` over bitsandbytes)
computes ``y = base(x) + B(A(dropout(x))) · s`` with separate tensor operations, each a pass
over an output-sized tensor: 4-bit layers first copy the base output (``result.clone()``),
then ``· s`` writes the adapter's output again and ``result + …`` reads both and writes a
third; the backward multiplies the output's gradient by s and autograd sums the input's two
gradients (the frozen weight's and the adapter's) in a separate kernel. On an 8B model at
r = 16 those passes move more bytes than the adapters' matmuls do work.

Here, for an adapter whose dropout is off (p = 0: PEFT's ``nn.Identity``):

    forward:   y = x·Wᵀ (+ bias);  h = x·Aᵀ (T × r);  y += s · h·Bᵀ    (cuBLAS addmm in place)
    backward:  dH = s · dY·B;   dB = s · dYᵀ·h;   dA = dHᵀ·x            (s in addmm's alpha)
               dx = dY·W  then  dx += dH·A                              (addmm in place)

where W is the base weight (a 4-bit one dequantized to the compute dtype, as bitsandbytes'
own backward does). It saves x, shared with the base linear, and the r-wide h: what PEFT's
layer saves over bf16 adapters and over a 4-bit base, and less over a bf16 base with fp32
adapters under autocast, where PEFT's layer casts x to fp32 and autocast keeps a bf16 copy
per adapter (memory.activations.shares_inputs; measured: the 8B bf16 LoRA plan at 16 × 704
without DeepSpeed peaked 67.37 GB against 68.03 estimated, kernels11_h100.jsonl). It moves
12 B per token and output feature (16 B over a 4-bit base) and 4 B per input feature less
(speed.fused_lora_saved_bytes), and under autocast none of PEFT's casts (speed.lora_share).
Measured on one H100 (benchmarks/results/kernels5_h100.jsonl): the 8B QLoRA default launch
1.10x and the bf16 LoRA one 1.04x the same plans on PEFT's layers, losses equal to 0.001.
Its forward and backward are Python; they call F.linear on the base weight (dequantizing a
4-bit one themselves, not through bitsandbytes' module and autograd function, with
bitsandbytes' C functions called directly where they match its own: launch/dequant.py) and
scale in addmm's epilogue; in a Llama layer's seven linears the host spends 0.72x PEFT's time on
bf16 adapters and 0.61x over NF4, timed on an H100 machine's host (hostops.FUSED_ADAPTER_HOST_US;
on a CPU, where nothing launches, 1.1x and 0.7x).

The adapters keep their dtype (PEFT's fp32 under autocast, DeepSpeed's bf16): the matmuls
run in the compute dtype (autocast's, else x's) and the adapters' gradients come back in
theirs, the numbers autocast gives PEFT's path. Where a call is anything else (several or
no active adapters, merged or disabled adapters, dropout > 0, DoRA or another variant,
extra arguments, fp32 adapters without autocast: PEFT then computes the adapter in fp32)
PEFT's own forward runs.

Not for ZeRO-3: its hooks gather lora_A and lora_B when their modules are called, and this
path reads their weights directly (trainsetup.fused_lora_refusal).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zeroplan.launch import dequant
from zeroplan.models import SHARED_INPUT

# attribute set on each patched layer: the forward PEFT gave it
_PEFT_FORWARD = "_zp_peft_forward"


def _cast(t: Any, dtype: Any) -> Any:
    """``t`` in ``dtype``; the tensor itself where it already is (``Tensor.to`` would return
    it too, after a dispatch that costs the host about 1.5 µs: a fused linear makes about
    eight such calls a forward and backward)."""
    return t if t.dtype == dtype else t.to(dtype)


def _base_weight(base: Any, dtype: Any) -> Any:
    """The base linear's weight in the compute dtype: a 4-bit one dequantized (as
    bitsandbytes' MatMul4Bit backward does), a dense one as it is."""
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is None:
        return _cast(base.weight, dtype)
    return _cast(dequant.dequantize(base.weight, quant_state), dtype)


def _base_forward(base: Any, x: Any, dtype: Any) -> Any:
    """``base(x)`` in ``dtype`` without the module call: F.linear over the weight (a 4-bit
    one dequantized as bitsandbytes' MatMul4Bit forward does, the same numbers where its
    compute dtype is ``dtype``). The module's own forward where anything else is asked of it
    (hooks, another compute dtype, a 4-bit weight without its quantization state)."""
    import torch.nn.functional as F

    weight = base.weight
    # hooks, or a forward replaced on the instance (accelerate's offload): the module's call
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return _cast(base(x), dtype)
    bias = None if base.bias is None else _cast(base.bias, dtype)
    if type(base) is _LINEAR:
        return F.linear(x, _cast(weight, dtype), bias)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or getattr(base, "compute_dtype", None) != dtype:
        return _cast(base(x), dtype)
    return F.linear(x, _base_weight(base, dtype), bias)


_LINEAR: Any = None


def _function() -> Any:
    import torch

    class LoRALinear(torch.autograd.Function):
        """y = base(x) + s · (x·Aᵀ)·Bᵀ; see the module docstring."""

        @staticmethod
        def forward(
            ctx: Any, x: Any, a: Any, b: Any, base: Any, scaling: float, dtype: Any, cast: bool
        ) -> Any:
            # ``cast``: autocast is on; its casts are made here, once, and it is off inside
            if cast:
                with torch.autocast(x.device.type, enabled=False):
                    return LoRALinear._forward(ctx, x, a, b, base, scaling, dtype)
            return LoRALinear._forward(ctx, x, a, b, base, scaling, dtype)

        @staticmethod
        def _forward(
            ctx: Any, x: Any, a: Any, b: Any, base: Any, scaling: float, dtype: Any
        ) -> Any:
            xc = _cast(x, dtype)
            y = _base_forward(base, xc, dtype)
            x2 = xc.reshape(-1, xc.shape[-1])
            ac, bc = _cast(a, dtype), _cast(b, dtype)
            h = torch.mm(x2, ac.t())
            y.view(-1, y.shape[-1]).addmm_(h, bc.t(), alpha=scaling)
            ctx.save_for_backward(x2, h, ac, bc)
            ctx.base, ctx.scaling = base, scaling
            ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.shape, x.dtype, a.dtype, b.dtype
            return y

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            x2, h, ac, bc = ctx.saved_tensors
            s = ctx.scaling
            dy2 = _cast(dy.reshape(-1, dy.shape[-1]), x2.dtype)
            # s·(a·b) as one addmm (beta 0: the 0-d input is neither read nor broadcast)
            unread = dy2.new_empty(())
            dh = torch.addmm(unread, dy2, bc, beta=0, alpha=s)
            da = db = dx = None
            if ctx.needs_input_grad[1]:
                da = _cast(torch.mm(dh.t(), x2), ctx.a_dtype)
            if ctx.needs_input_grad[2]:
                db = _cast(torch.addmm(unread, dy2.t(), h, beta=0, alpha=s), ctx.b_dtype)
            if ctx.needs_input_grad[0]:
                dx = torch.mm(dy2, _base_weight(ctx.base, dy2.dtype))
                dx.addmm_(dh, ac)
                dx = _cast(dx.view(ctx.x_shape), ctx.x_dtype)
            return dx, da, db, None, None, None, None

    return LoRALinear


def _group_function() -> Any:
    import torch

    class LoRAGroup(torch.autograd.Function):
        """Sibling LoRA linears that read one input (q/k/v, gate/up), k of them:

            forward:   H = x·[A₁; …; A_k]ᵀ (T × Σr);  yᵢ = x·Wᵢᵀ;  yᵢ += sᵢ · Hᵢ·Bᵢᵀ
            backward:  dHᵢ = sᵢ · dYᵢ·Bᵢ;  dBᵢ = sᵢ · dYᵢᵀ·Hᵢ;  [dA₁; …] = [dH₁ …]ᵀ·x
                       dx = dY₁·W₁;  dx += dYᵢ·Wᵢ (i > 1);  dx += [dH₁ …]·[A₁; …]

        x is read once for all the A matmuls and their gradients, and the input's gradient
        is one buffer the k base matmuls and the adapters add into in place, where k single
        functions write k gradients that autograd then sums (speed.fused_lora_saved_bytes:
        (k − 1) · 10 B per input feature and token, and 2 B per forward). Saves x, H, the
        stacked A and the Bs: what the single functions save, the A stacked."""

        @staticmethod
        def forward(
            ctx: Any, x: Any, bases: Any, scalings: Any, dtype: Any, cast: bool, *ab: Any
        ) -> Any:
            if cast:
                with torch.autocast(x.device.type, enabled=False):
                    return LoRAGroup._forward(ctx, x, bases, scalings, dtype, ab)
            return LoRAGroup._forward(ctx, x, bases, scalings, dtype, ab)

        @staticmethod
        def _forward(ctx: Any, x: Any, bases: Any, scalings: Any, dtype: Any, ab: Any) -> Any:
            xc = _cast(x, dtype)
            x2 = xc.reshape(-1, xc.shape[-1])
            # stacked, then cast: two calls where casting each first takes k + 1
            a_all = _cast(torch.cat(ab[0::2]), dtype)
            bcs = [_cast(b, dtype) for b in ab[1::2]]
            h = torch.mm(x2, a_all.t())
            outs, off = [], 0
            for base, bc, s in zip(bases, bcs, scalings, strict=True):
                r = bc.shape[1]
                y = _base_forward(base, xc, dtype)
                y.view(-1, y.shape[-1]).addmm_(h[:, off : off + r], bc.t(), alpha=s)
                outs.append(y)
                off += r
            ctx.save_for_backward(x2, h, a_all, *bcs)
            ctx.bases, ctx.scalings = bases, scalings
            ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
            ctx.ab_dtypes = [t.dtype for t in ab]
            return tuple(outs)

        @staticmethod
        def backward(ctx: Any, *dys: Any) -> Any:
            x2, h, a_all, *bcs = ctx.saved_tensors
            unread = x2.new_empty(())  # addmm's beta 0: neither read nor broadcast
            dys2 = [_cast(dy.reshape(-1, dy.shape[-1]), x2.dtype) for dy in dys]
            dhs = [
                torch.addmm(unread, dy2, bc, beta=0, alpha=s)
                for dy2, bc, s in zip(dys2, bcs, ctx.scalings, strict=True)
            ]
            dh = torch.cat(dhs, 1)
            needs = ctx.needs_input_grad[5:]
            grads: list[Any] = []
            da_all = torch.mm(dh.t(), x2) if any(needs[0::2]) else None
            a_dtypes = set(ctx.ab_dtypes[0::2])
            if da_all is not None and len(a_dtypes) == 1:
                # the A gradients are row blocks of one matrix: one cast, then views
                da_all = _cast(da_all, a_dtypes.pop())
            off = 0
            for i, (dy2, s) in enumerate(zip(dys2, ctx.scalings, strict=True)):
                r = bcs[i].shape[1]
                da = db = None
                if needs[2 * i] and da_all is not None:
                    da = _cast(da_all[off : off + r], ctx.ab_dtypes[2 * i])
                if needs[2 * i + 1]:
                    db = torch.addmm(unread, dy2.t(), h[:, off : off + r], beta=0, alpha=s)
                    db = _cast(db, ctx.ab_dtypes[2 * i + 1])
                grads += [da, db]
                off += r
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.mm(dys2[0], _base_weight(ctx.bases[0], x2.dtype))
                for dy2, base in zip(dys2[1:], ctx.bases[1:], strict=True):
                    dx.addmm_(dy2, _base_weight(base, x2.dtype))
                dx.addmm_(dh, a_all)
                dx = _cast(dx.view(ctx.x_shape), ctx.x_dtype)
            return (dx, None, None, None, None, *grads)

    return LoRAGroup


_FN: Any = None
_GROUP_FN: Any = None


def _apply() -> Any:
    global _FN, _GROUP_FN, _LINEAR
    if _FN is None:
        import torch

        _LINEAR = torch.nn.Linear
        _FN = _function()
        _GROUP_FN = _group_function()
    return _FN.apply


@dataclass(frozen=True)
class Installed:
    """What ``install`` did (the rank says it in its log)."""

    layers: int  # LoRA linears on the fused path
    kept: int  # LoRA layers left on PEFT's (banks, embeddings, dropout, variants)
    why_kept: str | None = None
    grouped: int = 0  # of the fused layers, those run with their siblings (LoRAGroup)


def _layer_ok(layer: Any) -> str | None:
    """Why a PEFT LoRA layer cannot take the fused path at all (None: it can)."""
    import torch

    names = list(layer.lora_A.keys())
    if len(names) != 1:
        return f"{len(names)} adapters"
    name = names[0]
    if name in getattr(layer, "lora_variant", {}):
        return "a LoRA variant (DoRA)"
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return "LoRA dropout"
    base = layer.get_base_layer()
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    if not isinstance(base, torch.nn.Linear) and not hasattr(base.weight, "quant_state"):
        return f"base layer {type(base).__name__}"
    if getattr(base.weight, "quant_state", None) is None and base.weight.dtype not in (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    ):
        return f"base weight {base.weight.dtype}"
    return None


def _adapter(layer: Any, name: str, x: Any, cast: bool) -> tuple[Any, Any, float] | None:
    """``layer``'s lora_A and lora_B weights and scaling where the fused path computes what
    PEFT's forward would for ``x`` (``cast``: autocast is on); None where PEFT's must run: the
    adapter disabled, merged or not active, or fp32 adapters without autocast (PEFT computes
    them in fp32; keep its numbers)."""
    if layer.disable_adapters or layer.merged_adapters or name not in layer.active_adapters:
        return None
    a = layer.lora_A[name].weight
    if not cast and a.dtype != x.dtype:
        return None
    return a, layer.lora_B[name].weight, layer.scaling[name]


class _Group:
    """Fused sibling layers of one module that read the same input (SHARED_INPUT): the
    first of them called runs all through LoRAGroup, and each other one, called next with
    the same tensor, takes its output (``pending``) instead of computing it. Called with
    another tensor, or where a sibling would take PEFT's path, each computes its own."""

    def __init__(self, members: list[tuple[Any, str, Any]]) -> None:
        self.members = members  # (PEFT layer, adapter name, base layer)
        self.bases = tuple(base for _, _, base in members)
        self.x: Any = None  # the input the pending outputs were computed from
        self.pending: dict[int, Any] = {}

    def take(self, index: int, x: Any) -> Any:
        """The output computed for member ``index`` from this very ``x`` (None: none)."""
        if self.x is not x:
            return None
        out = self.pending.pop(index, None)
        if not self.pending:
            self.x = None  # nothing of this input kept alive
        return out

    def run(self, index: int, x: Any, dtype: Any, cast: bool) -> Any:
        """Every member's output from ``x``; member ``index``'s returned, the others kept
        for their call. None where a member's adapter is off or would take PEFT's path."""
        ab: list[Any] = []
        scalings = []
        for layer, name, _ in self.members:
            adapter = _adapter(layer, name, x, cast)
            if adapter is None:
                return None
            ab += adapter[:2]
            scalings.append(adapter[2])
        outs = _GROUP_FN.apply(x, self.bases, tuple(scalings), dtype, cast, *ab)
        self.x = x
        self.pending = {i: y for i, y in enumerate(outs) if i != index}
        return outs[index]


def _fused_forward(
    peft_forward: Callable[..., Any], name: str, base: Any, group: tuple[_Group, int] | None
) -> Callable[..., Any]:
    import torch

    apply = _apply()
    autocast_on, autocast_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    # Every call walks this Python (the host's share, hostops.FUSED_ADAPTER_HOST_US): the
    # base layer is looked up once, the checks read PEFT's attributes directly
    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return peft_forward(x, *args, **kwargs)
        if group is not None:
            # a sibling called first with this very x computed it, its adapters checked
            out = group[0].take(group[1], x)
            if out is not None:
                return out
        kind = x.device.type
        cast = autocast_on(kind)
        dtype = autocast_dtype(kind) if cast else x.dtype
        if group is not None:
            out = group[0].run(group[1], x, dtype, cast)  # None: an adapter is off
            if out is not None:
                return out
        adapter = _adapter(self, name, x, cast)
        if adapter is None:
            return peft_forward(x)
        a, b, scaling = adapter
        return apply(x, a, b, base, scaling, dtype, cast)

    return forward


def _groups(fused: list[tuple[str, Any]]) -> dict[int, tuple[_Group, int]]:
    """The fused layers (qualified name, layer) that share an input with a fused sibling of
    the same parent module (SHARED_INPUT), by id: their group and place in it."""
    by_parent: dict[tuple[str, tuple[str, ...]], list[tuple[str, Any]]] = {}
    for qualified, layer in fused:
        parent, _, leaf = qualified.rpartition(".")
        for siblings in SHARED_INPUT:
            if leaf in siblings:
                by_parent.setdefault((parent, siblings), []).append((leaf, layer))
    out: dict[int, tuple[_Group, int]] = {}
    for (_, siblings), found in by_parent.items():
        if len(found) < 2:
            continue
        found.sort(key=lambda item: siblings.index(item[0]))
        layers = [layer for _, layer in found]
        group = _Group([(m, next(iter(m.lora_A.keys())), m.get_base_layer()) for m in layers])
        for i, layer in enumerate(layers):
            out[id(layer)] = (group, i)
    return out


def install(model: Any, group: bool = True) -> Installed:
    """Route every eligible PEFT LoRA linear of ``model`` through the fused function (the
    others keep PEFT's forward), siblings that read one input (SHARED_INPUT) through one
    LoRAGroup where ``group``; idempotent."""
    from peft.tuners.lora import LoraLayer

    done = kept = 0
    why: str | None = None
    fused: list[tuple[str, Any]] = []
    for qualified, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if getattr(module, _PEFT_FORWARD, None) is not None:
            done += 1
            continue
        reason = _layer_ok(module)
        if reason is not None:
            kept += 1
            why = why or reason
            continue
        fused.append((qualified, module))
    groups = _groups(fused) if group else {}
    for _, module in fused:
        peft_forward = module.forward
        setattr(module, _PEFT_FORWARD, peft_forward)
        name = next(iter(module.lora_A.keys()))
        forward = _fused_forward(
            peft_forward, name, module.get_base_layer(), groups.get(id(module))
        )
        module.forward = types.MethodType(forward, module)
        done += 1
    return Installed(done, kept, why, grouped=len(groups))


def uninstall(model: Any) -> None:
    """Give every patched layer PEFT's forward back."""
    for module in model.modules():
        peft_forward = getattr(module, _PEFT_FORWARD, None)
        if peft_forward is not None:
            module.forward = peft_forward
            delattr(module, _PEFT_FORWARD)
