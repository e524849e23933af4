"""Mixture-of-experts LoRA steps at several depths in one process, and the host's operations
per MoE layer on the GPU's own path (issue 29, speed: the host-bound steps).

    python benchmarks/moe_depth.py --out $OUT/moe_speed3_h100.jsonl --budget-s 60 [--reverse]

The 2-layer cuts of moe_speed.py cannot tell a host cost per step from one per layer. Here
each family's model is built once per target set at its deepest depth (``FAMILIES``:
Qwen3-30B-A3B's own 128 experts top-8 to 16 layers, Mixtral-8x7B's 8 top-2 to 8; real
vocabularies, random bf16 weights) and timed at every depth of ``DEPTHS`` in the same
process: transformers 5's decoder runs ``self.layers[: config.num_hidden_layers]``, so
setting that runs the first n layers; the layers beyond get no gradient, and clipping and
the fused AdamW skip parameters without one. Per depth, target set (attention q,k,v,o
with dropout 0.05; all-linear with dropout 0, Qwen3 only) and configuration (``CONFIGS``: micro-batch
1 × 128 and 1 × 512, with and without checkpointing) the lean step of moe_speed.py, 2
warm-up and 10 timed steps: wall and dispatch seconds. ``--reverse`` runs everything in the
opposite order (families, target sets, depths, configurations): run once each way in two
processes, so a drift within a process shows apart from the depth.

Before the timing, per family and target set, the ATen calls one forward and backward of
1 × 128 tokens dispatches (count_host_ops.dispatched: what returns a new tensor) at two
depths, with and without checkpointing: their difference over the depths is what one MoE
layer asks of the host on the device's own path, by operator, to set beside
zeroplan/catalog/host_ops.json (counted on the CPU, whose torch >= 2.10 runs the same
grouped_mm path: tests/test_hostops.py) and the timed host clock. One more count, of the
clipping and optimizer step, is the per-step part. Rows: ``bench`` "moe_depth" (a timed configuration) and "moe_ops" (a count).

``--budget-s`` starts no new depth after that many seconds. ``--device cpu --tiny`` checks
the script on tiny shapes on the CPU (and counts the CPU path's operations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from count_host_ops import dispatched  # noqa: E402
from measure_memory import build_model, environment, make_optimizer  # noqa: E402
from moe_grid import Device, model_args, set_ckpt  # noqa: E402
from moe_speed import ATTN, SHAPES, config_of, failures_recorded, timed  # noqa: E402

# shape (moe_speed.SHAPES) -> the depths timed (the model is built at the deepest) and the
# target sets: attention q,k,v,o (dropout 0.05) and all-linear (dropout 0); Mixtral's
# all-linear steps are the GPU's (W + B·A over 8 banks of 176M), not the host's
TARGETS = [(ATTN, 0.05), ("all-linear", 0.0)]
FAMILIES = {"qwen3-128x8": ((2, 4, 8, 16), TARGETS), "mixtral-8x2": ((2, 4, 8), TARGETS[:1])}
TINY_FAMILIES = {"qwen3-128x8": ((1, 2, 3), TARGETS), "mixtral-8x2": ((1, 2), TARGETS[:1])}
# (checkpointing, micro-batch, seq): small enough for the host's clock to set the pace
CONFIGS = [(False, 1, 128), (False, 1, 512), (True, 1, 512)]
TINY_CONFIGS = [(False, 1, 16), (True, 1, 16)]
COUNT_TOKENS = 128


def config(name: str, layers: int, tiny: bool) -> dict[str, Any]:
    """moe_speed's config of the shape, at ``layers`` layers (tiny: 8 experts for Qwen3)."""
    cfg = config_of(name, tiny)
    cfg["num_hidden_layers"] = layers
    if cfg.get("max_window_layers"):
        cfg["max_window_layers"] = layers
    if tiny and cfg["model_type"] == "qwen3_moe":
        cfg["num_experts"] = 8
    return cfg


def set_depth(model: Any, layers: int) -> None:
    """Run the first ``layers`` decoder layers (the PEFT wrapper's config is the model's)."""
    model.config.num_hidden_layers = layers


def count_ops(
    dev: Device,
    model: Any,
    optimizer: Any,
    trainable: list[Any],
    vocab: int,
    depths: tuple[int, int],
) -> list[dict[str, Any]]:
    """Per checkpointing: the ATen calls of one forward and backward at both ``depths`` and
    their difference per layer by operator; then those of clipping and the optimizer step."""
    torch = dev.torch
    ids = torch.randint(0, vocab, (1, COUNT_TOKENS), device=dev.name)

    def fwd_bwd() -> None:
        with torch.autocast(dev.name, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    fwd_bwd()  # the optimizer's first step allocates its states: not what a step counts
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = []
    for ckpt in (False, True):
        set_ckpt(model, ckpt)
        totals = []
        for layers in depths:
            set_depth(model, layers)
            fwd_bwd()  # the first call builds caches (rotary, masks) the second reuses
            optimizer.zero_grad(set_to_none=True)
            totals.append(dispatched(fwd_bwd))
        low, high = totals
        span = depths[1] - depths[0]
        per_layer = {
            op: (high[op] - low[op]) / span for op in sorted(high | low) if high[op] != low[op]
        }
        step_ops = dispatched(
            lambda: (torch.nn.utils.clip_grad_norm_(trainable, 1.0), optimizer.step())
        )
        optimizer.zero_grad(set_to_none=True)
        out.append(
            {
                "grad_ckpt": ckpt,
                "depths": list(depths),
                "ops": [sum(t.values()) for t in totals],
                "per_layer": sum(per_layer.values()),
                "per_layer_by_op": per_layer,
                "optimizer_ops": sum(step_ops.values()),
            }
        )
    return out


def measure(
    dev: Device,
    name: str,
    depths: tuple[int, ...],
    targets: str,
    dropout: float,
    configs: list[tuple[bool, int, int]],
    args: argparse.Namespace,
    base: dict[str, Any],
    write: Any,
    began: float,
) -> None:
    from transformers import AutoConfig

    dev.free()
    built = max(depths)
    cfg = config(name, built, args.tiny)
    t0 = time.time()
    margs = model_args(targets, dropout, dev.name)
    model = build_model(margs, AutoConfig.for_model(**cfg), None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(margs, trainable)
    row0 = dict(
        base,
        shape=name,
        model_type=cfg["model_type"],
        built_layers=built,
        lora_r=16,
        lora_targets=targets,
        lora_dropout=dropout,
        build_seconds=time.time() - t0,
    )
    vocab = cfg["vocab_size"]
    low = sorted(depths)[:2] if args.tiny else (2, 4)
    for counted in count_ops(dev, model, optimizer, trainable, vocab, (low[0], low[1])):
        write(dict(row0, bench="moe_ops", tokens=COUNT_TOKENS, **counted))
    order = sorted(depths, reverse=args.reverse)
    for layers in order:
        if args.budget_s and time.time() - began > args.budget_s:
            print(f"budget spent: {name} {targets[:10]} L={layers} not run", flush=True)
            continue
        set_depth(model, layers)
        for ckpt, mb, seq in reversed(configs) if args.reverse else configs:
            row = dict(
                row0,
                config=config(name, layers, args.tiny),
                num_layers=layers,
                grad_ckpt=ckpt,
                micro_batch=mb,
                seq_len=seq,
                oom=False,
                error=None,
            )
            with failures_recorded(dev, optimizer, row):
                set_ckpt(model, ckpt)
                walls, dispatch = timed(dev, model, optimizer, trainable, vocab, mb, seq)
                row.update(warmup_steps=2, step_seconds=walls, dispatch_seconds=dispatch)
            write(row)
    del model, optimizer, trainable
    dev.free()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "moe_depth.jsonl"))
    p.add_argument("--budget-s", type=float, default=0.0)
    p.add_argument("--reverse", action="store_true", help="run everything in the opposite order")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run)")
    args = p.parse_args()
    dev = Device(args.device)
    began = time.time()
    order = "reverse" if args.reverse else "forward"
    base = {"bench": "moe_depth", "order": order, "tag": "tiny" if args.tiny else ""}
    base["env"] = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict[str, Any]) -> None:
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if row["bench"] == "moe_ops":
            print(
                f"[{time.time() - began:5.0f}s] ops {row['shape']} {row['lora_targets'][:10]} "
                f"ckpt={row['grad_ckpt']}: {row['ops']} per layer {row['per_layer']:.1f}, "
                f"optimizer {row['optimizer_ops']}",
                flush=True,
            )
            return
        walls = sorted(row.get("step_seconds", [0.0])[2:] or [0.0])
        disp = sorted(row.get("dispatch_seconds", [0.0])[2:] or [0.0])
        print(
            f"[{time.time() - began:5.0f}s] {row['shape']} L={row['num_layers']} "
            f"{row['lora_targets'][:10]} ckpt={row['grad_ckpt']} "
            f"{row['micro_batch']}x{row['seq_len']}: wall {walls[len(walls) // 2] * 1e3:.1f} ms "
            f"dispatch {disp[len(disp) // 2] * 1e3:.1f} err={row['error']}",
            flush=True,
        )

    families = TINY_FAMILIES if args.tiny else FAMILIES
    names = list(families)[::-1] if args.reverse else list(families)
    for name in names:
        depths, targets = families[name]
        for target, dropout in targets[::-1] if args.reverse else targets:
            if args.budget_s and time.time() - began > args.budget_s:
                print(f"budget spent: {name} {target[:10]} not run", flush=True)
                continue
            configs = TINY_CONFIGS if args.tiny else CONFIGS
            measure(dev, name, depths, target, dropout, configs, args, base, write, began)
    print(f"done in {time.time() - began:.0f}s", flush=True)


assert set(FAMILIES) <= set(SHAPES)

if __name__ == "__main__":
    main()
