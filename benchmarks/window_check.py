"""Sliding windows on the GPU stack: which packed attention `zeroplan launch` picks for a
model whose window binds, whether an explicit varlen is refused there, and whether each path
it can take gives every packed record the logits of transformers' own eager sliding
attention on that record alone (tiny Mistral and Gemma 3, window 6, records up to 30
tokens, bf16 on a GPU and fp32 on a CPU; the varlen case only where torch's kernel takes a window).

    python benchmarks/window_check.py --out $OUT/window_check.jsonl

One JSON line: versions, the varlen kernel's parameters, the choices, and per model and
path the largest logit difference against the reference (None: not run here, and why).
On a CPU it runs the reference paths (what tests/test_packing.py checks).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from zeroplan.errors import BadSetupError  # noqa: E402
from zeroplan.launch import batching  # noqa: E402

BASE = tinyllm.TINY_DECODER
WINDOW = tinyllm.SLIDING_WINDOW
MODELS = tinyllm.SLIDING_CONFIGS
LENGTHS = [20, 7, 13, 30, 5, 11, 17]
CAP = 32


def model(cfg: dict[str, Any], attn: str, device: str) -> Any:
    torch.manual_seed(0)
    c = transformers.AutoConfig.for_model(**cfg, attn_implementation=attn)
    c.use_cache = False
    # the flash varlen kernel takes only fp16/bf16 (the first GPU call failed on fp32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return transformers.AutoModelForCausalLM.from_config(c, dtype=dtype).to(device).eval()


def max_diff(cfg: dict[str, Any], kernel: str, device: str) -> float:
    """Largest |logit| difference of any packed record against it alone (eager)."""
    attn = batching.register_varlen() if kernel == "varlen" else "sdpa"
    m, ref = model(cfg, attn, device), model(cfg, "eager", device)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in LENGTHS:
        ids = torch.randint(3, BASE["vocab_size"], (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    packed = batching.pack_examples(examples, CAP, seed=0)
    layout = "flat" if kernel == "varlen" else "rows"
    batch = batching.PackedCollator(0, CAP, layout)(packed.rows)
    inputs = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
        if not k.startswith("zp_") and k != "labels"
    }
    worst = 0.0
    with torch.no_grad():
        logits = m(**inputs).logits.reshape(len(packed.rows), CAP, -1)
        by_ids = {tuple(e["input_ids"]): e for e in examples}
        for r, row in enumerate(packed.rows):
            start = 0
            for n in batching.segment_lengths(row["position_ids"]):
                ids = row["input_ids"][start : start + n]
                alone = ref(input_ids=torch.tensor([ids], device=device)).logits[0]
                assert tuple(ids) in by_ids
                worst = max(worst, float((logits[r, start : start + n] - alone).abs().max()))
                start += n
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    out: dict[str, Any] = {
        "bench": "window_check",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "varlen_available": batching.varlen_available(),
        "varlen_takes_window": batching.varlen_takes_window(),
    }
    try:
        from torch.nn.attention.varlen import varlen_attn

        out["varlen_attn_params"] = list(inspect.signature(varlen_attn).parameters)
    except ImportError as exc:
        out["varlen_attn_params"] = f"none ({exc})"
    out["auto_choice_gemma3_512_at_1664"] = batching.choose_packed_attention(
        "auto", cuda, "gemma3_text", 512, 1664
    )
    try:
        out["explicit_varlen"] = batching.choose_packed_attention(
            "varlen", cuda, "gemma3_text", 512, 1664
        )
    except BadSetupError as exc:
        out["explicit_varlen"] = f"refused: {exc}"
    diffs: dict[str, Any] = {}
    for name, cfg in MODELS.items():
        diffs[f"{name}/mask"] = max_diff(cfg, "mask", device)
        if cuda and not batching.varlen_takes_window():
            diffs[f"{name}/varlen"] = "not run: this torch's varlen kernel takes no window"
        else:
            diffs[f"{name}/varlen"] = max_diff(cfg, "varlen", device)
    out["max_logit_diff_vs_eager_alone"] = diffs
    print(json.dumps(out, indent=1), flush=True)
    with args.out.open("a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
