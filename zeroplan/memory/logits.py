"""The loss: vocabulary-sized logits, often the largest single term for 128k-vocab models."""

from __future__ import annotations

import math

from zeroplan.memory.result import Term
from zeroplan.memory.weights import gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import BF16, FP32, TrainSetup

# At the start of backward, cross-entropy holds its saved fp32 log-softmax (4 B), the fp32
# gradient nll_loss hands back (4 B) and log_softmax's fp32 input gradient (4 B), per
# logit; transformers' ForCausalLMLoss upcasts the bf16 logits to fp32 first.
UNFUSED_BYTES_PER_LOGIT = 3 * FP32
# Gemma-2 soft-caps the logits (divide, tanh, multiply) in fp32 before the loss: tanh's
# saved output adds one more fp32 tensor. Not measured yet.
SOFTCAP_EXTRA_BYTES_PER_LOGIT = FP32


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's fused linear cross-entropy chunk: next_pow2(ceil(T / ceil(V / h)))."""
    return int(2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / hidden))))))


# TRL's chunked LM head (trl/kernels/chunked_logprob.py, TRL 1.16): tiles of 4096 tokens ×
# 32768 vocabulary entries, one buffer in the compute dtype
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768


def trl_chunked_head_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """TRL's chunked LM head at the start of backward (T = b·s, counting every position as
    labelled, the worst case):

        2 B · T · h   the labelled positions' hidden states, gathered and saved
        4 B · T · h   their fp32 gradient, accumulated over the vocabulary tiles
        2 B · min(T, 4096) · min(V, 32768)   the projection tile
    """
    t, v, h = setup.tokens, spec.vocab_size, spec.hidden_size
    return (BF16 + FP32) * t * h + BF16 * min(t, TRL_TOKEN_TILE) * min(v, TRL_VOCAB_TILE)


def logits(spec: ModelSpec, setup: TrainSetup) -> Term:
    """Loss memory at the start of backward.

    unfused:  12 B · T · V   (T = b·s tokens, V vocabulary; +4 B with logit soft-capping)
    fused (Liger linear cross-entropy, never materialises T·V):
              chunk · V · (2 + 4 + 4) B  +  2 B · T · h (hidden-state gradient computed
              in the forward), chunk = next_pow2(ceil(T / ceil(V / h)))
    """
    t, v, h = setup.tokens, spec.vocab_size, spec.hidden_size
    if setup.chunked_lm_head:
        size = trl_chunked_head_bytes(spec, setup)
        tile = min(t, TRL_TOKEN_TILE) * min(v, TRL_VOCAB_TILE)
        formula = f"TRL chunked head: 6 B × {t:,} × {h} + 2 B × {tile:,}"
    elif setup.fused_loss:
        chunk = liger_chunk_tokens(t, v, h)
        size = chunk * v * (BF16 + 2 * FP32) + BF16 * t * h
        formula = f"fused: {chunk} × {v:,} × 10 B + 2 B × {t:,} × {h}"
    else:
        per = UNFUSED_BYTES_PER_LOGIT + (
            SOFTCAP_EXTRA_BYTES_PER_LOGIT if spec.final_logit_softcapping else 0
        )
        size = per * t * v
        formula = f"{per} B × {t:,} tokens × {v:,} vocab"
    return Term("logits", int(size), f"{formula} = {gib(size)}")


def kept_output(spec: ModelSpec, setup: TrainSetup) -> Term:
    """The model's output object, alive through backward when the loop keeps it
    (``out = model(input_ids=..., labels=...); out.loss.backward()``).

    logits:  2 B · T · V  (the bf16 lm_head output; 0 under the fused loss, which returns
             no logits in training). The loss's fp32 upcast (``ForCausalLMLoss``:
             ``logits.float()``) is not kept: cross-entropy saves its log-softmax output,
             not its input, so the upcast dies when the loss function returns.
    cache:   without checkpointing transformers builds a DynamicCache when the config says
             ``use_cache`` (most do; checkpointing turns it off), and the output holds it:
             keys and values of every layer, 2 · 2 B · kv · T · L. While backward runs these
             are the tensors attention saved anyway; they stay after it, through the
             optimizer step and the next forward, until ``out`` is reassigned.
    Sliding-window caches are counted at the full sequence. Not yet calibrated on a GPU.
    """
    if not setup.keep_outputs:
        return Term("kept output", 0, "outputs dropped before backward")
    t = setup.tokens
    kept_logits = BF16 * t * spec.vocab_size if setup.full_logits else 0
    cache = (
        2 * BF16 * spec.kv_dim * t * spec.num_layers
        if not setup.grad_ckpt and spec.config.get("use_cache", True)
        else 0
    )
    formula = f"logits 2 B × {t:,} × {spec.vocab_size:,} = {gib(kept_logits)}"
    formula += f"; cache 4 B × {spec.kv_dim} × {t:,} × {spec.num_layers} = {gib(cache)}"
    return Term("kept output", kept_logits + cache, formula)


def kept_logits_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """The logits part of ``kept_output``: 2 B · T · V, else 0."""
    if not setup.keep_outputs or not setup.full_logits:
        return 0
    return BF16 * setup.tokens * spec.vocab_size


def loss_forward_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """The loss at the end of the forward, inside cross-entropy (unfused):

        bf16 logits 2 B + their fp32 upcast 4 B + log-softmax output 4 B = 10 B · T · V

    below the 12 B at the start of backward, so the forward's end only becomes the peak
    when a kept output of the previous step is alive beside it (``kept_output``).
    The fused loss: its backward-start figure (``logits``), computed in the forward.
    """
    if not setup.full_logits:
        return logits(spec, setup).bytes
    per = BF16 + 2 * FP32 + (SOFTCAP_EXTRA_BYTES_PER_LOGIT if spec.final_logit_softcapping else 0)
    return per * setup.tokens * spec.vocab_size
