"""What the GPU benchmarks train on when the GPU machine has no network: a random-weight
model of a real architecture with the vocabulary of a tokenizer built in code
(tests/tinyllm.py), and synthetic alpaca records of 120-260 words (at most ~700 tokens).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402

# the training stack whose versions every GPU result records
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def build_model(path: Path, catalog: str = "meta-llama--Llama-3.2-1B") -> Path:
    """Random bf16 weights of the catalog architecture, initialised on the GPU when there is
    one (an 8B model's random init on the CPU takes minutes), saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tinyllm.build_tokenizer()
    tok.save_pretrained(path)
    arch = json.loads((ROOT / "zeroplan/catalog/models" / f"{catalog}.json").read_text())
    arch.update(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    arch.pop("torch_dtype", None)
    cfg = AutoConfig.for_model(**arch)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def records(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    words = " ".join(tinyllm.CORPUS).split()
    out = []
    for _ in range(n):
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(120, 260)))
        out.append({"instruction": "Write a long answer.", "input": "", "output": answer})
    return out
