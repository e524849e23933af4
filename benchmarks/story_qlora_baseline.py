"""The QLoRA story's own TRL script (shared/seeds), as its author ran it, timed: the baseline
``zeroplan launch`` is compared with on the same GPU — and, with ``--mode trl-packing``, the
same job as a TRL user would tune it with TRL's own packing.

    python benchmarks/story_qlora_baseline.py --model DIR --data records.jsonl \
        --steps 30 --out benchmarks/results/story_baseline_h100.jsonl [--mode trl-packing]

The story's settings: 4-bit NF4 with double quantization and bf16 compute; LoRA r=16,
alpha 32, dropout 0.05, bias none, on q/k/v/o; per-device batch 1, accumulation 8, lr 2e-4,
bf16, paged_adamw_8bit, max_seq_length 768, packing off. The story passed a transformers
``TrainingArguments`` (gradient checkpointing off by default) to SFTTrainer; TRL converts
it to an SFTConfig from ``args.to_dict()``, which keeps checkpointing off — so this script
builds TrainingArguments and converts them the same way (an SFTConfig built directly would
turn checkpointing on: TRL's default, not the story's). ``trl-packing``: the same model and
adapter, micro-batch 8 × accumulation 1, ``packing=True`` (best-fit decreasing,
padding-free), no checkpointing. One deliberate change: the story
trained on ``dataset_text_field="instruction"`` (the question only, a bug); here each
record's instruction, input and output are joined into the text field, so that both runs
process the same tokens. ``prepare_model_for_kbit_training`` is called, as TRL does for a
4-bit model with a peft_config. Writes one JSON line: tokens/s (non-padding tokens over the
timed steps, the first 3 steps excluded), the loss curve, peak memory and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_fixtures import WARMUP_STEPS, versions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (weights + tokenizer)")
    p.add_argument("--data", required=True, type=Path, help="alpaca records, .json or .jsonl")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tag", default="", help="recorded in the row (e.g. the architecture)")
    p.add_argument("--mode", default="story", choices=("story", "trl-packing"))
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
        TrainingArguments,
    )
    from trl import SFTConfig, SFTTrainer

    text = args.data.read_text()
    rows = (
        [json.loads(line) for line in text.splitlines() if line.strip()]
        if args.data.suffix == ".jsonl"
        else json.loads(text)
    )
    texts = [
        "\n".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x) for r in rows
    ]
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=bnb, device_map={"": 0}
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.losses: list[dict[str, Any]] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            torch.cuda.synchronize()
            self.starts.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, _args: Any, state: Any, _control: Any, logs: Any = None, **k: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append({"step": state.global_step, "loss": float(logs["loss"])})

    clock = Clock()
    packing = args.mode == "trl-packing"
    story_args = TrainingArguments(
        output_dir=str(args.out.parent / f"{args.mode}_baseline_run"),
        per_device_train_batch_size=8 if packing else 1,
        gradient_accumulation_steps=1 if packing else 8,
        learning_rate=2e-4,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        bf16=True,
        optim="paged_adamw_8bit",
        report_to=[],
    )
    # what SFTTrainer does with a TrainingArguments (trl.SFTTrainer.__init__), plus the SFT
    # options the story passed to SFTTrainer itself
    converted = story_args.to_dict()
    converted["hub_token"] = story_args.hub_token
    converted.pop("push_to_hub_token", None)
    converted.update(max_length=768, packing=packing, dataset_text_field="text")
    if packing:
        converted.update(packing_strategy="bfd", padding_free=True)
    cfg = SFTConfig(**converted)
    counted = [0]

    class Counting(SFTTrainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            mask = inputs.get("attention_mask")
            counted[0] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *a, **k)

    trainer = Counting(
        model=model,
        args=cfg,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tok,
        peft_config=lora,
        callbacks=[clock],
    )
    torch.cuda.reset_peak_memory_stats()
    marks: list[int] = []

    class Marks(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(counted[0])

    trainer.add_callback(Marks())
    trainer.train()
    timed = list(zip(clock.starts, clock.ends, strict=True))[WARMUP_STEPS:]
    seconds = sum(e - s for s, e in timed)
    # real tokens the timed steps trained on (non-padding, counted per micro-batch)
    tokens = marks[-1] - marks[WARMUP_STEPS - 1] if len(marks) > WARMUP_STEPS else 0
    row = {
        "run": args.mode,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "tag": args.tag,
        "steps": args.steps,
        "timed_steps": len(timed),
        "tokens_per_s": tokens / seconds if seconds else None,
        "timed_from_step": WARMUP_STEPS,
        "step_seconds": [e - s for s, e in zip(clock.starts, clock.ends, strict=True)],
        "losses": clock.losses,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "gpu": torch.cuda.get_device_name(0),
        "versions": versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("run", "tokens_per_s", "peak_allocated_bytes")}))


if __name__ == "__main__":
    main()
