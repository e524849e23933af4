"""Mixture-of-experts LoRA steps across expert counts: wall time, the host's share, the GPU's
kernels, the routing's balance (issue 29, speed).

    python benchmarks/moe_speed.py --out $OUT/moe_speed_h100.jsonl --budget-s 100

Cut models (``LAYERS`` decoder layers, the family's real vocabulary, random bf16 weights on
the GPU) of one family's modelling code at several expert counts and top-k (``SHAPES``:
Mixtral-8x7B's own 8 experts top-2 and Mixtral-shaped 16/2 and 32/4, Qwen3-30B-A3B's 128/8,
an OLMoE-sized 64/8 and a 32/4 of Qwen3's small experts). For each shape and target set
(attention q,k,v,o with dropout 0.05; all-linear with dropout 0) the lean step of
moe_grid.py (bf16 autocast, the model's loss, backward, clipping, fused AdamW), 2 warm-up
and 10 timed steps per configuration (micro-batch 1-4, seq 512-1024, with and without
checkpointing). Per step: the wall seconds (synchronised) and the dispatch seconds (when
the host had queued the whole step, before the synchronisation: the host's own clock when
nothing waits on the GPU inside the step). One more step of some configurations runs under
torch.profiler: the GPU's busy time (every kernel's duration), by operator, the kernels
launched and the host-device synchronisations. Then a no-grad forward with a hook on every
router counts the tokens each expert got (random weights route about evenly: the max over
the mean says how evenly).

``--budget-s`` starts no new shape and target set after that many seconds. ``--device cpu
--tiny`` checks the script on a tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from measure_memory import build_model, environment, make_optimizer  # noqa: E402
from moe_grid import CATALOG, TINY, Device, model_args, set_ckpt  # noqa: E402

LAYERS = 2
MIXTRAL = "mistralai--Mixtral-8x7B-v0.1.json"
QWEN3 = "Qwen--Qwen3-30B-A3B.json"
# name -> (catalog file, config overrides); in the order they run (the budget may stop it)
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-8x2": (MIXTRAL, {}),
    "qwen3-128x8": (QWEN3, {}),
    "mixtral-16x2": (MIXTRAL, {"num_local_experts": 16}),
    "olmoe-64x8": (QWEN3, {"num_experts": 64, "moe_intermediate_size": 1024}),
    "mixtral-32x4": (MIXTRAL, {"num_local_experts": 32, "num_experts_per_tok": 4}),
    "qwen3-32x4": (QWEN3, {"num_experts": 32, "num_experts_per_tok": 4}),
}
ATTN = "q_proj,k_proj,v_proj,o_proj"
TARGETS = [(ATTN, 0.05), ("all-linear", 0.0)]
# (checkpointing, micro-batch, seq, profiled)
CONFIGS = [
    (False, 1, 512, True),
    (False, 4, 1024, True),
    (True, 1, 512, False),
    (True, 4, 1024, False),
]
WARMUP, TIMED = 2, 10
TINY_CONFIGS = [(False, 1, 16, True), (True, 2, 32, False)]


def config_of(name: str, tiny: bool) -> dict[str, Any]:
    """The catalog config with the shape's overrides, cut to LAYERS layers."""
    file, overrides = SHAPES[name]
    cfg: dict[str, Any] = json.loads((CATALOG / file).read_text())
    cfg.pop("torch_dtype", None)
    cfg.update(overrides, num_hidden_layers=LAYERS)
    if cfg.get("max_window_layers"):
        cfg["max_window_layers"] = LAYERS
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg or k == "head_dim"})
    return cfg


def step(dev: Device, model: Any, optimizer: Any, trainable: list[Any], ids: Any) -> float:
    """One lean step up to the point where the host has queued all of it; returns then."""
    torch = dev.torch
    with torch.autocast(dev.name, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter()


def timed(
    dev: Device, model: Any, optimizer: Any, trainable: list[Any], vocab: int, mb: int, seq: int
) -> tuple[list[float], list[float]]:
    """WARMUP + TIMED steps: each one's wall seconds and dispatch seconds."""
    torch = dev.torch
    gen = torch.Generator(device=dev.name).manual_seed(0)
    walls, dispatch = [], []
    for _ in range(WARMUP + TIMED):
        ids = torch.randint(0, vocab, (mb, seq), device=dev.name, generator=gen)
        dev.sync()
        start = time.perf_counter()
        queued = step(dev, model, optimizer, trainable, ids)
        dev.sync()
        walls.append(time.perf_counter() - start)
        dispatch.append(queued - start)
    return walls, dispatch


def profiled(
    dev: Device, model: Any, optimizer: Any, trainable: list[Any], vocab: int, mb: int, seq: int
) -> dict[str, Any]:
    """One step under torch.profiler: GPU busy seconds (every kernel's duration), by
    operator (the 12 largest by their own kernels' time), kernels and launches, and the
    synchronising runtime calls."""
    torch = dev.torch
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab, (mb, seq), device=dev.name)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
    dev.sync()
    with profile(activities=acts) as prof:
        step(dev, model, optimizer, trainable, ids)
        dev.sync()
    busy, ops, runtime, aten = 0.0, [], {}, 0
    for e in prof.key_averages():
        aten += e.count if e.key.startswith("aten::") else 0
        own = getattr(e, "self_device_time_total", 0.0) or 0.0
        busy += own
        if own:
            ops.append((e.key, e.count, own * 1e-6))
        if e.key.startswith("cuda") or e.key.startswith("cu"):
            runtime[e.key] = e.count
    ops.sort(key=lambda o: -o[2])
    kernels = sum(
        1
        for e in prof.events()
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")
    )
    return {
        "gpu_busy_s": busy * 1e-6,
        "ops": [list(o) for o in ops[:12]],
        "grouped_mm_s": sum(o[2] for o in ops if "grouped_mm" in o[0]),
        "grouped_mm_calls": sum(o[1] for o in ops if "grouped_mm" in o[0]),
        "kernels": kernels,
        "aten_calls": aten,
        "runtime_calls": runtime,
    }


def routing_balance(dev: Device, model: Any, vocab: int, mb: int, seq: int) -> list[float]:
    """Per MoE layer, the most tokens any expert got over the mean (a no-grad forward)."""
    torch = dev.torch
    counts: list[Any] = []

    def hook(module: Any, args: Any, out: Any) -> None:
        indices = out[2] if isinstance(out, tuple) else out
        counts.append(torch.bincount(indices.reshape(-1), minlength=module.num_experts))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if type(m).__name__.endswith("TopKRouter")
    ]
    try:
        ids = torch.randint(0, vocab, (mb, seq), device=dev.name)
        with torch.no_grad(), torch.autocast(dev.name, dtype=torch.bfloat16):
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return [float(c.max() / c.float().mean()) for c in counts]


def measure(
    dev: Device,
    name: str,
    cfg: dict[str, Any],
    targets: str,
    dropout: float,
    configs: list[tuple[bool, int, int, bool]],
    base: dict[str, Any],
    write: Any,
) -> None:
    from transformers import AutoConfig

    dev.free()
    row0 = dict(
        base,
        shape=name,
        config=cfg,
        model_type=cfg["model_type"],
        num_layers=cfg["num_hidden_layers"],
        lora_r=16,
        lora_targets=targets,
        lora_dropout=dropout,
    )
    args = model_args(targets, dropout, dev.name)
    t0 = time.time()
    model = build_model(args, AutoConfig.for_model(**cfg), None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, trainable)
    row0.update(
        build_seconds=time.time() - t0,
        experts_implementation=getattr(model.config, "_experts_implementation", None),
        trainable_params=sum(p.numel() for p in trainable),
    )
    vocab = cfg["vocab_size"]
    for ckpt, mb, seq, prof in configs:
        row = dict(row0, grad_ckpt=ckpt, micro_batch=mb, seq_len=seq, oom=False, error=None)
        with failures_recorded(dev, optimizer, row):
            set_ckpt(model, ckpt)
            dev.free()
            dev.reset()
            walls, dispatch = timed(dev, model, optimizer, trainable, vocab, mb, seq)
            row.update(
                warmup_steps=WARMUP,
                step_seconds=walls,
                dispatch_seconds=dispatch,
                peak_allocated_bytes=dev.peak(),
            )
            if prof:
                row["profile"] = profiled(dev, model, optimizer, trainable, vocab, mb, seq)
                row["balance"] = routing_balance(dev, model, vocab, mb, seq)
        write(row)
    del model, optimizer, trainable
    dev.free()


@contextlib.contextmanager
def failures_recorded(dev: Device, optimizer: Any, row: dict[str, Any]) -> Iterator[None]:
    """Running out of memory, or any other failure, inside the block is written into the
    configuration's row as its result; the next configuration still runs."""
    try:
        yield
    except dev.torch.OutOfMemoryError as exc:
        row.update(oom=True, error=str(exc).splitlines()[0][:300])
        optimizer.zero_grad(set_to_none=True)
    except Exception as exc:  # a failure is a result
        row.update(error=f"{type(exc).__name__}: {exc}"[:400])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "moe_speed.jsonl"))
    p.add_argument("--budget-s", type=float, default=0.0)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run)")
    args = p.parse_args()
    dev = Device(args.device)
    began = time.time()
    base = {"bench": "moe_speed", "tag": "tiny" if args.tiny else "", "env": environment()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict[str, Any]) -> None:
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        walls = sorted(row.get("step_seconds", [0.0])[WARMUP:] or [0.0])
        disp = sorted(row.get("dispatch_seconds", [0.0])[WARMUP:] or [0.0])
        busy = row.get("profile", {}).get("gpu_busy_s", 0.0)
        print(
            f"[{time.time() - began:5.0f}s] {row['shape']} {row['lora_targets'][:10]} "
            f"ckpt={row['grad_ckpt']} {row['micro_batch']}x{row['seq_len']}: "
            f"wall {walls[len(walls) // 2] * 1e3:.1f} ms dispatch {disp[len(disp) // 2] * 1e3:.1f}"
            f" busy {busy * 1e3:.1f} peak {row.get('peak_allocated_bytes', 0) / 2**30:.1f} GiB"
            f" err={row['error']}",
            flush=True,
        )

    for name in args.shapes.split(","):
        cfg = config_of(name, args.tiny)
        for targets, dropout in TARGETS:
            if args.budget_s and time.time() - began > args.budget_s:
                print(f"budget spent: {name} {targets} not run", flush=True)
                continue
            configs = TINY_CONFIGS if args.tiny else CONFIGS
            measure(dev, name, cfg, targets, dropout, configs, base, write)
    print(f"done in {time.time() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()
