"""The recomputed layer's peak, traced on the CPU: every tensor storage a checkpointed
LoRA step makes is counted from the op that makes it to the moment it dies, so the step's
peak and what is alive at it are exact (as autograd keeps them; CPU kernels: SDPA's CPU
flash path, unfused dropout, so dropout 0 here).

    python benchmarks/recompute_trace.py            # the four regimes below, top tensors

Tiny Llama and Gemma 3 layers (the real models' i/h and q/h ratios), LoRA on all linears
(r 8, dropout 0), non-reentrant checkpointing, a vocabulary too small for the loss to set
the peak. Two regimes: ``deepspeed`` (bf16 adapters, no autocast: DeepSpeed's dtypes) and
``autocast`` (PEFT's fp32 adapters under bf16 autocast: the trainer loop without
DeepSpeed). Per token: the slope between micro-batches 2 and 4 (constants drop out),
against the estimate's layer-recompute activations (checkpoints + one layer +
recompute_extra). tests/test_real_cpu.py holds the deepspeed regime to 1%.
"""

from __future__ import annotations

import argparse
import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zeroplan.memory.activations import activation_profile  # noqa: E402
from zeroplan.models import spec_from_config  # noqa: E402
from zeroplan.trainsetup import TrainSetup  # noqa: E402

SMALL = {"num_hidden_layers": 3, "vocab_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 1, "head_dim": 64}  # fmt: skip
ARCHS: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B's ratios: i = 4h, q = h, kv = q/4
    "llama": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, **SMALL},
    # Gemma-3-1B's: i = 6h, q = 0.89h, one kv head; four norms a layer, q/k norms
    "gemma3": {
        "model_type": "gemma3_text",
        "hidden_size": 288,
        "intermediate_size": 1728,
        "query_pre_attn_scalar": 64,
        **SMALL,
    },
}
REGIMES = ("deepspeed", "autocast")


class LiveStorages:
    """Live bytes of the storages made under ``mode``: counted when an op makes them,
    dropped when the storage dies (a storage keeps one Python object while it lives)."""

    def __init__(self, existing: list[Any]) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.live = self.peak = 0
        self.at_peak: Counter[str] = Counter()
        self._made: dict[int, tuple[int, str]] = {}
        known = {id(t.untyped_storage()) for t in existing}
        outer = self

        def free(key: int) -> None:
            outer.live -= outer._made.pop(key)[0]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if not isinstance(t, torch.Tensor):
                        continue
                    st = t.untyped_storage()
                    key = id(st)
                    if key in known or key in outer._made or st.nbytes() == 0:
                        continue
                    node = torch._C._current_autograd_node()
                    where = f"{func.__name__} {tuple(t.shape)} {str(t.dtype)[6:]}" + (
                        f" in {node.name()}" if node is not None else ""
                    )
                    outer._made[key] = (st.nbytes(), where)
                    outer.live += st.nbytes()
                    if outer.live > outer.peak:
                        outer.peak = outer.live
                        outer.at_peak = Counter()
                        for n, w in outer._made.values():
                            outer.at_peak[w] += n
                    weakref.finalize(st, free, key)
                return out

        self.mode = Mode()


def lora_model(config: dict[str, Any], regime: str, dropout: float = 0.0) -> Any:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**config, attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, target_modules="all-linear", lora_dropout=dropout)
    )
    if regime == "deepspeed":  # DeepSpeed bf16 casts the adapters too
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def traced_step(model: Any, regime: str, batch: int, seq: int, vocab: int) -> LiveStorages:
    """One step's forward (the output dropped, as the Trainer does) and backward, traced."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
    tracker = LiveStorages(list(model.parameters()))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=regime == "autocast")
    with tracker.mode:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return tracker


def peak_per_token(
    arch: str, regime: str, seq: int = 128, dropout: float = 0.0
) -> tuple[float, LiveStorages]:
    """The step's peak live bytes per token (slope from micro-batch 2 to 4, after a warm-up
    step) and the micro-batch-4 trace."""
    config = ARCHS[arch]
    model = lora_model(config, regime, dropout)
    traced_step(model, regime, 2, seq, config["vocab_size"])  # lazily made state
    small = traced_step(model, regime, 2, seq, config["vocab_size"])
    large = traced_step(model, regime, 4, seq, config["vocab_size"])
    return (large.peak - small.peak) / (2 * seq), large


def estimated_per_token(arch: str, regime: str, dropout: float = 0.0) -> dict[str, float]:
    """The estimate's layer-recompute activations per token, and the older count's."""
    spec = spec_from_config(ARCHS[arch])
    ds = regime == "deepspeed"
    setup = TrainSetup(
        method="lora", micro_batch=1, seq_len=1, zero=0 if ds else None, grad_ckpt=True,
        lora_r=8, lora_dropout=dropout, attn="sdpa",
    )  # fmt: skip
    act = activation_profile(spec, setup, 0)  # one token
    return {
        "now": act.checkpoints + act.one_layer + act.recompute_extra,
        "older count": act.checkpoints + act.one_layer + act.transient + act.head,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=12, help="largest live tensors to list")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument(
        "--dropout", type=float, default=0.0,
        help="LoRA dropout (the CPU's dropout keeps its noise in the input's dtype, CUDA's a "
        "1-byte mask: above 0 the CPU holds 1-3 B per element more than a GPU)",
    )  # fmt: skip
    args = p.parse_args()
    import platform
    from importlib.metadata import version

    stack = ", ".join(f"{pkg} {version(pkg)}" for pkg in ("torch", "transformers", "peft"))
    print(f"# CPU ({platform.machine()}, Python {platform.python_version()}): {stack}")
    for arch in args.archs.split(","):
        for regime in args.regimes.split(","):
            measured, trace = peak_per_token(arch, regime, dropout=args.dropout)
            est = estimated_per_token(arch, regime, args.dropout)
            line = ", ".join(
                f"{k} {v:,.0f} ({(v - measured) / measured:+.1%})" for k, v in est.items()
            )
            print(
                f"{arch} {regime}, dropout {args.dropout:g}: peak {measured:,.0f} B per token; estimate {line}"
            )
            tokens = 4 * 128
            for where, n in trace.at_peak.most_common(args.top):
                print(f"    {n / tokens:8,.0f} B/token  {where}")


if __name__ == "__main__":
    main()
