"""Activations autograd saves for backward, per decoder layer and per token.

Derived op by op from what each PyTorch / transformers / PEFT operation saves for its
backward in a Llama-style layer, then checked against measured peaks
(benchmarks/results/). Symbols: h hidden size, q = heads·head_dim, kv = kv_heads·head_dim,
i intermediate size, r LoRA rank, H heads, s sequence length, T = b·s tokens.

Regimes: without DeepSpeed the trainer loop runs the step under bf16 autocast (what HF
Trainer/accelerate do), so PEFT's fp32 adapters see their input cast to fp32 and autocast
casts it back to a bf16 copy that lora_A saves. A plain loop on a bf16 model runs without
autocast (``setup.autocast`` False): the adapters then compute in fp32 and save fp32
tensors. Under DeepSpeed bf16 everything, adapters included, is bf16 and there is no
autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroplan import liger
from zeroplan.memory.precision import (
    amp_copies_at_backward,
    amp_input_casts_per_token,
    amp_norm_extra_per_token,
    amp_recompute_copies,
    amp_weight_copies,
    residual_bytes,
)
from zeroplan.models import Linear, ModelSpec
from zeroplan.trainsetup import (
    TrainSetup,
    fused_lora_runs,
    lora_targets,
    resolve_attention,
    sdpa_gets_mask,
)

BF16 = 2
FP32 = 4
MASK = 1  # dropout keeps a bool mask
# ZeRO-3 swaps F.linear for its own autograd function (deepspeed.runtime.zero.linear), which
# saves every linear's input, the frozen base layers' under LoRA too. Those inputs are
# 2 B per element of (2h + q + i) per token; measured is 4.5 B with the model built inside
# zero.Init (Llama-3.2-1B 4.53, Qwen2.5-0.5B 4.49, benchmarks/results/memory_h100_zero1gpu.jsonl),
# and 1.7 B with it built before deepspeed.initialize, as a plain loop does (Llama-3.2-1B
# without checkpointing, LoRA on all linears 1.60 and on q/k/v/o 1.72: 2.4-2.5 GiB below the
# zero.Init rate, benchmarks/results/edges_h100.jsonl). Both read off measurements: why
# zero.Init keeps more is not traced yet.
ZERO3_LORA_BYTES_PER_INPUT = 4.5
ZERO3_NO_INIT_BYTES_PER_INPUT = 1.7


@dataclass(frozen=True)
class Saved:
    """A tensor (family) saved for backward: ``bytes_per_token`` per layer per token."""

    what: str
    bytes_per_token: float


def _lora_input(d: int, r: int, setup: TrainSetup) -> float:
    """Saved by one adapted linear with input width d.

    autocast:    x.to(fp32) → dropout (mask 1 B·d) → autocast's bf16 copy saved by lora_A (2 B·d);
                 lora_A's bf16 output saved by lora_B: 2 B·r
    DeepSpeed:   dropout on bf16 x (mask 1 B·d + output 2 B·d), or x itself when p = 0;
                 lora_A's output 2 B·r
    no autocast, fp32 adapters (a plain loop on a bf16 model; PEFT casts x to the adapter's
                 dtype, ``_cast_input_dtype``, bitsandbytes layers too when autocast is off):
                 dropout on the fp32 copy (mask 1 B·d), its fp32 output saved by lora_A
                 (4 B·d), lora_A's fp32 output saved by lora_B (4 B·r). Not yet calibrated
                 on a GPU.
    """
    mask = MASK * d if setup.lora_dropout > 0 else 0
    width = FP32 if fp32_adapter_inputs(setup) else BF16
    return mask + width * d + width * r


# Adapted linears that read one tensor: the attention norm's output (q, k, v) and the MLP
# norm's (gate, up); other names read their own input
SHARED_INPUT = {
    "q_proj": "attention input",
    "k_proj": "attention input",
    "v_proj": "attention input",
    "qkv_proj": "attention input",
    "gate_proj": "MLP input",
    "up_proj": "MLP input",
    "gate_up_proj": "MLP input",
}


def shares_inputs(setup: TrainSetup) -> bool:
    """Dropout 0 (PEFT's dropout is then an identity) where nothing casts the input, so
    lora_A saves the linear's input itself, one tensor for every adapter that reads it:
    bf16 LoRA under DeepSpeed ZeRO 0-2 (bf16 adapters), and QLoRA under autocast (PEFT's
    4-bit LoRA layer casts its input to the adapter's dtype only when autocast is off,
    ``peft.tuners.lora.bnb.Linear4bit.forward``; autocast's bf16 cast of a bf16 input is the
    input), and the launch's fused LoRA linears wherever they run (zeroplan.launch.loralinear:
    bf16 LoRA under autocast too). With dropout each adapter saves its own dropped-out copy;
    with fp32 adapters and no autocast its own cast; ZeRO-3's linears save their inputs apart
    (ZERO3_LORA_BYTES_PER_INPUT). Measured on one H100: Llama-3.1-8B QLoRA, Liger, 16 × 704
    packed tokens, dropout 0: 57.34 GB peak, where a copy per adapter said 69.49
    (benchmarks/results/kernels2_h100.jsonl)."""
    if setup.lora_dropout != 0 or setup.zero == 3:
        return False
    if setup.method == "qlora":
        return bool(setup.autocast)
    if setup.method == "lora" and fused_lora_runs(setup):
        # the launch's fused linears save the bf16 input itself, one per group, whatever the
        # adapters' dtype (under autocast they cast the adapters, not the input)
        return True
    return setup.method == "lora" and setup.deepspeed and not fp32_adapter_inputs(setup)


def _lora_inputs(adapted: list[Linear], setup: TrainSetup) -> float:
    """Saved by a layer's adapted linears: Σ _lora_input, or where the adapters share their
    inputs (shares_inputs) each distinct input once, 2 B·d, plus lora_A's output per adapter,
    2 B·r; o_proj's input is the attention's output, which sdpa and flash attention keep
    already (layer_saved), so it adds nothing there. Measured on one H100: Llama-3.2-3B,
    ZeRO-0, 16 × 704 packed tokens, dropout 0: 35.73 GB peak, where counting a copy per
    adapter said 43.83 (benchmarks/results/kernels_heldout_h100.jsonl)."""
    r = setup.lora_r
    if not shares_inputs(setup):
        return sum(_lora_input(lin.in_features, r, setup) for lin in adapted)
    seen: set[str] = set()
    total = 0.0
    for lin in adapted:
        total += BF16 * r
        key = SHARED_INPUT.get(lin.name, lin.name)
        if (lin.name == "o_proj" and setup.attn != "eager") or key in seen:
            continue
        seen.add(key)
        total += BF16 * lin.in_features
    return total


# axolotl's fused LoRA autograd functions (axolotl 0.19, src/axolotl/kernels/lora.py) and
# the linears each fuses; axolotl patches one in only where all of them carry an adapter
# (monkeypatch/lora_kernels.py: q, k and v; o; gate, up and down of a dense MLP)
LORA_KERNEL_GROUPS = {
    "LoRA_QKV": ("q_proj", "k_proj", "v_proj"),
    "LoRA_O": ("o_proj",),
    "LoRA_MLP": ("gate_proj", "up_proj", "down_proj"),
}


def lora_kernel_groups(adapted: list[Linear], setup: TrainSetup) -> list[str]:
    """The fused groups that run (``setup.lora_kernels``): those whose every linear is
    adapted in this layer (not phi3's fused qkv_proj / gate_up_proj, not MoE banks)."""
    if not setup.lora_kernels:
        return []
    names = {lin.name for lin in adapted if lin.group in ("attn", "mlp")}
    return [g for g, members in LORA_KERNEL_GROUPS.items() if set(members) <= names]


def lora_kernel_saved(group: str, spec: ModelSpec, setup: TrainSetup) -> float:
    """Saved per token by one of axolotl's fused LoRA functions, read off its
    ``save_for_backward`` (axolotl 0.19, kernels/lora.py), in place of PEFT's path.

    Each function is handed the group's input X (bf16, the model's dtype: the kernels keep
    it, autocast or not) and, with dropout, X_drop = dropout(X) drawn once for the group
    outside the function (``_apply_dropout``: the Dropout module saves its 1 B mask), and
    saves X and X_drop (one tensor when p = 0). The adapters' bf16 copies it saves are
    weight-sized, as autocast's (activation_profile's adapter copies); lora_A's outputs are
    recomputed in the backward, not saved.

    LoRA_QKV: X 2 B·h (+ X_drop 2 B·h + mask 1 B·h)
    LoRA_O:   X is the attention output that sdpa / flash attention save already (0; eager:
              2 B·q) (+ X_drop 2 B·q + mask 1 B·q)
    LoRA_MLP: X 2 B·h (+ X_drop 2 B·h + mask 1 B·h), gate and up outputs 2 · 2 B·i; act(gate)
              and down_proj's input are recomputed from them in the backward

    Against PEFT's path under autocast with dropout (_lora_input: 3 B·d + 2 B·r per adapter,
    and the MLP's 6 B·i) that keeps 5h + 5i + 14r bytes less per token and layer: 56,544 B on
    Llama-3.2-3B at r = 16, where axolotl 0.19's LoRA run on one H100 peaked 5.66 GiB under
    the same recipe with the kernels off, 56,524 B per token and layer at 4 × 960 tokens
    (benchmarks/results/recipes_gpu.md).
    """
    width = spec.q_dim if group == "LoRA_O" else spec.hidden_size
    kept = BF16 * width if group != "LoRA_O" or setup.attn == "eager" else 0
    dropped = (BF16 + MASK) * width if setup.lora_dropout > 0 else 0
    gate_up = 2 * BF16 * spec.intermediate_size if group == "LoRA_MLP" else 0
    return kept + dropped + gate_up


def fp32_adapter_inputs(setup: TrainSetup) -> bool:
    """LoRA adapters that compute in fp32: PEFT's fp32 adapters (no DeepSpeed) without autocast."""
    return setup.is_lora and not setup.deepspeed and not setup.autocast and not setup.lora_bf16


def _norm(h: float, spec: ModelSpec, setup: TrainSetup) -> float:
    """RMSNorm: the fp32 upcast of its input (4 B·h) feeds pow and mul and is saved; the
    normalised bf16 tensor (2 B·h) is saved for the weight's gradient when it trains.
    Gemma's norm multiplies in fp32 by (1 + w): 4 B·h more when the weight trains.

    Liger's RMSNorm (``kernels="liger"``; liger-kernel 0.8.5, ``ops/rms_norm.py``) saves
    only its input X (the residual stream's width, 2 B·h in bf16) and one fp32 rstd per row,
    and recomputes the normalised tensor for the weight's gradient: 2 B·h trained or not.
    Both save the per-row rstd (the plain norm's rsqrt output), 4 B a token, left out of
    both. So per norm: 4 B·h → 2 B·h frozen, 6 B·h (Gemma 8 B·h) → 2 B·h trained."""
    if liger.runs(spec.model_type, setup.kernels, "rms_norm"):
        return residual_bytes(setup) * h
    weight_trained = setup.method == "full"
    extra = (FP32 if spec.gemma_norm else BF16) * h if weight_trained else 0
    return FP32 * h + extra


def _mlp(spec: ModelSpec, setup: TrainSetup) -> float:
    """A dense gated MLP, act(gate(x)) · up(x): the gate and up outputs and act(gate), the
    product's other factor, 3 · 2 B·i (SiLU and tanh-GELU each save their input, the
    product both factors). Liger's SwiGLU / GeGLU (liger-kernel 0.8.5, ``ops/swiglu.py``,
    ``ops/geglu.py``) save the gate and up outputs and recompute act(gate) in the backward:
    2 · 2 B·i."""
    factors = 2 if liger.runs(spec.model_type, setup.kernels, "swiglu", "geglu") else 3
    return factors * BF16 * spec.intermediate_size


def layer_saved(spec: ModelSpec, setup: TrainSetup, moe_layer: bool = False) -> list[Saved]:
    """Tensors one decoder layer saves for backward, per token (no checkpointing).

    norms:      per norm 4 B·h (+ 2 B·h full); Liger's 2 B·h                (see _norm)
    attention:  sdpa / flash: q 2 B·q, k 2 B·kv, v 2 B·kv, output 2 B·q (also o_proj's
                input), log-sum-exp 4 B·H; eager adds repeated k, v (2 B·q each) and
                the fp32 softmax + its bf16 copy, 6 B·H·s, per token; with Gemma-2's
                score cap also tanh's bf16 output, 2 B·H·s (transformers'
                gemma2 eager_attention_forward: the scale and the cap's divide and
                multiply by constants save nothing, dropout at p = 0 returns its input)
    qk-norm:    4 B·(q + kv) (+ 2 B·(q + kv) full)
    MLP:        gate output, up output, act(gate): 6 B·i; Liger's SwiGLU / GeGLU 4 B·i (_mlp)
    RoPE:       the model's rotary saves cos and sin (q·cos needs no q), Liger's the same:
                nothing per token either way
    linear inputs: full fine-tuning saves each distinct input once (attn in 2 B·h, MLP in
                2 B·h, down_proj in 2 B·i); LoRA saves per adapted linear (_lora_input),
                or each distinct input once where its adapters share it (_lora_inputs);
                axolotl's fused LoRA functions per group instead (lora_kernel_saved)
    MoE:        router + top_k routed copies of each token (expert_saved_per_token)
    ZeRO-3 LoRA: the frozen linears' inputs, 4.5 B·(2h + q + i) measured under zero.Init,
                1.7 B without it (TrainSetup.zero_init)
    AMP on an fp32 model (full fp16 without DeepSpeed): the two pre-norms' fp32 outputs
                (precision.amp_norm_extra_per_token) and one fp16 input per linear
                reading them (precision.amp_input_casts_per_token); the other tensors have
                bf16's sizes in fp16
    """
    setup = resolve_attention(setup, spec)  # an unset attention: the model's
    h, q, kv, heads = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.num_heads
    full = setup.method == "full"
    out: list[Saved] = [Saved("norms", spec.norms_per_layer * _norm(h, spec, setup))]
    if setup.attn == "eager":
        out.append(Saved("attention q, k, v (repeated)", BF16 * 3 * q))
        out.append(Saved("attention softmax (fp32 + bf16)", (FP32 + BF16) * heads * setup.seq_len))
        if spec.attn_logit_softcapping:
            out.append(Saved("attention score cap (tanh output)", BF16 * heads * setup.seq_len))
        if full:
            out.append(Saved("attention output (o_proj input)", BF16 * q))
    else:
        out.append(Saved("attention q, k, v", BF16 * (q + 2 * kv)))
        out.append(Saved("attention output + lse", BF16 * q + FP32 * heads))
        repeated = padding_mask_repeat_per_token(spec, setup)
        if repeated:
            out.append(Saved("attention k, v repeated to every head (padding mask)", repeated))
    if spec.qk_norm:
        out.append(Saved("q/k norms", _norm(q + kv, spec, setup)))

    amp = 2 * amp_norm_extra_per_token(spec, setup) + amp_input_casts_per_token(
        spec, setup, moe_layer
    )
    if amp:
        out.append(Saved("AMP: fp32 norm outputs, per-linear fp16 inputs", amp))

    parts = ("attn", "router") if moe_layer else ("attn", "mlp")
    adapted: list[Linear] = [lin for lin, _ in lora_targets(spec, setup) if lin.group in parts]
    fused = lora_kernel_groups(adapted, setup)
    if moe_layer and spec.moe:
        out.append(Saved("MoE router + experts", expert_saved_per_token(spec, setup)))
    elif "LoRA_MLP" not in fused:  # LoRA_MLP keeps gate and up itself
        out.append(Saved("MLP gate, up, act", _mlp(spec, setup)))

    if full:
        out.append(Saved("linear inputs", BF16 * (2 * h + spec.intermediate_size)))
    else:
        for group in fused:
            out.append(Saved(f"axolotl {group}", lora_kernel_saved(group, spec, setup)))
        in_fused = {name for group in fused for name in LORA_KERNEL_GROUPS[group]}
        lora = _lora_inputs([lin for lin in adapted if lin.name not in in_fused], setup)
        out.append(Saved("LoRA inputs", lora))
        if setup.zero == 3 and setup.method == "lora" and not moe_layer:
            inputs = 2 * h + q + spec.intermediate_size
            rate = ZERO3_LORA_BYTES_PER_INPUT if setup.zero_init else ZERO3_NO_INIT_BYTES_PER_INPUT
            out.append(Saved("ZeRO-3 base-linear inputs", rate * inputs))
    return out


def banks_trained(spec: ModelSpec, setup: TrainSetup) -> bool:
    """LoRA reaches the MoE expert banks (``all-linear``: PEFT wraps the 3-D parameters)."""
    return any(lin.group == "expert" for lin, _ in lora_targets(spec, setup))


def expert_saved_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """Saved by one MoE block per token, as transformers 5 runs it (``grouped_mm``: each
    token copied to its top_k experts, the copies sorted by expert).

    router:         fp32 logits and softmax 2 · 4 B·E
    per routed copy (top_k per token):
      frozen banks: gate and up halves of gate_up's output and act(gate), 3 · 2 B·i_e, and
                    the expert's output, which the routing weight multiplies, 2 B·h
      trained banks (LoRA on them): a matmul whose weight needs a gradient also saves its
                    input: the gathered token 2 B·h and down_proj's input 2 B·i_e

    Measured on one H100 (benchmarks/results/moe_h100.jsonl): LoRA on attention (and the
    router) of Qwen3-30B-A3B and Mixtral-8x7B shapes, cut and at full depth, within 0.6%
    of their peaks with this term (the earlier guess of 8 B·i_e per copy put Mixtral's
    4 × 1024 5% over).
    """
    assert spec.moe is not None
    h, ie = spec.hidden_size, spec.moe.expert_intermediate_size
    per_copy = 3 * BF16 * ie + BF16 * h
    if banks_trained(spec, setup):
        per_copy += BF16 * h + BF16 * ie
    return spec.moe.top_k * per_copy + 2 * FP32 * spec.moe.num_experts


def expert_bank_copies(spec: ModelSpec, setup: TrainSetup) -> int:
    """One MoE layer's bank-sized tensors alive from its forward to its backward when LoRA
    trains the expert banks.

    PEFT's ParamWrapper puts LoRA on a 3-D bank as a parametrization: every forward
    computes W' = W + s·B·A, a bf16 tensor as large as the bank, and grouped_mm saves W'
    for the backward of its input. So each MoE layer keeps 2 B × (E·2i_e·h + E·h·i_e)
    (gate_up and down) until its backward: a second copy of every expert weight without
    checkpointing, one layer's under it (the recomputed layer). Measured: see
    expert_bank_backward.
    """
    if spec.moe is None or not banks_trained(spec, setup):
        return 0
    return BF16 * sum(lin.params for lin in spec.moe_linears() if lin.group == "expert")


def expert_bank_backward(spec: ModelSpec, setup: TrainSetup) -> int:
    """What a trained MoE layer's backward adds to its saved banks: grouped_mm's gradient of
    W', as large as the bank, before PEFT's parametrization reduces it to A's and B's.

    down_proj's backward comes first, with both of the layer's copies alive: + D; then
    gate_up's, after down's copy is freed: − D + G. With D = 2 B·E·h·i_e and
    G = 2 B·E·2i_e·h = 2·D, the transient is max(D, G − D) = D.

    With expert_bank_copies: all-linear LoRA (dropout 0) of cut Qwen3-30B-A3B (8 layers)
    and Mixtral-8x7B (4 layers) shapes on one H100 from -2.1% to +2.5%, with and without
    checkpointing (benchmarks/results/moe_h100.jsonl; without the two terms up to 47% under),
    and the full Qwen3-30B-A3B on one H200 within 0.2% (check_h200_moe.jsonl, where the
    estimate before said 71.7 GiB for 125.5 measured); benchmarks/moe_check.py prints them.
    """
    if spec.moe is None or not banks_trained(spec, setup):
        return 0
    banks = {lin.name: BF16 * lin.params for lin in spec.moe_linears() if lin.group == "expert"}
    down, gate_up = banks["down_proj"], banks["gate_up_proj"]
    return max(down, gate_up - down)


def per_layer_bytes_per_token(spec: ModelSpec, setup: TrainSetup, moe_layer: bool = False) -> float:
    return sum(s.bytes_per_token for s in layer_saved(spec, setup, moe_layer))


def backward_transient_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """Gradients in flight inside one layer's backward: about three i-wide bf16 tensors
    (grad of the MLP product, of act(gate) and of up) at the MLP's backward: 6 B·i."""
    width = (
        spec.moe.expert_intermediate_size * spec.moe.top_k if spec.moe else spec.intermediate_size
    )
    return 3 * BF16 * width


def mlp_backward_traced(spec: ModelSpec, setup: TrainSetup) -> bool:
    """Where recompute_mlp_backward_per_token was traced: bf16 LoRA under DeepSpeed ZeRO 0-2
    (bf16 adapters, no autocast, no casts) on a dense model, PEFT's LoRA layers."""
    return (
        setup.method == "lora"
        and setup.deepspeed
        and setup.zero != 3
        and spec.moe is None
        and not setup.lora_kernels
    )


def recompute_mlp_backward_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """What the first recomputed layer holds beyond its saved tensors when its MLP's
    backward peaks, per token, where traced (mlp_backward_traced; elsewhere the estimate
    keeps the older count: backward_transient_per_token + the final norm's
    head_saved_per_token).

    The peak falls in down_proj's backward, where its two input gradients (the frozen
    linear's and the adapter's, 2 B·i each) and their sum (2 B·i) exist: the 6 B·i of
    backward_transient_per_token. By then the final norm's saved input (head) is long
    freed, and so is what down_proj's adapter saved (_lora_input: its input, 2 B·i, with
    dropout the mask and the dropped-out copy, 3 B·i, and lora_A's output 2 B·r) and, in
    Gemma's layers, the post-feed-forward norm's (_norm). In flight at the layer's width:
    the gradient of the residual stream, 2 B·h.

        6 B·i + 2 B·h − down_proj's adapter input − Gemma's post-ff _norm

    Traced on the CPU, as autograd keeps them (tests/test_real_cpu.py counts every live
    storage through a checkpointed LoRA step of tiny Llama and Gemma 3 models in
    DeepSpeed's dtypes; benchmarks/results/recompute_trace_cpu.txt): within 0.1% of both
    peaks, where the older count put them 14% and 17% over, the direction and size of
    Gemma 3 1B launched under ZeRO-0 on an H100
    (+12.6%, issue 30; 11.4 GiB measured, now 11.5 estimated for that run's dropout 0.05).
    """
    h = spec.hidden_size
    held = backward_transient_per_token(spec, setup) + BF16 * h
    adapted = {lin.name for lin, _ in lora_targets(spec, setup)}
    if "down_proj" in adapted:
        held -= _lora_input(spec.intermediate_size, setup.lora_r, setup)
    if spec.norms_per_layer == 4:  # Gemma 2/3 normalise the MLP's output
        held -= _norm(h, spec, setup)
    return held


def head_saved_per_token(spec: ModelSpec, setup: TrainSetup) -> float:
    """Final norm (4 B·h, + 2 B·h full; AMP + precision.amp_norm_extra_per_token) and, full
    fine-tuning, lm_head's input 2 B·h."""
    h = spec.hidden_size
    full = setup.method == "full"
    return _norm(h, spec, setup) + (BF16 * h if full else 0) + amp_norm_extra_per_token(spec, setup)


def padding_mask_repeat_per_token(spec: ModelSpec, setup: TrainSetup) -> int:
    """Padded batches under sdpa (``setup.padding_mask``): the k and v that SDPA saves are
    repeated to every query head, 2 · 2 B · (q - kv) more per token per layer.

    transformers' sdpa_attention_forward hands SDPA the grouped k and v (``enable_gqa``) only
    when there is no attention mask (``use_gqa_in_sdpa`` on CUDA); with the mask a padded
    batch carries it calls ``repeat_kv`` first, and SDPA saves the repeated copies for
    backward. Measured with the padding-mask term below on LLaMA-Factory 0.9.5, TRL 1.16 and
    axolotl 0.19 (benchmarks/results/recipes_gpu.md). The same where a sliding window
    binds (trainsetup.sdpa_gets_mask: the window is a mask, packed or not)."""
    setup = resolve_attention(setup, spec)  # an unset attention: the model's
    if not sdpa_gets_mask(spec, setup):
        return 0
    return 2 * BF16 * (spec.q_dim - spec.kv_dim)


def padding_mask_bytes(spec: ModelSpec, setup: TrainSetup, layers: int) -> int:
    """Padded batches under sdpa: each layer's SDPA call turns the boolean b·s·s mask into
    its own additive mask in the compute dtype, last dimension padded to a multiple of 16
    (what the memory-efficient kernel takes), and saves it for backward:
    2 B · b · s · ⌈s/16⌉·16 per layer. Fitted: 55.8 B per b·s² on the 28-layer
    Llama-3.2-3B (2 B × 28 = 56), axolotl 0.19 on an H100, 14 steps of varying s. Counted
    for every layer where a sliding window binds (trainsetup.sdpa_gets_mask): the launch's
    block mask reaches every layer; unpacked, only the sliding layers get one (5 of 6 on
    Gemma 3), so this over-counts there by the full layers' share. Not measured on a GPU."""
    setup = resolve_attention(setup, spec)  # an unset attention: the model's
    if not sdpa_gets_mask(spec, setup):
        return 0
    s = setup.seq_len
    return BF16 * setup.micro_batch * s * (-(-s // 16) * 16) * layers


def eager_mask_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """The eager path materialises one b·s·s causal mask in bf16, shared by all layers."""
    setup = resolve_attention(setup, spec)  # an unset attention: the model's
    return BF16 * setup.micro_batch * setup.seq_len**2 if setup.attn == "eager" else 0


@dataclass(frozen=True)
class ActivationProfile:
    """Activation bytes at the moments the peak can fall on (one GPU, one micro-batch)."""

    all_layers: int  # no checkpointing: everything saved by the forward
    checkpoints: int  # checkpointing: one hidden state per layer
    one_layer: int  # one layer's saved tensors (recomputed under checkpointing)
    transient: int  # gradients in flight in one layer's backward
    head: int  # final norm + lm_head input
    # Copies autocast makes of fp32 weights: LoRA's adapters (bf16, or fp16 on an fp16
    # setup), AMP's fp32 model (precision.amp_*). Alive when backward starts:
    autocast_weights: int
    forward_weights: int  # ... alive at the end of the forward (autocast's cache)
    recompute_weights: int  # ... alive while a checkpointed layer is recomputed
    # what the first recomputed layer holds beyond its saved tensors at its MLP's backward
    # (recompute_mlp_backward_per_token; untraced setups: transient + head)
    recompute_extra: int


def activation_profile(spec: ModelSpec, setup: TrainSetup, trainable: int) -> ActivationProfile:
    """Bytes for T = b·s tokens: per-layer bytes × T × layers, etc.

    checkpoints = 2 B·h·T·L (non-reentrant checkpointing keeps each layer's input); 4 B·h·T·L
    for AMP on an fp32 model (precision.residual_bytes). Other saved tensors are counted as
    in bf16 under fp16 too (the same sizes for fp16 tensors), plus AMP's fp32 norm outputs
    and per-linear input casts (layer_saved).

    autocast's weight copies: LoRA's adapter copies 2 B·Ψ_t at every moment (counted held
    throughout, as measured); AMP's per moment: amp_weight_copies at the forward's end,
    amp_copies_at_backward at its start, amp_recompute_copies in a recomputed layer.
    """
    t = setup.tokens
    dense = spec.num_dense_layers
    moe_layers = spec.moe.num_moe_layers if spec.moe else 0
    dense_layer = per_layer_bytes_per_token(spec, setup) * t if dense else 0.0
    moe_layer = per_layer_bytes_per_token(spec, setup, moe_layer=True) * t if moe_layers else 0.0
    moe_layer += expert_bank_copies(spec, setup) if moe_layers else 0
    # autocast's cached bf16 copies of the fp32 adapters (none without autocast)
    # (bf16 adapters, lora_bf16, need no copy)
    copies = setup.is_lora and not setup.deepspeed and setup.autocast and not setup.lora_bf16
    adapters = BF16 * trainable if copies else 0
    transient = int(backward_transient_per_token(spec, setup) * t) + expert_bank_backward(
        spec, setup
    )
    head = int(head_saved_per_token(spec, setup) * t)
    traced = mlp_backward_traced(spec, setup)
    extra = int(recompute_mlp_backward_per_token(spec, setup) * t) if traced else transient + head
    return ActivationProfile(
        all_layers=int(dense * dense_layer + moe_layers * moe_layer)
        + eager_mask_bytes(spec, setup)
        + padding_mask_bytes(spec, setup, spec.num_layers),
        checkpoints=residual_bytes(setup) * spec.hidden_size * t * spec.num_layers,
        one_layer=int(max(dense_layer, moe_layer))
        + eager_mask_bytes(spec, setup)
        + padding_mask_bytes(spec, setup, 1),
        transient=transient,
        head=head,
        autocast_weights=adapters or amp_copies_at_backward(spec, setup),
        forward_weights=adapters or amp_weight_copies(spec, setup),
        recompute_weights=adapters or amp_recompute_copies(spec, setup),
        recompute_extra=extra,
    )
