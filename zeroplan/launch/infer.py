"""Use what a run trained: merge the LoRA adapter into the base, or generate with it.

Generation renders the conversation with the chat template saved next to the weights (the
one training rendered every record with) and ``add_generation_prompt=True``, and adds the
run's system prompt the way training did: the prompt is never written by hand, so it
cannot differ from what the model learned (the QLoRA story's mistake).

``path`` may be a run folder (its ``final/`` is used), a ``final/`` or checkpoint folder
(an adapter), or a merged model folder. ``zeroplan.json`` beside the weights names the base
model, the method, the data format and the system prompt; without it (a checkpoint) the
base comes from ``adapter_config.json`` and there is no system prompt.

QLoRA adapters are loaded on a 4-bit base on a GPU (as trained); on the CPU, and when
merging, on the bf16 / fp32 base (bitsandbytes quantizes on the GPU only, and merged
weights must be dense), so outputs differ slightly from the 4-bit model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zeroplan.errors import BadSetupError, NoWeightsError
from zeroplan.launch import envcheck
from zeroplan.launch.sft import FINAL, RUN_INFO, quantization_kwargs
from zeroplan.outputs import check_can_create, new_folder
from zeroplan.trainsetup import TrainSetup

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Loaded:
    """A model ready to generate: weights, tokenizer, and what the run recorded about them."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    path: Path = Path()


def weights_dir(path: str | Path) -> Path:
    """The folder holding the weights: ``path/final`` for a run folder, else ``path``."""
    p = Path(path).expanduser()
    if (p / FINAL).is_dir():
        p = p / FINAL
    if (p / ADAPTER_CONFIG).is_file() or (p / "config.json").is_file():
        return p
    from zeroplan.launch.sft import last_checkpoint  # by step number: 11 is newer than 6

    newest = last_checkpoint(p) if p.is_dir() else None
    hint = f"; the newest checkpoint is {newest}" if newest is not None else ""
    raise NoWeightsError(f"{path} holds no trained weights (no final/ adapter or model){hint}")


def run_info(weights: Path) -> dict[str, Any]:
    """zeroplan.json next to the weights; for a bare adapter, the base from its config."""
    info: dict[str, Any] = {}
    if (weights / RUN_INFO).is_file():
        info = json.loads((weights / RUN_INFO).read_text(encoding="utf-8"))
    if "base_model" not in info and (weights / ADAPTER_CONFIG).is_file():
        cfg = json.loads((weights / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        info["base_model"] = cfg.get("base_model_name_or_path")
        info.setdefault("method", "lora")
    info.setdefault("method", "full")
    return info


def _is_adapter(weights: Path) -> bool:
    return (weights / ADAPTER_CONFIG).is_file()


def _base_of(weights: Path, info: dict[str, Any]) -> str:
    base = info.get("base_model")
    if not base:
        raise NoWeightsError(f"{weights}: the adapter does not name its base model")
    return str(base)


def _require_stack(adapter: bool, why: str) -> None:
    """The packages the weights load with, checked (without importing them) after the run
    folder and before the seconds of importing torch: a plain ``pip install .`` has none."""
    for module in ("torch", "transformers", *(("peft",) if adapter else ())):
        envcheck.require(module, why)


def load(path: str | Path, device: str | None = None) -> Loaded:
    """Base + adapter (or the full / merged weights) and the run's tokenizer, in eval mode."""
    weights = weights_dir(path)
    info = run_info(weights)
    adapter = _is_adapter(weights)
    base = _base_of(weights, info) if adapter else None
    _require_stack(adapter, "loading a run's model")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    device = device or ("cuda" if cuda else "cpu")
    dtype = getattr(torch, info.get("dtype") or ("bfloat16" if cuda else "float32"))
    if not cuda and dtype == torch.bfloat16:
        dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(weights)
    model: Any
    placed = False  # a 4-bit base is put on its GPU while loading and cannot be moved
    if base is not None:
        from peft import PeftModel

        kw: dict[str, Any] = {"dtype": dtype}
        if info.get("method") == "qlora" and cuda:
            from transformers import BitsAndBytesConfig

            q = quantization_kwargs(TrainSetup(method="qlora")) or {}
            q = {
                **q,
                "bnb_4bit_compute_dtype": torch.bfloat16,
                "bnb_4bit_quant_storage": torch.uint8,
            }
            kw["quantization_config"] = BitsAndBytesConfig(**q)  # type: ignore[no-untyped-call]
            kw["device_map"] = {"": device}
            placed = True
        model = AutoModelForCausalLM.from_pretrained(base, **kw)
        model = PeftModel.from_pretrained(model, str(weights))
    else:
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype)
    if not placed:
        model.to(device)
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, info=info, path=weights)


def chat_messages(
    info: dict[str, Any], prompt: str | None, messages: list[dict[str, str]] | None
) -> list[dict[str, str]]:
    """The conversation to render: the prompt as a user turn, the run's system prompt first."""
    if (prompt is None) == (messages is None):
        raise BadSetupError("give either a prompt or messages")
    msgs = [{"role": "user", "content": prompt}] if prompt is not None else list(messages or [])
    if not msgs:
        raise BadSetupError("messages is empty")
    system = info.get("system_prompt")
    if system and msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def prompt_ids(
    loaded: Loaded, prompt: str | None = None, messages: list[dict[str, str]] | None = None
) -> list[int]:
    """The token ids the model is given: the chat template with the generation prompt."""
    tok = loaded.tokenizer
    if loaded.info.get("format") == "text" or not getattr(tok, "chat_template", None):
        if prompt is None:
            raise BadSetupError(
                "this model was trained on plain text and has no chat template: give a prompt"
            )
        return list(tok(prompt, add_special_tokens=True)["input_ids"])
    msgs = chat_messages(loaded.info, prompt, messages)
    out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def generate(
    run: str | Path | Loaded,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    seed: int | None = None,
) -> str:
    """The model's reply to ``prompt`` (or to the conversation ``messages``).

    ``temperature`` 0 decodes greedily. Defaults are the QLoRA story's (0.7, 0.9, 1.1).
    Pass a ``Loaded`` (from ``load``) to keep the model between calls, as a chat does.
    """
    if max_new_tokens < 1:
        raise BadSetupError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise BadSetupError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise BadSetupError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise BadSetupError(f"repetition_penalty must be positive, got {repetition_penalty}")
    loaded = run if isinstance(run, Loaded) else load(run)  # checks the folder, then torch
    import torch

    tok, model = loaded.tokenizer, loaded.model
    ids = prompt_ids(loaded, prompt, messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    eos = {tok.eos_token_id} - {None}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) - {None}
    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "repetition_penalty": repetition_penalty,
        "eos_token_id": sorted(eos) or None,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
    return str(tok.decode(out[0, len(ids) :], skip_special_tokens=True)).strip()


def merge_adapter(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the run's LoRA adapter into its base weights and save model + tokenizer in out_dir.

    The base is loaded dense in the run's dtype (bf16 for GPU runs; a QLoRA adapter is merged
    into the bf16 base, not the 4-bit one). ``out_dir`` must be new or empty. The result
    loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``generate(out_dir)``.

    The run folder and ``out_dir`` are checked before the packages and the seconds of
    loading; the model is saved into a temporary folder beside ``out_dir`` and renamed to it
    at the end, so that an error or Ctrl-C leaves no half-saved model.
    """
    weights = weights_dir(run_dir)
    if not _is_adapter(weights):
        raise NoWeightsError(
            f"{weights} holds full weights, not a LoRA adapter: there is nothing to merge"
        )
    info = run_info(weights)
    base = _base_of(weights, info)
    out = Path(out_dir).expanduser()
    if out.is_dir() and any(out.iterdir()):
        raise BadSetupError(f"{out} is not empty: merge into a new folder")
    check_can_create(out, "the merged model")
    _require_stack(True, "merging a LoRA adapter")
    with new_folder(out, "the merged model") as folder:
        _save_merged(weights, info, base, folder)
    return out


def _save_merged(weights: Path, info: dict[str, Any], base: str, folder: Path) -> None:
    """Load the base and the adapter, merge them and save the model into ``folder``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, info.get("dtype") or "bfloat16")
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged: Any = PeftModel.from_pretrained(model, str(weights)).merge_and_unload()
    merged.save_pretrained(folder)
    AutoTokenizer.from_pretrained(weights).save_pretrained(folder)
    merged_info = {**info, "method": "merged", "merged_from": str(weights.resolve())}
    (folder / RUN_INFO).write_text(json.dumps(merged_info, indent=2) + "\n")
