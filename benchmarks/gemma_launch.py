"""Gemma 3's launched step (issue 30): `zeroplan launch` of Gemma-3-1B-it LoRA at the plan
of issue 30 (ZeRO-0, 32 × 1,664 tokens packed into one varlen row, checkpointing, fused
loss), with ``--kernels auto`` (the plan's Liger) and ``--kernels none``, and a
Llama-3.2-1B twin of the same plan as a control; each launched step's allocations traced
at its peak (gemma_trace/sitecustomize.py: the live bytes grouped by the frames that
allocated them).

    python benchmarks/gemma_launch.py --work /tmp/gl --out $OUT/gemma.jsonl --steps 6

Random weights of the catalog architecture with its own vocabulary (262k for Gemma 3) and
a small tokenizer built in code; variable-length alpaca records (60-600 words, about
150-1,600 tokens). The runs go in parallel on one GPU (memory is per process; their speed
is not a measurement). One JSON line per run: measured peak (metrics.jsonl, after the
first line) against the plan's, the trace, applied.json's kernels and batching, versions.
``--arch tiny`` rehearses on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tinyllm  # noqa: E402
from gpu_fixtures import build_model, metrics, records, versions, write_plan  # noqa: E402
from kernels_speed import _write, path_prediction  # noqa: E402

from zeroplan.trainsetup import TrainSetup  # noqa: E402

ARCHS = {"gemma": "google--gemma-3-1b-it", "llama": "meta-llama--Llama-3.2-1B"}
# CPU rehearsal: the same architectures, tiny (Gemma 3's sliding and global layers kept)
TINY: dict[str, dict[str, Any]] = {
    "gemma": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "sliding_window": 32,
        "max_position_embeddings": 4096,
        "query_pre_attn_scalar": 16,
        "rope_local_base_freq": 10000.0,
    },
    "llama": tinyllm.TINY_LLAMA,
}
# name: (model, plan's kernels, launch --kernels)
RUNS = {
    "gemma-auto": ("gemma", "liger", "auto"),
    "gemma-none": ("gemma", "liger", "none"),
    "llama-none": ("llama", "liger", "none"),
}


def setup(kernels: str, micro_batch: int, seq_len: int, cpu: bool = False) -> TrainSetup:
    """Issue 30's plan of the launched Gemma 3 job (on the CPU without Liger)."""
    return TrainSetup(
        method="lora", micro_batch=micro_batch, seq_len=seq_len, zero=None if cpu else 0,
        grad_ckpt=True,
        fused_loss=not cpu, kernels="none" if cpu else kernels, lora_dropout=0.0,
    )  # fmt: skip


def start(name: str, work: Path, args: Any) -> tuple[subprocess.Popen[str], Path, float]:
    arch, kernels, launch_kernels = RUNS[name]
    model = work / arch
    plan = work / f"plan-{name}.json"
    write_plan(plan, model, setup(kernels, args.micro_batch, args.seq_len, args.tiny), args.gpus)
    run = work / f"run-{name}"
    trace = work / f"trace-{name}.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "benchmarks/gemma_trace"), os.environ.get("PYTHONPATH", "")]
        ),
        "ZP_TRACE_OUT": str(trace),
        "ZP_TRACE_AFTER": str(args.trace_after),
    }
    cmd = [
        sys.executable,
        "-m",
        "zeroplan",
        "launch",
        str(plan),
        "--data",
        str(work / "data.jsonl"),
    ]
    cmd += ["-o", str(run), "--model", str(model), "--max-steps", str(args.steps)]
    cmd += ["--logging-steps", "1", "--no-dashboard", "--kernels", launch_kernels]
    cmd += ["--batching", "packed"] + (["--force"] if args.gpus else [])
    log = (work / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    return proc, plan, time.time()


def row(name: str, work: Path, plan: Path, rc: int, wall: float) -> dict[str, Any]:
    run = work / f"run-{name}"
    lines = metrics(run)
    peaks = [m.get("peak_allocated_bytes") or 0 for m in lines if m.get("event") == "train"]
    applied_file = run / "applied.json"
    applied = json.loads(applied_file.read_text()) if applied_file.exists() else {}
    trace_file = work / f"trace-{name}.json"
    best = json.loads(plan.read_text())["best"]
    log = (work / f"{name}.log").read_text()
    return {
        "bench": "gemma_launch",
        "run": name,
        "model": ARCHS[RUNS[name][0]],
        "launch_kernels": RUNS[name][2],
        "returncode": rc,
        "wall_s": round(wall, 1),
        "setup": best["setup"],
        "predicted_peak_allocated_bytes": best["peak_allocated_bytes"],
        "predicted_peak_phase": best.get("peak_phase"),
        # the plan's prediction is for its own kernels; --kernels none runs another path
        **(
            path_prediction(json.loads(plan.read_text()), {}, applied, work / RUNS[name][0])
            if applied
            else {}
        ),
        "measured_peak_allocated_bytes": max(peaks[1:]) if len(peaks) > 1 else None,
        "peaks": peaks,
        "kernels": applied.get("kernels"),
        "batching": applied.get("batching"),
        "attn_implementation": applied.get("attn_implementation"),
        "memory_after_load": applied.get("gpu_memory_after_load"),
        "data_summary": applied.get("data"),
        "losses": [m.get("loss") for m in lines if m.get("event") == "train" and m.get("loss")],
        "trace": json.loads(trace_file.read_text()) if trace_file.exists() else None,
        "trace_note": (
            trace_file.with_suffix(".steps").read_text()
            if trace_file.with_suffix(".steps").exists()
            else None
        ),
        "log_tail": log[-1500:],
    }


def probe() -> dict[str, Any]:
    """What this stack does with Gemma-2's attention and what the varlen kernel can take:
    transformers' Gemma-2 class flags, the implementation a tiny Gemma-2 built with
    attn_implementation="sdpa" (and with none) really gets, torch's varlen_attn parameters
    (a window, a softcap?)."""
    import inspect

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.gemma2 import modeling_gemma2

    out: dict[str, Any] = {"bench": "gemma_probe", "transformers": transformers.__version__}
    cls = modeling_gemma2.Gemma2PreTrainedModel
    for flag in ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn"):
        out[f"gemma2{flag}"] = getattr(cls, flag, None)
    cfg = AutoConfig.for_model(
        "gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    )  # fmt: skip
    for asked in ("sdpa", None):
        try:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=asked)
            out[f"gemma2_asked_{asked}"] = model.config._attn_implementation
        except Exception as exc:  # what transformers says is the finding
            out[f"gemma2_asked_{asked}"] = f"raises {type(exc).__name__}: {str(exc)[:160]}"
    try:
        from torch.nn.attention.varlen import varlen_attn

        out["varlen_attn_params"] = list(inspect.signature(varlen_attn).parameters)
    except ImportError as exc:
        out["varlen_attn_params"] = f"no varlen_attn ({exc})"
    return out


def gpu_env() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"versions": versions(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # the driver is reported where NVML reads it
            env["driver"] = None
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--trace-after", type=int, default=3, help="trace the optimizer step after this")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1664)
    p.add_argument("--records", type=int, default=500)
    p.add_argument("--max-words", type=int, default=600)
    p.add_argument("--timeout", type=float, default=170, help="seconds per run")
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny models, 2 GPUs planned")
    args = p.parse_args()
    args.gpus = 1 if args.tiny else None
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    names = args.runs.split(",")
    for arch in sorted({RUNS[n][0] for n in names}):
        path = args.work / arch
        if (path / "config.json").exists():
            continue
        if args.tiny:
            tinyllm.build_model_dir(path, arch=TINY[arch])
        else:
            build_model(path, ARCHS[arch], full_vocab=True)
    print(f"models ready in {time.time() - t0:.0f} s", flush=True)
    tinyllm.write_jsonl(args.work / "data.jsonl", records(args.records, 60, args.max_words))
    started = {n: start(n, args.work, args) for n in names}
    env = gpu_env()
    _write(args.out, probe() | {"env": env})
    for name, (proc, plan, t) in started.items():
        try:
            rc = proc.wait(timeout=max(1.0, args.timeout - (time.time() - t)))
        except subprocess.TimeoutExpired:
            proc.terminate()  # zeroplan launch forwards it to its ranks
            rc = proc.wait(timeout=30)
        r = row(name, args.work, plan, rc, time.time() - t)
        r["env"] = env
        _write(args.out, r)
        m = r["measured_peak_allocated_bytes"]
        e = r.get("path_predicted_peak_allocated_bytes") or r["predicted_peak_allocated_bytes"]
        print(name, "rc", rc, "measured", m, "predicted", e,
              f"{(e - m) / m:+.1%}" if m else "", "trace", bool(r["trace"]), flush=True)  # fmt: skip
        if rc:
            print(r["log_tail"], flush=True)
    print(f"all done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
