"""Peer trainers on the same GPU, model, records and job as benchmarks/kernels_speed.py's
launches, each as its users run it (issue 26, side by side): TRL's SFTTrainer with Liger's
kernels and packing, and Unsloth.

    python benchmarks/peers_speed.py --model /tmp/k/model --data /tmp/k/alpaca.jsonl \
        --run trl-users --out $OUT/kernels2_h100.jsonl

Runs:

    trl-users   as TRL's users run it: SFTConfig(use_liger_kernel=True, packing=True) with
                every other SFTConfig default (bfd packing, padding-free rows of max_length
                1024, per-device batch 8, gradient checkpointing on, bf16), LoRA r 16 /
                alpha 32 / dropout 0.05 on all-linear as TRL's examples write it
    trl-tuned   the same with what zeroplan's plan does differently: no checkpointing,
                dropout 0
    unsloth-notebook  as Unsloth's Llama-3.1 (8B) Alpaca notebook runs it (NOTEBOOK below):
                FastLanguageModel.from_pretrained(max_seq_length 2048, load_in_4bit),
                get_peft_model(r 16, alpha 16, dropout 0, the seven projections,
                use_gradient_checkpointing="unsloth"), SFTConfig(per-device 2 ×
                accumulation 4, packing off, adamw_8bit, lr 2e-4, linear, weight decay 0.01)
                on the notebook's alpaca prompt + EOS as the "text" field
    unsloth-packed    the same with packing on and no checkpointing: the closest to
                zeroplan's plan (packed rows, no recompute)
    unsloth-packed-bf16  unsloth-packed with load_in_4bit=False: Unsloth's 16-bit LoRA,
                beside zeroplan's bf16 LoRA plan

Unsloth must be imported before transformers, TRL and PEFT (it patches them as they
load), so an Unsloth run imports it first; kernels_speed.py starts each run in its own
process with the Unsloth packages first on PYTHONPATH (its --unsloth-site).

The TRL runs read the alpaca records of kernels_speed.py as conversations (user: instruction
and input, assistant: output) that the tokenizer's chat template renders, as zeroplan's
launch renders them. Real tokens are the non-padding ids each forward reads (a pre-hook on
the input embedding, which no checkpointing reruns); tokens/s is their sum over the steps
after the warm-up ones over the wall time from the end of the last warm-up step to the end
of the last step (an optimizer step: all its accumulated micro-batches). One JSON line with
what the trainer resolved (packing, padding-free, attention, checkpointing) and the peak
allocated bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_fixtures import WARMUP_STEPS, versions  # noqa: E402

RUNS: dict[str, dict[str, Any]] = {
    "trl-users": {"trainer": "trl", "lora_dropout": 0.05, "config": {}},
    "trl-tuned": {
        "trainer": "trl",
        "lora_dropout": 0.0,
        "config": {"gradient_checkpointing": False},
    },
    "unsloth-notebook": {
        "trainer": "unsloth",
        "packing": False,
        "checkpointing": "unsloth",
        "config": {},
    },
    # SFTConfig's own gradient_checkpointing (True by default in TRL 1.x) would turn the
    # trainer's checkpointing on over get_peft_model's False: both off
    "unsloth-packed": {
        "trainer": "unsloth",
        "packing": True,
        "checkpointing": False,
        "config": {"gradient_checkpointing": False},
    },
    # bf16 LoRA as Unsloth's users ask for it: the packed run with load_in_4bit=False (its
    # 16-bit LoRA), beside zeroplan's bf16 LoRA plan
    "unsloth-packed-bf16": {
        "trainer": "unsloth",
        "packing": True,
        "checkpointing": False,
        "load_in_4bit": False,
        "config": {"gradient_checkpointing": False},
    },
}

# Unsloth's own notebook for this model: unslothai/notebooks, nb/Llama3.1_(8B)-Alpaca.ipynb
# (commit 016b8dce8bee9ec8d94efc84863d5c327aa8956c), the cells a user runs unchanged
NOTEBOOK = "unslothai/notebooks nb/Llama3.1_(8B)-Alpaca.ipynb @016b8dce"
NOTEBOOK_MAX_SEQ_LENGTH = 2048  # its "max_seq_length = 2048"
NOTEBOOK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the Stanford Alpaca prompt the notebook formats each record with, EOS appended
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
)
# what Unsloth reports about the attention it found (module, attribute)
UNSLOTH_ATTENTION = (
    ("unsloth.models._utils", "HAS_FLASH_ATTENTION"),
    ("unsloth.models._utils", "xformers_version"),
    ("unsloth.utils.attention_dispatch", "HAS_XFORMERS"),
    ("unsloth.utils.attention_dispatch", "_NATIVE_BEATS_XFORMERS"),
)
# the packages of an Unsloth install whose versions its rows record
UNSLOTH_PACKAGES = (
    "unsloth",
    "unsloth_zoo",
    "datasets",
    "xformers",
    "flash-attn",
    "triton",
    "torchao",
    "cut_cross_entropy",
)


def conversations(path: Path) -> list[dict[str, Any]]:
    out = []
    for r in _records(path):
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


def alpaca_texts(path: Path, eos: str) -> list[dict[str, str]]:
    """The notebook's data cell: each record as ALPACA_PROMPT + EOS in a "text" field."""
    return [
        {"text": ALPACA_PROMPT.format(r["instruction"], r.get("input", ""), r["output"]) + eos}
        for r in _records(path)
    ]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def unsloth_load_kwargs(
    model_dir: Path, cuda: bool, name: str = "unsloth-notebook"
) -> dict[str, Any]:
    """FastLanguageModel.from_pretrained as the notebook calls it (dtype None: Unsloth picks
    bf16 where the GPU has it); 16-bit for ``unsloth-packed-bf16``; on a CPU rehearsal no
    4-bit (bitsandbytes' 4-bit needs CUDA there)."""
    return {
        "model_name": str(model_dir),
        "max_seq_length": NOTEBOOK_MAX_SEQ_LENGTH,
        "dtype": None,
        "load_in_4bit": cuda and RUNS[name].get("load_in_4bit", True),
    }


def unsloth_peft_kwargs(name: str) -> dict[str, Any]:
    """FastLanguageModel.get_peft_model as the notebook calls it; the packed run turns
    checkpointing off."""
    return {
        "r": 16,
        "target_modules": list(NOTEBOOK_TARGETS),
        "lora_alpha": 16,
        "lora_dropout": 0,
        "bias": "none",
        "use_gradient_checkpointing": RUNS[name]["checkpointing"],
        "random_state": 3407,
        "use_rslora": False,
        "loftq_config": None,
    }


def unsloth_sft_config(name: str, work: Path, steps: int, cuda: bool) -> dict[str, Any]:
    """The notebook's SFTTrainer/SFTConfig values, in TRL 1.x's names (max_length for
    max_seq_length; the tokenizer goes in as processing_class). Changed for the benchmark:
    max_steps (its 60 → ``steps``) and no checkpoint saving; warm-up 5 steps of the linear
    schedule as it has them. The packed run turns packing on and the trainer's checkpointing
    off. On a CPU rehearsal PyTorch's
    AdamW (bitsandbytes' 8-bit AdamW needs CUDA there)."""
    return {
        "dataset_text_field": "text",
        "max_length": NOTEBOOK_MAX_SEQ_LENGTH,
        "packing": RUNS[name]["packing"],
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "warmup_steps": 5,
        "max_steps": steps,
        "learning_rate": 2e-4,
        "logging_steps": 1,
        "optim": "adamw_8bit" if cuda else "adamw_torch",
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "seed": 3407,
        "output_dir": str(work / name),
        "report_to": "none",
        "save_strategy": "no",
        **RUNS[name]["config"],
    }


# --------------------------------------------------------------------------- timing


class StepClock:
    """Counts the real tokens each forward reads and the wall clock at each optimizer
    step's end; ``callback()`` is the TrainerCallback that reads the clock."""

    def __init__(self, model: Any, pad: int | None, cuda: bool) -> None:
        self.model, self.pad, self.cuda = model, pad, cuda
        self.step_tokens: list[int] = []
        self.ends: list[float] = []
        self.tokens_at_end: list[int] = []
        model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, _module: Any, args: tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        if self.model.training and ids is not None:
            real = (ids != self.pad).sum() if self.pad is not None else ids.numel()
            self.step_tokens.append(int(real))

    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        clock = self

        class Timer(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if clock.cuda:
                    torch.cuda.synchronize()
                clock.ends.append(time.perf_counter())
                clock.tokens_at_end.append(sum(clock.step_tokens))

        return Timer()


def step_summary(ends: list[float], tokens_at_end: list[int]) -> dict[str, Any]:
    """tokens/s over the steps after WARMUP_STEPS: (tokens at the last step's end − tokens
    at the last warm-up step's end) / (the wall time between those ends); each timed step's
    own rate; the real tokens of every step."""
    n = len(ends)
    timed = n - WARMUP_STEPS
    w = WARMUP_STEPS - 1
    tps = (tokens_at_end[-1] - tokens_at_end[w]) / (ends[-1] - ends[w]) if timed > 0 else None
    return {
        "tokens_per_s": tps,
        "step_rates": [
            round((tokens_at_end[i] - tokens_at_end[i - 1]) / (ends[i] - ends[i - 1]))
            for i in range(WARMUP_STEPS, n)
        ],
        "timed_steps": max(timed, 0),
        "tokens_per_step": [
            b - a for a, b in zip([0, *tokens_at_end], tokens_at_end, strict=False)
        ],
    }


def row(
    name: str,
    trainer: str,
    started: float,
    clock: StepClock,
    peak: int | None,
    log_history: list[dict[str, Any]],
    resolved: dict[str, Any],
) -> dict[str, Any]:
    """One JSON line, the same keys for every peer."""
    return {
        "run": name,
        "trainer": trainer,
        "wall_s": round(time.time() - started, 1),
        **step_summary(clock.ends, clock.tokens_at_end),
        "peak_allocated_bytes": peak,
        "losses": [h["loss"] for h in log_history if "loss" in h],
        "resolved": resolved,
    }


# --------------------------------------------------------------------------- TRL


def run_trl(name: str, model_dir: Path, data: Path, work: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    spec = RUNS[name]
    cuda = torch.cuda.is_available()
    # a CPU rehearsal (tests' tiny model): no bf16, no Triton
    cpu = {} if cuda else {"bf16": False, "use_cpu": True, "use_liger_kernel": False}
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    clock = StepClock(model, tok.pad_token_id, cuda)
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
        callbacks=[clock.callback()],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    resolved = {
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
    }
    return row(name, "trl", t0, clock, peak, trainer.state.log_history, resolved)


# --------------------------------------------------------------------------- Unsloth


def run_unsloth(name: str, model_dir: Path, data: Path, work: Path, steps: int) -> dict[str, Any]:
    import torch
    import unsloth  # noqa: F401  (before TRL: it patches transformers, TRL and PEFT as they load)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    cuda = torch.cuda.is_available()
    t0 = time.time()
    model, tok = FastLanguageModel.from_pretrained(**unsloth_load_kwargs(model_dir, cuda, name))
    loaded_s = round(time.time() - t0, 1)
    model = FastLanguageModel.get_peft_model(model, **unsloth_peft_kwargs(name))
    clock = StepClock(model, tok.pad_token_id, cuda)
    cfg = SFTConfig(**unsloth_sft_config(name, work, steps, cuda))
    trainer = SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=Dataset.from_list(alpaca_texts(data, tok.eos_token)),
        args=cfg,
        callbacks=[clock.callback()],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    args = trainer.args  # what Unsloth's patched trainer resolved (precision, packing)
    resolved = {
        "source": NOTEBOOK,
        "load": unsloth_load_kwargs(model_dir, cuda, name),
        "peft": unsloth_peft_kwargs(name),
        "packing": getattr(args, "packing", None),
        "packing_strategy": getattr(args, "packing_strategy", None),
        "padding_free": getattr(args, "padding_free", None),
        "max_length": getattr(args, "max_length", None),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_checkpointing": getattr(args, "gradient_checkpointing", None),
        "model_checkpointing": _attr_of(model, "is_gradient_checkpointing"),
        "optim": str(args.optim),
        "bf16": args.bf16,
        "fp16": args.fp16,
        "model_dtype": str(getattr(model, "dtype", None)),
        "loaded_s": loaded_s,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "attention": unsloth_attention(bool(getattr(args, "packing", False))),
        "device_type": _attr("unsloth_zoo.device_type", "DEVICE_TYPE"),
    }
    return row(name, "unsloth", t0, clock, peak, trainer.state.log_history, resolved)


def unsloth_attention(packed: bool) -> dict[str, Any]:
    """What Unsloth found: flash-attn, xformers (and whether torch's varlen beats it), and
    the backend its dispatcher picks for this run's calls (varlen when packed)."""
    out: dict[str, Any] = {attr: _attr(mod, attr) for mod, attr in UNSLOTH_ATTENTION}
    try:
        from unsloth.utils.attention_dispatch import select_attention_backend

        out["backend"] = str(select_attention_backend(use_varlen=packed))
    except Exception as exc:  # a row says what it could not read
        out["backend"] = f"unknown ({exc})"
    return out


def _attr(module: str, name: str) -> Any:
    try:
        found = importlib.import_module(module)
    except Exception as exc:  # a row says what it could not read
        return f"unknown ({exc})"
    return _attr_of(found, name)


def _attr_of(obj: Any, name: str) -> Any:
    try:
        value = getattr(obj, name)
    except Exception as exc:
        return f"unknown ({exc})"
    return value if isinstance(value, bool | int | float | str | type(None)) else str(value)


def unsloth_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in UNSLOTH_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


RUNNERS: dict[str, Callable[[str, Path, Path, Path, int], dict[str, Any]]] = {
    "trl": run_trl,
    "unsloth": run_unsloth,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", choices=sorted(RUNS), required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/peers"))
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--out", type=Path, required=True, help="JSON line appended here")
    args = p.parse_args()
    trainer = RUNS[args.run]["trainer"]
    result = RUNNERS[trainer](args.run, args.model, args.data, args.work, args.steps)
    extra = unsloth_versions() if trainer == "unsloth" else {}
    out = {**result, "versions": {**versions(), **extra}}
    with args.out.open("a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps({k: out[k] for k in ("run", "tokens_per_s", "peak_allocated_bytes")}))


if __name__ == "__main__":
    main()
