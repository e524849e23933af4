"""Sibling LoRA linears that read one input (q/k/v, gate/up) forward and backward, three
ways: PEFT's layers, zeroplan launch's LoRAGroup (each base its own matmul) and LoRAStack
(the bases one matrix with the adapters' A rows below them), on Llama-3.1-8B's shapes at a
packed micro-batch of T tokens: the time each takes, the rate of the base matmuls, and how
far outputs and gradients differ from PEFT's.

    python benchmarks/lora_stack_speed.py --out $OUT/lora_stack_h100.jsonl --tokens 11264

Setups as in lora_linear_speed.py: ``bf16`` (bf16 base and adapters, no autocast), ``amp``
(bf16 base, fp32 adapters, bf16 autocast) and ``4bit`` (NF4 with double quantization, fp32
adapters, autocast). r = 16, alpha 32, dropout 0. Each (setup, set, path) is timed with CUDA
events over ``--iters`` calls after ``--warmup``; a row keeps every call's milliseconds and
the base matmuls' TFLOP/s (forward and input gradient: 4 · T · in · Σ out per call). The
per-step line multiplies by 32 layers: what one micro-batch's linears of that set take.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lora_linear_speed import LAYERS, _layer  # noqa: E402

# Llama-3.1-8B: sibling set → (name, out) each, one input 4,096 wide
SETS = {
    "q/k/v": [("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)],
    "gate/up": [("gate_proj", 14336), ("up_proj", 14336)],
}
IN = 4096


def _module(setup: str, members: list[tuple[str, int]]) -> Any:
    import torch

    module = torch.nn.Module()
    for name, n_out in members:
        setattr(module, name, _layer(setup, IN, n_out))
    return module


def _step(module: Any, names: list[str], x: Any, autocast: bool, dys: list[Any]) -> list[Any]:
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ys = [getattr(module, n)(x) for n in names]
    torch.autograd.backward(ys, dys)
    return ys


def _time(module: Any, names: list[str], x: Any, autocast: bool, dys: list[Any], warmup: int,
          iters: int) -> list[float]:  # fmt: skip
    import torch

    out = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(module, names, x, autocast, dys)
        end.record()
        end.synchronize()
        if i >= warmup:
            out.append(start.elapsed_time(end))
        x.grad = None
        module.zero_grad(set_to_none=True)
    return out


def _results(module: Any, names: list[str], x: Any, autocast: bool, dys: list[Any]) -> list[Any]:
    x.grad = None
    module.zero_grad(set_to_none=True)
    ys = _step(module, names, x, autocast, dys)
    got = [y.detach().float() for y in ys] + [x.grad.float()]
    got += [p.grad.float() for p in module.parameters() if p.requires_grad]
    x.grad = None
    module.zero_grad(set_to_none=True)
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=11264)
    p.add_argument("--setups", default="bf16,amp,4bit")
    p.add_argument("--sets", default="q/k/v,gate/up")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    import torch
    from gpu_fixtures import versions

    from zeroplan.launch import loralinear

    gpu = torch.cuda.get_device_name(0)
    with args.out.open("a") as sink:
        for setup in args.setups.split(","):
            autocast = setup != "bf16"
            for set_name in args.sets.split(","):
                members = SETS[set_name]
                names = [n for n, _ in members]
                out_sum = sum(n for _, n in members)
                torch.manual_seed(0)
                module = _module(setup, members)
                x = torch.randn(1, args.tokens, IN, device="cuda", dtype=torch.bfloat16)
                x.requires_grad_(True)
                dys = [
                    torch.randn(1, args.tokens, n, device="cuda", dtype=torch.bfloat16)
                    for _, n in members
                ]
                ref = _results(module, names, x, autocast, dys)
                times = {"peft": _time(module, names, x, autocast, dys, args.warmup, args.iters)}
                diffs: dict[str, list[float]] = {}
                for path, stacked in (("group", ()), ("stack", (tuple(names),))):
                    loralinear.uninstall(module)
                    installed = loralinear.install(module, stacked=stacked)
                    assert installed.stacked == len(names) * bool(stacked), installed
                    got = _results(module, names, x, autocast, dys)
                    diffs[path] = [
                        float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                        for a, b in zip(got, ref, strict=True)
                    ]
                    times[path] = _time(module, names, x, autocast, dys, args.warmup, args.iters)
                flops = 4 * args.tokens * IN * out_sum
                row = {
                    "bench": "lora_stack",
                    "setup": setup,
                    "set": set_name,
                    "in": IN,
                    "out": [n for _, n in members],
                    "tokens": args.tokens,
                    "ms": times,
                    "median_ms": {k: statistics.median(v) for k, v in times.items()},
                    "base_tflops": {
                        k: flops / statistics.median(v) / 1e9 for k, v in times.items()
                    },
                    "per_step_ms": {k: statistics.median(v) * LAYERS for k, v in times.items()},
                    "rel_max_diff_outputs_dx_grads": diffs,
                    "gpu": gpu,
                    "versions": versions(),
                }
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                med = row["median_ms"]
                print(
                    f"{setup:5} {set_name:8} PEFT {med['peft']:7.3f} ms  group "
                    f"{med['group']:7.3f}  stack {med['stack']:7.3f}  "
                    f"(stack/group {med['stack'] / med['group']:.3f}; base "
                    f"{row['base_tflops']['group']:.0f} → {row['base_tflops']['stack']:.0f} "
                    f"TFLOP/s; max rel diff {max(diffs['stack']):.1e})",
                    flush=True,
                )
                del module, x, dys
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
