"""TRL's CLI config (``trl sft --config recipe.yaml``), TRL 1.16.0, and a JSON of HF
``TrainingArguments`` / ``SFTConfig`` fields (format ``hf``).

``trl sft`` parses the file into ``ScriptArguments``, ``SFTConfig`` (TrainingArguments plus
SFT's own fields), ``ModelConfig`` and ``DatasetMixtureConfig`` (trl/scripts/sft.py), so
one key table serves both formats. The defaults differ:

- TRL (trl/trainer/sft_config.py, trl/trainer/model_config.py): ``gradient_checkpointing``
  true, ``bf16`` true unless ``fp16``, ``max_length`` 1024, no PEFT unless ``use_peft``
  (then r 16, alpha 32, dropout 0.05, PEFT's default targets for the architecture), the
  model loaded in ``dtype: float32`` unless told otherwise, no nested quantization.
- transformers' TrainingArguments (format ``hf``, a JSON of its fields for your own script):
  checkpointing off, no bf16/fp16; with any SFTConfig-only key (max_length, packing, ...)
  the SFTConfig defaults above. The model's dtype is your script's: assumed 16-bit.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from zeroplan.errors import BadRecipeError
from zeroplan.recipes.common import (
    Default,
    Key,
    Trainer,
    as_bool,
    as_float,
    as_int,
    as_optim,
    as_peft_targets,
    at_least_one,
    optional_bool,
    optional_int,
    optional_quoted_int,
    precision_edits,
    quoted_float,
    quoted_int,
    text,
)
from zeroplan.trainsetup import default_attention

VERSION = "1.16.0"
LABEL = f"TRL {VERSION}"
TRANSFORMERS = "5.25.0"
HF_LABEL = f"transformers {TRANSFORMERS} TrainingArguments"
_SFT = "trl/trainer/sft_config.py"
_MODEL = "trl/trainer/model_config.py"
_TA = "transformers/training_args.py"

ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = ("bfloat16", "float16", "auto")

# PEFT's default LoRA targets per model type when none are named
# (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21.2),
# for the catalog's model types; PEFT asks for target_modules for the others.
PEFT_DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
}


def peft_default_targets(model_type: str, key: str) -> tuple[str, ...]:
    if model_type not in PEFT_DEFAULT_TARGETS:
        raise BadRecipeError(
            f"{key} is not given and PEFT has no default LoRA targets for {model_type} "
            "models: name them (or all-linear)"
        )
    return PEFT_DEFAULT_TARGETS[model_type]


def _attention(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if value not in ATTENTIONS:
        raise BadRecipeError(f"{key}: {value} is not modelled; supported: {', '.join(ATTENTIONS)}")
    return str(value)


def _dtype(key: str, value: Any) -> str:
    if value not in (*DTYPES, "float32"):
        raise BadRecipeError(f"{key}: {value} is not modelled; supported: {', '.join(DTYPES)}")
    return str(value)


def _quant_type(key: str, value: Any) -> str:
    if value not in ("nf4", "fp4"):
        raise BadRecipeError(f"{key}: {value} is not modelled; supported: nf4, fp4")
    return str(value)


def _targets(key: str, value: Any) -> tuple[str, ...] | None:
    """ModelConfig.__post_init__ (trl/trainer/model_config.py) turns a one-item list into
    its string, which PEFT then reads as a pattern (common.as_peft_targets)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return as_peft_targets(key, value)


def _write_targets(targets: tuple[str, ...]) -> Any:
    return "all-linear" if targets == ("all-linear",) else list(targets)


def _keys(quoted: bool) -> tuple[Key, ...]:
    """The key table; ``quoted``: a quoted number reads as the number, as trl sft's argparse
    reads it (a JSON for your own script goes through HfArgumentParser.parse_dict, which
    hands values over as they are: there a quoted number stays a string)."""
    whole = quoted_int if quoted else as_int
    count = at_least_one(whole)
    number = quoted_float if quoted else as_float
    steps = optional_quoted_int if quoted else optional_int
    return (
        Key("model_name_or_path", "model", text, write=str),
        Key("use_peft", "use_peft", as_bool, write=bool),
        Key("load_in_4bit", "load_in_4bit", as_bool, write=bool),
        Key("load_in_8bit", "load_in_8bit", as_bool),
        Key("bnb_4bit_quant_type", "bnb_4bit_quant_type", _quant_type),
        Key("use_bnb_nested_quant", "nested_quant", as_bool),
        # the plan writes a setting back under the name the recipe used (Trainer.key_for)
        Key("dtype", "dtype", _dtype, write=str),
        Key("torch_dtype", "dtype", _dtype, write=str),  # the name before transformers 4.56
        Key("lora_r", "lora_r", count, write=int),
        Key("lora_alpha", "lora_alpha", whole, write=int),
        Key("lora_dropout", "lora_dropout", number, write=float),
        Key("lora_target_modules", "lora_targets", _targets, write=_write_targets),
        Key("per_device_train_batch_size", "micro_batch", count, write=int),
        Key("gradient_accumulation_steps", "grad_accum", count, write=int),
        Key("max_length", "seq_len", count, write=int),
        Key("max_seq_length", "seq_len", count, write=int),  # TRL's name before 0.20
        Key("gradient_checkpointing", "grad_ckpt", as_bool, write=bool),
        Key("optim", "optim", as_optim, write=str),
        Key("bf16", "bf16", optional_bool),
        Key("fp16", "fp16", as_bool),
        Key("attn_implementation", "attn", _attention, write=str),
        Key("packing", "packing", as_bool),
        Key("padding_free", "padding_free", as_bool),
        Key("use_liger_kernel", "fused_loss", as_bool, write=bool),
        Key("deepspeed", "deepspeed", lambda k, v: v, write=lambda v: v),
        Key("num_train_epochs", "epochs", number),
        Key("max_steps", "max_steps", steps),
    )


KEYS = _keys(quoted=True)

DEFAULTS = {
    "use_peft": Default(False, _MODEL),
    "load_in_4bit": Default(False, _MODEL),
    "load_in_8bit": Default(False, _MODEL),
    "nested_quant": Default(False, f"{_MODEL} (use_bnb_nested_quant)"),
    "dtype": Default("float32", f"{_MODEL} (dtype)"),
    "lora_r": Default(16, _MODEL),
    "lora_alpha": Default(32, _MODEL),
    "lora_dropout": Default(0.05, _MODEL),
    # None: PEFT's default for the architecture (PEFT_DEFAULT_TARGETS)
    "lora_targets": Default(None, f"{_MODEL} (lora_target_modules: PEFT's default)"),
    "micro_batch": Default(8, _TA),
    "grad_accum": Default(1, _TA),
    "seq_len": Default(1024, f"{_SFT} (max_length)"),
    "grad_ckpt": Default(True, _SFT),
    "optim": Default("adamw_torch_fused", _TA),
    # None: true unless fp16 (SFTConfig.__post_init__)
    "bf16": Default(None, _SFT),
    "fp16": Default(False, _TA),
    "attn": Default(
        None, f"{_MODEL} (attn_implementation: transformers' default, sdpa; Gemma-2 eager)"
    ),
    "packing": Default(False, _SFT),
    "padding_free": Default(False, _SFT),
    "fused_loss": Default(False, f"{_TA} (use_liger_kernel)"),
    "deepspeed": Default(None, _TA),
    "epochs": Default(3.0, _TA),
    "max_steps": Default(-1, _TA),
}
# SFTTrainer cuts each tokenized record at max_length, keeping its start (truncation_mode
# keep_start, the default), in _prepare_dataset
OVERLONG = ("truncate", f"{LABEL} SFTTrainer truncates at max_length (keep_start)")

# transformers' TrainingArguments where they differ from SFTConfig / trl sft; the model
# loading keys are the user's own script's, so they are not refused (dtype assumed 16-bit)
HF_DEFAULTS = {
    **DEFAULTS,
    "dtype": Default("auto", "your script's (assumed 16-bit)"),
    "grad_ckpt": Default(False, _TA),
    "bf16": Default(False, _TA),
}
# SFTConfig's own fields: with any of them a JSON is an SFTConfig, with SFTConfig's defaults
SFT_ONLY = frozenset(
    {
        "max_length",
        "max_seq_length",
        "packing",
        "padding_free",
        "dataset_text_field",
        "completion_only_loss",
        "assistant_only_loss",
        "packing_strategy",
        "dataset_kwargs",
    }
)

IGNORED = {
    "activation_offloading": "activation offloading to the CPU is not modelled",
    "use_dora": "DoRA's magnitude vectors and extra activations are not modelled",
    "lora_modules_to_save": "fully trained extra modules besides LoRA are not modelled",
    "lora_target_parameters": "LoRA on parameters (MoE experts) is not modelled",
    "fsdp": "FSDP is not modelled (zeroplan plans DDP or DeepSpeed)",
    "fsdp_config": "FSDP is not modelled (zeroplan plans DDP or DeepSpeed)",
    "torch_compile": "torch.compile's memory and speed are not modelled",
    "gradient_checkpointing_kwargs": "reentrant or not, zeroplan models checkpointing the same way",
    "bnb_4bit_quant_storage": "storage dtype of the packed 4-bit weights: same bytes",
    "model_init_kwargs": "extra from_pretrained arguments are not read",
    "use_cpu": "CPU training is not modelled",
}

MARKERS = frozenset(
    {
        "use_peft",
        "max_length",
        "max_seq_length",
        "dataset_name",
        "padding_free",
        "use_bnb_nested_quant",
        "dtype",
        "lora_task_type",
        "dataset_train_split",
        "use_liger_kernel",
        "lora_target_modules",
    }
)


def derive(s: dict[str, Any], model_type: str) -> tuple[dict[str, Any], list[str]]:
    """TRL's settings as zeroplan's: method from use_peft and load_in_4bit/8bit, bf16 true
    unless fp16, PEFT's default targets, packing or padding-free."""
    notes: list[str] = []
    if s["dtype"] == "float32":
        raise BadRecipeError(
            "dtype: float32 (TRL's default for trl sft) loads 32-bit base weights, which "
            "zeroplan does not model; set dtype: bfloat16 (or float16, auto)"
        )
    if s["load_in_8bit"]:
        raise BadRecipeError(
            "load_in_8bit: an 8-bit base is not modelled; supported: load_in_4bit (QLoRA), or "
            "a 16-bit base"
        )
    if s["load_in_4bit"] and not s["use_peft"]:
        raise BadRecipeError(
            "load_in_4bit without use_peft: a 4-bit base cannot be trained in full"
        )
    s["method"] = ("qlora" if s["load_in_4bit"] else "lora") if s["use_peft"] else "full"
    if s["method"] != "full" and s["lora_targets"] is None:
        s["lora_targets"] = peft_default_targets(model_type, "lora_target_modules")
    if s["method"] == "qlora" and not s["nested_quant"]:
        notes.append(
            "use_bnb_nested_quant false: the 4-bit weights' constants take about 0.37 bit per "
            "weight more than the double quantization zeroplan models"
        )
    if s["bf16"] is None:
        s["bf16"] = not s["fp16"]
    if s["bf16"] and s["fp16"]:
        raise BadRecipeError("bf16 and fp16 are both true; choose one")
    s["precision"] = "bf16" if s["bf16"] else "fp16" if s["fp16"] else ""
    if not s["precision"]:
        notes.append(
            "neither bf16 nor fp16: fp32 training, which zeroplan does not model; it models "
            "the card's mixed precision"
        )
    s["attn"] = s["attn"] or default_attention(model_type)
    s["packing"] = bool(s["packing"] or s["padding_free"])
    # TRL renders messages with the tokenizer's chat template and text as it is + EOS: what
    # zeroplan's data counter does without a prompt format
    s["prompt"], s["_prompt_why"] = None, "SFTTrainer: the chat template (text: + EOS)"
    s["overlong"], s["_overlong_why"] = OVERLONG
    return s, notes


def method_edits(method: str, data: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"use_peft": method != "full", "load_in_4bit": method == "qlora"}
    if method == "qlora":
        out["use_bnb_nested_quant"] = True  # the double quantization zeroplan models
    return out


TRAINER = Trainer(
    format="trl",
    label=LABEL,
    keys=KEYS,
    defaults=DEFAULTS,
    ignored=IGNORED,
    markers=MARKERS,
    derive=derive,
    edits={"method": method_edits, "precision": precision_edits},
    # trl sft hands a key no dataclass takes to accelerate launch, which refuses it
    key_lists=(f"trl-{VERSION}.txt", "transformers-training-args.txt", "accelerate-launch.txt"),
)

# TrainingArguments' JSON: TRL's keys and readers under transformers' defaults, found by
# its file type rather than by marker keys. Your script may declare arguments of its own,
# so a key outside TrainingArguments / SFTConfig / TRL's is noted, not refused.
HF_TRAINER = replace(
    TRAINER,
    format="hf",
    label=HF_LABEL,
    keys=_keys(quoted=False),
    defaults=HF_DEFAULTS,
    markers=frozenset(),
    key_lists=(f"trl-{VERSION}.txt", "transformers-training-args.txt"),
    unknown_note="not a TrainingArguments, SFTConfig or TRL field: HfArgumentParser refuses "
    "such a key unless your script's own arguments take it",
)
# an hf JSON with SFTConfig's own keys: SFTConfig's defaults under the hf format
SFT_JSON_TRAINER = replace(
    HF_TRAINER,
    label=f"TRL {VERSION} SFTConfig",
    defaults={**DEFAULTS, "dtype": HF_DEFAULTS["dtype"]},
)
