"""What each part of the launched QLoRA step copies to the host and waits for (issue 26).

The host probe once counted 896 "Memcpy DtoH (Device -> Pageable)" a step in the 8B QLoRA
launch (host6_h100.jsonl); its profiled window had run into the final adapter save, which
makes them (host7_h100.jsonl: the probe's HostReads names ``_save_checkpoint``; a profiled
step makes about 5). Alone, no part of the step made one (memcpy_probe2_h100.jsonl). Each
part runs here alone on the GPU, under torch.profiler and under sync debug mode, and prints
how many such copies (and synchronising calls) each makes per call:

    dequant      bitsandbytes' dequantize_4bit of an NF4 weight with nested statistics
    peft-4bit    PEFT's LoRA over bitsandbytes' Linear4bit: forward and backward
    fused-4bit   zeroplan's fused LoRA linear over the same layer: forward and backward
    peft-4bit-autocast, fused-4bit-autocast   the same as the QLoRA launch runs them: fp32
                 adapters (PEFT's dtype for them) under bf16 autocast
    fused-4bit-bnb  the same, its dequantization through bitsandbytes' dequantize_4bit
    dequant-direct  the same through bitsandbytes' C functions called directly
                 (zeroplan.launch.dequant.direct, the fused LoRA linears' path): its output
                 must equal dequant's bit for bit; its host time against dequant's is what
                 the dispatch and checks cost
    clip         torch's clip_grad_norm_ over 448 LoRA-shaped gradients
    adamw-fused  torch's fused AdamW step over them (the launch's optimizer)

Each part also reports ``wall_us_per_call``: 200 calls queued back to back, unprofiled, then
one synchronise; where the host is slower than the kernels (a dequantization is ~37 µs on the
GPU) that is the host's cost of one call.

    python benchmarks/memcpy_probe.py --out memcpy.jsonl      (a CUDA GPU, bitsandbytes, peft)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# the host probe's module, by path (an interpreter may have a sitecustomize of its own);
# without ZEROPLAN_HOST_PROBE set, loading it patches nothing
_SPEC = importlib.util.spec_from_file_location(
    "host_probe", Path(__file__).resolve().parent / "host_probe" / "sitecustomize.py"
)
assert _SPEC is not None and _SPEC.loader is not None
PROBE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(PROBE)

HIDDEN = 4096
RANK = 16
TRAINABLE = 448  # the 8B launch's LoRA tensors (32 layers × 7 linears × A and B)


def wall_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Microseconds per call of ``calls`` calls queued back to back, one synchronise after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def count(fn: Callable[[], Any], calls: int = 4) -> dict[str, Any]:
    """Per call of fn (after one unprofiled warm-up): device-to-host copies and all copies
    the profiler saw, cudaStreamSynchronize calls, the warnings of sync debug mode, and the
    unprofiled wall time per call (``wall_us``)."""
    fn()
    torch.cuda.synchronize()
    wall = wall_us(fn)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    dtoh = memcpy = syncs = 0
    callers: Counter[str] = Counter()
    for e in prof.events():
        if "Memcpy DtoH" in e.name:
            dtoh += 1
        if e.name == "cudaMemcpyAsync":
            memcpy += 1
            callers[PROBE.caller_chain(e)] += 1
        if e.name == "cudaStreamSynchronize":
            syncs += 1
    torch.cuda.set_sync_debug_mode(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    seen = sorted({str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)})
    reads = PROBE.host_reads_mode()  # the operators that read a GPU value, and their lines
    with reads:
        fn()
        torch.cuda.synchronize()
    return {
        "wall_us_per_call": round(wall, 1),
        "dtoh_per_call": dtoh / calls,
        "memcpy_calls_per_call": memcpy / calls,
        "stream_syncs_per_call": syncs / calls,
        "memcpy_callers": {k: v / calls for k, v in callers.items()},
        "sync_debug_warnings": seen,
        "host_reads": dict(reads.seen),
    }


def linear4bit() -> Any:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        HIDDEN, HIDDEN, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
        compress_statistics=True,
    )  # fmt: skip
    weight = torch.randn(HIDDEN, HIDDEN, dtype=torch.bfloat16) * 0.02  # as the launch loads it
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    return layer.cuda()


def through_bitsandbytes(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn with the fused LoRA linears dequantizing through bitsandbytes' dequantize_4bit."""
    from zeroplan.launch import dequant

    def run() -> Any:
        saved, dequant._DIRECT_OK = dequant._DIRECT_OK, False
        try:
            return fn()
        finally:
            dequant._DIRECT_OK = saved

    return run


def autocast(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn under bf16 autocast, as the Trainer runs a QLoRA step (TrainSetup.autocast)."""

    def run() -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn()

    return run


def parts() -> dict[str, Callable[[], Any]]:
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig, get_peft_model

    out: dict[str, Callable[[], Any]] = {}
    base = linear4bit()
    state = base.weight.quant_state
    out["dequant"] = lambda: bnbf.dequantize_4bit(base.weight.data, state)
    from zeroplan.launch.dequant import direct  # the fused LoRA linears' dequantization

    reference = bnbf.dequantize_4bit(base.weight.data, state)
    if torch.equal(direct(base.weight.data, state), reference):
        out["dequant-direct"] = lambda: direct(base.weight.data, state)
    else:
        diff = (direct(base.weight.data, state).float() - reference.float()).abs().max().item()
        print(f"dequant-direct: not run (differs from bitsandbytes' by up to {diff})")

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = linear4bit()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    x = torch.randn(1664, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cfg = LoraConfig(r=RANK, lora_alpha=32, lora_dropout=0.0, target_modules=["proj"])
    peft_model = get_peft_model(One(), cfg).to(torch.bfloat16)
    out["peft-4bit"] = lambda: peft_model(x).sum().backward()
    try:
        from zeroplan.launch import loralinear

        fused_model = get_peft_model(One(), cfg).to(torch.bfloat16)
        loralinear.install(fused_model)
        out["fused-4bit"] = lambda: fused_model(x).sum().backward()
        out["fused-4bit-bnb"] = through_bitsandbytes(lambda: fused_model(x).sum().backward())
        # as the QLoRA launch runs it: the adapters in fp32, the step under bf16 autocast
        fused32 = get_peft_model(One(), cfg)
        loralinear.install(fused32)
        out["fused-4bit-autocast"] = autocast(lambda: fused32(x).sum().backward())
    except Exception as exc:  # report it and go on: the other parts still tell
        print(f"fused-4bit: not run ({type(exc).__name__}: {exc})")
    # PEFT's layer as the QLoRA launch runs it (fp32 adapters under bf16 autocast)
    peft32 = get_peft_model(One(), cfg)
    out["peft-4bit-autocast"] = autocast(lambda: peft32(x).sum().backward())
    params = [
        torch.nn.Parameter(torch.randn(RANK, HIDDEN, device="cuda") * 0.01)
        for _ in range(TRAINABLE)
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    out["clip"] = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    out["adamw-fused"] = opt.step
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows = []
    for name, fn in parts().items():
        try:
            row = {"part": name, **count(fn)}
        except Exception as exc:  # one part failing leaves the others
            row = {"part": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        print(json.dumps(row)[:600], flush=True)
    versions = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps({**row, **versions}) + "\n")


if __name__ == "__main__":
    main()
