"""The fused LoRA linears' 4-bit dequantization (zeroplan.launch.dequant): bitsandbytes'
result bit for bit, its C functions called directly only where the first call matched.

The direct calls need a CUDA GPU; here they are stood in for, and the comparison, the
fall-back and the routing are what is checked. benchmarks/memcpy_probe.py runs the real
ones on a GPU (``dequant-direct``: equal to bitsandbytes' output, and its host time)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

from zeroplan.launch import dequant  # noqa: E402


@pytest.fixture
def nf4() -> tuple[Any, Any, Any]:
    """An NF4 weight with nested statistics (QLoRA's), its state and the bf16 original."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)).bfloat16() * 0.1
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    return packed, state, w


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dequant, "_DIRECT_OK", None)
    monkeypatch.setattr(dequant, "_PATH", None)


def test_off_the_gpu_it_is_bitsandbytes_own(nf4: tuple[Any, Any, Any]) -> None:
    packed, state, w = nf4
    assert dequant.path() is None
    out = dequant.dequantize(packed, state)
    assert dequant.path() == "dequantize_4bit"
    assert torch.equal(out, bnbf.dequantize_4bit(packed, state))
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    # NF4: 16 levels per block of 64 scaled by its absmax; the widest gap is 0.28 of it
    assert (out.float() - w.float()).abs().max() < 0.15 * w.float().abs().max()
    assert dequant._DIRECT_OK is None  # nothing compared: the direct calls never ran


def _stand_in(monkeypatch: pytest.MonkeyPatch, shift: float) -> list[int]:
    """The direct calls replaced by bitsandbytes' result (+ shift), counted."""
    calls: list[int] = []

    def direct(weight: Any, state: Any) -> Any:
        calls.append(1)
        return dequant._bnb(weight, state) + shift

    monkeypatch.setattr(dequant, "_eligible", lambda weight, state: True)
    monkeypatch.setattr(dequant, "direct", direct)
    return calls


def test_the_direct_calls_serve_once_the_first_call_matched(
    monkeypatch: pytest.MonkeyPatch, nf4: tuple[Any, Any, Any]
) -> None:
    packed, state, _ = nf4
    calls = _stand_in(monkeypatch, 0.0)
    first = dequant.dequantize(packed, state)
    assert dequant._DIRECT_OK is True and len(calls) == 1 and dequant.path() == "direct"
    assert torch.equal(dequant.dequantize(packed, state), first) and len(calls) == 2


def test_one_bit_off_and_bitsandbytes_serves_every_call(
    monkeypatch: pytest.MonkeyPatch, nf4: tuple[Any, Any, Any]
) -> None:
    packed, state, _ = nf4
    calls = _stand_in(monkeypatch, 2.0**-10)
    reference = bnbf.dequantize_4bit(packed, state)
    with pytest.warns(UserWarning, match="differs from its dequantize_4bit"):
        assert torch.equal(dequant.dequantize(packed, state), reference)
    assert dequant._DIRECT_OK is False and dequant.path() == "dequantize_4bit"
    assert torch.equal(dequant.dequantize(packed, state), reference) and len(calls) == 1


def test_what_the_direct_calls_cover(nf4: tuple[Any, Any, Any]) -> None:
    packed, state, _ = nf4
    assert not dequant._eligible(packed, state)  # on the CPU
    flat, plain = bnbf.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    assert not plain.nested and not dequant._eligible(flat, plain)
