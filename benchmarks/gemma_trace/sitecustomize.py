"""Allocation trace of one launched step, loaded into every rank of a ``zeroplan launch``
through PYTHONPATH (benchmarks/gemma_launch.py puts this folder first on it).

Inert unless ZP_TRACE_OUT names a JSON file and the process is a rank (LOCAL_RANK set).
torch's global optimizer-step hooks mark the steps: after optimizer step ZP_TRACE_AFTER the
allocation history starts; after the next one the snapshot is replayed (the live bytes at
the step's peak, grouped by the frames that allocated them) and written to ZP_TRACE_OUT.
The step traced is the whole of one step: its forward, backward and optimizer step.
"""

from __future__ import annotations

import os
import sys


def _chain() -> None:
    """Run the sitecustomize this one shadows (the next on sys.path), if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        path = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(path):
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), {"__name__": "sitecustomize_chained"})
            return


_chain()

if os.environ.get("ZP_TRACE_OUT") and "LOCAL_RANK" in os.environ:
    import atexit
    import json
    from collections import Counter
    from pathlib import Path
    from typing import Any

    _OUT = Path(os.environ["ZP_TRACE_OUT"])
    _AFTER = int(os.environ.get("ZP_TRACE_AFTER", "3"))
    _state: dict[str, Any] = {"steps": 0, "base": None, "done": False}

    def _frames(ev: dict[str, Any], depth: int = 4) -> str:
        """The innermost frames outside torch (file:line:function), innermost first."""
        out = []
        for f in ev.get("frames") or []:
            fn = f.get("filename", "")
            if not fn.endswith(".py") or "/torch/" in fn or fn.endswith("sitecustomize.py"):
                continue
            out.append(f"{Path(fn).name}:{f.get('line')}:{f.get('name')}")
            if len(out) == depth:
                break
        return " < ".join(out) or "?"

    def _replay(snapshot: dict[str, Any], base: int) -> dict[str, Any]:
        trace = snapshot["device_traces"][0]
        live: dict[int, tuple[int, str]] = {}
        total = peak = 0
        peak_at = 0
        peak_live: dict[int, tuple[int, str]] = {}
        for i, ev in enumerate(trace):
            if ev["action"] == "alloc":
                live[ev["addr"]] = (ev["size"], _frames(ev))
                total += ev["size"]
                if total > peak:
                    peak, peak_at, peak_live = total, i, dict(live)
            elif ev["action"] == "free_completed":
                # a block allocated before the trace began leaves the baseline
                total -= live.pop(ev["addr"])[0] if ev["addr"] in live else ev["size"]
        groups: Counter[str] = Counter()
        blocks: Counter[str] = Counter()
        for size, where in peak_live.values():
            groups[where] += size
            blocks[where] += 1
        # what was allocated last before the peak: the moment it falls on
        last = [_frames(ev, 6) for ev in trace[max(0, peak_at - 3) : peak_at + 1]]
        return {
            "baseline_bytes": base,
            "trace_peak_bytes": base + peak,
            "peak_event": peak_at,
            "trace_events": len(trace),
            "allocated_last_before_peak": last,
            "live_at_peak": [
                {"frames": k, "bytes": v, "blocks": blocks[k]} for k, v in groups.most_common(40)
            ],
        }

    def _post(optimizer: Any, args: Any, kwargs: Any) -> None:
        import torch

        if _state["done"] or not torch.cuda.is_available():
            _state["steps"] += 1
            return
        _state["steps"] += 1
        if _state["steps"] == _AFTER:
            torch.cuda.synchronize()
            _state["base"] = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(
                max_entries=1_000_000, context="alloc", stacks="python"
            )
        elif _state["steps"] == _AFTER + 1 and _state["base"] is not None:
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            row = _replay(snap, _state["base"])
            row["optimizer"] = type(optimizer).__name__
            row["step_traced"] = _state["steps"]
            _OUT.write_text(json.dumps(row, indent=1) + "\n")
            _state["done"] = True

    def _install() -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_post)

    _install()

    @atexit.register
    def _say() -> None:
        if not _state["done"] and _state["steps"]:
            # (the rank's wrapper process, zeroplan.launch.ranklog, sees none: it says nothing)
            with _OUT.with_suffix(".steps").open("a") as f:
                f.write(f"pid {os.getpid()}: {_state['steps']} optimizer steps, no trace\n")
