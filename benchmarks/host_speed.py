"""Host-paced launched steps, before and after, and the plan's choice among five measured
setups: one GPU call (issues 26 and 30).

    python benchmarks/host_speed.py --work /tmp/h --out $OUT/host_h100.jsonl \
        --before .stage-host-main --deadline 420

Builds random-weight Llama-3.1-8B (its 128,256-token vocabulary) and Llama-3.2-1B, writes
alpaca-like records (benchmarks/gpu_fixtures.py), plans each job on this GPU
(``zeroplan plan MODEL --data records``) and launches it with ``zeroplan launch`` per run
(kernels_speed.launch), from this tree or, for the runs marked ``before``, from the
zeroplan tree ``--before`` (main before this work), on the same card in the same call:

    8b-mb1-today   Llama-3.1-8B QLoRA, 1 × 1,664 packed, no checkpointing, fused loss, the
                   model's own kernels, LoRA dropout 0.05: the launch issue 26 measured
                   (3,902 tokens/s), zeroplan before
    8b-mb1-main    the same with today's defaults (Liger's kernels, dropout 0), zeroplan before
    8b-mb1         the same from this tree (the host's waits and walks taken out, hostloop)
    1b-mb4-today   Llama-3.2-1B LoRA, 4 × 704, no DeepSpeed, unfused loss, own kernels,
                   dropout 0.05 (realdata_h200_hostbound's job), zeroplan before
    1b-mb4         the same job with today's defaults, from this tree
    1b-mb4-compile, 8b-mb1-compile   1b-mb4 and 8b-mb1 with --compile (each decoder layer
                   through torch.compile: fewer operations for the host to dispatch)
    1b-mb4-compile-none, 8b-mb1-compile-none   the same compiled without Liger's kernels
                   (inductor fuses the norms, SwiGLU and rotary itself; Liger's autograd
                   functions split each layer's graph)
    1b-mb4-ro, 8b-mb1-ro   the same in torch.compile's "reduce-overhead" mode (CUDA graphs)
    8b-plan        the default 8B QLoRA plan as planned (GPU-bound), probed: its GPU time by
                   kernel (the probe's top_gpu and gpu_ms_per_step_by_kind)
    8b-mb1-graphs, 1b-mb1-graphs, 1b-mb4-graphs   8b-mb1, 1b-mb1-fused and 1b-mb4 with the
                   decoder as CUDA graphs (--cuda-graphs)
    8b-lora, 8b-lora-graphs   the 8B bf16 LoRA plan (GPU-bound) eager and as CUDA graphs
    8b-plan-graphs   the default 8B QLoRA plan (8b-plan) as CUDA graphs
    q3-*, q05-*   Qwen3-1.7B and Qwen2.5-0.5B LoRA (families no graphed launch had run):
                   the plan's choice (CUDA graphs by default) and the same setup eager,
                   and a host-bound shape (1 × 1,664; 4 × 704) with and without graphs
    1b-plan, 1b-alt1..4   the 1B LoRA plan's choice on this GPU and four other setups it
                   ranked (the first of each distinct micro-batch / checkpointing / DeepSpeed
                   shape down its list), from this tree
    8b-lora-plan, 8b-lora-alt1..4   the same for the 8B bf16 LoRA plan (GPU-bound)

Each run: 3 warm-up steps, ``--timed`` timed ones (tokens/s over those, from metrics.jsonl),
then four more under the probe (benchmarks/host_probe: the host seconds of each Trainer
phase, where the host waited for the GPU, torch.profiler's kernels and GPU-busy seconds a
step), not timed. A run is not started when ``--deadline`` would pass before its estimated
end; its row says so. One JSON line per run, with the GPU, driver and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tinyllm  # noqa: E402
from gpu_fixtures import (  # noqa: E402
    RANKED_JOBS,
    WARMUP_STEPS,
    build_model,
    metrics,
    ranked_job,
    records,
)
from kernels_speed import _json, _write, environment, launch, plan_for  # noqa: E402

PROBE = ROOT / "benchmarks" / "host_probe"
ARCHS = {
    "8b": "meta-llama--Llama-3.1-8B",
    "1b": "meta-llama--Llama-3.2-1B",
    # families no graphed launch was measured on before (held out): Qwen3's q/k norms,
    # Qwen2.5's biased q/k/v, both with tied embeddings
    "q3": "Qwen--Qwen3-1.7B",
    "q05": "Qwen--Qwen2.5-0.5B",
}
# the host-bound shapes: no checkpointing, no DeepSpeed, and the loop's autocast as a plan
# without DeepSpeed has it (autocast None resolves to the Trainer's bf16 autocast). Until
# the twenty-second session the 1B runs kept a ZeRO-0 plan's autocast off, so they ran
# PEFT's fp32 adapters without autocast, where the fused LoRA linears never run.
MB1 = {"micro_batch": 1, "seq_len": 1664, "grad_accum": 1, "grad_ckpt": False, "zero": None,
       "autocast": None}  # fmt: skip
MB4 = {"micro_batch": 4, "seq_len": 704, "grad_accum": 1, "grad_ckpt": False, "zero": None,
       "autocast": None}  # fmt: skip
TODAY = {"kernels": "none", "lora_dropout": 0.05}
DEFAULTS = {"kernels": "liger", "lora_dropout": 0.0, "cuda_graphs": False}
GRAPHS = {"cuda_graphs": True}  # the decoder as CUDA graphs, as the plan says (launch/graphs.py)
# name: (model, method, launch options, changes to the plan's setup, tree: before | after)
RUNS: dict[str, tuple[str, str, list[str], dict[str, Any], str]] = {
    "8b-mb1-today": ("8b", "qlora", ["--kernels", "none"], {**MB1, **TODAY, "fused_loss": True}, "before"),
    "8b-mb1-main": ("8b", "qlora", [], {**MB1, **DEFAULTS, "fused_loss": True}, "before"),
    "8b-mb1": ("8b", "qlora", [], {**MB1, **DEFAULTS, "fused_loss": True}, "after"),
    "1b-mb4-today": ("1b", "lora", ["--kernels", "none"], {**MB4, **TODAY, "fused_loss": False}, "before"),
    "1b-mb4": ("1b", "lora", [], {**MB4, **DEFAULTS, "fused_loss": True}, "after"),
    "1b-mb4-compile": ("1b", "lora", ["--compile"], {**MB4, **DEFAULTS, "fused_loss": True}, "after"),
    "8b-mb1-compile": ("8b", "qlora", ["--compile"], {**MB1, **DEFAULTS, "fused_loss": True}, "after"),
    "1b-mb4-compile-none": ("1b", "lora", ["--compile", "--kernels", "none"], {**MB4, **DEFAULTS, "kernels": "none", "fused_loss": True}, "after"),
    "8b-mb1-compile-none": ("8b", "qlora", ["--compile", "--kernels", "none"], {**MB1, **DEFAULTS, "kernels": "none", "fused_loss": True}, "after"),
    "1b-mb4-ro": ("1b", "lora", ["--compile"], {**MB4, **DEFAULTS, "fused_loss": True}, "after"),
    "8b-mb1-ro": ("8b", "qlora", ["--compile"], {**MB1, **DEFAULTS, "fused_loss": True}, "after"),
    # host-bound 1B LoRA (autocast adapters) on the fused linears and on PEFT's layers: the
    # plan weighs both (the fused ones timed at 0.70 of PEFT's host time on an H100 host)
    "1b-mb1-fused": ("1b", "lora", [], {**MB1, **DEFAULTS, "fused_loss": True, "fused_lora": True}, "after"),
    "1b-mb1-peft": ("1b", "lora", [], {**MB1, **DEFAULTS, "fused_loss": True, "fused_lora": False}, "after"),
    # the default 8B QLoRA plan as planned (GPU-bound), probed: where its GPU time goes
    "8b-plan": ("8b", "qlora", [], {}, "after"),
    # the decoder as CUDA graphs (launch/graphs.py) against the same job eager, this tree:
    # host-bound (8b-mb1, 1b-mb1-fused, 1b-mb4) and the GPU-bound 8B bf16 LoRA plan
    "8b-mb1-graphs": ("8b", "qlora", [], {**MB1, **DEFAULTS, **GRAPHS, "fused_loss": True}, "after"),
    "1b-mb1-graphs": ("1b", "lora", [], {**MB1, **DEFAULTS, **GRAPHS, "fused_loss": True, "fused_lora": True}, "after"),
    "1b-mb4-graphs": ("1b", "lora", [], {**MB4, **DEFAULTS, **GRAPHS, "fused_loss": True}, "after"),
    "8b-lora": ("8b", "lora", [], {"cuda_graphs": False}, "after"),
    "8b-lora-graphs": ("8b", "lora", [], GRAPHS, "after"),
    "8b-plan-graphs": ("8b", "qlora", [], GRAPHS, "after"),
    # held-out families, the plan's choice (CUDA graphs by default) against the same setup
    # eager, and a host-bound shape both ways
    "q3-plan": ("q3", "lora", [], {}, "after"),
    "q3-plan-eager": ("q3", "lora", [], {"cuda_graphs": False}, "after"),
    "q3-mb1-graphs": ("q3", "lora", [], {**MB1, **DEFAULTS, **GRAPHS, "fused_loss": True}, "after"),
    "q3-mb1": ("q3", "lora", [], {**MB1, **DEFAULTS, "fused_loss": True}, "after"),
    "q05-plan": ("q05", "lora", [], {}, "after"),
    "q05-plan-eager": ("q05", "lora", [], {"cuda_graphs": False}, "after"),
    "q05-mb4-graphs": ("q05", "lora", [], {**MB4, **DEFAULTS, **GRAPHS, "fused_loss": True}, "after"),
    "q05-mb4": ("q05", "lora", [], {**MB4, **DEFAULTS, "fused_loss": True}, "after"),
}  # fmt: skip
# torch.compile's mode for a run (host_probe sets zeroplan.launch.kernels.COMPILE_MODE)
MODES = {"1b-mb4-ro": "reduce-overhead", "8b-mb1-ro": "reduce-overhead"}
# seconds a --compile run adds to its estimate (the first forward's and backward's compile)
COMPILE_EXTRA_S = 15.0
# steps after the timed ones: two under sync debug mode, two profiled (the profiler stops
# at the next step's start), one watched for the host's reads of GPU values (host_probe's
# HostReads, closed at the last step's end, before the final save)
PROBED = 5


def ranked_setups(plan: dict[str, Any], n: int) -> list[tuple[dict[str, Any], float]]:
    """The plan's choice and the first alternative of each further shape down its ranking
    (micro-batch, checkpointing, DeepSpeed or not; ZeRO 1-2 at one GPU repeat ZeRO-0's
    step), with each one's predicted tokens/s: ``n`` in all."""
    rows = [plan["best"], *plan.get("alternatives", [])]
    out: list[tuple[dict[str, Any], float]] = []
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        s = row["setup"]
        shape = (s["micro_batch"], s["grad_ckpt"], s["zero"] is None, s.get("offload"))
        if shape in seen:
            continue
        seen.add(shape)
        out.append((dict(s), float(row["tokens_per_s"])))
        if len(out) == n:
            break
    return out


def timed_rate(lines: list[dict[str, Any]], last: int) -> dict[str, Any]:
    """Real tokens/s over steps WARMUP_STEPS+1 .. last (the probe's steps left out)."""
    train = [m for m in lines if m["event"] == "train" and m["rank"] == 0]
    timed = [m for m in train if WARMUP_STEPS < m["step"] <= last and m.get("tokens_per_s")]
    if not timed:
        return {"tokens_per_s": None, "timed_steps": 0}
    prev = {m["step"]: m for m in train}
    seconds = tokens = 0.0
    for m in timed:
        before = prev.get(m["step"] - 1)
        if before is None:
            continue
        dt = m["t"] - before["t"]
        seconds += dt
        tokens += m["tokens_per_s"] * dt
    rates = [m["tokens_per_s"] for m in timed]
    return {
        "tokens_per_s": tokens / seconds if seconds else None,
        "timed_steps": len(timed),
        "step_rate_median": statistics.median(rates),
        "step_rate_min": min(rates),
        "step_rate_max": max(rates),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--before", type=Path, help="zeroplan tree before this work (runs of it)")
    order = [*[n for n in RUNS if n != "8b-mb1-main"], *RANKED_JOBS["1b"][2], "8b-mb1-main"]
    p.add_argument("--runs", default=",".join(order))
    p.add_argument("--timed", type=int, default=20, help="timed steps after the warm-up")
    p.add_argument("--timed-ranked", type=int, default=10, help="the same, five-setup runs")
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--deadline", type=float, default=420.0, help="seconds for everything")
    p.add_argument("--estimate-8b", type=float, default=65.0, help="seconds an 8B launch takes")
    p.add_argument("--estimate-1b", type=float, default=28.0, help="seconds a 1B launch takes")
    p.add_argument("--arch", default="", help="tiny: a CPU rehearsal on tests/tinyllm's model")
    args = p.parse_args()
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    data = tinyllm.write_jsonl(args.work / "alpaca.jsonl", records(args.records))
    names = args.runs.split(",")
    models: dict[str, Path] = {}
    plans: dict[tuple[str, str], Path] = {}
    for key in ARCHS:
        if not any(_job_of(n)[0] == key for n in names):
            continue
        models[key] = args.work / f"model-{key}"
        if not (models[key] / "config.json").exists():
            if args.arch == "tiny":
                tinyllm.build_model_dir(models[key])
            else:
                build_model(models[key], ARCHS[key], full_vocab=True)
        print(f"{key} model ready at {time.time() - t0:.0f} s", flush=True)
    ranked: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for name in names:
        key, method, options, tree = _job_of(name)
        if args.arch == "tiny":
            method = "lora"
        need = args.estimate_8b if key == "8b" else args.estimate_1b
        need += COMPILE_EXTRA_S if "--compile" in options else 0.0
        left = args.deadline - (time.time() - t0)
        if left < need:
            _write(
                args.out, {"run": name, "skipped": f"{left:.0f} s left, needs ~{need:.0f}", **env}
            )
            continue
        if (key, method) not in plans:
            plans[key, method] = plan_for(models[key], data, args.work / key, method)
        plan = plans[key, method]
        predicted_rank = None
        found = ranked_job(name)  # a plan-choice run: (its job, its place in the ranking)
        if found is not None:
            job, index = found
            if job not in ranked:
                n = len(RANKED_JOBS[job][2])
                ranked[job] = ranked_setups(json.loads(plan.read_text()), n)
            if index >= len(ranked[job]):
                _write(args.out, {"run": name, "skipped": "the plan ranks fewer shapes", **env})
                continue
            changes, predicted_rank = ranked[job][index]
        else:
            changes = RUNS[name][3]
        if args.arch == "tiny":  # the CPU: the tiny model's own length, no Liger, no 4-bit
            changes = {k: v for k, v in changes.items() if k != "seq_len"}
            changes.update(kernels="none", fused_loss=False, method="lora")
            options = ["--kernels", "none", *[o for o in options if o == "--compile"]]
        if tree == "before" and args.before is None:
            p.error(f"--runs {name}: needs --before")
        code = args.before.resolve() if tree == "before" and args.before else None
        if code is not None:
            plan = older_plan(plan, args.work / key / "plan-before", code)
        # the five setups are timed only; the others probed after their timed steps
        timed = args.timed_ranked if found else args.timed
        steps = WARMUP_STEPS + timed + (0 if found else PROBED)
        probe_env = {"PYTHONPATH": _pythonpath(code)}
        if name in MODES:
            probe_env["ZEROPLAN_COMPILE_MODE"] = MODES[name]
        if not found:
            probe_env["ZEROPLAN_HOST_PROBE"] = str(args.work / f"probe-{name}.json")
            probe_env["ZEROPLAN_HOST_PROBE_STEPS"] = str(WARMUP_STEPS + timed + 1)
        extra = ["--force"] if args.arch == "tiny" else []
        row = launch(
            name, plan, models[key], data, args.work, steps, left, extra,
            spec=(method, options, changes), code=code, env=probe_env,
        )  # fmt: skip
        lines = metrics(args.work / f"run-{name}")
        row.update(timed_rate(lines, WARMUP_STEPS + timed))
        probe = _json(args.work / f"probe-{name}.json")
        row.update(
            tree=tree,
            compile_mode=MODES.get(name, "default") if "--compile" in options else None,
            code=str(code or ROOT),
            model=ARCHS[key],
            plan_rank_predicted_tokens_per_s=predicted_rank,
            probe={k: v for k, v in probe.items() if k != "steps"},
            step_rates=None,
        )
        _write(args.out, {**row, "arch": args.arch or ARCHS[key], **env})
        print(
            json.dumps({k: row.get(k) for k in ("run", "returncode", "tokens_per_s")}),
            f"predicted {row.get('path_predicted_tokens_per_s')}; {time.time() - t0:.0f} s",
            flush=True,
        )
        if row["returncode"]:
            print(row["stderr_tail"], flush=True)


def _job_of(name: str) -> tuple[str, str, list[str], str]:
    """(model key, method, launch options, tree) of a run: a plan-choice run's job's, else
    RUNS'."""
    found = ranked_job(name)
    if found is not None:
        key, method, _ = RANKED_JOBS[found[0]]
        return key, method, [], "after"
    key, method, options, _, tree = RUNS[name]
    return key, method, options, tree


def older_plan(plan: Path, folder: Path, before: Path) -> Path:
    """plan.json without the setup fields that the zeroplan tree ``before`` does not have
    (its plan reader refuses them; each one's default there is what that tree ran): a field
    counts as known where its TrainSetup declares it (``    name:`` in trainsetup.py)."""
    known = (before / "zeroplan" / "trainsetup.py").read_text()
    data = json.loads(plan.read_text())
    setup = data["best"]["setup"]
    for field in [f for f in setup if f"\n    {f}:" not in known]:
        del setup[field]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(data, indent=2) + "\n")
    return folder / "plan.json"


def _pythonpath(code: Path | None) -> str:
    """The probe first, then PYTHONPATH with this tree swapped for ``code`` (every process
    of a run, torchrun's ranks too, imports that tree's zeroplan)."""
    import os

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if code is not None:
        paths = [str(code) if Path(p).resolve() == ROOT else p for p in paths]
        paths = paths if str(code) in paths else [str(code), *paths]
    return os.pathsep.join([str(PROBE), *paths])


if __name__ == "__main__":
    main()
