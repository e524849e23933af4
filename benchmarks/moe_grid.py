"""Mixture-of-experts LoRA on one GPU: peak memory, step time, and what bitsandbytes quantizes.

    python benchmarks/moe_grid.py --out $OUT/moe_h200.jsonl --budget-s 330

Issue 29. Random-weight Qwen3-30B-A3B and Mixtral-8x7B architectures from the catalog's
config.json (real vocabularies), cut to fewer decoder layers so that every shape fits one
GPU quickly (``num_layers`` in each row; ``full_layers`` is the real depth); a few rows at
the full depth check that the per-layer terms scale. One process, one model per target
set: configurations of a target set share the model and its optimizer (the optimizer's
states exist from the first step on, as in every step after it), and each configuration's
peak is ``max_memory_allocated`` over its own steps after ``reset_peak_memory_stats``. The
step is measure_memory.py's lean trainer step (its model building and optimizer are
reused): bf16 autocast, the model's causal-LM loss, backward, clipping, fused AdamW,
``zero_grad(set_to_none=True)``.

Sections, in order (``--budget-s`` starts no section after that many seconds):

* ``grid``: LoRA r=16 on attention (q,k,v,o; dropout 0.05), attention + router
  (``gate``) and all-linear, both with dropout 0 (PEFT refuses dropout on the router and
  the expert banks, which it wraps as parameters), with and without checkpointing, micro-batch 1-4, seq
  512-1024; the attention-only rows run 2 warm-up + 10 timed steps, the others 4 steps;
* ``bnb``: a one-layer cut saved and loaded with ``BitsAndBytesConfig`` (4-bit NF4 with
  double quantization, then 8-bit): the class and dtype of every parameter, and a QLoRA
  attention-only step on the 4-bit model;
* ``depth``: the same attention-only and all-linear rows at the full depth.

``--device cpu --tiny`` runs every section on a tiny model on the CPU (no peaks) to check
the script before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from measure_memory import build_model, environment, make_optimizer  # noqa: E402

CATALOG = HERE.parent / "zeroplan" / "catalog" / "models"
MODELS = {
    "Qwen/Qwen3-30B-A3B": ("Qwen--Qwen3-30B-A3B.json", 8),
    "mistralai/Mixtral-8x7B-v0.1": ("mistralai--Mixtral-8x7B-v0.1.json", 4),
}
ATTN = "q_proj,k_proj,v_proj,o_proj"
ROUTER = ATTN + ",gate"
SHAPES = [(1, 512), (1, 1024), (4, 512), (4, 1024)]
# (targets, dropout, shapes, timed): the grid section's target sets
TARGET_SETS = [
    (ATTN, 0.05, SHAPES, True),
    ("all-linear", 0.0, [(1, 512), (4, 1024)], False),
    # PEFT wraps transformers 5's router (not an nn.Linear) as a parameter too: no dropout
    (ROUTER, 0.0, [(1, 1024), (4, 1024)], False),
]
WARMUP, TIMED, PEAK_STEPS = 2, 10, 4
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
}


def arch(model: str, layers: int | None, tiny: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((CATALOG / MODELS[model][0]).read_text())
    cfg.pop("torch_dtype", None)
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg or k == "head_dim"})
        if cfg["model_type"] == "qwen3_moe":
            cfg["num_experts"] = 8
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        if cfg.get("max_window_layers"):
            cfg["max_window_layers"] = layers
    return cfg


class Device:
    """torch.cuda's memory counters, or zeros on the CPU (``--device cpu`` dry runs)."""

    def __init__(self, name: str) -> None:
        import torch

        self.torch = torch
        self.cuda = name == "cuda"
        self.name = name

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else 0

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else 0

    def reserved_peak(self) -> int:
        return self.torch.cuda.max_memory_reserved() if self.cuda else 0

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def model_args(
    targets: str, dropout: float, device: str, method: str = "lora"
) -> argparse.Namespace:
    """What measure_memory.build_model reads."""
    return argparse.Namespace(
        method=method,
        lora_r=16,
        lora_targets=targets,
        lora_dropout=dropout,
        grad_ckpt=False,
        reentrant=False,
        fused_loss=False,
        precision="bf16",
        attn="sdpa",
        zero=None,
        keep_outputs=False,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        device=device,
    )


def set_ckpt(model: Any, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()


def run_steps(
    dev: Device,
    model: Any,
    optimizer: Any,
    trainable: list[Any],
    vocab: int,
    mb: int,
    seq: int,
    n: int,
) -> tuple[list[float], list[int]]:
    """``n`` lean trainer steps; each step's seconds and the peak so far after it."""
    torch = dev.torch
    gen = torch.Generator(device=dev.name).manual_seed(0)
    seconds: list[float] = []
    peaks: list[int] = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (mb, seq), device=dev.name, generator=gen)
        dev.sync()
        start = time.perf_counter()
        with torch.autocast(dev.name, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss, ids
        dev.sync()
        seconds.append(time.perf_counter() - start)
        peaks.append(dev.peak())
    return seconds, peaks


def measure_target_set(
    dev: Device,
    model_name: str,
    cfg: dict[str, Any],
    targets: str,
    dropout: float,
    configs: list[tuple[bool, int, int]],
    timed: bool,
    base: dict[str, Any],
    write: Any,
    section: str = "grid",
) -> None:
    """One model with one target set; a row per (checkpointing, micro-batch, seq)."""
    from transformers import AutoConfig

    torch = dev.torch
    dev.free()
    row0 = dict(
        base,
        section=section,
        model=model_name,
        model_type=cfg["model_type"],
        num_layers=cfg["num_hidden_layers"],
        full_layers=arch(model_name, None, False)["num_hidden_layers"],
        method="lora",
        lora_r=16,
        lora_targets=targets,
        lora_dropout=dropout,
        allocated_before_bytes=dev.allocated(),
    )
    args = model_args(targets, dropout, dev.name)
    try:
        t0 = time.time()
        model = build_model(args, AutoConfig.for_model(**cfg), None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(args, trainable)
        dev.sync()
        dev.free()
        row0.update(
            build_seconds=time.time() - t0,
            setup_allocated_bytes=dev.allocated(),
            trainable_params=sum(p.numel() for p in trainable),
            experts_implementation=getattr(model.config, "_experts_implementation", None),
            lora_tensors=sorted(
                {
                    n.split("layers.0.", 1)[-1]: list(p.shape)
                    for n, p in model.named_parameters()
                    if p.requires_grad and "layers.0." in n
                }.items()
            ),
        )
    except Exception as exc:  # PEFT refusing a target set is a result
        write(dict(row0, oom=False, error=f"{type(exc).__name__}: {exc}"[:400]))
        traceback.print_exc()
        dev.free()
        return
    vocab = cfg["vocab_size"]
    for ckpt, mb, seq in configs:
        row = dict(row0, grad_ckpt=ckpt, micro_batch=mb, seq_len=seq, oom=False, error=None)
        n = WARMUP + TIMED if timed else PEAK_STEPS
        try:
            set_ckpt(model, ckpt)
            dev.free()
            dev.reset()
            seconds, peaks = run_steps(dev, model, optimizer, trainable, vocab, mb, seq, n)
            timed_s = seconds[WARMUP:] if timed else seconds[1:]
            row.update(
                steps=n,
                warmup_steps=WARMUP if timed else 1,
                step_seconds=seconds,
                step_peaks_bytes=peaks,
                tokens_per_s_per_gpu=mb * seq * len(timed_s) / sum(timed_s),
            )
        except torch.OutOfMemoryError as exc:
            row.update(oom=True, error=str(exc).splitlines()[0][:300])
            optimizer.zero_grad(set_to_none=True)
        except Exception as exc:
            row.update(error=f"{type(exc).__name__}: {exc}"[:400])
            traceback.print_exc()
        row.update(peak_allocated_bytes=dev.peak(), peak_reserved_bytes=dev.reserved_peak())
        write(row)
    del model, optimizer, trainable
    dev.free()


def bnb_section(
    dev: Device, model_name: str, cfg: dict[str, Any], base: dict[str, Any], write: Any
) -> None:
    """Save a cut model, load it 4-bit and 8-bit through transformers, and say per parameter
    what bitsandbytes made of it; then a QLoRA attention-only step on the 4-bit model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    folder = Path(tempfile.mkdtemp(prefix="moe_bnb_"))
    try:
        with torch.device(dev.name):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.for_model(**cfg), dtype=torch.bfloat16
            )
        model.save_pretrained(folder)
        del model
        dev.free()
        quants = {
            "4bit": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            "8bit": BitsAndBytesConfig(load_in_8bit=True),
        }
        for kind, qcfg in quants.items():
            row = dict(
                base,
                section="bnb",
                model=model_name,
                model_type=cfg["model_type"],
                num_layers=cfg["num_hidden_layers"],
                quant=kind,
                error=None,
            )
            before = dev.allocated()
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    folder, quantization_config=qcfg, dtype=torch.bfloat16, device_map=dev.name
                )
                dev.sync()
                row["loaded_allocated_bytes"] = dev.allocated() - before
                row["params"] = [
                    [n.split("layers.0.", 1)[-1], type(p).__name__, str(p.dtype), list(p.shape)]
                    for n, p in model.named_parameters()
                    if "layers.0." in n or "layers" not in n
                ]
                row["modules"] = sorted(
                    {
                        n.split("layers.0.", 1)[-1]: type(m).__name__
                        for n, m in model.named_modules()
                        if "layers.0." in n
                    }.items()
                )
                if kind == "4bit":
                    row["qlora"] = qlora_steps(dev, model, cfg["vocab_size"])
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                traceback.print_exc()
            write(row)
            model = None
            dev.free()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def qlora_steps(dev: Device, model: Any, vocab: int) -> list[dict[str, Any]]:
    """Attention-only LoRA on the 4-bit model (no kbit upcast, as zeroplan launch runs it)."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    lcfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=ATTN.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lcfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model_args(ATTN, 0.05, dev.name), trainable)
    dev.free()
    out: list[dict[str, Any]] = [
        {
            "setup_allocated_bytes": dev.allocated(),
            "trainable_params": sum(p.numel() for p in trainable),
        }
    ]
    for mb, seq in [(1, 1024), (4, 1024)]:
        dev.reset()
        seconds, _ = run_steps(dev, model, optimizer, trainable, vocab, mb, seq, PEAK_STEPS)
        out.append(
            {
                "micro_batch": mb,
                "seq_len": seq,
                "grad_ckpt": False,
                "peak_allocated_bytes": dev.peak(),
                "step_seconds": seconds,
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "moe.jsonl"))
    p.add_argument("--budget-s", type=float, default=0.0)
    p.add_argument("--sections", default="grid,bnb,depth")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU dry run)")
    args = p.parse_args()
    dev = Device(args.device)
    began = time.time()
    base = {"bench": "moe_grid", "tag": "tiny" if args.tiny else "", "env": environment()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict[str, Any]) -> None:
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        peak = row.get("peak_allocated_bytes")
        tps = row.get("tokens_per_s_per_gpu")
        print(
            f"[{time.time() - began:5.0f}s] {row['model']} L={row['num_layers']} "
            f"{row.get('lora_targets', row.get('quant'))} ckpt={row.get('grad_ckpt')} "
            f"{row.get('micro_batch')}x{row.get('seq_len')}: "
            f"peak={peak / 2**30 if peak else 0:.2f} GiB tok/s={tps or 0:.0f} "
            f"oom={row.get('oom')} err={row.get('error')}",
            flush=True,
        )

    models = args.models.split(",")
    shapes_tiny = [(1, 16), (2, 32)]

    def over() -> bool:
        return bool(args.budget_s) and time.time() - began > args.budget_s

    for section in args.sections.split(","):
        for model in models:
            if over():
                print(f"budget spent: {section} {model} not run", flush=True)
                continue
            layers = 2 if args.tiny else MODELS[model][1]
            if section == "grid":
                cfg = arch(model, layers, args.tiny)
                for targets, dropout, shapes, timed in TARGET_SETS:
                    shapes = shapes_tiny if args.tiny else shapes
                    configs = [(ck, mb, s) for ck in (False, True) for mb, s in shapes]
                    measure_target_set(
                        dev, model, cfg, targets, dropout, configs, timed, base, write
                    )
            elif section == "bnb":
                bnb_section(dev, model, arch(model, 1, args.tiny), base, write)
            elif section == "depth":
                cfg = arch(model, 3 if args.tiny else None, args.tiny)
                mb, s = shapes_tiny[-1] if args.tiny else (4, 1024)
                configs = [(True, mb, s), (False, 1, s)]
                measure_target_set(
                    dev, model, cfg, ATTN, 0.05, configs, False, base, write, "depth"
                )
    print(f"done in {time.time() - began:.0f}s", flush=True)


if __name__ == "__main__":
    main()
