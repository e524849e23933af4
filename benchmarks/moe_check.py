"""The MoE measurements against zeroplan's estimate and speed model (CPU only).

    python benchmarks/moe_check.py

Reads benchmarks/results/moe_h100.jsonl (benchmarks/moe_grid.py) and check_h200_moe.jsonl,
estimates every row's setup on the model cut to the row's depth (``num_layers``) and prints
the measured peak against the estimate; then the launched runs (launch_moe_h100.jsonl,
launch_gpu_check.py --layers 8); then the timed attention-only rows (2 warm-up + 10 timed
steps, median) against ``speed.step_time`` of the lean step. docs/moe.md quotes it;
tests/test_moe.py holds the memory rows within 5% and speed.family_note to the speed range.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zeroplan.hardware import parse_cluster
from zeroplan.memory import estimate
from zeroplan.models import ModelSpec, load_model, spec_from_config
from zeroplan.speed import step_time
from zeroplan.trainsetup import TrainSetup, parse_targets

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line]


def cut(model: str, layers: int) -> ModelSpec:
    """The catalog model with ``layers`` decoder layers, as moe_grid.py built it."""
    spec = load_model(model)
    return spec_from_config({**spec.config, "num_hidden_layers": layers}, name=spec.name)


def setup_of(row: dict[str, Any], method: str = "lora") -> TrainSetup:
    return TrainSetup(
        method=method,
        micro_batch=row["micro_batch"],
        seq_len=row["seq_len"],
        grad_ckpt=row.get("grad_ckpt", False),
        lora_r=row.get("lora_r", 16),
        lora_targets=parse_targets(row.get("lora_targets", "q_proj,k_proj,v_proj,o_proj")),
        lora_dropout=row.get("lora_dropout", 0.05),
    )


def gpu_of(row: dict[str, Any]) -> str:
    return "1xH200" if "H200" in row["env"]["gpu"] else "1xH100"


def memory_rows() -> list[dict[str, Any]]:
    """Every measured LoRA / QLoRA peak with its estimate (``error``: estimate / measured − 1)."""
    out = []
    for row in rows("moe_h100.jsonl"):
        if row.get("section") in ("grid", "depth") and not row["error"]:
            spec, setup = cut(row["model"], row["num_layers"]), setup_of(row)
            measured = row["peak_allocated_bytes"]
        elif row.get("section") == "bnb" and row.get("qlora"):
            for step in row["qlora"][1:]:
                spec, setup = cut(row["model"], row["num_layers"]), setup_of(step, "qlora")
                est = estimate(spec, parse_cluster(gpu_of(row)), setup)
                out.append(_memory(row, setup, step["peak_allocated_bytes"], est))
            continue
        else:
            continue
        out.append(_memory(row, setup, measured, estimate(spec, parse_cluster(gpu_of(row)), setup)))
    for row in rows("check_h200_moe.jsonl"):
        setup = setup_of(row)
        est = estimate(load_model(row["model"]), parse_cluster(gpu_of(row)), setup)
        out.append(_memory(dict(row, num_layers=48), setup, row["peak_allocated_bytes"], est))
    return out


def _memory(row: dict[str, Any], setup: TrainSetup, measured: int, est: Any) -> dict[str, Any]:
    return {
        "model": row["model"],
        "gpu": gpu_of(row)[2:],
        "layers": row["num_layers"],
        "setup": setup,
        "oom": bool(row.get("oom")),
        "measured": measured,
        "estimated": est.peak_allocated_bytes,
        "fits": est.fits,
        "error": est.peak_allocated_bytes / measured - 1,
    }


def speed_rows() -> list[dict[str, Any]]:
    """The timed attention-only rows: median step against step_time's lean step
    (``error``: predicted tokens/s / measured − 1)."""
    out = []
    for row in rows("moe_h100.jsonl"):
        if row.get("section") != "grid" or row.get("warmup_steps") != 2 or row["error"]:
            continue
        spec, setup = cut(row["model"], row["num_layers"]), setup_of(row)
        median = statistics.median(row["step_seconds"][row["warmup_steps"] :])
        predicted = step_time(spec, setup, parse_cluster(gpu_of(row)), launched=False)
        out.append(
            {
                "model": row["model"],
                "layers": row["num_layers"],
                "setup": setup,
                "measured_s": median,
                "predicted_s": predicted.total_s,
                "host_bound": predicted.host_bound,
                "error": setup.tokens / predicted.total_s / (setup.tokens / median) - 1,
            }
        )
    return out


def launch_rows(name: str = "launch_moe_h100.jsonl") -> list[dict[str, Any]]:
    """``zeroplan launch`` of cut MoE models (launch_gpu_check.py --layers): the measured
    peak against the estimate of the launched setup, tokens/s against the plan's, losses.
    The model had the small tokenizer's vocabulary (gpu_fixtures.build_model); ``error``
    None where no peak was measured."""
    import dataclasses

    sys.path.insert(0, str(RESULTS.parent.parent / "tests"))
    import tinyllm

    vocab = len(tinyllm.build_tokenizer())
    known = {f.name for f in dataclasses.fields(TrainSetup)}
    out = []
    for row in rows(name):
        catalog = load_model(row["arch"].replace("--", "/"))
        config = {**catalog.config, "num_hidden_layers": row["layers"], "vocab_size": vocab}
        spec = spec_from_config(config, name=catalog.name)
        values = {k: v for k, v in row["setup"].items() if k in known}
        values["lora_targets"] = parse_targets(values["lora_targets"])
        setup = TrainSetup(**values)
        est = estimate(spec, parse_cluster("1xH100"), setup)
        measured = row["measured_peak_allocated_bytes"]
        out.append(
            {
                "model": catalog.name,
                "layers": row["layers"],
                "setup": setup,
                "measured": measured,
                "estimated": est.peak_allocated_bytes,
                # None: a run that failed before its first step (rc and stderr in the row)
                "error": est.peak_allocated_bytes / measured - 1 if measured else None,
                "tokens_per_s": row["tokens_per_s"],
                "predicted_tokens_per_s": row["predicted"]["tokens_per_s"],
                "losses": [x["loss"] for x in row["losses"]],
            }
        )
    return out


def _label(r: dict[str, Any]) -> str:
    s: TrainSetup = r["setup"]
    targets = ",".join(s.lora_targets).replace("q_proj,k_proj,v_proj,o_proj", "qkvo")
    ckpt = "ckpt" if s.grad_ckpt else "    "
    return (
        f"{r['model'].split('/')[-1]:22s} L={r['layers']:2d} {s.method:5s} {targets:10s} "
        f"{ckpt} {s.micro_batch}x{s.seq_len:<4d}"
    )


def main() -> None:
    print("peak allocated, GiB: measured, estimated, error")
    for r in memory_rows():
        state = "OOM (estimate: does not fit)" if r["oom"] and not r["fits"] else ""
        print(
            f"  {_label(r)} {r['gpu']} {r['measured'] / GIB:7.2f} {r['estimated'] / GIB:7.2f} "
            f"{r['error']:+6.1%} {state}"
        )
    print("launched (zeroplan launch, alpaca-like records): peak GiB, tokens/s, loss")
    for r in launch_rows():
        print(
            f"  {_label(r)} H100 {r['measured'] / GIB:7.2f} {r['estimated'] / GIB:7.2f} "
            f"{r['error']:+6.1%}  {r['tokens_per_s']:8.0f} (plan {r['predicted_tokens_per_s']:.0f})"
            f"  loss {r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}"
        )
    print("lean step, ms: measured median, predicted, predicted tokens/s error")
    for r in speed_rows():
        bound = "host-bound" if r["host_bound"] else "GPU-bound"
        print(
            f"  {_label(r)} {r['measured_s'] * 1e3:6.1f} {r['predicted_s'] * 1e3:6.1f} "
            f"{r['error']:+6.1%} {bound}"
        )


if __name__ == "__main__":
    main()
