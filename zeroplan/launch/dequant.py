"""4-bit base weights dequantized for the fused LoRA linears, with less of the host's time.

bitsandbytes' ``dequantize_4bit`` of an NF4 weight with nested statistics (QLoRA's double
quantization) runs two kernels: the 8-bit absmax back to float32 (blockwise, 256 per
block), then the 4-bit weight to the compute dtype. Each is a ``torch.ops.bitsandbytes`` op
whose kernel is Python behind the dispatcher, with checks around it; on the host that is
about 150 µs per weight under the profiler (benchmarks/results/host5_h100.jsonl: 445
``dequantize_blockwise`` and 445 ``dequantize_4bit`` calls a step of the 8B QLoRA launch at
1 × 1,664, 82 and 72 µs each), where the two kernels take the GPU 40 µs.

``dequantize`` calls the same two C functions of bitsandbytes' library directly (ctypes, the
argument types bitsandbytes sets), on the current stream, into tensors of its own. The
first call of a process computes both ways and compares: where they differ by one bit (a
bitsandbytes whose functions changed) every call after goes through bitsandbytes, and the
run says so once. On one H100 (benchmarks/results/memcpy_probe_h100.jsonl) they matched, and
a 4,096-wide fused linear's forward and backward at 1,664 tokens took 906.6 µs against
993.4 through ``dequantize_4bit``. Anything else (no CUDA, the weight on another device
than the current one, no nested statistics, another quantization type) goes through
bitsandbytes too, and so does every call where ``ZEROPLAN_DIRECT_DEQUANT=0`` (for measuring
what this saves).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

# None: not compared yet in this process; True: the direct calls match bitsandbytes bit
# for bit; False: they did not, bitsandbytes' own function serves every call
_DIRECT_OK: bool | None = False if os.environ.get("ZEROPLAN_DIRECT_DEQUANT") == "0" else None
_KIND = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
# how the last weight was dequantized in this process (path()); None: no 4-bit weight yet
_PATH: str | None = None


def path() -> str | None:
    """How the fused LoRA linears of this process dequantized 4-bit weights, for the run's
    result.json: "direct" (bitsandbytes' C functions called directly), "dequantize_4bit"
    (bitsandbytes' own function: turned off, not eligible, or the direct calls differed),
    None (none did: no 4-bit base, or PEFT's layers, which dequantize inside bitsandbytes)."""
    return _PATH


def _bnb(weight: Any, state: Any) -> Any:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.view(-1, 1), state)


def _eligible(weight: Any, state: Any) -> bool:
    """What the direct calls cover: a CUDA weight on the current device (the C functions
    launch there), NF4 or FP4 with nested statistics, a 16- or 32-bit result."""
    import torch

    return (
        weight.is_cuda
        and torch.version.hip is None
        and weight.device.index == torch.cuda.current_device()
        and bool(getattr(state, "nested", False))
        and state.quant_type in ("nf4", "fp4")
        and str(state.dtype) in _KIND
    )


@functools.cache
def _c_functions(dtype: str, quant_type: str) -> tuple[Any, Any]:
    """bitsandbytes' blockwise float32 dequantization and its 4-bit one for ``dtype``,
    looked up once (the calls are on the step's hot path)."""
    from bitsandbytes.backends.cuda import ops  # noqa: F401  (sets the C argument types)
    from bitsandbytes.cextension import lib

    return lib.cdequantize_blockwise_fp32, getattr(
        lib, f"cdequantize_blockwise_{_KIND[dtype]}_{quant_type}"
    )


def direct(weight: Any, state: Any) -> Any:
    """absmax = blockwise(absmax₈, state2) + offset (float32), then W = 4-bit(weight, absmax)
    in ``state.dtype``: bitsandbytes' two kernels, called as its own CUDA backend calls them."""
    import torch

    blockwise, four_bit = _c_functions(str(state.dtype), state.quant_type)
    stream = torch._C._cuda_getCurrentRawStream(weight.device.index)
    s2 = state.state2
    absmax = torch.empty(state.absmax.shape, dtype=torch.float32, device=weight.device)
    blockwise(
        s2.code.data_ptr(), state.absmax.data_ptr(), s2.absmax.data_ptr(), absmax.data_ptr(),
        s2.blocksize, state.absmax.numel(), stream,
    )  # fmt: skip
    absmax += state.offset
    out = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
    four_bit(
        None, weight.data_ptr(), absmax.data_ptr(), out.data_ptr(), state.blocksize,
        out.numel(), stream,
    )  # fmt: skip
    return out


def dequantize(weight: Any, state: Any) -> Any:
    """The 4-bit ``weight`` (bitsandbytes' packed Params4bit data) in ``state.dtype``, shaped
    ``state.shape``: what ``bitsandbytes.functional.dequantize_4bit`` returns, bit for bit."""
    global _DIRECT_OK, _PATH
    if _DIRECT_OK is False or not _eligible(weight, state):
        _PATH = "dequantize_4bit"
        return _bnb(weight, state)
    _PATH = "direct"
    if _DIRECT_OK is None:
        import torch

        reference = _bnb(weight, state)
        _DIRECT_OK = bool(torch.equal(reference, direct(weight, state)))
        if not _DIRECT_OK:
            _PATH = "dequantize_4bit"
            warnings.warn(
                "zeroplan: bitsandbytes' 4-bit dequantization called directly differs from "
                "its dequantize_4bit here; every weight goes through dequantize_4bit",
                stacklevel=2,
            )
        return reference
    return direct(weight, state)
