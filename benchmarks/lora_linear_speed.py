"""One LoRA linear's forward and backward, PEFT's layer against zeroplan launch's fused one
(zeroplan.launch.loralinear), on Llama-3.1-8B's seven linear shapes at a packed micro-batch
of T tokens: the time each takes and how far their outputs and gradients differ.

    python benchmarks/lora_linear_speed.py --out $OUT/lora_linear_h100.jsonl --tokens 11264

Three setups, as zeroplan launch runs them: ``bf16`` (DeepSpeed bf16: bf16 base and adapters,
no autocast), ``amp`` (bf16 base, PEFT's fp32 adapters, bf16 autocast) and ``4bit``
(bitsandbytes NF4 with double quantization, fp32 adapters, autocast: QLoRA). r = 16, alpha
32, dropout 0. Each (setup, shape, path) is timed with CUDA events over ``--iters`` calls of
forward + backward after ``--warmup``; a row keeps every call's milliseconds. The layer-sum
line multiplies each shape by its count in a Llama layer (q, o; k, v; gate, up; down) and
by 32 layers: what one micro-batch's linears would save.
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

# Llama-3.1-8B: (name, in, out, count per layer)
SHAPES = [
    ("q_proj/o_proj", 4096, 4096, 2),
    ("k_proj/v_proj", 4096, 1024, 2),
    ("gate_proj/up_proj", 4096, 14336, 2),
    ("down_proj", 14336, 4096, 1),
]
LAYERS = 32


def _layer(setup: str, n_in: int, n_out: int) -> Any:
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    if setup == "4bit":
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit

        base = bnb.nn.Linear4bit(
            n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
        )
        w = torch.randn(n_out, n_in) * 0.02
        base.weight = bnb.nn.Params4bit(
            w, requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        base = base.cuda()
        cls: Any = Linear4bit
    else:
        base = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        base.requires_grad_(False)
        cls = Linear
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)
    layer = cls(base, "default", config=cfg, r=16, lora_alpha=32, lora_dropout=0.0)
    adapter = torch.bfloat16 if setup == "bf16" else torch.float32
    for name in ("lora_A", "lora_B"):
        getattr(layer, name)["default"].to(device="cuda", dtype=adapter)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    return layer


def _time(layer: Any, x: Any, autocast: bool, warmup: int, iters: int) -> list[float]:
    import torch

    out = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(gradient=torch.ones_like(y))
        end.record()
        end.synchronize()
        if i >= warmup:
            out.append(start.elapsed_time(end))
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return out


def _grads(layer: Any, x: Any, autocast: bool, dy: Any) -> list[Any]:
    import torch

    x.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(gradient=dy)
    grads = [y.detach().float(), x.grad.float()]
    grads += [
        layer.lora_A["default"].weight.grad.float(),
        layer.lora_B["default"].weight.grad.float(),
    ]
    for p in layer.parameters():
        p.grad = None
    return grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=11264)
    p.add_argument("--setups", default="bf16,amp,4bit")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    import torch
    from gpu_fixtures import versions

    from zeroplan.launch import loralinear

    gpu = torch.cuda.get_device_name(0)
    rows = []
    for setup in args.setups.split(","):
        autocast = setup != "bf16"
        total = {"peft": 0.0, "fused": 0.0}
        for name, n_in, n_out, count in SHAPES:
            torch.manual_seed(0)
            layer = _layer(setup, n_in, n_out)
            x = torch.randn(1, args.tokens, n_in, device="cuda", dtype=torch.bfloat16)
            x.requires_grad_(True)
            dy = torch.randn(1, args.tokens, n_out, device="cuda", dtype=torch.bfloat16)
            ref = _grads(layer, x, autocast, dy)
            peft_ms = _time(layer, x, autocast, args.warmup, args.iters)
            loralinear.install(layer)
            got = _grads(layer, x, autocast, dy)
            fused_ms = _time(layer, x, autocast, args.warmup, args.iters)
            diffs = [
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                for a, b in zip(got, ref, strict=True)
            ]
            row = {
                "bench": "lora_linear",
                "setup": setup,
                "shape": name,
                "in": n_in,
                "out": n_out,
                "tokens": args.tokens,
                "peft_ms": peft_ms,
                "fused_ms": fused_ms,
                "peft_median_ms": statistics.median(peft_ms),
                "fused_median_ms": statistics.median(fused_ms),
                "rel_max_diff_y_dx_dA_dB": diffs,
                "gpu": gpu,
                "versions": versions(),
            }
            total["peft"] += row["peft_median_ms"] * count * LAYERS
            total["fused"] += row["fused_median_ms"] * count * LAYERS
            rows.append(row)
            print(
                f"{setup:5} {name:18} PEFT {row['peft_median_ms']:7.3f} ms  fused "
                f"{row['fused_median_ms']:7.3f} ms  ({row['peft_median_ms'] / row['fused_median_ms']:.2f}x)"
                f"  rel diff y/dx/dA/dB {' '.join(f'{d:.1e}' for d in diffs)}",
                flush=True,
            )
            del layer, x, dy
            torch.cuda.empty_cache()
        rows.append(
            {
                "bench": "lora_linear_layers",
                "setup": setup,
                "tokens": args.tokens,
                "layers": LAYERS,
                "peft_ms": total["peft"],
                "fused_ms": total["fused"],
                "gpu": gpu,
            }
        )
        print(
            f"{setup:5} 32 layers' linears: PEFT {total['peft']:.1f} ms, fused "
            f"{total['fused']:.1f} ms a micro-batch (saves {total['peft'] - total['fused']:.1f})",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
