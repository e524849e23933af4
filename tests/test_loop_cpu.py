"""The loop terms of issue 12, checked with real torch / transformers / PEFT on the CPU.

No GPU here, so no peaks: what can be counted exactly on the CPU is counted. New tensors
that an optimizer step allocates, through a dispatch mode that sees every op's outputs
and a weak reference that sees them freed; the tensors autograd saves for backward,
through ``torch.autograd.graph.saved_tensors_hooks``. The counts are compared with the
formulas of zeroplan/memory (optimizer.adamw_step_temporaries, activations._lora_input,
logits.kept_output).
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


class NewBytes(TorchDispatchMode):  # type: ignore[misc]
    """Peak bytes of storages created inside the mode and still alive (CPU-side count)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        seen: set[int] = set()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in seen:
                continue  # in place, or a view of something counted already
            seen.add(ptr)
            n = t.untyped_storage().nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def step_peak(params: list[Any], **kw: Any) -> int:
    opt = torch.optim.AdamW(params, lr=1e-3, **kw)
    for _ in range(2):  # the first step allocates the states; the second is the steady one
        for p in params:
            p.grad = torch.randn_like(p)
        with NewBytes() as mode:
            opt.step()
    return mode.peak


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_foreach_adamw_allocates_one_temporary_per_parameter_element(dtype: str) -> None:
    dt = getattr(torch, dtype)
    params = [torch.nn.Parameter(torch.randn(n, dtype=dt)) for n in (1000, 5000, 300, 7)]
    size = sum(p.numel() * p.element_size() for p in params)
    # foreach (PyTorch's default on a GPU; asked for by name on the CPU): sqrt(exp_avg_sq)
    # for the whole list, in the parameter's dtype
    assert step_peak(params, foreach=True) == size
    assert step_peak(params, fused=True) == 0


def test_foreach_adamw_temporaries_of_two_dtypes_overlap() -> None:
    """Grouped by dtype, the first group's list is released only once the second's exists:
    Ψ_t × param bytes (what the estimate counts) holds for a mixed list too."""
    params = [
        torch.nn.Parameter(torch.randn(4000, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.randn(1000)),
    ]
    assert step_peak(params, foreach=True) == 4000 * 2 + 1000 * 4


# ----------------------------------------------------------------------------- saved tensors

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB, R = 64, 128, 2, 4, 2, 512, 4
B, S = 3, 16  # 48 tokens: no activation shaped like an adapter weight


def tiny_lora(dropout: float) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    lcfg = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(model, lcfg)
    model.train()
    return model


def saved_tensors(model: Any, autocast: bool) -> list[Any]:
    """Every distinct tensor autograd saves in one forward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, Any] = {}

    def pack(t: Any) -> Any:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel() > 1:
            saved.setdefault(ptr, t)
        return t

    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(0))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return list(saved.values())


def nbytes(tensors: list[Any]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_lora_without_autocast_saves_fp32_adapter_inputs(dropout: float) -> None:
    """Per adapted linear with input width d, per token: autocast saves a bf16 copy of the
    (dropped-out) input, 2 B·d, and lora_A's bf16 output, 2 B·r; without autocast both are
    fp32: 4 B·d and 4 B·r (activations._lora_input). Autocast's bf16 copies of the fp32
    adapter weights, saved for backward, are the estimate's autocast_weights."""
    from zeroplan.memory.activations import _lora_input
    from zeroplan.trainsetup import TrainSetup

    model = tiny_lora(dropout)
    lora_shapes = {tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    lora_shapes |= {(b, a) for a, b in lora_shapes}  # linear saves its weight transposed
    with_ac = saved_tensors(model, autocast=True)
    without = saved_tensors(model, autocast=False)
    weight_copies = [
        t for t in with_ac if t.dtype == torch.bfloat16 and tuple(t.shape) in lora_shapes
    ]
    assert weight_copies and not any(tuple(t.shape) in lora_shapes for t in without)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # at most one bf16 copy of every adapter weight (2 B · Ψ_t); a lora_A whose input does
    # not require grad (layer 0's q, k, v: the frozen embedding) saves none
    assert nbytes(weight_copies) <= 2 * n_lora

    inputs = (HIDDEN, HIDDEN, HIDDEN, HEADS * (HIDDEN // HEADS), HIDDEN, HIDDEN, INTER)
    tokens = B * S
    per_token = {
        ac: sum(
            _lora_input(d, R, TrainSetup(lora_r=R, lora_dropout=dropout, autocast=ac))
            for d in inputs
        )
        for ac in (True, False)
    }
    expected = LAYERS * tokens * (per_token[False] - per_token[True])
    assert expected == LAYERS * tokens * sum(2 * d + 2 * R for d in inputs)
    assert nbytes(without) - (nbytes(with_ac) - nbytes(weight_copies)) == expected


def test_the_loss_saves_its_log_softmax_but_neither_the_logits_nor_their_upcast() -> None:
    """Of the vocabulary-sized tensors, autograd keeps only cross-entropy's fp32 log-softmax
    output: the bf16 logits and their fp32 upcast are freed unless the output object is
    kept (logits.kept_output counts the bf16 logits only)."""
    model = tiny_lora(0.0)
    vocab_sized = [t for t in saved_tensors(model, autocast=True) if t.numel() == B * S * VOCAB]
    assert [t.dtype for t in vocab_sized] == [torch.float32]
