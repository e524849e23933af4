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
# The sibling sets (models.SHARED_INPUT) that can run as one matmul each way (LoRAStack,
# where ``install`` is given them; the launch does under ZEROPLAN_LORA_STACK=1): q/k/v,
# whose k and v of a GQA model are narrow matmuls that run slowly alone. gate/up are wide
# already (lora_linear_h100.jsonl: 4,096 → 14,336 at about 610 TFLOP/s), and copying their
# outputs out of one product would cost about what one matmul saves.
STACKED: tuple[tuple[str, ...], ...] = (SHARED_INPUT[0],)


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


def _adapter_grads(
    ctx: Any, x2: Any, h: Any, dh: Any, dys2: list[Any], bcs: Any, unread: Any
) -> list[Any]:
    """The k adapters' gradients of a sibling function (LoRAGroup, LoRAStack), in its inputs'
    order after x and the four constants (A₁, B₁, …, A_k, B_k; None where not needed):

        [dA₁; …; dA_k] = [dH₁ … dH_k]ᵀ·x;   dBᵢ = sᵢ · dYᵢᵀ·Hᵢ

    ``dh`` the stacked dH (T × Σr), ``h`` the stacked H, ``dys2`` each output's gradient and
    ``bcs`` each B in the compute dtype, ``unread`` the 0-d input of addmm at beta 0."""
    import torch

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
    return grads


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
            grads = _adapter_grads(ctx, x2, h, dh, dys2, bcs, unread)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.mm(dys2[0], _base_weight(ctx.bases[0], x2.dtype))
                for dy2, base in zip(dys2[1:], ctx.bases[1:], strict=True):
                    dx.addmm_(dy2, _base_weight(base, x2.dtype))
                dx.addmm_(dh, a_all)
                dx = _cast(dx.view(ctx.x_shape), ctx.x_dtype)
            return (dx, None, None, None, None, *grads)

    return LoRAGroup


def _stack_function() -> Any:
    import torch
    import torch.nn.functional as F

    class LoRAStack(torch.autograd.Function):
        """Sibling LoRA linears whose base weights are rows of one matrix (``_Stack``):
        W = [W₁; …; W_k; A₁; …; A_k], N = Σ nᵢ base rows and R = Σ rᵢ adapter rows:

            forward:   [Y₁ … Y_k H] = x·Wᵀ (+ [b; 0]);  Yᵢ += sᵢ · Hᵢ·Bᵢᵀ
            backward:  dHᵢ = sᵢ · dYᵢ·Bᵢ;  dBᵢ = sᵢ · dYᵢᵀ·Hᵢ
                       dx = [dY₁ … dY_k dH₁ … dH_k]·W;  [dA₁; …] = [dH₁ …]ᵀ·x

        One matmul each way where LoRAGroup runs k + 1 forward and k + 1 backward: q/k/v
        of a GQA model are one 4,096 × 6,192 matmul instead of a 4,096-wide one and two
        1,024-wide ones, which cuBLAS runs at about a third of its rate on H100
        (lora_linear_h100.jsonl). The outputs are copied out of the wide one (one pass: the
        model's attention takes q, k and v as tensors of their own, and a view would keep
        the whole product alive wherever one of them is saved). Saves x, H and the Bs."""

        @staticmethod
        def forward(
            ctx: Any, x: Any, stack: Any, scalings: Any, dtype: Any, cast: bool, *ab: Any
        ) -> Any:
            if cast:
                with torch.autocast(x.device.type, enabled=False):
                    return LoRAStack._forward(ctx, x, stack, scalings, dtype, ab)
            return LoRAStack._forward(ctx, x, stack, scalings, dtype, ab)

        @staticmethod
        def _forward(ctx: Any, x: Any, stack: Any, scalings: Any, dtype: Any, ab: Any) -> Any:
            xc = _cast(x, dtype)
            x2 = xc.reshape(-1, xc.shape[-1])
            a_list = ab[0::2]
            w = stack.weight(dtype, a_list)
            # (its stub types the out= overload: without out it returns the copies)
            parts: list[Any] = torch.split_with_sizes_copy(  # type: ignore[func-returns-value,assignment]
                F.linear(x2, w, stack.bias(dtype)), stack.split, dim=1
            )
            h = parts[-1]
            bcs = [_cast(b, dtype) for b in ab[1::2]]
            off = 0
            for y, bc, s in zip(parts[:-1], bcs, scalings, strict=True):
                r = bc.shape[1]
                y.addmm_(h[:, off : off + r], bc.t(), alpha=s)
                off += r
            ctx.save_for_backward(x2, h, *a_list, *bcs)
            ctx.stack, ctx.scalings, ctx.k = stack, scalings, len(bcs)
            ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
            ctx.ab_dtypes = [t.dtype for t in ab]
            lead = x.shape[:-1]
            return tuple(y.view(*lead, y.shape[-1]) for y in parts[:-1])

        @staticmethod
        def backward(ctx: Any, *dys: Any) -> Any:
            x2, h, *rest = ctx.saved_tensors
            a_list, bcs = rest[: ctx.k], rest[ctx.k :]
            unread = x2.new_empty(())  # addmm's beta 0: neither read nor broadcast
            dys2 = [_cast(dy.reshape(-1, dy.shape[-1]), x2.dtype) for dy in dys]
            dhs = [
                torch.addmm(unread, dy2, bc, beta=0, alpha=s)
                for dy2, bc, s in zip(dys2, bcs, ctx.scalings, strict=True)
            ]
            dx = None
            if ctx.needs_input_grad[0]:
                d_all = torch.cat(dys2 + dhs, 1)
                dx = torch.mm(d_all, ctx.stack.weight(x2.dtype, a_list))
                dx = _cast(dx.view(ctx.x_shape), ctx.x_dtype)
                dh = d_all[:, ctx.stack.n_base :]
            else:
                dh = torch.cat(dhs, 1)
            grads = _adapter_grads(ctx, x2, h, dh, dys2, bcs, unread)
            return (dx, None, None, None, None, *grads)

    return LoRAStack


class _Stack:
    """The base weights of sibling linears (q/k/v) as rows of one matrix, with rows for
    their adapters' A below them, for LoRAStack.

    Dense bases of one dtype become views of one buffer at install (``pin``: each weight's
    storage moves there, so nothing is copied per call and no memory is added but the
    adapters' R rows); the A rows are written there each call. Where a pinned weight no
    longer lies there (another tensor put in its place) or the compute dtype is another,
    and for 4-bit bases, the matrix is built for the call: each base dequantized or cast
    into its rows, as the per-linear path would make it."""

    def __init__(self, bases: tuple[Any, ...], ranks: list[int]) -> None:
        self.bases = bases
        self.sizes = [int(b.out_features) for b in bases]
        self.n_base = sum(self.sizes)
        self.split = [*self.sizes, sum(ranks)]
        self.in_features = int(bases[0].in_features)
        self.has_bias = bases[0].bias is not None
        self.buffer: Any = None
        self.bias_buffer: Any = None
        self.pointers: tuple[int, ...] = ()

    def pin(self) -> bool:
        """Move dense weights (and biases) into one buffer, each base's weight a view of
        its rows; False where they are 4-bit or differ in dtype or device."""
        import torch

        weights = [b.weight for b in self.bases]
        if any(getattr(w, "quant_state", None) is not None for w in weights):
            return False
        if len({(w.dtype, w.device) for w in weights}) != 1:
            return False
        rows = self.split[-1]
        w0 = weights[0]
        buffer = torch.empty(
            (self.n_base + rows, self.in_features), dtype=w0.dtype, device=w0.device
        )
        bias_buffer = None
        if self.has_bias:
            bias_buffer = torch.zeros(self.n_base + rows, dtype=w0.dtype, device=w0.device)
        off = 0
        with torch.no_grad():
            for base, n in zip(self.bases, self.sizes, strict=True):
                buffer[off : off + n].copy_(base.weight)
                base.weight.data = buffer[off : off + n]
                if bias_buffer is not None:
                    bias_buffer[off : off + n].copy_(base.bias)
                    base.bias.data = bias_buffer[off : off + n]
                off += n
        self.buffer, self.bias_buffer = buffer, bias_buffer
        self.pointers = tuple(b.weight.data_ptr() for b in self.bases)
        return True

    def _pinned(self, dtype: Any) -> bool:
        return (
            self.buffer is not None
            and self.buffer.dtype == dtype
            and tuple(b.weight.data_ptr() for b in self.bases) == self.pointers
        )

    def weight(self, dtype: Any, a_list: Any) -> Any:
        """W = [W₁; …; W_k; A₁; …; A_k] in ``dtype``."""
        import torch

        if not self._pinned(dtype):
            if self.buffer is not None:
                global _UNPINNED
                _UNPINNED += 1
            w = torch.empty(
                (self.split[-1] + self.n_base, self.in_features),
                dtype=dtype,
                device=a_list[0].device,
            )
            off = 0
            for base, n in zip(self.bases, self.sizes, strict=True):
                state = getattr(base.weight, "quant_state", None)
                if state is None:
                    w[off : off + n].copy_(base.weight)
                elif state.dtype == dtype:
                    dequant.dequantize(base.weight, state, out=w[off : off + n])
                else:
                    w[off : off + n].copy_(dequant.dequantize(base.weight, state))
                off += n
            torch.cat(a_list, out=w[self.n_base :])
            return w
        w = self.buffer
        # the pinned buffer's A rows written through .data: the bases' weights are views of
        # it and share its version counter, which a write would bump under any graph that
        # saved one of them; nothing but LoRAStack reads these rows, and it reads them back
        # at its backward before the optimizer changes an A
        torch.cat(a_list, out=w.data[self.n_base :])
        return w

    def bias(self, dtype: Any) -> Any:
        """[b₁; …; b_k; 0] in ``dtype``, or None where the bases have none."""
        import torch

        if not self.has_bias:
            return None
        if self.bias_buffer is not None and self.bias_buffer.dtype == dtype and self._pinned(dtype):
            return self.bias_buffer
        zeros = torch.zeros(self.split[-1], dtype=dtype, device=self.bases[0].bias.device)
        return torch.cat([*(_cast(b.bias, dtype) for b in self.bases), zeros])


def _stackable(bases: tuple[Any, ...]) -> bool:
    """Whether sibling bases can be one matrix: plain linears or 4-bit ones alike, each
    read as F.linear would (no hooks, no forward of their own), one input width, all with
    a bias or none."""
    import torch

    for base in bases:
        if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
            return False
        quantized = getattr(base.weight, "quant_state", None) is not None
        if not quantized and type(base) is not torch.nn.Linear:
            return False
    return (
        len({int(b.in_features) for b in bases}) == 1
        and len({b.bias is None for b in bases}) == 1
        and len({getattr(b.weight, "quant_state", None) is None for b in bases}) == 1
    )


_FN: Any = None
_GROUP_FN: Any = None
_STACK_FN: Any = None
# calls since the last install where pinned weights had left their buffer (unpinned_calls)
_UNPINNED = 0


def unpinned_calls() -> int:
    """How many LoRAStack calls since the last ``install`` found a pinned base weight moved out of its
    buffer (another tensor put in its place after install) and built the matrix for the call:
    the same numbers, a copy of the weights more. 0 where every call found them in place."""
    return _UNPINNED


def _apply() -> Any:
    global _FN, _GROUP_FN, _STACK_FN, _LINEAR
    if _FN is None:
        import torch

        _LINEAR = torch.nn.Linear
        _FN = _function()
        _GROUP_FN = _group_function()
        _STACK_FN = _stack_function()
    return _FN.apply


@dataclass(frozen=True)
class Installed:
    """What ``install`` did (the rank says it in its log)."""

    layers: int  # LoRA linears on the fused path
    kept: int  # LoRA layers left on PEFT's (banks, embeddings, dropout, variants)
    why_kept: str | None = None
    grouped: int = 0  # of the fused layers, those run with their siblings (LoRAGroup)
    stacked: int = 0  # of the grouped, those whose bases are one matrix (LoRAStack)


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

    def __init__(self, members: list[tuple[Any, str, Any]], stack: bool = False) -> None:
        self.members = members  # (PEFT layer, adapter name, base layer)
        self.bases = tuple(base for _, _, base in members)
        self.x: Any = None  # the input the pending outputs were computed from
        self.pending: dict[int, Any] = {}
        # the bases as one matrix (LoRAStack), where asked and they can be
        self.stack: _Stack | None = None
        if stack and _stackable(self.bases):
            ranks = [int(layer.lora_A[name].weight.shape[0]) for layer, name, _ in members]
            self.stack = _Stack(self.bases, ranks)
            self.stack.pin()

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
        if self.stack is not None:
            outs = _STACK_FN.apply(x, self.stack, tuple(scalings), dtype, cast, *ab)
        else:
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


def _groups(
    fused: list[tuple[str, Any]], stacked: tuple[tuple[str, ...], ...]
) -> dict[int, tuple[_Group, int]]:
    """The fused layers (qualified name, layer) that share an input with a fused sibling of
    the same parent module (SHARED_INPUT), by id: their group and place in it; the sibling
    sets in ``stacked`` with their bases as one matrix where they can be (_Stack)."""
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
        members = [(m, next(iter(m.lora_A.keys())), m.get_base_layer()) for m in layers]
        group = _Group(members, stack=siblings in stacked)
        for i, layer in enumerate(layers):
            out[id(layer)] = (group, i)
    return out


def install(model: Any, group: bool = True, stacked: tuple[tuple[str, ...], ...] = ()) -> Installed:
    """Route every eligible PEFT LoRA linear of ``model`` through the fused function (the
    others keep PEFT's forward), siblings that read one input (SHARED_INPUT) through one
    LoRAGroup where ``group``, those of the sibling sets in ``stacked`` through LoRAStack
    where their bases can be one matrix; idempotent."""
    from peft.tuners.lora import LoraLayer

    global _UNPINNED
    _UNPINNED = 0
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
    groups = _groups(fused, stacked) if group else {}
    for _, module in fused:
        peft_forward = module.forward
        setattr(module, _PEFT_FORWARD, peft_forward)
        name = next(iter(module.lora_A.keys()))
        forward = _fused_forward(
            peft_forward, name, module.get_base_layer(), groups.get(id(module))
        )
        module.forward = types.MethodType(forward, module)
        done += 1
    stacks = {id(g) for g, _ in groups.values() if g.stack is not None}
    stacked_layers = sum(1 for g, _ in groups.values() if id(g) in stacks)
    return Installed(done, kept, why, grouped=len(groups), stacked=stacked_layers)


def uninstall(model: Any) -> None:
    """Give every patched layer PEFT's forward back."""
    for module in model.modules():
        peft_forward = getattr(module, _PEFT_FORWARD, None)
        if peft_forward is not None:
            module.forward = peft_forward
            delattr(module, _PEFT_FORWARD)
