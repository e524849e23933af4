"""A tiny random Llama and a tokenizer built in code, for the run-side tests (no download).

The tokenizer is a byte-level BPE trained on a few sentences (any text tokenizes), with
chat special tokens and a chat template that has ``{% generation %}`` markers; the model
is a 2-layer Llama of hidden size 32 saved with ``save_pretrained``. ``write_plan`` writes
the plan.json of a real ``Plan`` for that model via ``zeroplan.planner.plan_json``
(``plan_for`` builds it, for any cluster).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zeroplan.hardware import Cluster, parse_cluster
from zeroplan.models import load_model
from zeroplan.planner import Plan, PlanRequest, evaluate, plan_json
from zeroplan.trainsetup import TrainSetup

SPECIALS = ["<pad>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Turns end with <|end|>, which is also EOS: generation stops there. The newline after an
# assistant turn is outside the generation markers (layout between turns).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATE_NO_MARKERS = TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "What is the capital of France? Paris is the capital of France.",
    "Explain why the sky is blue. Sunlight scatters off the air.",
    "hello world, how are you today? I am fine, thank you.",
]
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    # large enough that a LoRA can move the logits far: the tests check what it learned
    "initializer_range": 0.2,
}


# Tiny configs of models with sliding layers (tests/test_packing.py, benchmarks/window_check.py):
# a 6-token window, records up to 30 tokens, so the window binds
SLIDING_WINDOW = 6
# a two-layer decoder of any family small enough for a CPU test
TINY_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 300,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
SLIDING_CONFIGS: dict[str, dict[str, Any]] = {
    "mistral": {**TINY_DECODER, "model_type": "mistral", "sliding_window": SLIDING_WINDOW},
    "gemma3_text": {
        **TINY_DECODER,
        "model_type": "gemma3_text",
        "head_dim": 16,
        "sliding_window": SLIDING_WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def build_tokenizer(template: str | None = TEMPLATE) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    if template is not None:
        fast.chat_template = template
    return fast


# a tiny Qwen3-MoE: 8 experts (top 2) as 3-D banks, a router, q/k norms
TINY_QWEN3_MOE: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "head_dim": 8,
    "moe_intermediate_size": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}


def build_model_dir(
    path: Path, template: str | None = TEMPLATE, arch: dict[str, Any] | None = None
) -> Path:
    """Tokenizer + random tiny model (``arch``, default TINY_LLAMA) saved in ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer(template)
    tok.save_pretrained(path)
    cfg = AutoConfig.for_model(
        **(arch or TINY_LLAMA),
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def plan_for(model_dir: Path, setup: TrainSetup, cluster: Cluster) -> dict[str, Any]:
    """The plan JSON (as ``zeroplan plan -o`` writes it) of a plan that chooses exactly
    ``setup`` for the model in ``model_dir`` on ``cluster``."""
    req = PlanRequest(
        spec=load_model(str(model_dir / "config.json")),
        cluster=cluster,
        method=setup.method,
        seq_len=setup.seq_len,
        lora_r=setup.lora_r,
        lora_targets=setup.lora_targets,
    )
    best = evaluate(req, setup)
    return plan_json(Plan(request=req, best=best, ranked=[best], rejected={}, searched=1))


def write_plan(run_dir: Path, model_dir: Path, **setup: Any) -> Path:
    """plan.json (as ``zeroplan plan -o`` writes it) of a one-GPU plan choosing ``setup``."""
    chosen = TrainSetup(**{"seq_len": 64, "optim": "adamw", **setup})
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "plan.json"
    plan = plan_for(model_dir, chosen, parse_cluster("1xH100"))
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path


def alpaca_records(n: int = 16) -> list[dict[str, str]]:
    qa = [
        ("What is the capital of France?", "", "Paris."),
        ("Say hello.", "", "hello world"),
        ("Finish the sentence.", "the quick brown fox", "jumps over the lazy dog"),
        ("Why is the sky blue?", "", "Sunlight scatters off the air."),
    ]
    return [
        {"instruction": q, "input": i, "output": a}
        for q, i, a in (qa[k % len(qa)] for k in range(n))
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
