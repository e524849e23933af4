"""What the GPU benchmarks share. What they train on when the GPU machine has no network:
a random-weight model of a real architecture with the vocabulary of a tokenizer built in
code (tests/tinyllm.py), and synthetic alpaca records of 120-260 words (at most ~700
tokens). And how they read a run: the plan of a fixed setup, metrics.jsonl, tokens/s
after the warm-up steps, the package versions.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402

from zeroplan.hardware import local_cluster, parse_cluster  # noqa: E402
from zeroplan.trainsetup import TrainSetup  # noqa: E402

# the training stack whose versions every GPU result records
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")
WARMUP_STEPS = 3  # as in story_qlora_baseline.py: not timed
# the plan-choice checks (host_speed.py runs them, plan_choice.py reads them): per job, the
# model, the method and the runs: the plan's choice, then four other setups it ranked
RANKED_JOBS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "1b": ("1b", "lora", ("1b-plan", "1b-alt1", "1b-alt2", "1b-alt3", "1b-alt4")),
    "8b-lora": (
        "8b", "lora", ("8b-lora-plan", "8b-lora-alt1", "8b-lora-alt2", "8b-lora-alt3", "8b-lora-alt4"),
    ),
}  # fmt: skip


def ranked_job(name: str) -> tuple[str, int] | None:
    """(job, index in its ranking) of a plan-choice run's name, None for any other run."""
    for job, (_, _, names) in RANKED_JOBS.items():
        if name in names:
            return job, names.index(name)
    return None


def build_model(
    path: Path,
    catalog: str = "meta-llama--Llama-3.2-1B",
    full_vocab: bool = False,
    layers: int | None = None,
) -> Path:
    """Random bf16 weights of the catalog architecture, initialised on the GPU when there is
    one (an 8B model's random init on the CPU takes minutes), saved with its tokenizer.

    The vocabulary is the small tokenizer's, or with ``full_vocab`` the architecture's own
    (128k rows for Llama 3): the tokenizer then uses the first few hundred ids, and the
    logits, the loss and the plan's choice of the fused loss are those of the real model.
    ``layers`` cuts the decoder to that many layers (a mixture of experts that would take
    minutes to save and load at full depth)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tinyllm.build_tokenizer()
    tok.save_pretrained(path)
    arch = json.loads((ROOT / "zeroplan/catalog/models" / f"{catalog}.json").read_text())
    arch.update(
        vocab_size=arch["vocab_size"] if full_vocab else len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    arch.pop("torch_dtype", None)
    if layers is not None:
        arch["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(**arch)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def records(n: int, min_words: int = 120, max_words: int = 260) -> list[dict[str, str]]:
    """Alpaca records whose answers are ``min_words``-``max_words`` words of the small
    tokenizer's corpus (about 2.5 tokens a word), lengths uniform between."""
    rng = random.Random(0)
    words = " ".join(tinyllm.CORPUS).split()
    out = []
    for _ in range(n):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
        out.append({"instruction": "Write a long answer.", "input": "", "output": answer})
    return out


def write_plan(path: Path, model: Path, setup: TrainSetup, gpus: int | None) -> dict[str, Any]:
    """plan.json of exactly ``setup`` on this machine's GPUs (or ``gpus`` × H100 on the
    CPU): the estimate of that setup, as ``zeroplan launch`` reads it. Returns the JSON."""
    cluster = local_cluster() if gpus is None else parse_cluster(f"{gpus}xH100")
    assert cluster is not None, "no GPU here: pass gpus to plan for H100s"
    data = tinyllm.plan_for(model, setup, cluster)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def metrics(run: Path) -> list[dict[str, Any]]:
    """The run folder's metrics.jsonl lines (none yet: an empty list)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_tokens_per_s(lines: list[dict[str, Any]]) -> float | None:
    """All ranks' non-padding tokens per second over the steps after WARMUP_STEPS.

    Each train line holds its rank's rate since that rank's previous line; rate × interval
    gives the tokens of the interval.
    """
    total_tokens = 0.0
    spans: list[tuple[float, float]] = []
    for rank in sorted({m["rank"] for m in lines}):
        mine = [m for m in lines if m["rank"] == rank and m["event"] == "train"]
        for prev, cur in itertools.pairwise(mine):
            if prev["step"] >= WARMUP_STEPS and cur.get("tokens_per_s"):
                total_tokens += cur["tokens_per_s"] * (cur["t"] - prev["t"])
                spans.append((prev["t"], cur["t"]))
    if not spans:
        return None
    seconds = max(e for _, e in spans) - min(s for s, _ in spans)
    return total_tokens / seconds if seconds > 0 else None


def versions() -> dict[str, str | None]:
    """Installed versions of the training stack, DeepSpeed and Liger (None: not installed)."""
    out: dict[str, str | None] = {}
    for pkg in (*PACKAGES, "deepspeed", "liger-kernel"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
