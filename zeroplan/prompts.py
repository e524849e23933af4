"""How a trainer writes a record as text before tokenizing it, where that is not the model's
chat template (pure, no tokenizer here: ``zeroplan.datatokens`` counts the pieces).

A trainer's SFT data path turns a record into pieces of text, each tokenized on its own,
plus single special tokens between them; the token length of the record is the sum. Two
families are read from recipes (``zeroplan.recipes``):

- axolotl ``type: alpaca`` (``AlpacaPrompter``, instruct style, in ``prompters.py``, and
  ``InstructionPromptTokenizingStrategy`` in ``prompt_tokenizers.py``, axolotl 0.19.0): the
  prompt "<system>\\n\\n### Instruction:\\n<instruction>\\n\\n[### Input:\\n<input>\\n\\n]
  ### Response:\\n" tokenized with the tokenizer's special tokens (its BOS), the answer
  without them, then EOS. Alpaca records only: axolotl reads those fields.
- LLaMA-Factory's ``template:`` (``src/llamafactory/data/template.py``, 0.9.5): a prefix
  (BOS for llama3), the system slot when there is a system text (or the template's default),
  then each turn's user and assistant slot, each slot tokenized on its own; an alpaca record
  is one user turn "instruction\\ninput" (``data/converter.py``). Templates with
  ``replace_eos`` add their first stop word to the tokenizer as its EOS, a single token.

A piece is (text, whether the tokenizer's own special tokens are added), or a special token
named by ``BOS`` / ``EOS`` (one token, when the tokenizer has it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zeroplan.errors import BadDataError
from zeroplan.records import to_messages

BOS = "{bos}"
EOS = "{eos}"
# (text or BOS / EOS, add the tokenizer's special tokens)
Piece = tuple[str, bool]

AXOLOTL_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
AXOLOTL_ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Template:
    """One LLaMA-Factory chat template: slots with ``{content}``, the default system, and
    the marker that tells whether a tokenizer's own chat template writes the same turns."""

    name: str
    user: tuple[str, ...]
    assistant: tuple[str, ...]
    system: tuple[str, ...] = ("{content}",)
    prefix: tuple[str, ...] = ()
    default_system: str = ""
    added_tokens: tuple[str, ...] = ()  # replace_eos: the stop words become special tokens
    marker: str = ""  # a string the tokenizer's chat template has when its turns are these


# LLaMA-Factory 0.9.5's templates as it formats them (register_template calls in
# data/template.py): the common chat families and the plain alpaca one
LLAMAFACTORY_TEMPLATES = {
    t.name: t
    for t in (
        Template(
            "llama3",
            user=(
                "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            assistant=("{content}<|eot_id|>",),
            system=("<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",),
            prefix=(BOS,),
            added_tokens=("<|eot_id|>", "<|eom_id|>"),
            marker="<|start_header_id|>",
        ),
        Template(
            "qwen",
            user=("<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",),
            assistant=("{content}<|im_end|>\n",),
            system=("<|im_start|>system\n{content}<|im_end|>\n",),
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            added_tokens=("<|im_end|>",),
            marker="<|im_start|>",
        ),
        Template(
            "alpaca",
            user=("### Instruction:\n{content}\n\n### Response:\n",),
            assistant=("{content}", EOS, "\n\n"),
            default_system=(
                "Below is an instruction that describes a task. Write a response that "
                "appropriately completes the request.\n\n"
            ),
        ),
    )
}


@dataclass(frozen=True)
class PromptFormat:
    """How one trainer writes a record: ``kind`` axolotl_alpaca or llamafactory (with its
    ``template``); ``name`` for the output, ``source`` the trainer's file it follows."""

    kind: str
    name: str
    source: str
    template: Template | None = None

    @property
    def added_tokens(self) -> tuple[str, ...]:
        return self.template.added_tokens if self.template is not None else ()

    @property
    def key(self) -> str:
        """What the cached lengths are keyed on."""
        return f"{self.kind}:{self.name}"

    def reads(self, fmt: str) -> bool:
        """Whether this format renders records of ``fmt`` (axolotl's alpaca: alpaca only;
        LLaMA-Factory's templates: every chat format, not plain text)."""
        if self.kind == "axolotl_alpaca":
            return fmt == "alpaca"
        return fmt != "text"

    def pieces(
        self, record: dict[str, Any], fmt: str, index: int, system: str | None = None
    ) -> list[Piece]:
        """The record as the trainer tokenizes it, piece by piece."""
        if self.kind == "axolotl_alpaca":
            return axolotl_alpaca_pieces(record, index)
        assert self.template is not None
        return llamafactory_pieces(self.template, record, fmt, index, system)


def axolotl_alpaca_pieces(record: dict[str, Any], index: int) -> list[Piece]:
    """axolotl ``type: alpaca``: the prompt with the tokenizer's special tokens, the answer
    without (its BOS stripped), EOS."""
    instruction, extra, output = (record.get(k) for k in ("instruction", "input", "output"))
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise BadDataError(f"record {index}: axolotl type: alpaca needs 'instruction' and 'output'")
    if isinstance(extra, str) and extra:
        prompt = (
            f"{AXOLOTL_ALPACA_SYSTEM_INPUT}\n\n### Instruction:\n{instruction}\n\n"
            f"### Input:\n{extra}\n\n### Response:\n"
        )
    else:
        prompt = f"{AXOLOTL_ALPACA_SYSTEM}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    return [(prompt, True), (output, False), (EOS, False)]


def llamafactory_pieces(
    template: Template, record: dict[str, Any], fmt: str, index: int, system: str | None
) -> list[Piece]:
    """LLaMA-Factory's encoding of one record: prefix, system slot (the record's, the
    option's, else the template's default), then every turn's slot."""
    if fmt == "alpaca":
        # LLaMA-Factory joins instruction and input with one newline (AlpacaDatasetConverter)
        parts = [record.get("instruction"), record.get("input")]
        user = "\n".join(p for p in parts if isinstance(p, str) and p)
        messages = [{"role": "user", "content": user}]
        messages.append({"role": "assistant", "content": str(record.get("output", ""))})
        own = record.get("system")
        system = own if isinstance(own, str) and own else system
    else:
        messages = to_messages(record, fmt, index, system)
        if messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
    system = system or template.default_system
    out: list[Piece] = [(p, False) for p in template.prefix]
    if system:
        out += [(s.replace("{content}", system), False) for s in template.system]
    for m in messages:
        slots = template.user if m["role"] == "user" else template.assistant
        out += [(s.replace("{content}", m["content"]), False) for s in slots]
    return out
