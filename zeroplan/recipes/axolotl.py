"""axolotl YAML (``axolotl train recipe.yml``), version 0.18.0.

Keys and defaults are axolotl's config schema (src/axolotl/utils/schemas/: config.py,
training.py, peft.py, model.py) and its Liger plugin's (src/axolotl/integrations/liger/):

- ``adapter`` lora or qlora (with ``load_in_4bit: true``); absent: every weight trains.
  ``load_in_4bit`` with ``adapter: lora`` quantizes nothing but casts the base to float32
  (loaders/model.py): refused.
  ``load_in_8bit`` LoRA is not modelled.
- ``lora_r`` has no default (required for an adapter); ``lora_alpha`` neither (only the
  scale, no memory); ``lora_dropout`` 0; ``lora_target_linear: true`` is all-linear, else
  ``lora_target_modules``, else PEFT's default for the architecture.
- ``micro_batch_size`` 1, ``gradient_accumulation_steps`` 1 (also when only ``batch_size``
  is given: the schema's default 1 wins over normalize_config's batch_size /
  micro_batch_size; both set is refused), ``sequence_len`` 512,
  ``gradient_checkpointing`` false, ``optimizer`` adamw_torch_fused, ``bf16: auto``
  (bf16 where the card has it), ``sample_packing`` off.
- attention: ``attn_implementation``, or the older switches ``flash_attention``,
  ``sdp_attention``, ``eager_attention``; none: transformers' default (sdpa; Gemma-2 eager).
- its fused LoRA kernels (``lora_qkv_kernel``, ``lora_o_kernel``, ``lora_mlp_kernel``): on for
  LoRA / QLoRA when the recipe sets none of the four ``lora_*_kernel`` keys and not
  ``trust_remote_code`` (``check_auto_enable_lora_kernels`` in config.py, the same in 0.18.0
  and 0.19.0; whatever ``lora_dropout``: the kernels take dropout, one mask per group), else
  each as set.
- the fused loss: the Liger plugin (``plugins: [axolotl.integrations.liger.LigerPlugin]``)
  with ``liger_fused_linear_cross_entropy: true``, or the Cut Cross Entropy plugin
  (``cut_cross_entropy: true``), which also never materialises the logits (modelled as Liger's).
- values as its pydantic schema reads them: ``"2048"`` is 2048, ``"false"`` false, and a key
  left empty (YAML null) is unset (``bool | None`` fields; ``lora_dropout``: no dropout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zeroplan.errors import BadRecipeError
from zeroplan.prompts import PromptFormat
from zeroplan.recipes.common import (
    Default,
    Key,
    Trainer,
    as_bool,
    as_optim,
    as_peft_targets,
    at_least_one,
    optional_bool,
    optional_quoted_int,
    precision_edits,
    quoted_float,
    quoted_int,
    same,
    text,
)
from zeroplan.recipes.trl import peft_default_targets
from zeroplan.trainsetup import default_attention

VERSION = "0.18.0"
LABEL = f"axolotl {VERSION}"
_SCHEMAS = "src/axolotl/utils/schemas"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
ATTENTIONS = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash_attention_2"}


def _adapter(key: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    if value not in ("lora", "qlora"):
        raise BadRecipeError(
            f"{key}: {value} is not modelled; supported: lora, qlora, or none (full fine-tuning)"
        )
    return str(value)


def _ckpt(key: str, value: Any) -> bool:
    if value in ("offload", "offload_disk"):
        raise BadRecipeError(
            f"{key}: {value} (checkpoints offloaded to the CPU or disk) is not modelled; "
            "supported: true, false"
        )
    # the schema's bool | None: unset is off, and a quoted "false" is false
    return False if value is None else as_bool(key, value)


def _dropout(key: str, value: Any) -> float:
    # the schema's float | None: None passes on to PEFT's LoraConfig as no dropout
    return 0.0 if value is None else quoted_float(key, value)


def _attention(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if value not in ATTENTIONS:
        raise BadRecipeError(f"{key}: {value} is not modelled; supported: {', '.join(ATTENTIONS)}")
    return ATTENTIONS[str(value)]


def _switch(attn: str) -> Any:
    def read(key: str, value: Any) -> str | None:
        return attn if optional_bool(key, value) else None

    return read


def _bf16(key: str, value: Any) -> bool | None:
    """true / false, or None for 'auto' (bf16 where the card has it)."""
    if value in ("auto", None):
        return None
    if value == "full":
        raise BadRecipeError(f"{key}: full (bf16 without fp32 copies) is not modelled")
    return as_bool(key, value)


def _plugins(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRecipeError(f"{key}: a list of plugin classes, got {value!r}")
    return tuple(str(v) for v in value)


KEYS = (
    Key("base_model", "model", text, write=str),
    Key("adapter", "adapter", _adapter),
    # bool | None in the schema: a key left empty is unset
    Key("load_in_4bit", "load_in_4bit", optional_bool),
    Key("load_in_8bit", "load_in_8bit", optional_bool),
    Key("lora_r", "lora_r", at_least_one(optional_quoted_int), write=int),
    Key("lora_alpha", "lora_alpha", optional_quoted_int, write=int),
    Key("lora_dropout", "lora_dropout", _dropout, write=float),
    Key("lora_target_linear", "lora_target_linear", optional_bool),
    Key("lora_target_modules", "lora_targets", as_peft_targets),
    Key("micro_batch_size", "micro_batch", at_least_one(quoted_int), write=int),
    Key("gradient_accumulation_steps", "grad_accum", at_least_one(quoted_int), write=int),
    Key("batch_size", "batch_size", at_least_one(optional_quoted_int)),
    Key("sequence_len", "seq_len", at_least_one(quoted_int), write=int),
    Key("gradient_checkpointing", "grad_ckpt", _ckpt, write=bool),
    Key("optimizer", "optim", as_optim, write=str),
    Key("bf16", "bf16", _bf16),
    Key("fp16", "fp16", optional_bool),
    Key("attn_implementation", "attn", _attention, write=str),
    Key("flash_attention", "attn", _switch("flash_attention_2")),
    Key("sdp_attention", "attn", _switch("sdpa")),
    Key("eager_attention", "attn", _switch("eager")),
    Key("sample_packing", "packing", optional_bool),
    Key("plugins", "plugins", _plugins),
    Key("liger_fused_linear_cross_entropy", "liger_flce", optional_bool),
    Key("cut_cross_entropy", "cut_cross_entropy", optional_bool),
    Key("deepspeed", "deepspeed", same, write=lambda v: v),
    Key("lora_qkv_kernel", "lora_qkv_kernel", optional_bool),
    Key("lora_o_kernel", "lora_o_kernel", optional_bool),
    Key("lora_mlp_kernel", "lora_mlp_kernel", optional_bool),
    Key("lora_embedding_kernel", "lora_embedding_kernel", optional_bool),
    Key("trust_remote_code", "trust_remote_code", optional_bool),
    Key("datasets", "datasets", same),
    Key("excess_length_strategy", "excess_length", same),
    Key("num_epochs", "epochs", quoted_float),
    Key("max_steps", "max_steps", optional_quoted_int),
)
# axolotl's fused LoRA kernels; setting any of the four keys turns the auto-enable off
LORA_KERNEL_KEYS = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel")
_AUTO_KERNELS = f"{_SCHEMAS}/config.py (check_auto_enable_lora_kernels)"

DEFAULTS = {
    "adapter": Default(None, f"{_SCHEMAS}/peft.py"),
    "load_in_4bit": Default(False, f"{_SCHEMAS}/peft.py"),
    "load_in_8bit": Default(False, f"{_SCHEMAS}/peft.py"),
    "lora_r": Default(None, f"{_SCHEMAS}/peft.py (no default)"),
    "lora_alpha": Default(None, f"{_SCHEMAS}/peft.py (no default)"),
    "lora_dropout": Default(0.0, f"{_SCHEMAS}/peft.py"),
    "lora_target_linear": Default(None, f"{_SCHEMAS}/peft.py"),
    "lora_targets": Default(None, f"{_SCHEMAS}/peft.py (PEFT's default)"),
    "micro_batch": Default(1, f"{_SCHEMAS}/training.py"),
    "grad_accum": Default(1, f"{_SCHEMAS}/training.py"),
    "batch_size": Default(None, f"{_SCHEMAS}/training.py"),
    "seq_len": Default(512, f"{_SCHEMAS}/config.py (sequence_len)"),
    "grad_ckpt": Default(False, f"{_SCHEMAS}/config.py"),
    "optim": Default("adamw_torch_fused", f"{_SCHEMAS}/training.py"),
    "bf16": Default(None, f"{_SCHEMAS}/config.py (bf16: auto)"),
    "fp16": Default(None, f"{_SCHEMAS}/config.py"),
    "attn": Default(None, f"{_SCHEMAS}/config.py (transformers' default, sdpa; Gemma-2 eager)"),
    "packing": Default(None, f"{_SCHEMAS}/config.py (sample_packing)"),
    "plugins": Default((), f"{_SCHEMAS}/config.py"),
    "liger_flce": Default(None, "src/axolotl/integrations/liger/args.py"),
    "cut_cross_entropy": Default(None, "src/axolotl/integrations/cut_cross_entropy/args.py"),
    "deepspeed": Default(None, f"{_SCHEMAS}/config.py"),
    "lora_qkv_kernel": Default(None, _AUTO_KERNELS),
    "lora_o_kernel": Default(None, _AUTO_KERNELS),
    "lora_mlp_kernel": Default(None, _AUTO_KERNELS),
    "lora_embedding_kernel": Default(None, _AUTO_KERNELS),
    "trust_remote_code": Default(None, f"{_SCHEMAS}/model.py"),
    "datasets": Default(None, f"{_SCHEMAS}/config.py"),
    # None: drop (utils/data/utils.py handle_long_seq_in_dataset; the same in 0.19.0)
    "excess_length": Default(None, f"{_SCHEMAS}/config.py (excess_length_strategy)"),
    "epochs": Default(1.0, f"{_SCHEMAS}/training.py (num_epochs)"),
    "max_steps": Default(None, f"{_SCHEMAS}/config.py"),
}
# type: alpaca: AlpacaPrompter (instruct style) + AlpacaPromptTokenizingStrategy
ALPACA = PromptFormat(
    "axolotl_alpaca",
    f"{LABEL} type: alpaca",
    "src/axolotl/prompters.py, prompt_tokenizers.py",
)
# dataset types whose records are written with the tokenizer's chat template
CHAT_TEMPLATE_TYPES = ("chat_template",)

IGNORED = {
    "fsdp": "FSDP is not modelled (zeroplan plans DDP or DeepSpeed)",
    "fsdp_config": "FSDP is not modelled (zeroplan plans DDP or DeepSpeed)",
    "unsloth_lora_mlp": "Unsloth's LoRA kernels are not modelled",
    "unsloth_lora_qkv": "Unsloth's LoRA kernels are not modelled",
    "unsloth_lora_o": "Unsloth's LoRA kernels are not modelled",
    "unsloth_cross_entropy_loss": "Unsloth's loss kernel is not modelled",
    "relora": "ReLoRA's restarts are not modelled",
    "activation_offloading": "activation offloading to the CPU is not modelled",
    "chunked_cross_entropy": "chunked cross-entropy's smaller logits are not modelled",
    "liger_rms_norm": "Liger's RMSNorm kernel: small activations, not modelled",
    "liger_glu_activation": "Liger's SwiGLU kernel: small activations, not modelled",
    "liger_rope": "Liger's RoPE kernel: not modelled",
    "liger_cross_entropy": "Liger's (unfused) cross-entropy still materialises the logits",
    "xformers_attention": "xformers attention is not modelled",
    "s2_attention": "shifted sparse attention is not modelled",
    "sequence_parallel_degree": "sequence parallelism is not modelled",
    "context_parallel_size": "context parallelism is not modelled",
    "torch_compile": "torch.compile's memory and speed are not modelled",
    "peft_use_dora": "DoRA's magnitude vectors and extra activations are not modelled",
    "lora_modules_to_save": "fully trained extra modules besides LoRA are not modelled",
    "gradient_checkpointing_kwargs": "reentrant or not, zeroplan models checkpointing the same way",
    "fp8": "FP8 training is not modelled",
}

MARKERS = frozenset(
    {
        "base_model",
        "micro_batch_size",
        "sequence_len",
        "adapter",
        "sample_packing",
        "lora_target_linear",
        "datasets",
        "plugins",
        "num_epochs",
        "val_set_size",
        "optimizer",
        "flash_attention",
    }
)


def derive(s: dict[str, Any], model_type: str) -> tuple[dict[str, Any], list[str]]:
    """axolotl's settings as zeroplan's: method from adapter and load_in_*bit, targets,
    precision, attention, fused loss."""
    notes: list[str] = []
    if s["load_in_8bit"]:
        raise BadRecipeError(
            "load_in_8bit: an 8-bit base is not modelled; supported: load_in_4bit with "
            "adapter: qlora, or a 16-bit base"
        )
    adapter = s["adapter"]
    if adapter == "qlora" and not s["load_in_4bit"]:
        raise BadRecipeError("adapter: qlora needs load_in_4bit: true (axolotl refuses it too)")
    if adapter == "lora" and s["load_in_4bit"]:
        # loaders/model.py quantizes to 4 bit only for adapter: qlora, yet runs PEFT's
        # prepare_model_for_kbit_training whenever load_in_4bit is set, which casts the
        # 16-bit base to float32 (skipped under ZeRO-3)
        raise BadRecipeError(
            "adapter: lora with load_in_4bit: axolotl loads a 16-bit base (4-bit only with "
            "adapter: qlora) and casts it to float32 for k-bit training, which zeroplan does "
            "not model; write adapter: qlora for QLoRA, or drop load_in_4bit for LoRA"
        )
    if adapter is None and s["load_in_4bit"]:
        raise BadRecipeError("load_in_4bit without an adapter: a 4-bit base cannot train in full")
    s["method"] = "full" if adapter is None else "qlora" if s["load_in_4bit"] else "lora"
    if s["method"] != "full":
        if s["lora_r"] is None:
            raise BadRecipeError("lora_r is missing: axolotl has no default LoRA rank")
        if s["lora_target_linear"]:
            s["lora_targets"] = ("all-linear",)
        elif s["lora_targets"] is None:
            s["lora_targets"] = peft_default_targets(model_type, "lora_target_modules")
    s["lora_kernels"], why = _lora_kernels(s, notes)
    s["_lora_kernels_why"] = why
    if s["batch_size"] is not None:
        if "grad_accum" in s["_given"]:
            raise BadRecipeError(
                "gradient_accumulation_steps and batch_size are both set: axolotl refuses "
                "that (check_gas_bsz); keep one"
            )
        # the schema fills gradient_accumulation_steps with its default 1 before
        # normalize_config's `gradient_accumulation_steps or batch_size // micro_batch_size`
        # runs, so batch_size never sets the accumulation (utils/config/__init__.py)
        notes.append(
            f"batch_size {s['batch_size']} without gradient_accumulation_steps: {LABEL} keeps "
            "the accumulation at its default 1 (batch_size only counts the run's steps)"
        )
    if s["bf16"] and s["fp16"]:
        raise BadRecipeError("bf16 and fp16 are both true; choose one")
    s["precision"] = "bf16" if s["bf16"] else "fp16" if s["fp16"] else ""
    s["attn"] = s["attn"] or default_attention(model_type)
    s["packing"] = bool(s["packing"])
    liger = LIGER_PLUGIN in s["plugins"] and bool(s["liger_flce"])
    cce = CCE_PLUGIN in s["plugins"] and s["cut_cross_entropy"] is not False
    if s["liger_flce"] and LIGER_PLUGIN not in s["plugins"]:
        notes.append(
            f"liger_fused_linear_cross_entropy without {LIGER_PLUGIN} in plugins: axolotl "
            "does not load it, so the loss is not fused"
        )
    if cce:
        notes.append(
            "Cut Cross Entropy never materialises the logits: modelled as Liger's fused loss"
        )
    s["fused_loss"] = liger or cce
    s["prompt"], s["_prompt_why"] = _prompt(s["datasets"], notes)
    s["overlong"], s["_overlong_why"] = _overlong(s["excess_length"], notes)
    return s, notes


def _prompt(datasets: Any, notes: list[str]) -> tuple[PromptFormat | None, str]:
    """How axolotl writes the records of the recipe's (first) dataset: ``type: alpaca`` its
    alpaca prompt; ``chat_template`` the tokenizer's chat template; others are counted with
    the chat template and a note."""
    types = [d.get("type") for d in datasets or [] if isinstance(d, dict)]
    if not types:
        return None, "no datasets: the tokenizer's chat template"
    if len(set(map(str, types))) > 1:
        notes.append(
            f"datasets of types {', '.join(map(str, types))}: --data is read as the first's"
        )
    kind = types[0]
    if kind == "alpaca":
        return ALPACA, "datasets[0].type"
    if kind in CHAT_TEMPLATE_TYPES:
        return None, "datasets[0].type: the tokenizer's chat template"
    notes.append(
        f"datasets type {kind} is not one zeroplan writes (alpaca, chat_template): --data "
        "lengths come from the tokenizer's chat template"
    )
    return None, f"datasets[0].type ({kind}: the tokenizer's chat template instead)"


def _overlong(strategy: Any, notes: list[str]) -> tuple[str, str]:
    """axolotl drops a tokenized record longer than sequence_len unless
    ``excess_length_strategy: truncate`` (``raise`` stops the run: counted as drop)."""
    where = "utils/data/utils.py handle_long_seq_in_dataset"
    if strategy in (None, "drop"):
        return "drop", f"{LABEL} drops records longer than sequence_len ({where})"
    if strategy == "truncate":
        return "truncate", "excess_length_strategy"
    if strategy == "raise":
        notes.append(
            "excess_length_strategy: raise: axolotl stops at a record longer than sequence_len; "
            "--data counts such records as dropped"
        )
        return "drop", "excess_length_strategy (raise: counted as drop)"
    raise BadRecipeError(f"excess_length_strategy: {strategy} is not one of drop, truncate, raise")


def _lora_kernels(s: dict[str, Any], notes: list[str]) -> tuple[bool, str]:
    """Whether axolotl runs its fused LoRA kernels, and why: auto-enabled for LoRA / QLoRA
    when the recipe sets none of the ``lora_*_kernel`` keys and not ``trust_remote_code``,
    else as set. One bool models the three: a recipe that turns on only some is estimated
    with none (PEFT's path keeps more: the estimate errs high) and says so."""
    if s["method"] == "full":
        return False, "no adapter"
    keys = (*LORA_KERNEL_KEYS, "lora_embedding_kernel")
    if all(s[k] is None for k in keys):
        if s["trust_remote_code"]:
            return False, "trust_remote_code: axolotl does not turn them on"
        return True, f"auto-enabled for {s['method']} by {LABEL}"
    on = [k for k in LORA_KERNEL_KEYS if s[k]]
    if len(on) == len(LORA_KERNEL_KEYS):
        return True, f"{', '.join(on)} set true"
    if on:
        notes.append(
            f"only {', '.join(on)} of axolotl's LoRA kernels on: estimated with none, "
            "which keeps more for the backward (an upper bound)"
        )
    return False, "lora_*_kernel set in the recipe"


def method_edits(method: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"adapter": "qlora" if method == "qlora" else "lora", "load_in_4bit": method == "qlora"}


def fused_edits(fused: bool, data: Mapping[str, Any]) -> dict[str, Any]:
    """Liger's fused loss on: the plugin in ``plugins`` and its switch; off: the switch."""
    if not fused:
        return {"liger_fused_linear_cross_entropy": False, "cut_cross_entropy": None}
    plugins = list(data.get("plugins") or [])
    if LIGER_PLUGIN not in plugins:
        plugins.append(LIGER_PLUGIN)
    return {"plugins": plugins, "liger_fused_linear_cross_entropy": True}


def targets_edits(targets: tuple[str, ...], data: Mapping[str, Any]) -> dict[str, Any]:
    if targets == ("all-linear",):
        return {"lora_target_linear": True}
    return {"lora_target_linear": None, "lora_target_modules": list(targets)}


def accum_edits(accum: int, data: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's accumulation; a recipe's ``batch_size`` is commented out, since axolotl
    refuses it beside ``gradient_accumulation_steps`` (check_gas_bsz) and never derives
    the accumulation from it."""
    out: dict[str, Any] = {"gradient_accumulation_steps": accum}
    if data.get("batch_size") is not None:
        out["batch_size"] = None
    return out


TRAINER = Trainer(
    format="axolotl",
    label=LABEL,
    keys=KEYS,
    defaults=DEFAULTS,
    ignored=IGNORED,
    markers=MARKERS,
    derive=derive,
    key_lists=(f"axolotl-{VERSION}.txt",),
    # axolotl's schema ignores a key it lacks (pydantic's default) and other plugins add
    # keys of their own, so an unknown key is noted, not refused
    unknown_note=f"{LABEL} ignores a key its schema lacks (a plugin's own aside), so the "
    "default stays",
    edits={
        "method": method_edits,
        "fused_loss": fused_edits,
        "lora_targets": targets_edits,
        "grad_accum": accum_edits,
        "precision": precision_edits,
    },
)
