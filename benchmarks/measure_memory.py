"""Measure the real peak GPU memory of a few training steps for one configuration.

Run on a GPU machine with the [train] extra. One configuration per process, so that
every measurement starts from an empty caching allocator:

    python benchmarks/measure_memory.py meta-llama/Llama-3.2-1B --method lora \
        --micro-batch 4 --seq-len 2048 --grad-ckpt --out benchmarks/results/memory.jsonl

Under DeepSpeed, start it with a launcher (``torchrun --nproc-per-node 2 ... --zero 2``);
``--ddp`` (also under torchrun) is PyTorch DDP without DeepSpeed, what zeroplan plans as
"DDP". Rank 0 writes the row, with every rank's peaks.

What is measured is the *lean step* that zeroplan estimates and ``zeroplan launch`` runs:
random-weight model built from the config.json (bf16, or NF4 + double quantization for
qlora, quantized as bitsandbytes does on load), PEFT LoRA (adapter weights in fp32, as PEFT
keeps them), gradient checkpointing non-reentrant (``--reentrant``: reentrant, which is what
``zeroplan launch`` runs for LoRA under ZeRO-3, as TRL requires), forward with the model's own causal-LM
loss under bf16 autocast (what HF Trainer does without DeepSpeed) or DeepSpeed bf16, backward,
gradient clipping at 1.0, optimizer step, ``zero_grad(set_to_none=True)``.

``--loop plain`` measures instead the hand-written loop of the transformers docs on a bf16
model (zeroplan's ``--loop plain``): ``torch.optim.AdamW(params)`` with PyTorch's defaults
(foreach), no autocast, and ``out = model(input_ids=..., labels=...); out.loss.backward()``
with ``out`` kept until the next step's forward returns, and the model config's
``use_cache`` left as it is (a kept output holds its KV cache). ``--optim``,
``--autocast/--no-autocast`` and ``--keep-outputs/--no-keep-outputs`` override the loop's
choice one at a time, as zeroplan's switches do; the row records the resolved values. The peak is taken
over ``--steps`` full steps (the optimizer allocates its states in the first), counted from
after model set-up: ``torch.cuda.reset_peak_memory_stats()`` is called once the model,
adapters and engine exist. An OOM is a result, recorded as such.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zeroplan.models import load_model
from zeroplan.trainsetup import LOOPS, OPTIM_ALIASES, OPTIMIZERS, TrainSetup

GiB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="catalog name, Hub id or config.json path")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument(
        "--reentrant",
        action="store_true",
        help="reentrant checkpointing (TRL's choice for PEFT under ZeRO-3); default non-reentrant",
    )
    p.add_argument("--fused-loss", action="store_true", help="Liger fused linear cross-entropy")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--memory-fraction", type=float, default=None, help="imitate a smaller card")
    p.add_argument("--out", default="benchmarks/results/memory.jsonl")
    add_setup_options(p)
    return resolve_loop(p.parse_args(argv))


def add_setup_options(p: argparse.ArgumentParser) -> None:
    """What the model, its adapters, the loop and the parallelism are (shared with
    speed_grid.py, which sweeps the shapes itself)."""
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument(
        "--loop", default="trainer", choices=list(LOOPS), help="preset of the three below"
    )
    p.add_argument(
        "--optim",
        default=None,
        choices=[*OPTIMIZERS, *OPTIM_ALIASES],
        help="default: the loop's (adamw = adamw_torch_fused)",
    )
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--keep-outputs", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp16"],
        help="fp16: the fp16 mixed precision of a card without bf16, forced (GradScaler, or "
        "DeepSpeed's fp16 section)",
    )
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    p.add_argument(
        "--zero", type=int, default=None, help="DeepSpeed ZeRO stage (start with torchrun)"
    )
    p.add_argument("--ddp", action="store_true", help="PyTorch DDP (start with torchrun)")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON; default: stage defaults")
    p.add_argument("--tag", default="")


def resolve_loop(args: argparse.Namespace) -> argparse.Namespace:
    # the loop's choices resolved as zeroplan resolves them (DeepSpeed: no autocast)
    loop = TrainSetup(
        loop=args.loop,
        optim=args.optim or "",
        autocast=args.autocast,
        keep_outputs=args.keep_outputs,
        zero=args.zero,
    )
    args.optim, args.autocast, args.keep_outputs = loop.optim, loop.autocast, loop.keep_outputs
    return args


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in (
        "transformers",
        "peft",
        "bitsandbytes",
        "deepspeed",
        "trl",
        "liger_kernel",
        "accelerate",
    ):
        try:
            env[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except Exception:
            env[pkg] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            env["driver"] = None
    return env


def nvml_used_bytes(index: int) -> int | None:
    """nvidia-smi's used memory of the CUDA device ``index`` (NVML counts physical GPUs:
    the index goes through CUDA_VISIBLE_DEVICES first)."""
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.strip().isdigit() for v in visible):
        index = int(visible[index])
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def quantize_linears_nf4(model: Any, dtype: Any = None) -> None:
    """Swap every nn.Linear inside the decoder layers for a bitsandbytes NF4 Linear4bit.

    The same modules transformers quantizes on ``from_pretrained(quantization_config=...)``
    (all linears but lm_head), with double quantization and bf16 compute, one layer at a time
    so the bf16 copy of only one weight is alive at once.
    """
    import bitsandbytes as bnb
    import torch

    dtype = dtype or torch.bfloat16
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            child = name.rsplit(".", 1)[-1]
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                module.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            ).to(module.weight.device)
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
            setattr(parent, child, q)
            del module
    model.is_loaded_in_4bit = True


def half(args: argparse.Namespace) -> Any:
    import torch

    return torch.float16 if getattr(args, "precision", "bf16") == "fp16" else torch.bfloat16


def model_dtype(args: argparse.Namespace) -> Any:
    """The dtype the model is built in: the half type, except fp16 full fine-tuning without
    DeepSpeed, which AMP trains as an fp32 model (zeroplan.memory.precision)."""
    import torch

    amp_fp32 = args.precision == "fp16" and args.method == "full" and args.zero is None
    return torch.float32 if amp_fp32 else half(args)


def build_model(args: argparse.Namespace, config: Any, ds_config: dict[str, Any] | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": model_dtype(args), "attn_implementation": args.attn}
    if ds_config is not None and args.zero == 3:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        with torch.device(getattr(args, "device", "cuda")):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    # the trainer loop drops the output (and its cache) at once: no cache, as before; a kept
    # output holds whatever the config's use_cache builds (off under checkpointing)
    if not args.keep_outputs:
        model.config.use_cache = False
    if args.method == "qlora":
        quantize_linears_nf4(model, half(args))
        torch.cuda.empty_cache()
    if args.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets: Any = (
            "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        )
        lcfg = LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    else:
        model.requires_grad_(True)
    if args.grad_ckpt:
        reentrant = getattr(args, "reentrant", False)  # (speed_grid.py has no such switch)
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}
        )
        if reentrant:
            # reentrant checkpointing backpropagates into a layer only when its input needs a
            # gradient: with a frozen embedding that takes this hook (PEFT sets it too; twice
            # is harmless), as TRL and HF Trainer do
            model.enable_input_require_grads()
    if args.fused_loss:
        apply_fused_loss(model)
    model.train()
    return model


def apply_fused_loss(model: Any) -> None:
    """Liger's fused linear cross-entropy on the transformers model (under PEFT's wrapper)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(
        base,
        rope=False,
        rms_norm=False,
        swiglu=False,
        geglu=False,  # Gemma's apply function turns its GeGLU on unless told
        cross_entropy=False,
        fused_linear_cross_entropy=True,
    )


def make_optimizer(args: argparse.Namespace, params: list[Any]) -> Any:
    import torch

    if args.optim == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if args.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-5)  # PyTorch's default: foreach on a GPU
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=1e-5)
    import bitsandbytes as bnb

    if args.optim == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    if args.optim == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, lr=1e-5)
    return bnb.optim.PagedAdamW8bit(params, lr=1e-5)


def default_ds_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.precision != "fp16"},
        "fp16": {"enabled": args.precision == "fp16"},
        "zero_optimization": {"stage": args.zero},
        "steps_per_print": 10**9,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    spec = load_model(args.model)
    config = AutoConfig.for_model(**spec.config)
    if args.ddp and args.zero is not None:
        raise SystemExit("--ddp and --zero exclude each other")
    distributed = args.zero is not None or args.ddp
    rank, world = 0, 1
    ds_config = None
    if args.ddp:
        torch.distributed.init_process_group("nccl")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif distributed:
        import deepspeed

        deepspeed.init_distributed()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        ds_config = (
            json.loads(Path(args.ds_config).read_text())
            if args.ds_config
            else default_ds_config(args)
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    if args.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, local_rank)
    torch.manual_seed(0)
    nvml_before = nvml_used_bytes(local_rank)
    row: dict[str, Any] = {
        "model": spec.name,
        "model_type": spec.model_type,
        "method": args.method,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "grad_ckpt": args.grad_ckpt,
        "reentrant": args.reentrant and args.grad_ckpt,
        "lora_r": args.lora_r,
        "lora_targets": args.lora_targets,
        "lora_dropout": args.lora_dropout,
        "optim": args.optim,
        "loop": args.loop,
        "autocast": args.autocast,
        "keep_outputs": args.keep_outputs,
        "attn": args.attn,
        "precision": args.precision,
        "fused_loss": args.fused_loss,
        "zero": args.zero,
        "ddp": args.ddp,
        "world_size": world,
        "steps": args.steps,
        "memory_fraction": args.memory_fraction,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "tag": args.tag,
        "ds_config": ds_config,
    }
    t0 = time.time()
    oom = False
    error = None
    step_peaks: list[int] = []
    step_times: list[float] = []
    try:
        model = build_model(args, config, ds_config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        row["trainable_params"] = (
            sum(p.numel() for p in trainable) if not distributed or args.zero != 3 else None
        )
        optimizer = make_optimizer(args, trainable)
        engine = None
        if args.ddp:
            # zeroplan's DDP term: buckets are a flat copy of the gradients
            # (gradient_as_bucket_view off, PyTorch's default)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[torch.cuda.current_device()]
            )
        elif distributed:
            import deepspeed

            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=ds_config
            )
            engine.train()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        row["setup_allocated_bytes"] = torch.cuda.memory_allocated()
        # whether a kept output holds a KV cache (transformers turns it off under checkpointing)
        row["use_cache"] = bool(
            args.keep_outputs and getattr(config, "use_cache", False) and not args.grad_ckpt
        )
        scaler = (
            torch.amp.GradScaler("cuda")
            if args.precision == "fp16" and engine is None and args.autocast
            else None
        )
        torch.cuda.reset_peak_memory_stats()
        vocab = spec.vocab_size
        gen = torch.Generator(device="cuda").manual_seed(rank)
        out = None  # a kept output lives until the next forward returns, as in a plain loop
        for step in range(args.steps):
            ids = torch.randint(
                0, vocab, (args.micro_batch, args.seq_len), device="cuda", generator=gen
            )
            torch.cuda.synchronize()
            start = time.perf_counter()
            if engine is not None:
                out = engine(input_ids=ids, labels=ids)
                loss = out.loss
                if not args.keep_outputs:
                    out = None
                engine.backward(loss)
                engine.step()
            else:
                with torch.autocast("cuda", dtype=half(args), enabled=args.autocast):
                    out = model(input_ids=ids, labels=ids)
                loss = out.loss
                if not args.keep_outputs:
                    out = None
                if scaler is not None:  # fp16: what the HF Trainer's accelerate does
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            del loss, ids
            torch.cuda.synchronize()
            step_times.append(time.perf_counter() - start)
            step_peaks.append(torch.cuda.max_memory_allocated())
            if step == 0:
                row["after_step1_allocated_bytes"] = torch.cuda.memory_allocated()
    except torch.OutOfMemoryError as exc:
        oom = True
        error = str(exc).splitlines()[0][:300]
    except Exception as exc:  # a crash is a result too, but not an OOM
        error = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()
    peak_alloc = torch.cuda.max_memory_allocated()
    peak_reserved = torch.cuda.max_memory_reserved()
    nvml_after = nvml_used_bytes(local_rank)
    tokens = args.micro_batch * args.seq_len
    timed = step_times[1:] or step_times
    row.update(
        {
            "oom": oom,
            "error": error,
            "peak_allocated_bytes": peak_alloc,
            "peak_reserved_bytes": peak_reserved,
            "nvml_used_before_bytes": nvml_before,
            "nvml_used_bytes": nvml_after,
            "device_used_bytes": (nvml_after - nvml_before)
            if nvml_after and nvml_before is not None
            else None,
            "step_peaks_bytes": step_peaks,
            "step_seconds": step_times,
            "tokens_per_s_per_gpu": tokens / (sum(timed) / len(timed))
            if timed and not oom
            else None,
            "wall_seconds": time.time() - t0,
        }
    )
    if distributed:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(
            gathered,
            {
                k: row[k]
                for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "oom")
            },
        )
        row["per_rank"] = gathered
        row["peak_allocated_bytes"] = max(g["peak_allocated_bytes"] for g in gathered)
        row["peak_reserved_bytes"] = max(g["peak_reserved_bytes"] for g in gathered)
        row["oom"] = any(g["oom"] for g in gathered)
    row["env"] = environment()
    return row | {"rank": rank}


def main() -> None:
    args = parse_args()
    row = run(args)
    if row.pop("rank") == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        state = "OOM" if row["oom"] else ("ERROR " + row["error"] if row["error"] else "ok")
        print(
            f"{row['model']} {args.method} mb={args.micro_batch} s={args.seq_len} ckpt={args.grad_ckpt} "
            f"zero={args.zero} {args.loop} {args.optim} autocast={args.autocast} "
            f"keep={args.keep_outputs}: peak_alloc={row['peak_allocated_bytes'] / GiB:.2f} GiB "
            f"reserved={row['peak_reserved_bytes'] / GiB:.2f} GiB {state}",
            flush=True,
        )
    if args.zero is not None or args.ddp:
        import torch

        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
