"""The loss: vocabulary-sized logits, often the largest single term for 128k-vocab models."""

from __future__ import annotations

import math

from zeroplan.memory.result import Term
from zeroplan.memory.weights import BF16, FP32, gib
from zeroplan.models import ModelSpec
from zeroplan.trainsetup import TrainSetup

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


def logits(spec: ModelSpec, setup: TrainSetup) -> Term:
    """Loss memory at the start of backward.

    unfused:  12 B · T · V   (T = b·s tokens, V vocabulary; +4 B with logit soft-capping)
    fused (Liger linear cross-entropy, never materialises T·V):
              chunk · V · (2 + 4 + 4) B  +  2 B · T · h (hidden-state gradient computed
              in the forward), chunk = next_pow2(ceil(T / ceil(V / h)))
    """
    t, v, h = setup.tokens, spec.vocab_size, spec.hidden_size
    if setup.fused_loss:
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
