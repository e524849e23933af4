"""A peer trainer on the same GPU, model, records and job as benchmarks/kernels_speed.py's
launches: TRL's SFTTrainer with Liger's kernels and packing (issue 26, side by side).

    python benchmarks/peers_speed.py --model /tmp/k/model --data /tmp/k/alpaca.jsonl \
        --run trl-users --out $OUT/kernels2_h100.jsonl

Runs:

    trl-users   as TRL's users run it: SFTConfig(use_liger_kernel=True, packing=True) with
                every other SFTConfig default (bfd packing, padding-free rows of max_length
                1024, per-device batch 8, gradient checkpointing on, bf16), LoRA r 16 /
                alpha 32 / dropout 0.05 on all-linear as TRL's examples write it
    trl-tuned   the same with what zeroplan's plan does differently: no checkpointing,
                dropout 0

The records are the alpaca ones of kernels_speed.py, turned into conversations (user:
instruction and input, assistant: output) that the tokenizer's chat template renders, as
zeroplan's launch renders them. Real tokens are the non-padding ids each forward reads (a
pre-hook on the input embedding, which no checkpointing reruns); tokens/s is their sum over
the steps after the warm-up ones over the wall time from the end of the last warm-up step to
the end of the last step. One JSON line with what the trainer resolved (packing strategy,
padding-free, attention, checkpointing) and the peak allocated bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_fixtures import WARMUP_STEPS, versions  # noqa: E402

RUNS: dict[str, dict[str, Any]] = {
    "trl-users": {"lora_dropout": 0.05, "config": {}},
    "trl-tuned": {"lora_dropout": 0.0, "config": {"gradient_checkpointing": False}},
}


def conversations(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
        )
    return out


def run(name: str, model_dir: Path, data: Path, work: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    spec = RUNS[name]
    cuda = torch.cuda.is_available()
    # a CPU rehearsal (tests' tiny model): no bf16, no Triton
    cpu = {} if cuda else {"bf16": False, "use_cpu": True, "use_liger_kernel": False}
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    pad = tok.pad_token_id
    step_tokens: list[int] = []

    def count(_module: Any, args: tuple[Any, ...]) -> None:
        ids = args[0]
        if model.training and ids is not None:
            step_tokens.append(int((ids != pad).sum()) if pad is not None else ids.numel())

    model.get_input_embeddings().register_forward_pre_hook(count)
    ends: list[float] = []
    tokens_at_end: list[int] = []

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            tokens_at_end.append(sum(step_tokens))

    keys = {"bf16": True, "use_liger_kernel": True, **spec["config"], **cpu}
    cfg = SFTConfig(
        output_dir=str(work / name),
        max_steps=steps,
        logging_steps=1,
        packing=True,
        report_to="none",
        save_strategy="no",
        **keys,
    )
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=spec["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    t0 = time.time()
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=Dataset.from_list(conversations(data)),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    n = len(ends)
    timed = n - WARMUP_STEPS
    tps = (
        (tokens_at_end[-1] - tokens_at_end[WARMUP_STEPS - 1]) / (ends[-1] - ends[WARMUP_STEPS - 1])
        if timed > 0
        else None
    )
    per_step = [
        round((tokens_at_end[i] - tokens_at_end[i - 1]) / (ends[i] - ends[i - 1]))
        for i in range(WARMUP_STEPS, n)
    ]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "run": name,
        "trainer": "trl",
        "wall_s": round(time.time() - t0, 1),
        "tokens_per_s": tps,
        "step_rates": per_step,
        "timed_steps": max(timed, 0),
        "tokens_per_step": [
            b - a for a, b in zip([0, *tokens_at_end], tokens_at_end, strict=False)
        ],
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "losses": losses,
        "resolved": {
            "packing": cfg.packing,
            "packing_strategy": getattr(cfg, "packing_strategy", None),
            "padding_free": getattr(cfg, "padding_free", None),
            "max_length": cfg.max_length,
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "use_liger_kernel": cfg.use_liger_kernel,
            "lora_dropout": spec["lora_dropout"],
            "optim": str(cfg.optim),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "flash_attn_installed": _installed("flash_attn"),
        },
    }


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", choices=sorted(RUNS), required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/peers"))
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--out", type=Path, required=True, help="JSON line appended here")
    args = p.parse_args()
    row = {**run(args.run, args.model, args.data, args.work, args.steps), "versions": versions()}
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("run", "tokens_per_s", "peak_allocated_bytes")}))


if __name__ == "__main__":
    main()
