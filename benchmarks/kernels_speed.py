"""The launched step with Liger's kernels and compiled layers, against the plain step, and
what LoRA dropout costs: one GPU call (issue 26, the first measured step).

    python benchmarks/kernels_speed.py --work /tmp/k --out $OUT/kernels_h200.jsonl \
        --runs none,liger,liger-dropout0,none-dropout0,liger-compile,qlora-none,qlora-liger \
        --deadline 270

Builds a random-weight Llama-3.1-8B with its real 128,256-token vocabulary (the small
tokenizer of tests/tinyllm.py uses its first ids; benchmarks/gpu_fixtures.py), writes
variable-length alpaca-like records (120-260 words), plans the job once with
``zeroplan plan MODEL --data records --method lora --no-quantization`` (the default plan on
this GPU), then launches that plan.json with ``zeroplan launch`` once per run:

    none            --kernels none: the step every zeroplan run took before
    liger           --kernels liger: Liger's RMSNorm, SwiGLU and RoPE (+ the plan's fused loss)
    liger-dropout0  the same with lora_dropout 0 in the plan (zeroplan's default is 0.05)
    none-dropout0   --kernels none with lora_dropout 0
    liger-compile   --kernels liger --compile: each decoder layer through torch.compile
    qlora-none / qlora-liger   the default QLoRA plan (--method qlora), plain and Liger
    auto-compile    the default launch with --compile
    qlora-auto      the default QLoRA plan's default launch
    qlora-auto-fused-loss  the same with Liger's fused linear cross-entropy
    auto-zero0      the default bf16 LoRA plan under DeepSpeed ZeRO-0 (the plan's family until
                    the fused linears' autocast path was priced as DeepSpeed bf16's)
    qlora-old / lora-old   the plans before issue 26's second step (dropout 0.05,
                    micro-batch 8, unfused loss; QLoRA on the model's own kernels)
    trl-users / trl-tuned  TRL's SFTTrainer with Liger and packing on the same model and
                    records (benchmarks/peers_speed.py, its own process)
    unsloth-notebook / unsloth-packed  Unsloth as its Llama-3.1 (8B) notebook runs it, and
                    the same packed without checkpointing (peers_speed.py; its packages
                    first on PYTHONPATH from --unsloth-site: it pins older TRL and datasets)

Issue 26's second step (kernels2_h100.jsonl):

    --runs auto,qlora-auto,auto-compile,qlora-old,trl-users --no-parity --deadline 330 \
        --run-estimate 70 --compile-extra 50

Tokens/s counts real tokens over the steps after the warm-up ones (gpu_fixtures), each step's
rate kept (the spread); the matmul share is tokens/s × speed.flops_per_token (LoRA: the
forward's and the input gradients' matmuls, ≈ 4 FLOPs per parameter, plus attention at the
cap) over the catalog's dense bf16 peak of the GPU. Peak allocated is the largest metrics
line after the first (the first covers loading).

While the 8B model is built and saved (CPU- and disk-bound), ``--parity`` trains a small
Llama (Llama-3.2-1B's shape with the small vocabulary) with LoRA to memorise 64 fixed
answers, plain and with Liger's kernels, from the same seed, and keeps both loss curves.

A run is not started when ``--deadline`` seconds since the start would pass before it could
end (``--run-estimate`` seconds each); its row says so. Budget: about 70 s for the 8B build
with the parity runs beside it, then about 75 s a launch (the first call, with a 245 s
deadline, measured ``none`` and ``liger`` and skipped the rest). One JSON line per run, with the GPU,
driver and versions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import statistics
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
from gpu_fixtures import metrics, records, steady_tokens_per_s, versions  # noqa: E402
from realdata_speed import rates, zeroplan  # noqa: E402

ARCH = "meta-llama--Llama-3.1-8B"
PARITY_ARCH = "meta-llama--Llama-3.2-1B"
RUNS: dict[str, tuple[str, list[str], dict[str, Any]]] = {
    # name: (method, launch options, changes to the plan's setup)
    "none": ("lora", ["--kernels", "none"], {}),
    # the default launch: --kernels auto follows the plan's choice (its setup's kernels)
    "auto": ("lora", [], {}),
    "liger": ("lora", ["--kernels", "liger"], {}),
    "liger-dropout0": ("lora", ["--kernels", "liger"], {"lora_dropout": 0.0}),
    "none-dropout0": ("lora", ["--kernels", "none"], {"lora_dropout": 0.0}),
    "liger-compile": ("lora", ["--kernels", "liger", "--compile"], {}),
    "qlora-none": ("qlora", ["--kernels", "none"], {}),
    "qlora-liger": ("qlora", ["--kernels", "liger"], {}),
    # issue 26's second step: the default launch (the plan's kernels, dropout 0, its
    # micro-batch), the same with compiled layers, and the defaults before it
    "auto-compile": ("lora", ["--compile"], {}),
    "qlora-auto": ("qlora", [], {}),
    # the QLoRA plan before: the model's own kernels, dropout 0.05, micro-batch 8, no fused
    # loss (what zeroplan plan chose for these records before Liger was measured on QLoRA)
    "qlora-old": (
        "qlora",
        ["--kernels", "none"],
        {"lora_dropout": 0.05, "micro_batch": 8, "fused_loss": False, "kernels": "none"},
    ),
    # the bf16 LoRA plan before: Liger, dropout 0.05, micro-batch 8, no fused loss
    "lora-old": ("lora", [], {"lora_dropout": 0.05, "micro_batch": 8, "fused_loss": False}),
    # the default plans on PEFT's LoRA layers instead of the fused linears (issue 26's third
    # step: what the fused linears alone change, same plan otherwise)
    "auto-peft": ("lora", [], {"fused_lora": False}),
    "qlora-auto-peft": ("qlora", [], {"fused_lora": False}),
    # the default QLoRA plan with Liger's fused linear cross-entropy in place of the full
    # logits' float32 log-softmax (the plan leaves it off: predicted 2% faster on the 8B
    # records, inside the planner's 3% tie, which the simpler setup wins; one H100 ran it
    # 1.014x, 17 GB lighter: kernels9_h100.jsonl)
    "qlora-auto-fused-loss": ("qlora", [], {"fused_loss": True}),
    # the bf16 LoRA plan under DeepSpeed ZeRO-0, what the plan chose for one GPU until the
    # fused linears' autocast path was priced as the bf16 one (the plan now runs it without
    # DeepSpeed: fp32 adapters under autocast, torch's fused AdamW)
    "auto-zero0": ("lora", [], {"zero": 0, "autocast": False}),
}
# peers (benchmarks/peers_speed.py), each in its own process on the same model and records
PEERS = ("trl-users", "trl-tuned", "unsloth-notebook", "unsloth-packed", "unsloth-packed-bf16")


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"versions": {**versions(), **_more_versions()}}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        env["gpu"] = name.decode() if isinstance(name, bytes) else name
        env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception as exc:  # a benchmark row records what it could not read
        env["gpu"] = env["driver"] = f"unknown ({exc})"
    return env


def _more_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("triton", "flash-attn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def matmul_share(tokens_per_s: float | None, plan: dict[str, Any], model: Path) -> dict[str, Any]:
    """tokens/s × FLOPs per token (speed.flops_per_token) over the GPU's dense bf16 peak."""
    from zeroplan.hardware import parse_cluster
    from zeroplan.models import load_model
    from zeroplan.speed import flops_per_token
    from zeroplan.trainsetup import TrainSetup, parse_targets

    raw = dict(plan["best"]["setup"])
    if isinstance(raw.get("lora_targets"), list):
        raw["lora_targets"] = tuple(raw["lora_targets"])
    elif isinstance(raw.get("lora_targets"), str):
        raw["lora_targets"] = parse_targets(raw["lora_targets"])
    setup = TrainSetup(**raw)
    flops = flops_per_token(load_model(str(model / "config.json")), setup)
    gpu = parse_cluster(plan["cluster"]).gpu
    share = tokens_per_s * flops / (gpu.bf16_tflops * 1e12) if tokens_per_s else None
    return {
        "flops_per_token": flops,
        "peak_bf16_tflops": gpu.bf16_tflops,
        "catalog_gpu": gpu.name,
        "matmul_tflops": tokens_per_s * flops / 1e12 if tokens_per_s else None,
        "peak_share": share,
    }


def path_prediction(
    plan: dict[str, Any], changes: dict[str, Any], applied: dict[str, Any], model: Path
) -> dict[str, Any]:
    """The estimate for the path the run took: the plan's setup with the run's changes and
    ``kernels`` as applied.json says it ran (liger when any Liger kernel ran; ``compile``
    where the layers were compiled), at the packed rows' fill; the plan's own prediction is
    for the path it chose."""
    import dataclasses

    from zeroplan.api import estimate
    from zeroplan.hardware import parse_cluster
    from zeroplan.models import load_model
    from zeroplan.trainsetup import TrainSetup, parse_targets

    raw = {**plan["best"]["setup"], **changes}
    if isinstance(raw.get("lora_targets"), list):
        raw["lora_targets"] = tuple(raw["lora_targets"])
    elif isinstance(raw.get("lora_targets"), str):
        raw["lora_targets"] = parse_targets(raw["lora_targets"])
    path = applied.get("kernels") or {}
    ran, compiled = path.get("liger"), path.get("compile", "off") != "off"
    setup = dataclasses.replace(
        TrainSetup(**raw), kernels="liger" if ran else "none", compile=compiled
    )
    fill = (applied.get("batching") or {}).get("fill") or 1.0
    spec = load_model(str(model / "config.json"))
    est = estimate(spec, parse_cluster(plan["cluster"]), setup, fill=fill)
    return {
        "path_kernels": setup.kernels,
        "path_predicted_tokens_per_s": est.speed.tokens_per_s if est.speed else None,
        "path_predicted_peak_allocated_bytes": est.peak_allocated_bytes,
    }


def plan_for(model: Path, data: Path, work: Path, method: str) -> Path:
    out = work / f"plan-{method}"
    args = ["plan", str(model), "--data", str(data), "--method", method, "-o", str(out)]
    if method == "lora":
        args.append("--no-quantization")
    done = zeroplan(*args)
    print(done.stdout[-2500:], done.stderr[-1500:], flush=True)
    done.check_returncode()
    return out / "plan.json"


def variant_plan(plan: Path, name: str, changes: dict[str, Any]) -> Path:
    if not changes:
        return plan
    data = json.loads(plan.read_text())
    data["best"]["setup"].update(changes)
    path = plan.parent.parent / f"plan-{name}" / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def launch(
    name: str,
    plan: Path,
    model: Path,
    data: Path,
    work: Path,
    steps: int,
    timeout: float,
    extra: list[str],
    spec: tuple[str, list[str], dict[str, Any]] | None = None,
    code: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One ``zeroplan launch`` of the plan with the run's changes (``spec``: RUNS[name]
    unless given), from the zeroplan tree ``code`` (this one by default), with ``env``."""
    method, options, changes = spec or RUNS[name]
    run = work / f"run-{name}"
    # a folder left by an earlier run of this name (another variant in the same --work) would
    # be refused by the launch and its metrics read as this run's
    shutil.rmtree(run, ignore_errors=True)
    start = time.time()
    try:
        done = zeroplan(
            "launch", str(variant_plan(plan, name, changes)), "--data", str(data), "-o", str(run),
            "--model", str(model), "--max-steps", str(steps), "--logging-steps", "1",
            "--save-steps", "100000", "--no-dashboard", *options, *extra, timeout=timeout,
            code=code, env=env,
        )  # fmt: skip
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
    lines = metrics(run)
    applied = _json(run / "applied.json")
    result = _json(run / "result.json")
    step_rates = rates(lines)
    peaks = [m.get("peak_allocated_bytes") or 0 for m in lines]
    best = json.loads(plan.read_text())["best"]
    tokens = steady_tokens_per_s(lines)
    return {
        "run": name,
        "method": method,
        "options": options,
        "setup_changes": changes,
        "returncode": code,
        "wall_s": round(time.time() - start, 1),
        "setup": {**best["setup"], **changes},
        "kernels": applied.get("kernels"),
        "batching": applied.get("batching"),
        "compile": result.get("compile"),
        "dequantization": result.get("dequantization"),  # launch/dequant.py's path
        "tokens_per_s": tokens,
        "step_rates": [round(r) for r in step_rates],
        "step_rate_median": statistics.median(step_rates) if step_rates else None,
        "step_rate_min": min(step_rates) if step_rates else None,
        "step_rate_max": max(step_rates) if step_rates else None,
        "timed_steps": len(step_rates),
        "step_seconds": _step_seconds(lines),
        "predicted_tokens_per_s": best["tokens_per_s"],
        "predicted_peak_allocated_bytes": best["peak_allocated_bytes"],
        **path_prediction(json.loads(plan.read_text()), changes, applied, model),
        "measured_peak_after_first_line": max(peaks[1:]) if len(peaks) > 1 else None,
        # with CUDA graphs the first step's capture holds the peak; replays allocate nothing
        "measured_peak": max(peaks) if peaks else None,
        "cuda_graphs": result.get("cuda_graphs"),
        "memory_after_load": applied.get("gpu_memory_after_load"),
        "losses": [m["loss"] for m in lines if m["event"] == "train" and m.get("loss") is not None],
        **matmul_share(tokens, json.loads(plan.read_text()), model),
        "stderr_tail": err[-1200:],
    }


def _step_seconds(lines: list[dict[str, Any]]) -> list[float]:
    """Wall seconds between consecutive train lines (every step logs): the first ones hold
    the warm-up, and under --compile the compile."""
    train = [m for m in lines if m["event"] == "train" and m["rank"] == 0]
    return [round(b["t"] - a["t"], 3) for a, b in itertools.pairwise(train)]


def _json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


# --------------------------------------------------------------------------- loss parity


def parity_records(n: int = 64, seed: int = 3) -> list[dict[str, str]]:
    """64 questions, each with its own fixed answer of 12-24 words: learnable by heart."""
    rng = random.Random(seed)
    pool = " ".join(tinyllm.CORPUS).split()
    return [
        {
            "instruction": f"Recite answer number {i}.",
            "input": "",
            "output": " ".join(rng.choice(pool) for _ in range(rng.randint(12, 24))),
        }
        for i in range(n)
    ]


def parity(work: Path, steps: int, arch: str) -> list[subprocess.Popen[str]]:
    """Start the small-model build and both parity runs, one after the other, in the
    background (one shell): returns the process to wait for."""
    folder = work / "parity"
    folder.mkdir(parents=True, exist_ok=True)
    data = tinyllm.write_jsonl(folder / "memorise.jsonl", parity_records())
    model = folder / "model"
    script = f"""
import json, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}, {str(ROOT / "benchmarks")!r}]
from pathlib import Path
import tinyllm, torch
from gpu_fixtures import build_model, write_plan
from zeroplan.trainsetup import TrainSetup
if {arch!r} == "tiny":
    tinyllm.build_model_dir(Path({str(model)!r}))
else:
    build_model(Path({str(model)!r}), {arch!r})
setup = TrainSetup(method="lora", seq_len=128, micro_batch=8, lora_r=16, lora_dropout=0.0)
gpus = None if torch.cuda.is_available() else 1
write_plan(Path({str(folder / "plan.json")!r}), Path({str(model)!r}), setup, gpus)
"""
    runs = []
    for kernels in ("none", "liger"):
        out = folder / f"run-{kernels}"
        runs.append(
            f"{sys.executable} -m zeroplan.launch.sft --plan {folder / 'plan.json'} "
            f"--data {data} --out {out} --model {model} --max-steps {steps} --logging-steps 1 --lr 1e-3 "
            f"--save-steps 100000 --kernels {kernels} --seed 7"
        )
    (folder / "build.py").write_text(script)
    cmd = f"{sys.executable} {folder / 'build.py'} && " + " && ".join(runs)
    log = (folder / "log.txt").open("w")
    return [
        subprocess.Popen(
            cmd, shell=True, cwd=ROOT, stdout=log, stderr=log, text=True, start_new_session=True
        )
    ]


def parity_row(work: Path) -> dict[str, Any]:
    folder = work / "parity"
    curves = {}
    for kernels in ("none", "liger"):
        lines = metrics(folder / f"run-{kernels}")
        curves[kernels] = [
            m["loss"] for m in lines if m["event"] == "train" and m.get("loss") is not None
        ]
    a, b = curves["none"], curves["liger"]
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)]
    log = (folder / "log.txt").read_text()[-1500:] if (folder / "log.txt").exists() else ""
    applied = _json(folder / "run-liger" / "applied.json")
    return {
        "run": "parity",
        "arch": PARITY_ARCH + " (small vocabulary)",
        "task": "LoRA r=16 memorising 64 fixed answers, lr 1e-3, 8 × 128 tokens a step",
        "losses_none": a,
        "losses_liger": b,
        "liger_kernels": applied.get("kernels"),
        "max_abs_diff": max(diffs) if diffs else None,
        "mean_abs_diff": statistics.mean(diffs) if diffs else None,
        "max_rel_diff": max(d / max(abs(x), 1e-9) for d, x in zip(diffs, a, strict=False))
        if diffs
        else None,
        "first": [a[0], b[0]] if n else None,
        "last": [a[n - 1], b[n - 1]] if n else None,
        "log_tail": log,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", default="none,liger,liger-dropout0,liger-compile")
    p.add_argument("--steps", type=int, default=13, help="3 warm-up + timed steps")
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--parity-steps", type=int, default=40)
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--deadline", type=float, default=270.0, help="seconds for everything")
    # measured on one H100: 61-75 s a launch of the 8B (start-up and loading 16 GB included)
    p.add_argument("--run-estimate", type=float, default=75.0, help="seconds a run takes")
    p.add_argument("--compile-extra", type=float, default=60.0, help="more for --compile")
    p.add_argument(
        "--unsloth-site", default="", help="PYTHONPATH entries an Unsloth run puts first"
    )
    # one H100 for the 8B, not yet measured: Unsloth's import, 4-bit load and kernel compile
    p.add_argument("--unsloth-extra", type=float, default=45.0, help="more for an Unsloth run")
    p.add_argument("--peer-timeout", type=float, default=300.0, help="seconds at most a peer")
    p.add_argument("--arch", default=ARCH, help="catalog file name, or tiny (a CPU rehearsal)")
    p.add_argument("--parity-arch", default=PARITY_ARCH)
    args = p.parse_args()
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()

    background = [] if args.no_parity else parity(args.work, args.parity_steps, args.parity_arch)
    model = args.work / "model"
    if not (model / "config.json").exists():
        from gpu_fixtures import build_model

        if args.arch == "tiny":
            tinyllm.build_model_dir(model)
        else:
            build_model(model, args.arch, full_vocab=True)
    print(f"8B model ready at {time.time() - t0:.0f} s", flush=True)
    data = tinyllm.write_jsonl(args.work / "alpaca.jsonl", records(args.records))
    for proc in background:  # parity used the GPU while the 8B saved; not while timing
        try:
            proc.wait(timeout=max(1.0, args.deadline - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the shell and its children
            proc.wait()
    if background:
        _write(args.out, {**parity_row(args.work), **env})
        print(f"parity done at {time.time() - t0:.0f} s", flush=True)

    plans: dict[str, Path] = {}
    for name in args.runs.split(","):
        if name in PEERS:
            left = args.deadline - (time.time() - t0)
            extra_s = args.unsloth_extra if name.startswith("unsloth") else 0.0
            if left < args.run_estimate + extra_s + 15:
                _write(args.out, {"run": name, "skipped": f"{left:.0f} s left", **env})
                continue
            peer(name, model, data, args, left)
            print(f"{name} done at {time.time() - t0:.0f} s", flush=True)
            continue
        method = RUNS[name][0]
        need = args.run_estimate + (args.compile_extra if "--compile" in RUNS[name][1] else 0)
        left = args.deadline - (time.time() - t0)
        if left < need:
            _write(
                args.out, {"run": name, "skipped": f"{left:.0f} s left, needs ~{need:.0f}", **env}
            )
            continue
        if method not in plans:
            plans[method] = plan_for(model, data, args.work, method)
        extra = ["--force"] if args.arch == "tiny" else []
        row = launch(name, plans[method], model, data, args.work, args.steps, left, extra)
        _write(args.out, {**row, "arch": args.arch, "full_vocab": args.arch != "tiny", **env})
        print(
            json.dumps(
                {k: row.get(k) for k in ("run", "returncode", "tokens_per_s", "peak_share")}
            ),
            f"peak {row['measured_peak']}; {time.time() - t0:.0f} s",
            flush=True,
        )
        if row["returncode"]:
            print(row["stderr_tail"], flush=True)


def peer(name: str, model: Path, data: Path, args: Any, left: float) -> None:
    """A peer trainer's run (benchmarks/peers_speed.py) in its own process; its row gets the
    GPU, driver and versions here, or says why it has no speed."""
    tmp = args.work / f"{name}.jsonl"
    tmp.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers_speed.py"), "--model", str(model),
           "--data", str(data), "--run", name, "--out", str(tmp), "--work", str(args.work),
           "--steps", str(args.steps)]  # fmt: skip
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=min(left, args.peer_timeout),
            cwd=ROOT,
            env=peer_env(name, dict(os.environ), args.unsloth_site),
        )
        code: Any = done.returncode
        tail = (done.stdout + done.stderr)[-2500:]
    except subprocess.TimeoutExpired as exc:
        code, tail = "timeout", str(exc.stderr or "")[-2500:]
    row = _json_line(tmp) or {"run": name, "tokens_per_s": None}
    env = environment()
    # the peer's own process knows its stack (Unsloth's pins differ from the launches')
    env["versions"] = {**env["versions"], **row.get("versions", {})}
    _write(args.out, {**row, "returncode": code, "log_tail": tail, "arch": args.arch, **env})
    print(tail[-1500:], flush=True)


def peer_env(name: str, base: dict[str, str], unsloth_site: str) -> dict[str, str]:
    """A peer's environment: an Unsloth run gets ``unsloth_site`` before the launches'
    packages on PYTHONPATH (its TRL and datasets pins are older) and the Hub offline (no
    network on the GPU machine; Unsloth then skips its statistics call)."""
    env = dict(base)
    if name.startswith("unsloth"):
        paths = [p for p in (unsloth_site, env.get("PYTHONPATH", "")) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _json_line(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}
    return out if isinstance(out, dict) else {}


def _write(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
