"""Time, on this machine's host, what the host clock of ``zeroplan.speed`` counts in calls:
Liger's kernels against the modules they replace, and the fused LoRA linears against PEFT's
layers. Run it on a GPU machine: there the calls launch CUDA kernels, as in a launched step.

The host clock counts operations (hostops): Llama's RMSNorm forward and backward is 22 ATen
calls, and a fused LoRA adapter costs a share of PEFT's (hostops.FUSED_ADAPTER_HOST_US). A
Triton launch from Python and Liger's own Python around it cost the host more than one ATen
call does (hostops.LIGER_OPS had counted each launch as one), and bitsandbytes' CUDA path is
not its CPU one; this times both where the launch runs them (host_timing_h100.jsonl, which
the two tables now hold).

Each piece runs forward and backward ``calls`` times on tensors small enough that the GPU
keeps up with the host (64 wide, 16 tokens), inside a scaffold (inputs made, the output
summed, backward) that is timed alone and taken off; each keeps its fastest of ``repeats``
runs, synchronized at the end, the three run in turn (count_host_ops.best_us). For a Liger
piece the line gives its time, the module's it replaces, and what Liger's counts as at the
micro-benchmark's own rate:

    calls equivalent = module's counted calls · Liger's µs / the module's µs

Writes one JSON line per piece (and the machine: GPU, driver, versions) to ``--out``:

    python benchmarks/host_timing.py --out host_timing.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def liger_pieces_us(device: str, calls: int, repeats: int) -> list[dict[str, Any]]:
    """Host µs of one forward and backward of Llama's RMSNorm (frozen weight), SiLU·mul and
    rotary on q and k, and of Liger's kernels in their place, each less its scaffold."""
    import torch
    from count_host_ops import best_us
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml

    from zeroplan.hostops import LIGER_OPS

    bf16 = torch.bfloat16
    h, heads, kv, d, t = 64, 4, 2, 16, 16
    cfg = LlamaConfig(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=d)
    cos, sin = ml.LlamaRotaryEmbedding(cfg, device=device)(
        torch.randn(1, t, h, device=device), torch.arange(t, device=device)[None]
    )
    cos, sin = cos.to(bf16), sin.to(bf16)
    own_norm = ml.LlamaRMSNorm(h).to(device, bf16).requires_grad_(False)
    liger_norm = LigerRMSNorm(h).to(device, bf16).requires_grad_(False)
    act = torch.nn.SiLU()
    one, two = [(1, t, h)], [(1, heads, t, d), (1, kv, t, d)]

    def piece(fn: Callable[..., Any], shapes: list[tuple[int, ...]]) -> Callable[[], None]:
        def run() -> None:
            xs = [torch.randn(*s, device=device, dtype=bf16, requires_grad=True) for s in shapes]
            out = fn(*xs)
            sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()

        return run

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    pieces = {
        # (the model's module, Liger's, the scaffold: what the piece adds to it is timed)
        "rms_norm": (own_norm, liger_norm, lambda x: x * 1, one),
        "swiglu": (
            lambda g, u: act(g) * u,
            LigerSiLUMulFunction.apply,
            lambda g, u: g + u,
            one + one,
        ),
        "rope": (
            lambda q, k: ml.apply_rotary_pos_emb(q, k, cos, sin),
            lambda q, k: liger_rotary_pos_emb(q, k, cos, sin),
            lambda q, k: (q * 1, k * 1),
            two,
        ),
    }
    rows = []
    for name, (own, liger, scaffold, shapes) in pieces.items():
        runs = [piece(fn, shapes) for fn in (scaffold, own, liger)]
        base, own_us, liger_us = best_us(runs, calls, repeats, sync)
        own_us, liger_us = own_us - base, liger_us - base
        counted_own, counted_liger = LIGER_OPS[name]
        rows.append(
            {
                "piece": name,
                "device": device,
                "own_us": round(own_us, 1),
                "liger_us": round(liger_us, 1),
                "scaffold_us": round(base, 1),
                "own_calls_counted": counted_own,
                "liger_calls_counted": counted_liger,
                "liger_calls_equivalent": round(counted_own * liger_us / own_us, 1),
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON lines written here")
    p.add_argument("--device", default="", help="cuda where there is one (default), else cpu")
    p.add_argument("--calls", type=int, default=300, help="calls per timed run")
    p.add_argument("--repeats", type=int, default=7, help="timed runs; the fastest is kept")
    p.add_argument("--skip-liger", action="store_true", help="time the LoRA linears only")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    from count_host_ops import fused_adapter_host_us
    from kernels_speed import environment  # versions, GPU and driver, as every GPU row has

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    rows: list[dict[str, Any]] = []
    if not args.skip_liger:
        rows += liger_pieces_us(device, args.calls, args.repeats)
    for path, (peft, fused) in fused_adapter_host_us(
        calls=args.calls, repeats=args.repeats, device=device
    ).items():
        rows.append(
            {"piece": f"lora_adapter_{path}", "device": device, "peft_us": peft,
             "fused_us": fused, "fused_share": round(fused / peft, 3) if peft > 0 else None}
        )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in rows:
            f.write(json.dumps({**row, **env}) + "\n")
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
