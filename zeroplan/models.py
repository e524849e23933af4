"""ModelSpec: what the memory model needs to know about a causal LM, read from its config.json.

A spec is resolved from, in this order:

1. a local ``config.json`` file or a model folder holding one;
2. the local Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``);
3. the built-in catalog shipped with zeroplan (``zeroplan/catalog``), by Hub id or alias;
4. the Hub itself, when online (``HF_HUB_OFFLINE`` unset), with ``HF_TOKEN`` for gated repos.

Parameter counts are exact, component by component, for the decoder-only families in
``_FAMILIES``; they are checked in the tests against ``sum(p.numel())`` of the real
transformers models built from the same configs. Anything else is refused with a message
that names what is missing: a silent guess would make every number downstream wrong.

One multimodal checkpoint is counted: Gemma 3 (4B, 12B, 27B), whose config.json is a
``gemma3`` wrapper of a ``text_config`` and a SigLIP ``vision_config``.
``AutoModelForCausalLM`` loads it as ``Gemma3ForConditionalGeneration``, vision tower
included, even for text-only SFT, so the spec is its text decoder plus ``vision_params``
(tower + projector, exact): they are weights on the GPU (and trained under full
fine-tuning) but see no activations on text batches. Not modelled and said so by the
estimate: LoRA adapters that ``all-linear`` also puts on the tower's linears, and how
bitsandbytes treats those linears in 4 bit (counted bf16).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # urllib is imported where the Hub is asked: it costs 45 ms at start-up
    import urllib.request

from zeroplan.errors import (
    BadModelConfigError,
    ContextWindowError,
    ModelNotFoundError,
    UnsupportedModelError,
)

# ---------------------------------------------------------------------------------------
# Architecture families: the structural facts config.json does not state explicitly.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    norms_per_layer: int = 2  # gemma2/3 add post-attention and post-feedforward norms
    qkv_bias_default: bool = False  # qwen2 hard-codes q/k/v biases, it has no config field
    qk_norm: bool = False  # qwen3 / gemma3 normalise q and k per head
    fused_qkv: bool = False  # phi3: one qkv_proj instead of q_proj, k_proj, v_proj
    fused_gate_up: bool = False  # phi3: one gate_up_proj
    gemma_norm: bool = False  # RMSNorm computed entirely in fp32 with (1 + w)
    moe: bool = False
    head_dim_default: int | None = None  # the config class's default when head_dim is absent
    # Whether the modelling code reads ``attention_bias`` (biases on q, k, v and o). Mistral,
    # Mixtral and Phi-3 ignore it and have none; Qwen2 ignores it and always biases q, k, v.
    honours_attention_bias: bool = True
    # The config class's defaults for fields a published config.json leaves out (Gemma 3's
    # text_config states only what differs from Gemma3TextConfig).
    defaults: Mapping[str, Any] = field(default_factory=dict)


# transformers' Gemma3TextConfig() defaults (checked in the tests against the installed class).
GEMMA3_TEXT_DEFAULTS: Mapping[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
}

_FAMILIES: dict[str, _Family] = {
    "llama": _Family(),
    "mistral": _Family(honours_attention_bias=False),
    "qwen2": _Family(qkv_bias_default=True, honours_attention_bias=False),
    "qwen3": _Family(qk_norm=True, head_dim_default=128),
    "gemma": _Family(gemma_norm=True, head_dim_default=256),
    "gemma2": _Family(norms_per_layer=4, gemma_norm=True, head_dim_default=256),
    "gemma3_text": _Family(
        norms_per_layer=4,
        qk_norm=True,
        gemma_norm=True,
        head_dim_default=256,
        defaults=GEMMA3_TEXT_DEFAULTS,
    ),
    "phi3": _Family(fused_qkv=True, fused_gate_up=True, honours_attention_bias=False),
    "mixtral": _Family(moe=True, honours_attention_bias=False),
    "qwen3_moe": _Family(qk_norm=True, moe=True, head_dim_default=128),
}


def supported_architectures() -> tuple[str, ...]:
    """The config ``model_type`` values zeroplan models (text decoders; ``gemma3``
    multimodal checkpoints are read through their ``gemma3_text`` tower)."""
    return tuple(_FAMILIES)


# Multimodal wrappers: their text tower could be estimated, but the vision tower, the
# projector and image tokens are not modelled, so we refuse rather than under-count.
# ModelSpec.source values that are not a local path
NOT_LOCAL_SOURCES = frozenset({"", "catalog", "hf-cache", "hub"})
_MULTIMODAL = {"gemma3", "mllama", "llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma"}


# Linears of one module that read the same input tensor (transformers' Llama-style attention
# and gated MLP): zeroplan launch's fused LoRA runs their adapters together
# (zeroplan.launch.loralinear.LoRAGroup), and the speed model counts what that saves
# (speed.fused_lora_saved_bytes).
SHARED_INPUT: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` (or a bank of experts stored as one) inside a decoder layer.

    ``count`` is how many of them a layer holds (experts), ``group`` says which part of
    the layer it belongs to ("attn", "mlp" or "expert"); ``name`` is the module name that
    LoRA ``target_modules`` match against.
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    group: str
    count: int = 1
    # PEFT's rank multiplier for this module: 2 for a fused expert gate_up bank (observed
    # with peft 0.21 on transformers 5 MoE models: lora_A is (E·2r, h)), else 1.
    lora_rank_factor: int = 1

    def lora_params(self, r: int) -> int:
        """LoRA A and B of this module: count · r · factor · (in + out)."""
        return self.count * r * self.lora_rank_factor * (self.in_features + self.out_features)

    @property
    def params(self) -> int:
        return self.count * (
            self.in_features * self.out_features + (self.out_features if self.bias else 0)
        )


@dataclass(frozen=True)
class MoE:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    num_moe_layers: int


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by component; ``total`` is what ``sum(p.numel())`` reports."""

    embeddings: int
    attention: int
    mlp: int  # dense MLPs, or the experts plus router of MoE layers
    norms: int
    lm_head: int  # 0 when tied to the embeddings
    vision: int = 0  # a multimodal checkpoint's vision tower and projector (Gemma 3)

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.norms + self.lm_head + self.vision


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only causal LM. Built by ``spec_from_config``; frozen."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norms_per_layer: int
    qk_norm: bool
    gemma_norm: bool
    fused_qkv: bool
    fused_gate_up: bool
    final_logit_softcapping: float | None = None
    # Gemma-2 caps its attention scores (softcap · tanh(scores / softcap)): under eager
    # attention the tanh output is one more saved heads × seq² tensor per layer
    attn_logit_softcapping: float | None = None
    moe: MoE | None = None
    # Vision tower + projector that the checkpoint loads with the decoder (Gemma 3): frozen
    # or trained weights, no activations on text. 0 for text-only models.
    vision_params: int = 0
    max_position_embeddings: int | None = None  # the context window; None when not stated
    # Tokens a sliding layer's query sees, itself included (transformers' ``sliding_window``),
    # None when no layer slides (sliding_window_of)
    sliding_window: int | None = None
    # where the config came from: an absolute path, "catalog", "hf-cache" or "hub"
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def local_path(self) -> str | None:
        """The local model folder the config was read from (its config.json's folder), or
        the config file itself when it is not named config.json; None for the catalog, the
        HF cache and the Hub."""
        if self.source in NOT_LOCAL_SOURCES:
            return None
        path = Path(self.source)
        return str(path.parent if path.name == "config.json" else path)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - (self.moe.num_moe_layers if self.moe else 0)

    def attention_linears(self) -> tuple[Linear, ...]:
        h, q, kv = self.hidden_size, self.q_dim, self.kv_dim
        qkv: tuple[Linear, ...]
        if self.fused_qkv:
            qkv = (Linear("qkv_proj", h, q + 2 * kv, self.qkv_bias, "attn"),)
        else:
            qkv = (
                Linear("q_proj", h, q, self.qkv_bias, "attn"),
                Linear("k_proj", h, kv, self.qkv_bias, "attn"),
                Linear("v_proj", h, kv, self.qkv_bias, "attn"),
            )
        return (*qkv, Linear("o_proj", q, h, self.o_bias, "attn"))

    def dense_mlp_linears(self) -> tuple[Linear, ...]:
        h, i, b = self.hidden_size, self.intermediate_size, self.mlp_bias
        if self.fused_gate_up:
            return (Linear("gate_up_proj", h, 2 * i, b, "mlp"), Linear("down_proj", i, h, b, "mlp"))
        return (
            Linear("gate_proj", h, i, b, "mlp"),
            Linear("up_proj", h, i, b, "mlp"),
            Linear("down_proj", i, h, b, "mlp"),
        )

    def moe_linears(self) -> tuple[Linear, ...]:
        """Router plus the expert banks of one MoE layer, as transformers 5 stores them.

        The experts are two 3-D tensors, ``gate_up_proj`` (E, 2i, h) and ``down_proj``
        (E, h, i), not ``nn.Linear`` modules: bitsandbytes does not quantize them and LoRA
        reaches them only through ``all-linear``. The router ``gate`` is a router module
        with one (E, h) weight, not an ``nn.Linear`` either: not quantized, and PEFT wraps
        it as a parameter when named or under ``all-linear`` (zeroplan.moe).
        """
        assert self.moe is not None
        h, e, i = self.hidden_size, self.moe.num_experts, self.moe.expert_intermediate_size
        return (
            Linear("gate", h, e, False, "router"),
            Linear("gate_up_proj", h, 2 * i, False, "expert", count=e, lora_rank_factor=2),
            Linear("down_proj", i, h, False, "expert", count=e),
        )

    def param_counts(self) -> ParamCounts:
        """Exact parameter counts.

        embeddings = V·h; lm_head = V·h unless tied; per layer: attention projections
        (+ biases) + q/k norms (2·head_dim when present), dense MLP or router + experts,
        and ``norms_per_layer``·h norm weights; plus the final norm h.
        """
        h = self.hidden_size
        attn_layer = sum(lin.params for lin in self.attention_linears())
        if self.qk_norm:
            attn_layer += 2 * self.head_dim
        dense_mlp = sum(lin.params for lin in self.dense_mlp_linears())
        moe_mlp = sum(lin.params for lin in self.moe_linears()) if self.moe else 0
        n_moe = self.moe.num_moe_layers if self.moe else 0
        return ParamCounts(
            embeddings=self.vocab_size * h,
            attention=self.num_layers * attn_layer,
            mlp=self.num_dense_layers * dense_mlp + n_moe * moe_mlp,
            norms=self.num_layers * self.norms_per_layer * h + h,
            lm_head=0 if self.tie_word_embeddings else self.vocab_size * h,
            vision=self.vision_params,
        )

    @property
    def total_params(self) -> int:
        return self.param_counts().total

    def linears_by_layer_kind(self) -> list[tuple[tuple[Linear, ...], int]]:
        """``[(linears of one layer, number of such layers), ...]`` for dense and MoE layers."""
        return list(self._layer_kinds)

    @cached_property
    def _layer_kinds(self) -> tuple[tuple[tuple[Linear, ...], int], ...]:
        # computed once per spec: the planner asks for it thousands of times per plan
        kinds: list[tuple[tuple[Linear, ...], int]] = []
        if self.num_dense_layers:
            kinds.append(
                (self.attention_linears() + self.dense_mlp_linears(), self.num_dense_layers)
            )
        if self.moe and self.moe.num_moe_layers:
            kinds.append((self.attention_linears() + self.moe_linears(), self.moe.num_moe_layers))
        return tuple(kinds)

    def check_seq_len(self, seq_len: int) -> None:
        """Refuse a sequence longer than the context window the config states.

        Past ``max_position_embeddings`` the model has no trained positions: training there
        needs a rope-scaling change to the config, which zeroplan has no option for, so the
        request is refused rather than estimated.
        """
        window = self.max_position_embeddings
        if window is not None and seq_len > window:
            raise ContextWindowError(
                f"--seq-len {seq_len:,} is longer than {self.name}'s context window of "
                f"{window:,} tokens (max_position_embeddings); use --seq-len {window} or less"
            )

    def quantizable_params(self) -> int:
        """Weights that bitsandbytes quantizes when transformers loads the model in 4 or 8 bit.

        Every ``nn.Linear`` weight inside the decoder layers; ``lm_head`` is kept out by
        transformers (``modules_to_not_convert``); embeddings, norms and biases stay bf16.
        In MoE layers that is the attention only: the 3-D expert banks and the router stay
        bf16 (4-bit and 8-bit, transformers 5.17 + bitsandbytes 0.50,
        benchmarks/results/moe_h100.jsonl).
        """
        return sum(
            n_layers * lin.count * lin.in_features * lin.out_features
            for linears, n_layers in self.linears_by_layer_kind()
            for lin in linears
            if lin.group in ("attn", "mlp")
        )


# ---------------------------------------------------------------------------------------
# config.json -> ModelSpec
# ---------------------------------------------------------------------------------------


def _require(cfg: dict[str, Any], key: str, name: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise BadModelConfigError(
            f"{name}: config.json has no '{key}'; it is needed to count parameters "
            "(pass the model's own config.json, or a catalog name from `zeroplan models`)"
        )
    return cfg[key]


def _positive_int(cfg: dict[str, Any], key: str, name: str) -> int:
    value = _require(cfg, key, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BadModelConfigError(
            f"{name}: config.json field '{key}' must be a positive integer, got {value!r}"
        )
    return value


def spec_from_config(cfg: dict[str, Any], name: str = "model", source: str = "") -> ModelSpec:
    """Build a ModelSpec from a parsed HF config.json; refuse what is not modelled."""
    if not isinstance(cfg, dict):
        raise BadModelConfigError(f"{name}: config.json must hold a JSON object")
    model_type = cfg.get("model_type")
    if not model_type:
        # every transformers config.json names it: a file without one is something else
        where = source if source.endswith(".json") else "its config.json"
        raise BadModelConfigError(
            f"{name}: {where} has no 'model_type', so it is not a model's config.json; point "
            "at the config.json of a Hugging Face model (or its folder)"
        )
    if (
        model_type == "gemma3"
        and isinstance(cfg.get("text_config"), dict)
        and isinstance(cfg.get("vision_config"), dict)
    ):
        text = spec_from_config({"model_type": "gemma3_text", **cfg["text_config"]}, name, source)
        vision = _siglip_params(cfg["vision_config"], text.hidden_size, name)
        return replace(text, model_type="gemma3", vision_params=vision, config=cfg)
    if model_type in _MULTIMODAL or "vision_config" in cfg:
        raise UnsupportedModelError(
            f"{name}: '{model_type}' is a vision-language model; zeroplan models text-only decoders "
            "(use the text-only variant, or pass its text_config as a config.json)"
        )
    if model_type not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES))
        raise UnsupportedModelError(
            f"{name}: architecture '{model_type}' is not modelled (supported: {known}); "
            "open an issue with its config.json"
        )
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") not in (None, "bitsandbytes"):
        raise UnsupportedModelError(
            f"{name}: pre-quantized checkpoints ({quant.get('quant_method')}) are not modelled; "
            "estimate the unquantized base model with --method qlora instead"
        )
    fam = _FAMILIES[model_type]
    cfg_in = cfg
    cfg = {
        **fam.defaults,
        **{k: v for k, v in cfg.items() if v is not None or k not in fam.defaults},
    }
    h = _positive_int(cfg, "hidden_size", name)
    heads = _positive_int(cfg, "num_attention_heads", name)
    # absent or null means one KV head per attention head (multi-head attention); 0 is not
    # absent, and is refused below like any other count of 0
    kv_heads = cfg.get("num_key_value_heads")
    if kv_heads is None:
        kv_heads = heads
    head_dim = cfg.get("head_dim") or fam.head_dim_default or h // heads
    if type(kv_heads) is not int or kv_heads <= 0 or heads % kv_heads:  # not bool
        raise BadModelConfigError(
            f"{name}: num_key_value_heads={kv_heads!r} must be a positive divisor of num_attention_heads={heads}"
        )
    if not cfg.get("head_dim") and not fam.head_dim_default and h % heads:
        raise BadModelConfigError(
            f"{name}: hidden_size {h} is not a multiple of num_attention_heads {heads}"
        )
    layers = _positive_int(cfg, "num_hidden_layers", name)
    vocab = _positive_int(cfg, "vocab_size", name)
    inter = _positive_int(cfg, "intermediate_size", name)

    moe: MoE | None = None
    if fam.moe:
        if model_type == "mixtral":
            experts = _positive_int(cfg, "num_local_experts", name)
            expert_inter = inter
            moe_layers = layers
        else:
            # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (its
            # attribute_map); the published config.json files say num_experts
            key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
            experts = _positive_int(cfg, key, name)
            expert_inter = _positive_int(cfg, "moe_intermediate_size", name)
            step = cfg.get("decoder_sparse_step", 1) or 1
            dense_only = set(cfg.get("mlp_only_layers") or [])
            moe_layers = sum(
                1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0
            )
        moe = MoE(
            experts, _positive_int(cfg, "num_experts_per_tok", name), expert_inter, moe_layers
        )

    attention_bias = bool(cfg.get("attention_bias", False)) and fam.honours_attention_bias
    qkv_bias = fam.qkv_bias_default or attention_bias
    o_bias = attention_bias
    return ModelSpec(
        name=name,
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=h,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type.startswith("gemma"))),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        norms_per_layer=fam.norms_per_layer,
        qk_norm=fam.qk_norm,
        gemma_norm=fam.gemma_norm,
        fused_qkv=fam.fused_qkv,
        fused_gate_up=fam.fused_gate_up,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
        moe=moe,
        max_position_embeddings=_context_window(cfg, name),
        sliding_window=sliding_window_of(cfg, model_type, layers),
        source=source,
        config=cfg_in,
    )


# The config class's sliding_window where a config.json leaves it out (transformers 5.25)
_WINDOW_DEFAULTS = {
    "mistral": 4096,
    "gemma2": 4096,
    "gemma3_text": 4096,
    "qwen2": 4096,
    "qwen3": 4096,
    "qwen3_moe": 4096,
}
# Families whose every layer is full attention (their modelling passes no sliding_window)
_NO_WINDOW = frozenset({"llama", "gemma"})
# Qwen slides only with use_sliding_window: Qwen2/3 the layers from max_window_layers on,
# Qwen3-MoE every layer
_QWEN = frozenset({"qwen2", "qwen3", "qwen3_moe"})


def sliding_window_of(cfg: Mapping[str, Any], model_type: str, layers: int) -> int | None:
    """The window of the model's sliding layers, as transformers 5.25 builds them, or None
    when no layer slides: the config's ``layer_types`` where it states them; else Gemma 2/3
    alternate sliding and full layers; Qwen slides only with ``use_sliding_window`` (Qwen2/3
    the layers ≥ ``max_window_layers``); Mistral, Mixtral and Phi-3 pass ``sliding_window``
    to every layer (None: none). Checked against the config classes in tests/test_attention.py."""
    if model_type in _NO_WINDOW:
        return None
    window = cfg.get("sliding_window", _WINDOW_DEFAULTS.get(model_type))
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if model_type in _QWEN and not cfg.get("use_sliding_window"):
        return None
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        return window if "sliding_attention" in types else None
    if model_type in ("qwen2", "qwen3"):
        return window if cfg.get("max_window_layers", 28) < layers else None
    return window


def _context_window(cfg: dict[str, Any], name: str) -> int | None:
    value = cfg.get("max_position_embeddings")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BadModelConfigError(
            f"{name}: config.json field 'max_position_embeddings' must be a positive integer, "
            f"got {value!r}"
        )
    return value


def _siglip_params(vision: dict[str, Any], text_hidden: int, name: str) -> int:
    """Gemma 3's SigLIP vision tower (no pooling head) and its projector, exactly.

    tower:  patch conv 3·p²·d + d, position embeddings (image/p)²·d,
            per layer q/k/v/out 4·(d² + d) + fc1 d·i + i + fc2 i·d + d + two LayerNorms 4·d,
            post LayerNorm 2·d
    projector: d × h_text matrix + an RMSNorm of d
    """
    d = _positive_int(vision, "hidden_size", name)
    i = _positive_int(vision, "intermediate_size", name)
    layers = _positive_int(vision, "num_hidden_layers", name)
    patch = _positive_int(vision, "patch_size", name)
    image = _positive_int(vision, "image_size", name)
    if vision.get("vision_use_head", False):
        raise UnsupportedModelError(
            f"{name}: a vision tower with a pooling head is not modelled; open an issue with its config.json"
        )
    per_layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 4 * d
    tower = 3 * patch * patch * d + d + (image // patch) ** 2 * d + layers * per_layer + 2 * d
    return tower + d * text_hidden + d


# ---------------------------------------------------------------------------------------
# Resolving a model id
# ---------------------------------------------------------------------------------------

_CATALOG = "catalog"


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadModelConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadModelConfigError(
            f"{name}: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "point at the model's config.json"
        ) from None
    if not isinstance(data, dict):
        raise BadModelConfigError(
            f"{name}: {path} must hold a JSON object, not {type(data).__name__}"
        )
    return data


@cache
def _catalog_index() -> dict[str, str]:
    """Lower-cased Hub id or alias -> catalog file name."""
    root = resources.files("zeroplan") / _CATALOG
    index: dict[str, str] = {}
    for entry in (root / "models").iterdir():
        if entry.name.endswith(".json"):
            repo = entry.name[: -len(".json")].replace("--", "/")
            index[repo.lower()] = entry.name
            index[repo.split("/", 1)[-1].lower()] = entry.name
    aliases = root / "aliases.json"
    if aliases.is_file():
        for alias, repo in json.loads(aliases.read_text(encoding="utf-8")).items():
            file = repo.replace("/", "--") + ".json"
            if (root / "models" / file).is_file():
                index[alias.lower()] = file
    return index


def catalog_models() -> list[str]:
    """Hub ids of every model in the built-in catalog, sorted."""
    return sorted({f[: -len(".json")].replace("--", "/") for f in _catalog_index().values()})


def _catalog_config(model: str) -> dict[str, Any] | None:
    file = _catalog_index().get(model.lower())
    if file is None:
        return None
    text = (resources.files("zeroplan") / _CATALOG / "models" / file).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def hf_cache_dirs() -> list[Path]:
    """Where the Hugging Face cache may be: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, the default."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: nothing is fetched from the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def cached_file(repo: str, name: str) -> Path | None:
    """``name`` (config.json, tokenizer.json) of the newest cached snapshot of ``repo``."""
    if repo.count("/") != 1:
        return None
    folder = "models--" + repo.replace("/", "--")
    for root in hf_cache_dirs():
        snapshots = root / folder / "snapshots"
        if snapshots.is_dir():
            candidates = sorted(snapshots.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
            if candidates:
                return candidates[-1]
    return None


def hub_request(repo: str, name: str) -> urllib.request.Request:
    """The request for ``name`` of ``repo`` on the Hub (``$HF_ENDPOINT``), with ``$HF_TOKEN``."""
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/{repo}/resolve/main/{name}")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def _hub_config(model: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """config.json from the Hub, or None when offline or the repo does not exist."""
    if hub_offline() or model.count("/") != 1:
        return None
    import urllib.error
    import urllib.request

    request = hub_request(model, "config.json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ModelNotFoundError(
                f"{model}: the Hub refused access (HTTP {exc.code}); accept the model's licence and "
                "set HF_TOKEN, or pass a local config.json"
            ) from None
        return None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_model(model: str) -> ModelSpec:
    """Resolve ``model`` (path, cached or catalog Hub id, alias, or Hub id) to a ModelSpec."""
    if not model.strip():
        # Path("") is the current folder: it would be read as a model folder
        raise ModelNotFoundError(
            "the model name is empty: give a Hub id, an alias from `zeroplan models`, or the "
            "path of a config.json or model folder"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelNotFoundError(
                f"{model}: folder has no config.json; point at a model folder or its config.json"
            )
        # resolved: a plan made here is launched from anywhere (planner.plan_json)
        return spec_from_config(
            _read_json(config, model), name=path.resolve().name, source=str(config.resolve())
        )
    if path.is_file():
        path = path.resolve()
        name = path.parent.name if path.name == "config.json" else path.stem
        return spec_from_config(_read_json(path, model), name=name or model, source=str(path))
    if model.endswith(".json") or (os.sep in model and not model.count("/") == 1):
        raise ModelNotFoundError(
            f"{model}: no such file; give the path of a config.json or a model folder"
        )

    cached = cached_file(model, "config.json")
    if cached is not None:
        return spec_from_config(_read_json(cached, model), name=model, source="hf-cache")
    catalog = _catalog_config(model)
    if catalog is not None:
        repo = _catalog_index()[model.lower()][: -len(".json")].replace("--", "/")
        return spec_from_config(catalog, name=repo, source="catalog")
    hub = _hub_config(model)
    if hub is not None:
        return spec_from_config(hub, name=model, source="hub")
    close = _close_catalog_name(model)
    hint = f" (did you mean {close}?)" if close else ""
    raise ModelNotFoundError(
        f"unknown model '{model}'{hint}: not a local path, not in the Hugging Face cache, not in "
        "the built-in catalog (`zeroplan models` lists it) and not reachable on the Hub; pass a "
        "config.json path"
    )


@cache
def _catalog_spellings() -> dict[str, str]:
    """Every name the catalog answers to, lower-cased -> as a suggestion writes it: the
    aliases as `zeroplan models` users type them, full Hub ids as the Hub spells them."""
    names = {key: key for key in _catalog_index()}
    names.update((repo.lower(), repo) for repo in catalog_models())
    return names


def _close_catalog_name(model: str) -> str | None:
    """The catalog name ``model`` is most likely a typo of, or None. The cutoff is above
    the GPU lookup's (0.75): model names share long prefixes, so a low one would offer a
    different size or family for a name that is merely not in the catalog."""
    names = _catalog_spellings()
    close = difflib.get_close_matches(model.strip().lower(), list(names), n=1, cutoff=0.85)
    return names[close[0]] if close else None
