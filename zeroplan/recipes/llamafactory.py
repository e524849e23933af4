"""LLaMA-Factory training YAML (``llamafactory-cli train recipe.yaml``), version 0.9.5.

Keys are the fields of its argument dataclasses (src/llamafactory/hparams/: model_args.py,
data_args.py, finetuning_args.py) and of transformers' ``Seq2SeqTrainingArguments``, which
it parses the YAML into. What it does with them, as far as memory and speed go:

- ``finetuning_type`` lora (default) or full; ``quantization_bit: 4`` (bitsandbytes) makes
  LoRA QLoRA. freeze and oft tuning are not modelled.
- ``lora_rank`` 8, ``lora_alpha`` = 2 × rank, ``lora_dropout`` 0, ``lora_target: all``
  (every linear layer but the head) unless given (finetuning_args.py).
- gradient checkpointing is on unless ``disable_gradient_checkpointing: true``
  (model_args.py; model/model_utils/checkpointing.py turns it on).
- ``cutoff_len`` 2048 (data_args.py); ``packing`` is off for SFT and on for ``stage: pt``
  unless given (parser.py), and
  ``neat_packing`` (packing without cross-attention) turns it on (hparams/parser.py).
- ``flash_attn``: auto (transformers' default, sdpa; for Gemma-2 eager unless flash-attn is
  installed), sdpa, fa2, disabled (eager).
- ``enable_liger_kernel`` patches in Liger's kernels, the fused linear cross-entropy among them.
- the batch, accumulation, optimizer, precision and ``deepspeed`` keys are transformers'
  TrainingArguments (per-device batch 8, accumulation 1, adamw_torch_fused, no bf16/fp16).
"""

from __future__ import annotations

from typing import Any

from zeroplan.errors import BadRecipeError
from zeroplan.prompts import LLAMAFACTORY_TEMPLATES, PromptFormat
from zeroplan.recipes.common import (
    Default,
    Key,
    Trainer,
    as_bool,
    as_float,
    as_int,
    as_optim,
    as_targets,
    at_least_one,
    negated,
    optional_int,
    precision_edits,
    text,
)
from zeroplan.trainsetup import default_attention

VERSION = "0.9.5"
LABEL = f"LLaMA-Factory {VERSION}"
_SRC = "src/llamafactory/hparams"
_TA = "transformers TrainingArguments"

# "auto" is resolved per model in derive (model/model_utils/attention.py)
ATTENTION = {"auto": "auto", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager"}


def _finetuning(key: str, value: Any) -> str:
    if value not in ("lora", "full"):
        raise BadRecipeError(
            f"{key}: {value} is not modelled; supported: lora, full (with quantization_bit: 4 "
            "for QLoRA)"
        )
    return str(value)


def _quant_bits(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        # HfArgumentParser.parse_dict keeps a quoted "4" a string, which LLaMA-Factory's
        # `quantization_bit == 4` tests then miss
        raise BadRecipeError(
            f"{key}: {value!r} is quoted, and LLaMA-Factory does not read a quoted number as "
            f"one: write {key}: {value.strip()} without quotes"
        )
    if value != 4:
        raise BadRecipeError(
            f"{key}: {value!r} is not modelled; supported: 4 (bitsandbytes NF4, QLoRA), or none"
        )
    return 4


def _quant_method(key: str, value: Any) -> str:
    # LLaMA-Factory parses this into its QuantizationMethod enum, whose bitsandbytes value is
    # exactly "bnb" (hparams/model_args.py): "bitsandbytes" or "BNB" stop it before training
    if value != "bnb":
        raise BadRecipeError(
            f"{key}: {value} is not modelled; supported: bnb (bitsandbytes; LLaMA-Factory "
            "accepts only that spelling)"
        )
    return "bnb"


def _attention(key: str, value: Any) -> str:
    if value not in ATTENTION:
        raise BadRecipeError(f"{key}: {value} is not modelled; supported: {', '.join(ATTENTION)}")
    return ATTENTION[str(value)]


_FLASH_ATTN = {"sdpa": "sdpa", "flash_attention_2": "fa2", "eager": "disabled"}


def _write_targets(targets: tuple[str, ...]) -> str:
    return "all" if targets == ("all-linear",) else ",".join(targets)


def _stage(key: str, value: Any) -> str:
    if value not in ("sft", "pt"):
        raise BadRecipeError(
            f"{key}: {value} is not modelled; supported: sft, pt (one model, no reference or "
            "reward model)"
        )
    return str(value)


def _deepspeed(key: str, value: Any) -> Any:
    return value


KEYS = (
    Key("model_name_or_path", "model", text, write=str),
    Key("stage", "stage", _stage),
    Key("finetuning_type", "finetuning_type", _finetuning),
    Key("quantization_bit", "quantization_bit", _quant_bits),
    Key("quantization_method", "quantization_method", _quant_method),
    Key("lora_rank", "lora_r", at_least_one(as_int), write=int),
    Key("lora_alpha", "lora_alpha", as_int, write=int),
    Key("lora_dropout", "lora_dropout", as_float, write=float),
    Key("lora_target", "lora_targets", as_targets, write=_write_targets),
    Key("per_device_train_batch_size", "micro_batch", at_least_one(as_int), write=int),
    Key("gradient_accumulation_steps", "grad_accum", at_least_one(as_int), write=int),
    Key("cutoff_len", "seq_len", at_least_one(as_int), write=int),
    Key("disable_gradient_checkpointing", "grad_ckpt", negated, write=lambda v: not v),
    Key("optim", "optim", as_optim, write=str),
    Key("bf16", "bf16", as_bool),
    Key("fp16", "fp16", as_bool),
    Key("flash_attn", "attn", _attention, write=lambda v: _FLASH_ATTN[v]),
    Key("packing", "packing", lambda k, v: None if v is None else as_bool(k, v)),
    Key("neat_packing", "neat_packing", as_bool),
    Key("enable_liger_kernel", "fused_loss", as_bool, write=bool),
    Key("deepspeed", "deepspeed", _deepspeed, write=lambda v: v),
    Key("template", "template", lambda k, v: None if v is None else text(k, v)),
    Key("num_train_epochs", "epochs", as_float),
    Key("max_steps", "max_steps", optional_int),
)

# What LLaMA-Factory 0.9.5 runs when a key is left out (src/llamafactory/hparams/*.py, and
# transformers' TrainingArguments for the trainer's own keys).
DEFAULTS = {
    "stage": Default("sft", f"{_SRC}/finetuning_args.py"),
    "finetuning_type": Default("lora", f"{_SRC}/finetuning_args.py"),
    "quantization_bit": Default(None, f"{_SRC}/model_args.py"),
    "lora_r": Default(8, f"{_SRC}/finetuning_args.py"),
    # None: 2 × lora_rank (FinetuningArguments.__post_init__)
    "lora_alpha": Default(None, f"{_SRC}/finetuning_args.py"),
    "lora_dropout": Default(0.0, f"{_SRC}/finetuning_args.py"),
    "lora_targets": Default(("all-linear",), f"{_SRC}/finetuning_args.py (lora_target: all)"),
    "micro_batch": Default(8, _TA),
    "grad_accum": Default(1, _TA),
    "seq_len": Default(2048, f"{_SRC}/data_args.py"),
    "grad_ckpt": Default(True, f"{_SRC}/model_args.py (disable_gradient_checkpointing: false)"),
    "optim": Default("adamw_torch_fused", f"{_TA} (torch >= 2.8)"),
    "bf16": Default(False, _TA),
    "fp16": Default(False, _TA),
    "attn": Default("auto", f"{_SRC}/model_args.py (flash_attn: auto)"),
    # None: on for stage pt, off for sft (parser.py: packing if set, else stage == "pt")
    "packing": Default(None, f"{_SRC}/parser.py (stage pt packs, sft does not)"),
    "neat_packing": Default(False, f"{_SRC}/data_args.py"),
    "fused_loss": Default(False, f"{_SRC}/model_args.py (enable_liger_kernel)"),
    "deepspeed": Default(None, _TA),
    # None: the tokenizer's own chat template (data/template.py get_template_and_fix_tokenizer)
    "template": Default(None, f"{_SRC}/data_args.py"),
    "epochs": Default(3.0, _TA),
    "max_steps": Default(-1, _TA),
}
_TEMPLATES = "src/llamafactory/data/template.py"
# each record is cut to cutoff_len, prompt and answer in proportion (infer_seqlen)
OVERLONG = ("truncate", f"{LABEL} cuts each record at cutoff_len (data/processor/supervised.py)")

IGNORED = {
    "pure_bf16": "trains the LoRA weights in bf16 without fp32 copies; zeroplan models PEFT's fp32 adapters",
    "upcast_layernorm": "fp32 layer norms: a few MB, not modelled",
    "upcast_lmhead_output": "fp32 head output: not modelled (the logits term is fp32 already)",
    "use_galore": "GaLore's projected optimizer states are not modelled",
    "use_apollo": "APOLLO's optimizer states are not modelled",
    "use_badam": "BAdam's block-wise updates are not modelled",
    "use_adam_mini": "Adam-mini's reduced states are not modelled",
    "use_muon": "Muon's optimizer states are not modelled",
    "use_unsloth": "Unsloth's kernels and offloaded checkpointing are not modelled",
    "use_unsloth_gc": "Unsloth's offloaded checkpointing is not modelled",
    "use_llama_pro": "LLaMA Pro's added blocks are not modelled",
    "use_dora": "DoRA's magnitude vectors and extra activations are not modelled",
    "use_reentrant_gc": "reentrant or not, zeroplan models checkpointing the same way",
    "shift_attn": "shift short attention (S²-Attn) is not modelled",
    "mixture_of_depths": "mixture-of-depths is not modelled",
    "additional_target": "extra trainable modules besides LoRA are not modelled",
    "freeze_trainable_layers": "freeze tuning is not modelled",
    "fsdp": "FSDP is not modelled (zeroplan plans DDP or DeepSpeed)",
    "fsdp_config": "FSDP is not modelled (zeroplan plans DDP or DeepSpeed)",
    "torch_compile": "torch.compile's memory and speed are not modelled",
    "rope_scaling": "changes positions only, not memory",
    "use_kt": "KTransformers' CPU/GPU hybrid is not modelled",
    "use_mca": "Megatron-core training is not modelled",
    "fp8": "FP8 training is not modelled",
}

MARKERS = frozenset(
    {
        "stage",
        "finetuning_type",
        "cutoff_len",
        "lora_target",
        "lora_rank",
        "template",
        "dataset_dir",
        "disable_gradient_checkpointing",
        "flash_attn",
        "quantization_bit",
        "enable_liger_kernel",
        "neat_packing",
        "do_train",
    }
)


def derive(s: dict[str, Any], model_type: str) -> tuple[dict[str, Any], list[str]]:
    """LLaMA-Factory's settings as zeroplan's: method from finetuning_type and
    quantization_bit, lora_alpha = 2 × rank when absent, precision, packing."""
    notes: list[str] = []
    if s["finetuning_type"] == "full":
        if s["quantization_bit"] is not None:
            raise BadRecipeError("quantization_bit with finetuning_type: full is not modelled")
        s["method"] = "full"
    else:
        s["method"] = "qlora" if s["quantization_bit"] == 4 else "lora"
    if s["method"] != "full" and s["lora_targets"] is None:
        # `lora_target:` left empty reaches LLaMA-Factory as None, where it stops the run
        raise BadRecipeError(
            "lora_target is empty: name the modules (q_proj,v_proj) or write all (every "
            "linear layer), or drop the key for LLaMA-Factory's default, all"
        )
    if s["lora_alpha"] is None:
        s["lora_alpha"] = 2 * s["lora_r"]
    if s["bf16"] and s["fp16"]:
        raise BadRecipeError("bf16 and fp16 are both true; choose one")
    s["precision"] = "bf16" if s["bf16"] else "fp16" if s["fp16"] else ""
    if not s["precision"]:
        notes.append(
            "neither bf16 nor fp16: LLaMA-Factory loads the model in the card's 16-bit type "
            "without mixed precision; zeroplan models the card's mixed precision"
        )
    # hparams/parser.py: an unset packing is on for pre-training (stage pt), off for sft
    packing = s["stage"] == "pt" if s["packing"] is None else s["packing"]
    s["packing"] = bool(packing or s["neat_packing"])
    s["attn"] = _auto_attention(s["attn"], model_type, notes)
    s["prompt"], s["_prompt_why"] = _prompt(s["template"], notes)
    s["overlong"], s["_overlong_why"] = OVERLONG
    return s, notes


def _auto_attention(attn: str, model_type: str, notes: list[str]) -> str:
    """``flash_attn: auto`` as LLaMA-Factory resolves it (model/model_utils/attention.py):
    transformers' default (trainsetup.default_attention), except that for Gemma-2 it asks for
    FlashAttention-2 when the flash-attn package is installed, which ``pip install
    llamafactory`` does not install; estimated without it (eager)."""
    if attn != "auto":
        return attn
    if model_type == "gemma2":
        notes.append(
            "flash_attn auto on Gemma-2: LLaMA-Factory runs eager attention unless flash-attn "
            "is installed (then fa2); estimated as eager (set flash_attn: fa2 if installed)"
        )
    return default_attention(model_type)


def _prompt(template: str | None, notes: list[str]) -> tuple[PromptFormat | None, str]:
    """How LLaMA-Factory writes a record: its ``template:`` where zeroplan knows it."""
    if template is None:
        return None, f"default of {LABEL}: the tokenizer's chat template"
    if template in LLAMAFACTORY_TEMPLATES:
        name = f"{LABEL} template {template}"
        fmt = PromptFormat("llamafactory", name, _TEMPLATES, LLAMAFACTORY_TEMPLATES[template])
        return fmt, "template"
    notes.append(
        f"template: {template} is not one zeroplan writes ({', '.join(LLAMAFACTORY_TEMPLATES)}): "
        "--data lengths come from the tokenizer's chat template"
    )
    return None, f"template ({template}: the tokenizer's chat template instead)"


def method_edits(method: str, data: Any) -> dict[str, Any]:
    """The keys that make ``method`` (the plan switches lora and qlora only)."""
    return {"quantization_bit": 4 if method == "qlora" else None}


TRAINER = Trainer(
    format="llamafactory",
    label=LABEL,
    keys=KEYS,
    defaults=DEFAULTS,
    ignored=IGNORED,
    markers=MARKERS,
    derive=derive,
    edits={"method": method_edits, "precision": precision_edits},
    # parsed with HfArgumentParser.parse_dict(allow_extra_keys=False): any other key stops it
    key_lists=(f"llamafactory-{VERSION}.txt", "transformers-training-args.txt"),
)
