"""Issue 30's three edges, traced on one GPU: what ZeRO-3 keeps gathered of the frozen base
under each checkpointing mode with and without ``zero.Init``, what a step keeps at its
peak (allocation traces), and where a host-paced step spends its time.

    python benchmarks/edges.py memory MODEL [measure_memory options] --ckpt-mode MODE
        [--no-zero-init] --out FILE
    python benchmarks/edges.py speed MODEL [measure_memory options] --timed 10 --out FILE

``memory`` runs the loop issue 30 names (a plain DeepSpeed engine loop: ``engine(...).loss;
engine.backward; engine.step``, a client ``torch.optim.AdamW``, DeepSpeed's default
buckets) at world size 1, or the lean trainer step without DeepSpeed. At world size 1
ZeRO-3 gathers nothing (DeepSpeed's ``_no_gather_coalesced``: the one partition is the
whole parameter), so the bytes it would hold at N ranks are read off its own bookkeeping:
after every fetch and release of a module's parameters the script sums the elements whose
``ds_status`` is AVAILABLE and not persistent, and records that sum with
``memory_allocated()``. At N ranks a held parameter costs 2 B · (N − 1)/N of its elements
beyond its partition. The last step runs under ``torch.cuda.memory._record_memory_history``
and the row lists what was alive at that step's peak, grouped by the first stack frame
outside torch.

``speed`` times ``--timed`` steps after two warm-up steps (one sync per step), then
separates one step's phases (forward, backward, optimizer; host time to return and time
to finish on the GPU), then profiles two steps with ``torch.profiler``: kernels launched,
the GPU's busy time, and the host's top operations; the tables go to ``--profile-out``.

Run on the GPU machine with the ``train`` extra (+ bitsandbytes, liger-kernel, deepspeed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import measure_memory as mm

GiB = 2**30


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["memory", "speed"])
    p.add_argument("model")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--ckpt-mode", default="none", choices=["none", "reentrant", "nonreentrant"])
    p.add_argument("--fused-loss", action="store_true")
    p.add_argument("--zero-init", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timed", type=int, default=10)
    p.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--varlen", action="store_true", help="one packed row, zeroplan_varlen")
    p.add_argument("--segment", type=int, default=416, help="--varlen: tokens a segment")
    p.add_argument("--out", required=True)
    p.add_argument("--profile-out", default=None)
    mm.add_setup_options(p)
    args = p.parse_args(argv)
    args.grad_ckpt = args.ckpt_mode != "none"
    args.reentrant = args.ckpt_mode == "reentrant"
    args.memory_fraction = None
    return mm.resolve_loop(args)


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """DeepSpeed's defaults for everything issue 30's loop leaves out (no bucket keys)."""
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": args.zero},
        "steps_per_print": 10**9,
    }


class HeldTracker:
    """Elements ZeRO-3 holds gathered (AVAILABLE, not persistent), sampled after every
    fetch and release of a module's parameters, with memory_allocated() at that moment."""

    def __init__(self) -> None:
        self.params: list[tuple[str, Any]] = []
        self.events: list[tuple[int, int, bool, int]] = []  # (allocated, held, forward, step)
        self.step = 0
        self.max_bwd: tuple[int, list[str]] = (0, [])
        self.complete: list[bool] = []  # DeepSpeed's trace judged complete, after each step
        self.coordinator: Any = None

    def install(self) -> None:
        import torch
        from deepspeed.runtime.zero.partitioned_param_coordinator import (
            PartitionedParameterCoordinator as C,
        )

        tracker = self
        fetch, release = C.fetch_sub_module, C.release_sub_module

        def sample(forward: bool) -> None:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            held = [
                (n, p)
                for n, p in tracker.params
                if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist
            ]
            count = sum(p.ds_numel for _, p in held)
            tracker.events.append((torch.cuda.memory_allocated(), count, forward, tracker.step))
            if not forward and count > tracker.max_bwd[0] and tracker.step >= 1:
                tracker.max_bwd = (count, [n for n, _ in held])

        def fetch_w(self: Any, module: Any, forward: bool) -> None:
            tracker.coordinator = self
            fetch(self, module, forward)
            sample(forward)

        def release_w(self: Any, module: Any, forward: bool = False) -> None:
            release(self, module, forward)
            sample(forward)

        C.fetch_sub_module = fetch_w
        C.release_sub_module = release_w

    def summary(self, total_elems: int) -> dict[str, Any]:
        evs = [e for e in self.events if e[3] >= 1] or self.events
        if not evs:
            return {}
        at_peak = max(evs, key=lambda e: e[0])
        bwd = [e[1] for e in evs if not e[2]]
        fwd = [e[1] for e in evs if e[2]]
        groups = Counter()
        for name in self.max_bwd[1]:
            parts = name.split(".")
            key = ".".join(p for p in parts if not p.isdigit())
            groups[key] += 1
        top_alloc = max(e[0] for e in evs)
        projected = max(e[0] + e[1] for e in evs)  # + 2 B · held · (N − 1)/N at N = 2
        return {
            "projected_two_rank_extra_bytes": projected - top_alloc,
            "complete_trace": self.complete,
            "base_elems": total_elems,
            "held_at_peak_elems": at_peak[1],
            "held_at_peak_phase": "forward" if at_peak[2] else "backward",
            "held_max_backward_elems": max(bwd) if bwd else 0,
            "held_max_forward_elems": max(fwd) if fwd else 0,
            "held_end_of_step_elems": evs[-1][1],
            "held_max_backward_params": dict(groups.most_common(40)),
        }


def live_at_peak(snapshot: dict[str, Any], baseline: int) -> dict[str, Any]:
    """Replay the allocation trace of one step: the peak of the live bytes and what was
    alive then, grouped by the first stack frame outside torch (bytes, blocks)."""
    trace = snapshot["device_traces"][0]
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for ev in trace:
        action = ev["action"]
        if action == "alloc":
            frame = "?"
            for f in ev.get("frames") or []:
                fn = f.get("filename", "")
                if fn.endswith(".py") and "/torch/" not in fn:
                    frame = f"{Path(fn).name}:{f.get('line')}:{f.get('name')}"
                    break
            live[ev["addr"]] = (ev["size"], frame)
            total += ev["size"]
            if total > peak:
                peak, peak_live = total, dict(live)
        elif action in ("free_completed",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    groups: dict[str, list[int]] = {}
    for size, frame in peak_live.values():
        g = groups.setdefault(frame, [0, 0])
        g[0] += size
        g[1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "trace_peak_bytes": baseline + peak,
        "baseline_bytes": baseline,
        "live_at_peak": [{"frame": k, "bytes": v[0], "blocks": v[1]} for k, v in top],
        "trace_events": len(trace),
    }


def init_dist(args: argparse.Namespace) -> None:
    if args.zero is None:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    import deepspeed

    deepspeed.init_distributed()


def build(args: argparse.Namespace) -> tuple[Any, Any, Any, list[Any], HeldTracker | None]:
    import torch
    from transformers import AutoConfig

    from zeroplan.models import load_model

    spec = load_model(args.model)
    config = AutoConfig.for_model(**spec.config)
    cfg = ds_config(args) if args.zero is not None else None
    if args.varlen:
        from zeroplan.launch.batching import register_varlen

        args.attn = register_varlen()
    tracker = None
    if args.zero == 3:
        tracker = HeldTracker()
        tracker.install()
    model = mm.build_model(args, config, cfg if args.zero_init else None)
    if tracker is not None:
        tracker.params = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = mm.make_optimizer(args, trainable)
    engine = None
    if cfg is not None:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
        engine.train()
        if tracker is not None:
            tracker.params = [
                (n, p) for n, p in engine.module.named_parameters() if not p.requires_grad
            ]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return model, engine, optimizer, trainable, tracker


def packed(args: Any, ids: Any) -> dict[str, Any]:
    """``--varlen``: the micro-batch as the launch feeds it, one flat row of segments of
    ``--segment`` tokens with position ids restarting in each and their boundaries for
    zeroplan_varlen attention (zeroplan.launch.batching)."""
    import torch

    if not args.varlen:
        return {}
    t = ids.shape[1]
    bounds = [*range(0, t, args.segment), t]
    cu = torch.tensor(bounds, dtype=torch.int32, device=ids.device)
    pos = torch.cat([torch.arange(b - a, device=ids.device) for a, b in itertools.pairwise(bounds)])
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    return {
        "position_ids": pos[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def one_step(
    args: Any, model: Any, engine: Any, optimizer: Any, trainable: Any, ids: Any, extra: Any
) -> Any:
    import torch

    if engine is not None:
        loss = engine(input_ids=ids, labels=ids, **extra).loss
        engine.backward(loss)
        engine.step()
        return None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.autocast):
        out = model(input_ids=ids, labels=ids, **extra)
    loss = out.loss
    if not args.keep_outputs:
        out = None
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def row_head(args: argparse.Namespace) -> dict[str, Any]:
    from zeroplan.models import load_model

    spec = load_model(args.model)
    return {
        "what": args.what,
        "model": spec.name,
        "model_type": spec.model_type,
        "method": args.method,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "grad_ckpt": args.grad_ckpt,
        "ckpt_mode": args.ckpt_mode,
        "reentrant": args.reentrant,
        "zero": args.zero,
        "zero_init": args.zero_init if args.zero == 3 else None,
        "world_size": 1,
        "lora_r": args.lora_r,
        "lora_targets": args.lora_targets,
        "lora_dropout": args.lora_dropout,
        "optim": args.optim,
        "loop": args.loop,
        "autocast": args.autocast,
        "keep_outputs": args.keep_outputs,
        "attn": args.attn,
        "fused_loss": args.fused_loss,
        "varlen_segment": args.segment if args.varlen else None,
        "precision": "bf16",
        "tag": args.tag,
        "ds_config": ds_config(args) if args.zero is not None else None,
    }


def memory(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    row = row_head(args)
    init_dist(args)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    row["before_load_bytes"] = torch.cuda.memory_allocated()
    try:
        model, engine, optimizer, trainable, tracker = build(args)
        row["setup_allocated_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        from zeroplan.models import load_model

        vocab = load_model(args.model).vocab_size
        gen = torch.Generator(device="cuda").manual_seed(0)
        peaks = []
        out = None
        for step in range(args.steps):
            if tracker is not None:
                tracker.step = step
            ids = torch.randint(
                0, vocab, (args.micro_batch, args.seq_len), device="cuda", generator=gen
            )
            extra = packed(args, ids)
            last = step == args.steps - 1 and args.trace
            if last:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(max_entries=400_000)
            out = one_step(args, model, engine, optimizer, trainable, ids, extra)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
            if tracker is not None and tracker.coordinator is not None:
                tracker.complete.append(bool(tracker.coordinator.is_complete_trace()))
            if last:
                snap = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                row["trace"] = live_at_peak(snap, base)
            torch.cuda.reset_peak_memory_stats()
        del out
        row["step_peaks_bytes"] = peaks
        row["peak_allocated_bytes"] = max(peaks[1:] or peaks)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row["oom"] = False
        if tracker is not None:
            total = sum(p.ds_numel for _, p in tracker.params)
            row["zero3_held"] = tracker.summary(total)
    except torch.OutOfMemoryError as exc:
        row.update(oom=True, error=str(exc).splitlines()[0][:300])
    row["env"] = mm.environment()
    return row


def speed(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    row = row_head(args)
    init_dist(args)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    try:
        model, engine, optimizer, trainable, _ = build(args)
        from zeroplan.models import load_model

        vocab = load_model(args.model).vocab_size
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(
            0, vocab, (args.micro_batch, args.seq_len), device="cuda", generator=gen
        )
        times = []
        out = None
        for _ in range(2 + args.timed):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = one_step(args, model, engine, optimizer, trainable, ids, packed(args, ids))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row["warmup_seconds"] = times[:2]
        row["step_seconds"] = times[2:]
        timed = sorted(times[2:])
        row["median_step_s"] = timed[len(timed) // 2]
        row["tokens_per_s"] = args.micro_batch * args.seq_len / row["median_step_s"]
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        if engine is None:
            row["phases"] = phases(args, model, optimizer, trainable, ids)
        row.update(profile(args, model, engine, optimizer, trainable, ids))
        del out
        row["oom"] = False
    except torch.OutOfMemoryError as exc:
        row.update(oom=True, error=str(exc).splitlines()[0][:300])
    row["env"] = mm.environment()
    return row


def phases(args: Any, model: Any, optimizer: Any, trainable: Any, ids: Any) -> dict[str, Any]:
    """One step's phases, three times: host seconds to return from each call, and seconds
    until the GPU finished it (a sync after each)."""
    import torch

    res: dict[str, list[float]] = {}

    def clock(name: str, fn: Any) -> Any:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        res.setdefault(name + "_host_s", []).append(t1 - t0)
        res.setdefault(name + "_done_s", []).append(t2 - t0)
        return r

    for _ in range(3):

        def fwd() -> Any:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.autocast):
                return model(input_ids=ids, labels=ids, **packed(args, ids))

        out = clock("forward", fwd)
        loss = out.loss
        if not args.keep_outputs:
            out = None
        clock("backward", loss.backward)
        clock("clip", lambda: torch.nn.utils.clip_grad_norm_(trainable, 1.0))
        clock("optimizer", optimizer.step)
        optimizer.zero_grad(set_to_none=True)
        del out, loss
    return {k: sorted(v)[1] for k, v in res.items()}


def profile(
    args: Any, model: Any, engine: Any, optimizer: Any, trainable: Any, ids: Any
) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            one_step(args, model, engine, optimizer, trainable, ids, packed(args, ids))
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 2
    kernels = 0
    gpu_us = 0.0
    cpu_ops = 0
    for ev in prof.events():
        dev = str(getattr(ev, "device_type", ""))
        if dev.endswith("CUDA"):
            kernels += 1
            gpu_us += ev.time_range.elapsed_us()
        elif dev.endswith("CPU") and ev.name.startswith("aten::"):
            cpu_ops += 1
    ka = prof.key_averages()
    if args.profile_out:
        with open(args.profile_out, "a", encoding="utf-8") as f:
            f.write(
                f"\n==== {args.model} {args.method} {args.micro_batch}x{args.seq_len} "
                f"ckpt={args.ckpt_mode} {args.optim} fused_loss={args.fused_loss} ({args.tag})\n"
            )
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
            f.write("\n-- by GPU time --\n")
            f.write(
                ka.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60)
            )
    return {
        "profiled_step_wall_s": wall,
        "profiled_kernels_per_step": kernels / 2,
        "profiled_gpu_busy_s_per_step": gpu_us / 2 / 1e6,
        "profiled_aten_ops_per_step": cpu_ops / 2,
    }


def main() -> None:
    args = parse()
    t0 = time.time()
    row = memory(args) if args.what == "memory" else speed(args)
    row["wall_seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    brief = {
        k: row.get(k) for k in ("model", "method", "ckpt_mode", "zero", "zero_init", "oom", "error")
    }
    if row.get("peak_allocated_bytes"):
        brief["peak_GiB"] = round(row["peak_allocated_bytes"] / GiB, 3)
    if "zero3_held" in row:
        h = row["zero3_held"]
        brief["held_peak_Gelem"] = round(h.get("held_at_peak_elems", 0) / 1e9, 3)
        brief["held_bwd_max_Gelem"] = round(h.get("held_max_backward_elems", 0) / 1e9, 3)
    if "median_step_s" in row:
        brief["step_s"] = round(row["median_step_s"], 4)
        brief["gpu_busy_s"] = round(row["profiled_gpu_busy_s_per_step"], 4)
        brief["kernels"] = row["profiled_kernels_per_step"]
    print(json.dumps(brief), flush=True)
    if args.zero is not None:
        import torch

        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
