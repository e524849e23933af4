"""Count the work a training step asks of the host, per decoder layer and per LoRA adapter,
for every architecture zeroplan models: zeroplan/catalog/host_ops.json, which
zeroplan.speed's host clock reads.

A step whose GPU work is short waits on the host: Python, autograd and the dispatch of
every kernel. What it costs grows with the tensor operations the modelling code runs, and
those differ by architecture more than the layer count says (Gemma 3 runs six RMSNorms a
layer, each in float32 around a (1 + weight) scale; Llama runs two). This script builds
each family's decoder from a catalog config, shrunk to a width where a CPU counts it in a
second (the operations a layer dispatches do not depend on its width), runs forward and
backward on a short sequence under a TorchDispatchMode, and counts the ATen calls that
produce a new tensor; views and aliases (view, t, transpose, slice, detach, ...) only
rewrite metadata and are not counted. Per layer is the count with two layers minus the
count with one:

- ``layer_frozen``: a frozen layer that gradients flow through (LoRA's and QLoRA's base);
- ``layer_full``: a layer whose weights train (full fine-tuning);
- ``adapter`` (``adapter_no_dropout``): one PEFT LoRA adapter, all-linear targets, with
  dropout 0.05 (none): (adapted layer − frozen layer) / adapters per layer.

    python benchmarks/count_host_ops.py            # writes zeroplan/catalog/host_ops.json
    python benchmarks/count_host_ops.py --check    # exit 1 when the file differs from a recount
    python benchmarks/count_host_ops.py --packed   # exit 1 when a packed step counts otherwise
    python benchmarks/count_host_ops.py --compile  # a Llama LoRA layer eager and compiled

The table is counted on padded rows with sdpa; ``zeroplan launch`` trains packed rows laid
end to end with varlen attention (zeroplan.launch.batching). ``--packed`` counts every sdpa
family's layer that way too (position_ids and segment boundaries in the batch, one
attention call standing for the CUDA varlen kernel, which the CPU cannot run) and fails
where the two differ by more than a tenth.

Needs torch, transformers and peft (the [train] extra); runs on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from zeroplan import models  # noqa: E402

OUT = HERE.parent / "zeroplan" / "catalog" / "host_ops.json"

# The catalog config each family is counted on (any member does: the shrink below keeps
# only the architecture); "gemma" has no catalog entry and uses GemmaConfig's defaults.
REPRESENTATIVE = {
    "llama": "meta-llama/Llama-3.2-1B",
    "mistral": "mistralai/Mistral-7B-v0.3",
    "qwen2": "Qwen/Qwen2.5-0.5B",
    "qwen3": "Qwen/Qwen3-0.6B",
    "gemma": None,
    "gemma2": "google/gemma-2-9b",
    "gemma3_text": "google/gemma-3-1b-it",
    "phi3": "microsoft/Phi-3-mini-4k-instruct",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "qwen3_moe": "Qwen/Qwen3-30B-A3B",
}

# Small enough to count fast, every head and expert setting kept valid.
SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Tokens per counted step: enough that top-k routing reaches every expert of the MoE
# families (the expert loop runs per expert hit, and a real micro-batch hits them all).
TOKENS = 512
LORA_DROPOUT = 0.05


def config_for(model_type: str, layers: int) -> Any:
    from transformers import AutoConfig

    name = REPRESENTATIVE[model_type]
    cfg = {"model_type": model_type} if name is None else dict(models.load_model(name).config)
    cfg.update(SHRINK, num_hidden_layers=layers)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    for key in ("max_window_layers", "sliding_window"):
        cfg.pop(key, None)
    return AutoConfig.for_model(**cfg)


# Segment lengths of the packed row --packed counts (TOKENS in all).
PACKED_SEGMENTS = (200, 150, 162)
PACKED_IMPL = "zeroplan_count_varlen"


def _one_call_varlen(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
) -> tuple[Any, None]:
    """The varlen kernel's place in a packed step, as one attention call: on CUDA
    zeroplan_varlen is one flash call per layer whatever the segments; its CPU fallback
    loops over them."""
    import torch.nn.functional as F

    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=kwargs.get("scaling"), enable_gqa=groups > 1
    )
    return out.transpose(1, 2), None


@cache
def _register_packed() -> str:
    from transformers import AttentionInterface

    # no mask function, as zeroplan_varlen (batching.register_varlen)
    AttentionInterface.register(PACKED_IMPL, _one_call_varlen)
    return PACKED_IMPL


def count(model_type: str, layers: int, mode: str, **options: Any) -> int:
    """ATen calls that return a new tensor in one forward and backward of a ``layers``-layer
    model: mode "frozen", "full", "lora" (all-linear, ``dropout``) or "lora-fused" (the same
    on zeroplan launch's fused LoRA linears); ``packed``: one row of PACKED_SEGMENTS with
    their position_ids and boundaries, as zeroplan launch packs; ``writes``: in-place calls
    too (calls' options)."""
    return sum(calls(model_type, layers, mode, **options).values())


def calls(
    model_type: str,
    layers: int,
    mode: str,
    dropout: float = LORA_DROPOUT,
    packed: bool = False,
    writes: bool = False,
) -> collections.Counter[str]:
    """count's calls by operator (``writes``: in-place ones too)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = config_for(model_type, layers)
    impl = _register_packed() if packed else attention(model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=impl)
    model.config.use_cache = False
    model.train()
    if mode in ("lora", "lora-fused"):
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear")
        model = get_peft_model(model, lcfg)
        if mode == "lora-fused":  # zeroplan launch's fused LoRA linears (bf16 adapters)
            from zeroplan.launch import loralinear

            model.to(torch.bfloat16)
            loralinear.install(model)
    elif mode == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        model.requires_grad_(True)
    ids = torch.randint(3, 512, (1, TOKENS))
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if packed:  # the launch's own collator lays the row out and marks its segments
        from zeroplan.launch.batching import PackedCollator

        row = ids[0].tolist()
        positions = [p for n in PACKED_SEGMENTS for p in range(n)]
        batch = PackedCollator(pad_id=0, capacity=TOKENS, layout="flat")(
            [{"input_ids": row, "labels": row, "position_ids": positions}]
        )
        del batch["zp_real_tokens"], batch["zp_slots"]
    for _ in range(2):  # the first call builds caches (rotary, masks) the second reuses
        made = dispatched(lambda: model(**batch).loss.backward(), writes)
    return made


def dispatched(run: Callable[[], Any], writes: bool = False) -> collections.Counter[str]:
    """The ATen calls ``run()`` dispatches that return a new tensor, by operator name; an
    alias of an input (view, t, detach, ...) launches nothing and is not counted. ``writes``:
    in-place calls (addmm_, mul_: they launch a kernel into an input) count too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            returns = func._schema.returns
            alias = returns[0].alias_info if returns else None
            if alias is None or (writes and alias.is_write):
                self.calls[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counter = Counter()
    with counter:
        run()
    return counter.calls


@cache  # a model build per question: every count of the family asks it
def attention(model_type: str) -> str:
    """sdpa, as transformers picks by default, or eager where the family has no sdpa path
    (Gemma 2: its attention soft-capping)."""
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_config(config_for(model_type, 1), attn_implementation="sdpa")
    except ValueError:
        return "eager"
    return "sdpa"


def adapters_per_layer(model_type: str) -> int:
    """PEFT LoRA modules all-linear puts in one decoder layer of this family."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config_for(model_type, 1))
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    return sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A") and ".layers." in n)


def per_layer(
    model_type: str, mode: str, dropout: float = LORA_DROPOUT, packed: bool = False
) -> int:
    kw = {"dropout": dropout, "packed": packed}
    return count(model_type, 2, mode, **kw) - count(model_type, 1, mode, **kw)


def per_layer_by_op(model_type: str, mode: str, dropout: float = LORA_DROPOUT) -> dict[str, int]:
    """per_layer's calls by operator (those a second layer adds)."""
    one, two = calls(model_type, 1, mode, dropout), calls(model_type, 2, mode, dropout)
    return {op: two[op] - one[op] for op in sorted(two) if two[op] != one[op]}


def packed_differences(model_type: str) -> dict[str, tuple[int, int]]:
    """Per-layer counts (padded, packed) for frozen, full and LoRA layers where they
    differ; empty where a packed step costs the host what the table counts. LoRA without
    dropout where PEFT refuses it (MoE expert banks)."""
    out = {}
    for mode in ("frozen", "full", "lora"):
        try:
            padded = per_layer(model_type, mode)
            packed = per_layer(model_type, mode, packed=True)
        except ValueError:
            padded = per_layer(model_type, mode, dropout=0.0)
            packed = per_layer(model_type, mode, dropout=0.0, packed=True)
        if padded != packed:
            out[mode] = (padded, packed)
    return out


def family_counts(model_type: str) -> dict[str, int | str]:
    frozen = per_layer(model_type, "frozen")
    n = adapters_per_layer(model_type)
    lora_plain = per_layer(model_type, "lora", dropout=0.0)
    try:
        lora = per_layer(model_type, "lora")
    except ValueError:  # PEFT wraps MoE expert banks only without dropout
        lora = lora_plain
    return {
        "layer_frozen": frozen,
        "layer_full": per_layer(model_type, "full"),
        "adapter": round((lora - frozen) / n),
        "adapter_no_dropout": round((lora_plain - frozen) / n),
        "adapters_counted": n,
        "attention": attention(model_type),
    }


def recount() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    families = {}
    for model_type in models.supported_architectures():
        print(f"  {model_type} ...", file=sys.stderr, flush=True)
        families[model_type] = family_counts(model_type)
    return {
        "what": (
            "ATen calls returning a new tensor (views and aliases not counted) in one "
            "forward and backward, bf16, sdpa attention (eager where a family has none): per decoder layer frozen (LoRA's "
            "base) and trained (full fine-tuning), and per PEFT LoRA adapter with dropout "
            "0.05 and without; benchmarks/count_host_ops.py"
        ),
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "families": families,
    }


def liger_pieces() -> dict[str, int]:
    """What Llama's own modules that Liger replaces dispatch in one forward and backward,
    counted as the table is (hostops.LIGER_OPS holds these beside Liger's): the RMSNorm with
    a frozen and with a trained weight, SiLU·mul of the gated MLP, rotary on q and k. Each
    piece runs inside a scaffold (inputs made, the output summed, backward) whose own
    operations, counted alone, are taken off."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml

    def ops(fn: Any, *shapes: tuple[int, ...]) -> int:
        def run() -> None:
            xs = [torch.randn(*s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
            out = fn(*xs)
            sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()

        for _ in range(2):  # the second call: caches built by the first are reused
            made = dispatched(run)
        return sum(made.values())

    h, heads, kv, d, t = 64, 4, 2, 16, 16
    norm = ml.LlamaRMSNorm(h).to(torch.bfloat16)
    cfg = LlamaConfig(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=d)
    cos, sin = ml.LlamaRotaryEmbedding(cfg)(torch.randn(1, t, h), torch.arange(t)[None])
    cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    act = torch.nn.SiLU()
    one, two = (1, t, h), ((1, heads, t, d), (1, kv, t, d))
    out = {}
    norm.weight.requires_grad_(False)
    out["rms_norm"] = ops(norm, one) - ops(lambda x: x * 1, one) + 2  # x·1: a mul and its grad
    norm.weight.requires_grad_(True)
    out["rms_norm_trained"] = ops(norm, one) - ops(lambda x: x * 1, one) + 2
    out["swiglu"] = ops(lambda g, u: act(g) * u, one, one) - ops(lambda g, u: g + u, one, one) + 3
    out["rope"] = (
        ops(lambda q, k: ml.apply_rotary_pos_emb(q, k, cos, sin), *two)
        - ops(lambda q, k: (q * 1, k * 1), *two)
        + 4
    )
    return out


# --------------------------------------------------------------------------- --compile

# inductor's generated kernels, named in the profiler on the CPU (cpp.enable_kernel_profile)
# and on the GPU (triton_*)
_KERNEL_NAMES = ("_cpp_fused_", "triton_")


# the operator namespaces counted: ATen's and bitsandbytes' (its 4-bit ops are torch
# custom operators); other profiler events (autograd nodes, dynamo's regions) are not calls
_OP_NAMESPACES = ("aten", "bitsandbytes")


def _is_op(name: str) -> bool:
    return name.split("::", 1)[0] in _OP_NAMESPACES and name.count("::") == 1


@cache
def _is_view(op: str) -> bool:
    """Whether the operator ``op`` ("aten::t") returns an alias of an input (launches
    nothing), by its schema, as ``dispatched`` decides."""
    import torch

    namespace, name = op.split("::")
    packet = getattr(getattr(torch.ops, namespace), name, None)
    if packet is None:
        return False
    overload = getattr(packet, "default", None) or getattr(packet, packet.overloads()[0])
    returns = overload._schema.returns
    return bool(returns and returns[0].alias_info is not None)


def profiled(run: Callable[[], Any]) -> collections.Counter[str]:
    """What ``run()`` asks of the host, read off torch.profiler (a TorchDispatchMode turns
    a compiled region back to eager, so ``dispatched`` cannot count one): ``aten`` the ATen
    (and bitsandbytes) calls made from Python or from a compiled graph's wrapper that return
    a new tensor (those inside another such call or a kernel are not counted; views are not),
    ``kernels`` inductor's generated kernels, ``graphs`` the compiled regions' calls,
    forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    out: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        if any(k in e.name for k in _KERNEL_NAMES):
            out["kernels"] += 1
            continue
        if e.name in ("CompiledFunction", "CompiledFunctionBackward"):
            out["graphs"] += 1
            continue
        if not _is_op(e.name) or _is_view(e.name):
            continue
        parent = e.cpu_parent
        while parent is not None and not (
            _is_op(parent.name) or any(k in parent.name for k in _KERNEL_NAMES)
        ):
            parent = parent.cpu_parent
        out["aten"] += parent is None
    return out


def quantize_4bit(model: Any) -> int:
    """Swap every linear inside the decoder layers for bitsandbytes' NF4 Linear4bit
    (double quantization, bf16 compute, as ``--method qlora`` loads them), on the CPU;
    returns how many."""
    import bitsandbytes as bnb
    import torch

    swapped = 0
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.float().contiguous(), requires_grad=False,
                    quant_type="nf4", compress_statistics=True,
                )  # fmt: skip
                setattr(parent, name, q.to("cpu"))
                swapped += 1
    return swapped


def compiled_calls(
    layers: int, compiled: bool, quant4: bool, dropout: float = 0.0
) -> collections.Counter[str]:
    """``profiled`` counts of one forward and backward of a ``layers``-layer Llama with
    all-linear LoRA (``dropout``), its decoder layers each through torch.compile (inductor,
    as ``zeroplan launch --compile`` wraps them: zeroplan.launch.kernels.RegionalCompile) or
    not, its linears in 4-bit (``quant4``) or bf16."""
    import torch
    import torch._inductor.config as inductor
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zeroplan.launch.kernels import RegionalCompile, decoder_layers

    inductor.cpp.enable_kernel_profile = True  # each C++ kernel a profiler event
    torch.manual_seed(0)
    config = config_for("llama", layers)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    if quant4:
        quantize_4bit(model)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(model, lcfg)
    model.train()
    if compiled:
        torch._dynamo.reset()
        RegionalCompile(warn=print, backend="inductor").wrap(decoder_layers(model))
    ids = torch.randint(3, 512, (1, TOKENS))
    for _ in range(3):  # compiles (forward, then backward) and fills the caches
        model(input_ids=ids, labels=ids).loss.backward()
    return profiled(lambda: model(input_ids=ids, labels=ids).loss.backward())


def compiled_per_layer(quant4: bool, dropout: float = 0.0) -> dict[str, dict[str, int]]:
    """Per decoder layer (two layers' counts minus one's), eager and compiled: ``aten`` +
    ``kernels`` is what the host dispatches, ``graphs`` the compiled regions it enters."""
    out = {}
    for compiled in (False, True):
        one = compiled_calls(1, compiled, quant4, dropout)
        two = compiled_calls(2, compiled, quant4, dropout)
        out["compiled" if compiled else "eager"] = {
            k: two[k] - one[k] for k in ("aten", "kernels", "graphs")
        }
    return out


def fused_adapter_counts() -> tuple[int, int]:
    """Calls per LoRA adapter (Llama, dropout 0) on PEFT's layer and on zeroplan launch's fused
    LoRA linear, in-place calls counted on both sides (the fused path's sums are addmm_ and
    mul_, which the table's unit would miss): hostops.FUSED_ADAPTER_OPS."""
    n = adapters_per_layer("llama")

    def layer(mode: str) -> int:
        kw = {"dropout": 0.0, "writes": True}
        return count("llama", 2, mode, **kw) - count("llama", 1, mode, **kw)

    frozen = layer("frozen")
    peft, fused = (round((layer(mode) - frozen) / n) for mode in ("lora", "lora-fused"))
    return peft, fused


def best_us(
    fns: list[Callable[[], None]], calls: int, repeats: int, sync: Callable[[], None]
) -> list[float]:
    """Microseconds per call of each of ``fns``: the fastest of ``repeats`` runs of ``calls``
    calls, the functions run in turn within each round so that a machine slowing for a while
    slows them alike (one after another, a slow spell fell on one piece's runs: the first
    H100 timing of benchmarks/host_timing.py, host_timing_h100.jsonl); each run synchronized at its end, two rounds
    first not kept (caches and autotuning)."""
    best = [float("inf")] * len(fns)
    for i in range(repeats + 2):
        for j, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            if i >= 2:
                best[j] = min(best[j], (time.perf_counter() - start) / calls * 1e6)
    return best


def fused_adapter_host_us(
    calls: int = 2000, repeats: int = 9, device: str = "cpu"
) -> dict[str, tuple[int, int]]:
    """Host microseconds one LoRA adapter adds to a linear's forward and backward, on PEFT's
    layers and on the fused linears (hostops.FUSED_ADAPTER_HOST_US), in a Llama layer's
    seven: q/k/v on one input, o, gate/up on one input, down (so the fused path runs two
    groups and two single linears, as in a launched all-linear layer). 64-wide bf16 linears
    on 4 tokens at one thread, so the work left is the host's. The bare block, PEFT's and
    the fused one are timed in turn ``repeats`` times over ``calls`` steps each; each keeps
    its fastest run (what other processes on the machine did not slow), the bare block's
    time taken off, per adapter. For "bf16" adapters (as DeepSpeed bf16 holds them), fp32
    ones under bf16 autocast (PEFT's default) and those over NF4 bases under autocast
    (QLoRA). On ``device`` "cuda" (benchmarks/host_timing.py) the calls launch kernels, as
    in a launched step, and each run ends synchronized."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    from zeroplan.launch import loralinear

    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    class Block(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            a = self.o_proj(q + k + v)
            return self.down_proj(self.gate_proj(a) * self.up_proj(a))

    def base(quantized: bool = False) -> Any:
        if not quantized:
            linear = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)
            return linear.to(device, torch.bfloat16)
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16)
        weight = bnb.nn.Params4bit(torch.randn(64, 64) * 0.1, requires_grad=False)
        if device == "cpu":
            layer.weight = weight._quantize("cpu")
            return layer
        layer.weight = weight
        return layer.to(device)  # quantized on the move, as bitsandbytes loads a model

    def block(dtype: Any, quantized: bool, mode: str) -> Any:
        from peft.tuners.lora.bnb import Linear4bit

        torch.manual_seed(0)
        out = Block()
        cls = Linear4bit if quantized else Linear
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)
        for name in names:
            layer = base(quantized)
            if mode != "bare":
                layer = cls(layer, "default", config=cfg, r=16, lora_alpha=32, lora_dropout=0.0)
                layer.lora_A["default"].to(dtype)
                layer.lora_B["default"].to(dtype)
            setattr(out, name, layer)
        out.to(device)
        if mode == "fused":
            loralinear.install(out)
        return out

    def step(layer: Any, autocast: bool, x: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                y = layer(x)
            y.float().sum().backward()

        return run

    out = {}
    for name, dtype, autocast, quantized in (
        ("bf16", torch.bfloat16, False, False),
        ("autocast", torch.float32, True, False),
        ("4bit", torch.float32, True, True),
    ):
        blocks = [block(dtype, quantized, mode) for mode in ("bare", "peft", "fused")]
        x = torch.randn(1, 4, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        best = best_us([step(m, autocast, x) for m in blocks], calls, repeats, sync)
        per = len(names)
        out[name] = (round((best[1] - best[0]) / per), round((best[2] - best[0]) / per))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the file, write nothing")
    p.add_argument(
        "--packed",
        action="store_true",
        help="count each sdpa family's layer on a packed row too; exit 1 where it differs",
    )
    p.add_argument(
        "--liger",
        action="store_true",
        help="count what Liger's kernels replace in Llama; exit 1 where hostops.LIGER_OPS differs",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="count a Llama LoRA layer eager and under --compile (bf16 and 4-bit), profiled",
    )
    p.add_argument(
        "--fused-lora",
        action="store_true",
        help="count one adapter on zeroplan launch's fused LoRA path and on PEFT's (Llama, "
        "dropout 0, bf16 adapters); exit 1 where hostops.FUSED_ADAPTER_OPS differs",
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    if args.liger:
        from zeroplan.hostops import LIGER_OPS

        counted = liger_pieces()
        for name, n in counted.items():
            print(f"{name:17} Llama's own {n:3}, Liger's {LIGER_OPS[name][1]} (hostops)")
        return 0 if all(LIGER_OPS[k][0] == n for k, n in counted.items()) else 1
    if args.fused_lora:
        from zeroplan.hostops import FUSED_ADAPTER_HOST_US, FUSED_ADAPTER_OPS

        counted = fused_adapter_counts()
        print(
            f"per adapter: PEFT's {counted[0]}, fused {counted[1]} (hostops: {FUSED_ADAPTER_OPS})"
        )
        # the host's time is timed, not counted: this machine's, printed beside the table's
        for name, (peft, fused) in fused_adapter_host_us().items():
            print(
                f"host us per adapter, {name}: PEFT's {peft}, fused {fused} (ratio "
                f"{fused / peft:.2f}; hostops: {FUSED_ADAPTER_HOST_US.get(name)})"
            )
        return 0 if counted == FUSED_ADAPTER_OPS else 1
    if args.compile:
        for quant4 in (False, True):
            counts = compiled_per_layer(quant4)
            print(f"{'4-bit' if quant4 else 'bf16':5} per layer {json.dumps(counts)}")
        return 0
    if args.packed:
        # the tolerance test_hostops holds the table to against a recount
        far = False
        for model_type in models.supported_architectures():
            if attention(model_type) != "sdpa":
                print(f"{model_type:12} {attention(model_type)} attention: not counted packed")
                continue
            diff = packed_differences(model_type)
            far |= any(abs(b - a) > 0.1 * a for a, b in diff.values())
            print(f"{model_type:12} " + (f"padded, packed per layer: {diff}" if diff else "same"))
        return 1 if far else 0
    fresh = recount()
    if args.check:
        old = json.loads(OUT.read_text())["families"]
        bad = {t: (old.get(t), c) for t, c in fresh["families"].items() if old.get(t) != c}
        for t, (was, now) in bad.items():
            print(f"{t}: host_ops.json has {was}, a recount gives {now}")
        return 1 if bad else 0
    OUT.write_text(json.dumps(fresh, indent=1) + "\n")
    for t, c in fresh["families"].items():
        print(f"{t:12} {c}")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
