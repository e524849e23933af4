"""LLaMA-Factory, axolotl and TRL running their own recipes on one GPU, next to zeroplan's
estimate of the same setup.

    python benchmarks/recipe_trainers.py --work /tmp/rt --out $OUT/recipes.jsonl \
        --runs trl-lora,trl-qlora,lf-lora,lf-qlora,ax-lora,ax-qlora \
        --site trl=/tmp/site-trl --site lf=/tmp/site-lf --site ax=/tmp/site-ax

Each run is a recipe of examples/recipes/gpu/ (written as ``zeroplan plan --emit`` writes
one) started through its trainer's own console entry point (``trl sft --config``,
``llamafactory-cli train``, ``axolotl train``) in a fresh process, as its users start it. The
only things changed in the copy that runs are paths: the model (a random-weight model of the
recipe's catalog architecture with its real vocabulary, a small tokenizer built in code: no
network there), the data and the output folder. benchmarks/recipe_probe/sitecustomize.py,
first on PYTHONPATH, adds a callback to the trainer that times every optimizer step, counts
its tokens (padded, real, in the loss), reads the CUDA allocator's peaks and, at the end,
what the loop did (collator, optimizer, autocast, checkpointing, parameter dtypes).

The data are alpaca-like records of 40-340 words (about 100-950 tokens, under every recipe's
1024 cap, so no trainer truncates or drops any), written in each trainer's format. Each row
then holds zeroplan's estimate twice: of the recipe as written (sequence length = its cap)
and of the shape that set the peak (the longest padded micro-batch the trainer built), with
the flag line of each; tokens/s after the first 3 steps, padded and real.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402
from gpu_fixtures import WARMUP_STEPS, build_model, records  # noqa: E402

RECIPES = ROOT / "examples" / "recipes" / "gpu"
PROBE = ROOT / "benchmarks" / "recipe_probe"
# trainer: (recipe file prefix, console entry point (module, function), argv before the file,
#           distribution whose version the row records)
TRAINERS: dict[str, tuple[str, tuple[str, str], list[str], str]] = {
    "trl": ("trl", ("trl.cli.main", "main"), ["sft", "--config"], "trl"),
    "lf": ("llamafactory", ("llamafactory.cli", "main"), ["train"], "llamafactory"),
    "ax": ("axolotl", ("axolotl.cli.main", "main"), ["train"], "axolotl"),
}
RECORD_WORDS = (40, 340)
# run-name suffixes: the same recipe with one environment variable set, to test a mechanism
VARIANTS = {
    # transformers' SDPA path on CUDA repeats k and v to every head when the batch has an
    # attention mask; this makes it pass enable_gqa=True instead (no repeated copies)
    "gqa": {"TRANSFORMERS_SDPA_FORCE_GQA": "1"},
    # the caching allocator maps growing segments instead of a block per size: what a
    # padded loop's ever-changing shapes reserve
    "expseg": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
}
# the micro-batch key of each trainer's recipe (variants mbN set it to N)
MICRO_BATCH_KEY = {
    "trl": "per_device_train_batch_size",
    "lf": "per_device_train_batch_size",
    "ax": "micro_batch_size",
}
# steps of an mbN run: enough for shapes to repeat (the steady step) after the new ones
MB_VARIANT_STEPS = 24
# run-name suffixes that change the recipe itself: axolotl's Triton LoRA kernels (on by
# default for LoRA on one GPU) off, to tell their saved activations from the rest of its peak
RECIPE_VARIANTS: dict[str, dict[str, Any]] = {
    "nokern": {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False},
}
# --tiny (a CPU dry run): what each recipe must change to run without a GPU
CPU_KEYS: dict[str, dict[str, Any]] = {
    "trl": {"bf16": False, "use_cpu": True, "optim": "adamw_torch"},
    # the 320-token test tokenizer gains the template's <|eot_id|>: room for it
    "lf": {"bf16": False, "use_cpu": True, "optim": "adamw_torch", "resize_vocab": True},
    # axolotl turns its Triton LoRA kernels on by default; they run on CUDA only
    "ax": {
        "bf16": False,
        "optimizer": "adamw_torch",
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
    },
}
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "llamafactory",
    "axolotl",
)


def write_data(work: Path, n: int) -> dict[str, Path]:
    """The same records in each trainer's format: alpaca JSONL (axolotl ``type: alpaca``),
    a LLaMA-Factory dataset folder with its dataset_info.json, and a TRL dataset folder of
    chat messages (``load_dataset(folder)``)."""
    recs = records(n, *RECORD_WORDS)
    data = work / "data"
    (data / "alpaca_messages").mkdir(parents=True, exist_ok=True)
    alpaca = data / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in recs))
    info = {"alpaca_synth": {"file_name": "alpaca.jsonl"}}  # alpaca columns are LF's default
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    msgs = [
        {
            "messages": [
                {"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in recs
    ]
    (data / "alpaca_messages" / "train.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in msgs)
    )
    return {"dir": data, "alpaca": alpaca, "messages": data / "alpaca_messages"}


def variants(run: str) -> list[str]:
    """The run's suffixes: ``ax-lora+mb8+expseg`` -> ["mb8", "expseg"]."""
    return run.split("+")[1:]


def recipe_edits(run: str) -> dict[str, Any]:
    """What the run's variants change in the recipe: RECIPE_VARIANTS, and mbN (micro-batch
    N, MB_VARIANT_STEPS steps)."""
    trainer = run.split("-", 1)[0]
    out: dict[str, Any] = {}
    for v in variants(run):
        out.update(RECIPE_VARIANTS.get(v, {}))
        if re.fullmatch(r"mb\d+", v):
            out[MICRO_BATCH_KEY[trainer]] = int(v[2:])
            out["max_steps"] = MB_VARIANT_STEPS
    return out


def variant_env(run: str) -> dict[str, str]:
    return {k: val for v in variants(run) for k, val in VARIANTS.get(v, {}).items()}


def recipe_path(run: str) -> Path:
    trainer, method = run.split("+", 1)[0].split("-", 1)
    prefix = TRAINERS[trainer][0]
    for ext in ("yaml", "yml"):
        p = RECIPES / f"{prefix}_{method}.{ext}"
        if p.exists():
            return p
    raise SystemExit(f"no recipe for {run} in {RECIPES}")


def localize(run: str, recipe: dict[str, Any], model: Path, data: dict[str, Path], out: Path):
    """The recipe with only its paths pointed at this machine's model, data and output."""
    trainer = run.split("-", 1)[0]
    r = dict(recipe)
    if trainer == "trl":
        r.update(model_name_or_path=str(model), dataset_name=str(data["messages"]))
    elif trainer == "lf":
        r.update(model_name_or_path=str(model), dataset_dir=str(data["dir"]))
    else:
        r.update(base_model=str(model), dataset_prepared_path=str(out / "prepared"))
        r["datasets"] = [{**d, "path": str(data["alpaca"])} for d in r["datasets"]]
    r["output_dir"] = str(out / "output")
    return r


def catalog_id(arch: str) -> str:
    return arch.replace("--", "/", 1)


def gpu_spec() -> tuple[str, dict[str, Any]]:
    """``1xH100`` / ``1xH200`` for zeroplan, and the GPU, driver and CUDA of this machine."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    driver = None
    with contextlib.suppress(OSError):  # no nvidia-smi: a CPU dry run
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    spec = "1xH200" if "H200" in name else "1xH100"
    return spec, {"gpu": name, "driver": driver, "cuda": torch.version.cuda}


def versions(env: dict[str, str]) -> dict[str, str | None]:
    """The packages' versions as the trainer's process sees them (its PYTHONPATH)."""
    code = (
        "import importlib.metadata as m, json\n"
        f"out = {{}}\nfor p in {PACKAGES!r}:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))"
    )
    env = {k: v for k, v in env.items() if k != "RECIPE_PROBE_OUT"}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    try:
        return dict(json.loads(res.stdout.strip().splitlines()[-1]))
    except (json.JSONDecodeError, IndexError):
        return {"error": res.stderr[-500:]}  # type: ignore[dict-item]


def setup_of(run: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe's setup in zeroplan's terms, read by hand for these six recipes (the
    --recipe reader is another branch's): method, micro-batch, cap, rank, targets, ckpt."""
    trainer, method = run.split("+", 1)[0].split("-", 1)
    if trainer == "trl":
        return {
            "method": method,
            "micro_batch": recipe["per_device_train_batch_size"],
            "grad_accum": recipe["gradient_accumulation_steps"],
            "seq_len": recipe["max_length"],
            "lora_r": recipe["lora_r"],
            "lora_dropout": recipe["lora_dropout"],
            "grad_ckpt": recipe["gradient_checkpointing"],
            "optim": recipe["optim"],
        }
    if trainer == "lf":
        return {
            "method": method,
            "micro_batch": recipe["per_device_train_batch_size"],
            "grad_accum": recipe["gradient_accumulation_steps"],
            "seq_len": recipe["cutoff_len"],
            "lora_r": recipe["lora_rank"],
            "lora_dropout": recipe["lora_dropout"],
            "grad_ckpt": not recipe.get("disable_gradient_checkpointing", False),
            "optim": recipe["optim"],
        }
    return {
        "method": method,
        "micro_batch": recipe["micro_batch_size"],
        "grad_accum": recipe["gradient_accumulation_steps"],
        "seq_len": recipe["sequence_len"],
        "lora_r": recipe["lora_r"],
        "lora_dropout": recipe["lora_dropout"],
        "grad_ckpt": bool(recipe.get("gradient_checkpointing", False)),
        "optim": recipe["optimizer"],
    }


# What each trainer's loop adds to the estimate of its recipe, as these runs measured it
# (benchmarks/results/recipes_gpu.md; zeroplan.recipes sets the same from a recipe): every
# one pads its batches (no packing in these recipes); TRL's SFTTrainer scores the LM head
# in chunks and keeps QLoRA adapters in bf16; axolotl runs its fused LoRA kernels (unless
# the run turns them off: nokern).
LOOP_FLAGS = {
    "trl": ["--padding-mask", "--chunked-lm-head"],
    "lf": ["--padding-mask"],
    "ax": ["--padding-mask", "--lora-kernels"],
}
QLORA_LOOP_FLAGS = {"trl": ["--lora-bf16"]}


def run_estimate(flags: list[str], env: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """``zeroplan estimate FLAGS --json`` of this tree in its own process: the flag line and
    the parsed answer, or ``{"error": the stderr's tail}``."""
    res = subprocess.run(
        [sys.executable, "-m", "zeroplan", "estimate", *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    line = "zeroplan estimate " + " ".join(flags)
    if res.returncode != 0:
        return line, {"error": res.stderr.strip()[-500:]}
    answer: dict[str, Any] = json.loads(res.stdout)
    return line, answer


def estimate(
    arch: str, gpus: str, setup: dict[str, Any], seq_len: int, extra: list[str] | None = None
) -> dict[str, Any]:
    """``zeroplan estimate`` of the setup at ``seq_len`` (plus ``extra`` flags): its flag
    line and the numbers the comparison reads."""
    flags = [
        catalog_id(arch),
        "--gpus",
        gpus,
        "--method",
        setup["method"],
        "--micro-batch",
        str(setup["micro_batch"]),
        "--grad-accum",
        str(setup["grad_accum"]),
        "--seq-len",
        str(seq_len),
        "--lora-r",
        str(setup["lora_r"]),
        "--lora-targets",
        "all-linear",
        "--lora-dropout",
        str(setup["lora_dropout"]),
        "--optim",
        setup["optim"],
        "--attn",
        "sdpa",
        "--grad-ckpt" if setup["grad_ckpt"] else "--no-grad-ckpt",
        *(extra or []),
        "--json",
    ]
    line, est = run_estimate(flags)
    if "error" in est:
        return {"flags": line, **est}
    pg = est["per_gpu"]
    return {
        "flags": line,
        "peak_allocated_bytes": pg["peak_allocated_bytes"],
        "peak_reserved_bytes": pg["peak_reserved_bytes"],
        "terms": {k: v for k, v in pg.items() if k.endswith("_bytes") and "peak" not in k},
        "peak_phase": pg.get("peak_phase"),
        "tokens_per_s": est.get("speed", {}).get("tokens_per_s"),
    }


def summarize(probe: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s after the warm-up steps (padded and real), the step times, the longest
    padded micro-batch and the step where the peak was reached."""
    steps = probe["steps"]
    steady = [s for s in steps if s["step"] > WARMUP_STEPS]
    secs = sum(s["seconds"] for s in steady)
    longest = max((sh[1] for s in steps for sh in s["shapes"] if sh), default=0)
    peak_step = max(steps, key=lambda s: s["peak_allocated"])["step"] if steps else None
    rising = [
        (s["step"], max(sh[1] for sh in s["shapes"] if sh))
        for i, s in enumerate(steps)
        if s["shapes"] and (i == 0 or s["peak_allocated"] > steps[i - 1]["peak_allocated"])
    ]
    rates = sorted(s["padded"] / s["seconds"] for s in steady)
    return {
        # the largest peak any step reached: axolotl resets the allocator's peak at every
        # log line, so the peak at the end of training is only the last step's
        "peak_allocated": max(
            [s["peak_allocated"] for s in steps] + [probe.get("peak_allocated_train", 0)]
        ),
        "peak_reserved": max(
            [s["peak_reserved"] for s in steps] + [probe.get("peak_reserved_train", 0)]
        ),
        # steps that changed shape ran first-time kernels (Triton autotuning, TRL's LM
        # head): the median step is the steady one
        "tokens_per_s_padded_median": rates[len(rates) // 2] if rates else None,
        "steps": len(steps),
        "timed_steps": len(steady),
        "step_seconds": [round(s["seconds"], 4) for s in steps],
        "tokens_per_s_padded": sum(s["padded"] for s in steady) / secs if secs else None,
        "tokens_per_s_real": sum(s["real"] for s in steady) / secs if secs else None,
        "padding_fraction": (
            1 - sum(s["real"] for s in steps) / max(1, sum(s["padded"] for s in steps))
        ),
        "longest_padded_len": longest,
        "peak_step": peak_step,
        # (step, its longest row) at each step that raised the peak: which shape set it
        "peak_raised_at": rising,
    }


def run_one(
    run: str, args: argparse.Namespace, model: Path, data: dict[str, Path], env0: dict[str, str]
) -> dict[str, Any]:
    import yaml

    trainer = run.split("-", 1)[0]
    _prefix, (mod, fn), pre, _dist = TRAINERS[trainer]
    src = recipe_path(run)
    recipe = yaml.safe_load(src.read_text())
    out = args.work / "runs" / run
    out.mkdir(parents=True, exist_ok=True)
    local = localize(run, recipe, model, data, out)
    local.update(recipe_edits(run))
    if args.tiny:
        local.update(CPU_KEYS[trainer])
    cfg = out / src.name
    cfg.write_text(yaml.safe_dump(local, sort_keys=False))
    probe_out = out / "probe.json"
    probe_out.unlink(missing_ok=True)
    site = args.site.get(trainer, "")
    env = {
        **env0,
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROBE), site, env0.get("PYTHONPATH")) if p),
        "RECIPE_PROBE_OUT": str(probe_out),
        **variant_env(run),
    }
    vers = versions(env)
    cmd = [sys.executable, "-c", f"import sys; from {mod} import {fn}; sys.exit({fn}())"]
    cmd += [*pre, str(cfg)]
    t0 = time.time()
    try:
        res = subprocess.run(
            cmd, cwd=out, env=env, capture_output=True, text=True, timeout=args.timeout
        )
        rc, tail = res.returncode, (res.stdout + res.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = 124, (str(e.stdout or "") + str(e.stderr or ""))[-6000:]
    (out / "log.txt").write_text(tail)
    row: dict[str, Any] = {
        "run": run,
        "trainer": trainer,
        "recipe": str(src.relative_to(ROOT)),
        "command": " ".join([*pre, src.name]),
        "rc": rc,
        "wall_s": round(time.time() - t0, 1),
        "versions": vers,
        "env": {
            k: env[k]
            for k in ("DISABLE_VERSION_CHECK", *(k for v in VARIANTS.values() for k in v))
            if k in env
        },
    }
    if not probe_out.exists():
        row["error"] = tail[-3000:]
        oom = re.search(r"OutOfMemoryError|CUDA out of memory", tail)
        row["oom"] = bool(oom)
        return row
    probe = json.loads(probe_out.read_text())
    row["measured"] = {
        k: probe[k]
        for k in (
            "peak_allocated_train",
            "peak_reserved_train",
            "peak_allocated_before_train",
            "allocated_at_train_begin",
            "allocated_at_train_end",
        )
    }
    row["did"] = {
        k: probe.get(k)
        for k in (
            "trainer_class",
            "model_class",
            "mixed_precision",
            "collator",
            "optimizer",
            "checkpointing",
            "params",
            "args",
        )
    }
    row["per_step"] = probe["steps"]
    row["setup"] = setup_of(run, {**recipe, **recipe_edits(run)})
    row["records"] = args.records
    row["estimate_recipe_data"] = estimate_recipe_data(cfg, data_file(run, data), args.gpus)
    return score(row, args.arch, args.gpus)


def data_file(run: str, data: dict[str, Path]) -> Path:
    """The file of the records the run's trainer read: TRL's chat messages, else alpaca."""
    return data["messages"] / "train.jsonl" if run.startswith("trl") else data["alpaca"]


def rebuild_run(row: dict[str, Any], work: Path, n_records: int) -> tuple[Path, Path]:
    """A measured run's recipe and data rebuilt on this machine, without a GPU: the model
    folder is the catalog architecture's config.json (all ``estimate --recipe`` reads) and
    the run's small tokenizer, the records are the same generated ones, the recipe the same
    file with the same paths and variant edits. Returns (recipe, data file)."""
    import yaml

    run = row["run"]
    model = work / f"model-{row['arch']}"
    if not (model / "config.json").exists():
        model.mkdir(parents=True, exist_ok=True)
        tinyllm.build_tokenizer().save_pretrained(model)
        catalog = ROOT / "zeroplan/catalog/models" / f"{row['arch']}.json"
        (model / "config.json").write_text(catalog.read_text())
    data = write_data(work / f"data-{n_records}", n_records)
    src = recipe_path(run)
    out = work / "runs" / run
    out.mkdir(parents=True, exist_ok=True)
    local = localize(run, yaml.safe_load(src.read_text()), model, data, out)
    local.update(recipe_edits(run))
    cfg = out / src.name
    cfg.write_text(yaml.safe_dump(local, sort_keys=False))
    return cfg, data_file(run, data)


def estimate_recipe_data(recipe: Path, data: Path, gpus: str) -> dict[str, Any]:
    """``zeroplan estimate --recipe`` of the recipe that ran, with ``--data`` of its records
    (written and cut as the recipe's trainer does: zeroplan.prompts): the padded loop's
    real tokens/s."""
    flags = ["--recipe", str(recipe), "--data", str(data), "--gpus", gpus, "--json"]
    # lengths cached beside the run's data: a rescore never reads another's
    env = {"HF_HUB_OFFLINE": "1", "ZEROPLAN_CACHE": str(data.parent / "zeroplan-cache")}
    line, est = run_estimate(flags, env)
    if "error" in est:
        return {"flags": line, **est}
    return {
        "flags": line,
        "peak_allocated_bytes": est["per_gpu"]["peak_allocated_bytes"],
        "speed": est.get("speed"),
        "data": {k: v for k, v in est.get("data", {}).items() if k != "histogram"},
    }


def score(row: dict[str, Any], arch: str, gpus: str) -> dict[str, Any]:
    """The row's summary and its three estimates: the recipe as written (its cap), the shape
    that set the peak (the longest padded micro-batch), and that shape with the trainer's
    loop terms (LOOP_FLAGS); measured peak / estimate - 1 for the last two."""
    row.update(summarize({"steps": row["per_step"], **row["measured"]}))
    setup = row["setup"]
    row["estimate_recipe"] = estimate(arch, gpus, setup, setup["seq_len"])
    shape = {**setup, "grad_ckpt": row["did"]["checkpointing"]["enabled"]}
    longest = row["longest_padded_len"]
    row["estimate_shape"] = estimate(arch, gpus, shape, longest)
    padded = any(s["real"] < s["padded"] for s in row["per_step"])
    extra = [f for f in LOOP_FLAGS[row["trainer"]] if padded or f != "--padding-mask"]
    if "nokern" in variants(row["run"]):
        extra.remove("--lora-kernels")
    if setup["method"] == "qlora":
        extra += QLORA_LOOP_FLAGS.get(row["trainer"], [])
    row["estimate_loop"] = estimate(arch, gpus, shape, longest, extra)
    for key in ("shape", "loop"):
        est = row[f"estimate_{key}"].get("peak_allocated_bytes")
        if est:
            row[f"peak_allocated_over_estimate_{key}"] = row["peak_allocated"] / est - 1
        tps = row[f"estimate_{key}"].get("tokens_per_s")
        if tps and row.get("tokens_per_s_padded_median"):
            row[f"tokens_per_s_median_over_estimate_{key}"] = (
                row["tokens_per_s_padded_median"] / tps - 1
            )
    row.pop("peak_allocated_over_estimate", None)  # the first runs' name for the shape's
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="scratch folder (model, data, runs)")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file: one row per run")
    ap.add_argument(
        "--runs",
        default="trl-lora,trl-qlora,lf-lora,lf-qlora,ax-lora,ax-qlora",
        help="comma list of TRAINER-METHOD[+VARIANT...] (trainers: trl, lf, ax; methods: lora, "
        "qlora; variants: gqa: TRANSFORMERS_SDPA_FORCE_GQA=1; nokern: axolotl's LoRA kernels "
        f"off; expseg: expandable segments; mbN: micro-batch N for {MB_VARIANT_STEPS} steps)",
    )
    ap.add_argument("--arch", default="meta-llama--Llama-3.2-3B-Instruct", help="catalog model")
    ap.add_argument("--records", type=int, default=96, help="alpaca-like records to train on")
    ap.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="TRAINER=DIR",
        help="a folder of that trainer's packages put on its PYTHONPATH (repeatable)",
    )
    ap.add_argument("--gpus", default=None, help="zeroplan's --gpus for the estimate")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument(
        "--tiny", action="store_true", help="CPU dry run: tests/tinyllm.py's 2-layer model"
    )
    ap.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="JSONL",
        help="no GPU: recompute the summaries and estimates of measured rows into --out (with "
        "--records as the run had them, 64 in the results; --work for the rebuilt recipes)",
    )
    args = ap.parse_args()
    if args.rescore is not None:
        rows = [json.loads(line) for line in args.rescore.read_text().splitlines() if line]
        out = []
        work = args.work or Path(tempfile.mkdtemp(prefix="rescore-"))
        for row in rows:
            if "per_step" in row:
                gpus = args.gpus or ("1xH200" if "H200" in row["machine"]["gpu"] else "1xH100")
                # estimate --recipe --data of the rebuilt run (the rows' --records: 64)
                recipe, data = rebuild_run(row, work, row.get("records", args.records))
                row["estimate_recipe_data"] = estimate_recipe_data(recipe, data, gpus)
                row = score(row, row["arch"], gpus)
            out.append(json.dumps(row) + "\n")
        args.out.write_text("".join(out))
        return
    if args.work is None:
        ap.error("--work is required for a run")
    args.site = dict(s.split("=", 1) for s in args.site)
    args.work.mkdir(parents=True, exist_ok=True)
    spec, machine = gpu_spec()
    args.gpus = args.gpus or spec
    model = args.work / "model"
    if args.tiny:
        tinyllm.build_model_dir(model)
    elif not (model / "config.json").exists():
        build_model(model, catalog=args.arch, full_vocab=True)
    data = write_data(args.work, args.records)
    env0 = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "WANDB_MODE": "disabled",
        "DISABLE_VERSION_CHECK": "1",  # LLaMA-Factory 0.9.5's pins predate this image
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
    }
    for run in args.runs.split(","):
        row = run_one(run, args, model, data, env0)
        row.update(machine=machine, python=platform.python_version(), arch=args.arch)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        keys = ("run", "rc", "wall_s", "peak_allocated_over_estimate_loop")
        brief = {k: row.get(k) for k in keys}
        print(json.dumps(brief), flush=True)
        if "error" in row:
            print(row["error"][-2500:], flush=True)


if __name__ == "__main__":
    main()
