"""Records → token ids and labels: formats, the loss mask token by token, limits, bad input.

The tokenizer is built in code (tests/tinyllm.py): byte-level BPE, turns that end with
``<|end|>`` (also EOS), a chat template with ``{% generation %}`` markers. "Labelled" means
label != -100: the tokens the loss is taken on.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tinyllm

from zeroplan.errors import (
    BadDataError,
    ChatTemplateError,
    DataNotFoundError,
    ZeroplanError,
)
from zeroplan.launch import data
from zeroplan.launch.data import IGNORE_INDEX

SYSTEM = "be brief"
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "fox?"},
    {"role": "assistant", "content": "the lazy dog"},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return tinyllm.build_tokenizer()


@pytest.fixture(scope="module")
def tok_plain() -> Any:
    """The same template without generation markers: masked by rendering prefixes."""
    return tinyllm.build_tokenizer(tinyllm.TEMPLATE_NO_MARKERS)


def labelled_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return "".join(
        tok.decode([t]) if lab != IGNORE_INDEX else "|" for t, lab in zip(ids, labels, strict=True)
    )


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive labelled tokens."""
    out: list[list[int]] = []
    prev = False
    for t, lab in zip(ids, labels, strict=True):
        on = lab != IGNORE_INDEX
        if on and not prev:
            out.append([])
        if on:
            out[-1].append(t)
        prev = on
    return out


def one_line(exc: pytest.ExceptionInfo[ZeroplanError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# --------------------------------------------------------------------------- the mask


def test_alpaca_mask_token_by_token(tok: Any) -> None:
    rec = {"instruction": "Finish the sentence.", "input": "the quick brown fox", "output": "jumps"}
    msgs = data.to_messages(rec, "alpaca", 0)
    assert msgs == [
        {"role": "user", "content": "Finish the sentence.\n\nthe quick brown fox"},
        {"role": "assistant", "content": "jumps"},
    ]
    ids, labels, method = data.encode_messages(tok, msgs)
    assert method == "generation-markers"
    # the prompt is exactly what inference renders (add_generation_prompt=True), all -100
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=True)
    n = len(prompt["input_ids"])
    assert ids[:n] == list(prompt["input_ids"])
    assert labels[:n] == [IGNORE_INDEX] * n
    # then the answer and the end-of-turn token, labelled with their own ids; the newline
    # the template writes between turns is not
    answer = tok("jumps<|end|>", add_special_tokens=False)["input_ids"]
    assert labels[n : n + len(answer)] == answer == ids[n : n + len(answer)]
    assert labels[n + len(answer) :] == [IGNORE_INDEX] * (len(ids) - n - len(answer))
    assert tok.decode(ids[n + len(answer) :]) == "\n"


def test_multi_turn_mask(tok: Any) -> None:
    ids, labels, _ = data.encode_messages(tok, CHAT)
    end = tok.convert_tokens_to_ids("<|end|>")
    turns = runs(ids, labels)
    assert [tok.decode(r) for r in turns] == ["hello world<|end|>", "the lazy dog<|end|>"]
    assert all(r[-1] == end for r in turns)
    # system, both user turns and every template token are out of the loss
    masked = [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    text = tok.decode(masked)
    for part in ("<s>", "<|system|>", SYSTEM, "<|user|>", "hello", "fox?", "<|assistant|>"):
        assert part in text
    assert "world" not in text and "lazy" not in text
    # each assistant run starts right after the generation prompt of its turn
    for i, run in zip((2, 4), turns, strict=True):
        prefix = tok.apply_chat_template(CHAT[:i], add_generation_prompt=True, return_dict=True)
        k = len(prefix["input_ids"])
        assert ids[:k] == list(prefix["input_ids"]) and ids[k : k + len(run)] == run
        assert labels[k - 1] == IGNORE_INDEX


def test_markers_and_prefix_rendering_agree(tok: Any, tok_plain: Any) -> None:
    a = data.encode_messages(tok, CHAT)
    b = data.encode_messages(tok_plain, CHAT)
    assert a[0] == b[0] and a[1] == b[1]
    assert (a[2], b[2]) == ("generation-markers", "prefix-render")


def test_template_that_rewrites_earlier_turns_is_refused(tok_plain: Any) -> None:
    """A template whose earlier turns change once later ones follow cannot be masked exactly."""
    t = copy.deepcopy(tok_plain)
    t.chat_template = (
        "{% for m in messages %}{% if loop.last %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
        "{% else %}{{ '<|' + m['role'] + '|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError) as exc:
        data.encode_messages(t, CHAT[1:], index=7)
    assert "record 7" in one_line(exc)


def test_text_trains_on_every_token(tok: Any) -> None:
    ids, labels = data.encode_text(tok, "the quick brown fox")
    assert labels == ids and ids[-1] == tok.eos_token_id


def test_system_prompt_added_once(tok: Any) -> None:
    rec = {"instruction": "Say hello.", "output": "hello"}
    msgs = data.to_messages(rec, "alpaca", 0, system=SYSTEM)
    assert msgs[0] == {"role": "system", "content": SYSTEM}
    chat = data.to_messages({"messages": CHAT}, "messages", 0, system="other")
    assert chat == CHAT  # it has its own system message


def test_sharegpt_roles() -> None:
    rec = {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": "hello"},
            {"from": "gpt", "value": "hello world"},
        ]
    }
    assert data.to_messages(rec, "sharegpt", 0) == CHAT[:3]


# --------------------------------------------------------------------------- sources, formats


def _records(fmt: str) -> list[dict[str, Any]]:
    if fmt == "alpaca":
        return tinyllm.alpaca_records(4)
    if fmt == "messages":
        return [{"messages": CHAT}] * 4
    if fmt == "sharegpt":
        conv = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello world"}]
        return [{"conversations": conv}] * 4
    return [{"text": "the quick brown fox"}] * 4


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "text"])
@pytest.mark.parametrize("kind", ["json", "json-data", "jsonl", "parquet"])
def test_each_format_loads_from_each_file_type(
    tok: Any, tmp_path: Path, fmt: str, kind: str
) -> None:
    records = _records(fmt)
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records))
    elif kind == "json-data":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": records}))
    elif kind == "jsonl":
        path = tinyllm.write_jsonl(tmp_path / "d.jsonl", records)
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    prepared = data.prepare(str(path), tok, max_seq_len=128)
    s = prepared.summary
    assert (s.format, s.records, s.train_examples) == (fmt, 4, 4)
    assert s.mask_method == ("all-tokens" if fmt == "text" else "generation-markers")
    for ex in prepared.train:
        assert len(ex["input_ids"]) == len(ex["labels"]) <= 128
        target = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert target and target[-1] == tok.eos_token_id  # every sample learns to stop
        if fmt != "text":
            assert len(target) < len(ex["input_ids"])


def test_format_named_explicitly(tok: Any) -> None:
    rec = {"text": "ignored", "messages": CHAT}
    assert data.prepare("x", tok, 128, records=[rec]).summary.format == "messages"
    assert data.prepare("x", tok, 128, fmt="text", records=[rec]).summary.format == "text"


# --------------------------------------------------------------------------- limits, split


def test_overlong_drop_and_truncate_counts(tok: Any) -> None:
    short = {"instruction": "Say hello.", "output": "hello"}
    long = {"instruction": "Say hello.", "output": "hello world " * 40}
    huge_prompt = {"instruction": "the quick brown fox " * 40, "output": "hello"}
    recs = [short, long, short, huge_prompt]
    limit = 40
    dropped = data.prepare("x", tok, limit, records=recs)
    s = dropped.summary
    assert (s.train_examples, s.dropped_too_long, s.truncated, s.dropped_no_target) == (2, 2, 0, 0)
    assert s.longest_tokens > limit
    cut = data.prepare("x", tok, limit, overlong="truncate", records=recs)
    s = cut.summary
    # the long answer is cut to 40 tokens; the prompt that fills 40 tokens leaves no target
    assert (s.train_examples, s.dropped_too_long, s.truncated, s.dropped_no_target) == (3, 0, 2, 1)
    assert max(len(e["input_ids"]) for e in cut.train) == limit


def test_empty_texts_are_dropped_as_nothing_to_learn(tok: Any) -> None:
    """{"text": ""} is EOS alone, one token no position predicts: kept, a micro-batch of them
    had a loss of 0/0 and the run "diverged at step 1 (loss nan)"."""
    recs = [{"text": ""}, {"text": "the quick brown fox"}, {"text": "  \n"}]
    s = data.prepare("x", tok, 64, records=recs).summary
    assert (s.records, s.train_examples, s.dropped_no_target) == (3, 1, 2)
    with pytest.raises(BadDataError, match="2 with nothing to learn"):
        data.prepare("x", tok, 64, records=[{"text": ""}, {"text": " "}])


def test_records_render_before_any_token() -> None:
    """One function renders records for training and for preflight, which has no tokenizer:
    a chat record's messages (system prompt added), a text, None for an empty text."""
    chat = data.rendered([{"instruction": "q", "output": "a"}], "alpaca", SYSTEM)
    assert list(chat) == [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    ]
    texts = [{"text": "the fox"}, {"text": " \n"}, {"text": ""}]
    assert list(data.rendered(texts, "text", SYSTEM)) == ["the fox", None, None]


def test_preflight_refuses_the_records_prepare_refuses(tok: Any, tmp_path: Path) -> None:
    """Without a tokenizer preflight renders the records as prepare does: the same first bad
    record refused in the same words; only empty texts, refused too."""
    from zeroplan.launch.preflight import read_as_training_does

    recs: list[dict[str, Any]] = [*tinyllm.alpaca_records(2), {"instruction": "q"}]
    bad = tinyllm.write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(BadDataError) as by_rank:
        data.prepare(str(bad), tok, 128)
    with pytest.raises(BadDataError) as by_preflight:
        read_as_training_does(str(bad), "auto", None)
    assert str(by_preflight.value) == str(by_rank.value) and "record 3" in str(by_rank.value)
    empty = tinyllm.write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(BadDataError, match=r"all 2 records of .* are empty texts"):
        read_as_training_does(str(empty), "auto", None)
    good = tinyllm.write_jsonl(tmp_path / "good.jsonl", [{"text": ""}, {"text": "a fox"}])
    read_as_training_does(str(good), "auto", None)


def test_eval_split_is_seeded_and_disjoint(tok: Any) -> None:
    recs = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(16)]
    a = data.prepare("x", tok, 128, eval_fraction=0.25, seed=1, records=recs)
    b = data.prepare("x", tok, 128, eval_fraction=0.25, seed=1, records=recs)
    c = data.prepare("x", tok, 128, eval_fraction=0.25, seed=2, records=recs)
    assert (a.summary.train_examples, a.summary.eval_examples) == (12, 4)
    assert a.eval == b.eval and a.eval != c.eval
    train_ids = {tuple(e["input_ids"]) for e in a.train}
    assert not train_ids & {tuple(e["input_ids"]) for e in a.eval}
    with pytest.raises(BadDataError) as exc:
        data.prepare("x", tok, 128, eval_fraction=0.99, records=recs[:1] * 2)
    assert "leaves none" in one_line(exc)


# --------------------------------------------------------------------------- bad input


def test_missing_file(tok: Any, tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as exc:
        data.prepare(str(tmp_path / "nope.jsonl"), tok, 128)
    assert one_line(exc) == f"no data file {tmp_path / 'nope.jsonl'}"


def test_hub_id_offline_is_a_clear_error(
    tok: Any, isolated_hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a path that does not exist and looks like owner/name is tried on the Hub."""
    datasets = pytest.importorskip("datasets")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    # both read HF_HUB_OFFLINE when first imported, which may have been before isolated_hf
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataNotFoundError) as exc:
        data.prepare("someone/no-such-dataset", tok, 128)
    msg = one_line(exc)
    assert "no data file someone/no-such-dataset" in msg and "Hub" in msg
    assert not data.looks_like_hub_id("data/train.jsonl")
    assert not data.looks_like_hub_id("./train")


def test_instruction_only_records_are_refused(tok: Any) -> None:
    """The story's dataset_text_field="instruction": training on the question alone."""
    with pytest.raises(BadDataError) as exc:
        data.prepare("x", tok, 128, records=[{"instruction": "q", "input": ""}])
    msg = one_line(exc)
    assert "record 1" in msg and "[input, instruction]" in msg and "output" in msg


def test_later_record_without_fields_names_its_index(tok: Any) -> None:
    recs: list[dict[str, Any]] = [*tinyllm.alpaca_records(3), {"instruction": "q", "answer": "a"}]
    with pytest.raises(BadDataError) as exc:
        data.prepare("x", tok, 128, records=recs)
    assert one_line(exc) == (
        "record 4: alpaca records need 'instruction' and 'output' (and optionally 'input'); "
        "this one has [answer, instruction]"
    )


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"question": "q", "answer": "a"}, "record 1 has fields [answer, question]"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "record 1 has no assistant message"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot' is not one of"),
        ({"messages": [{"role": "user", "text": "hi"}]}, "needs 'role' and 'content'"),
        ({"conversations": [{"from": "gpt", "value": 3}]}, "content must be text"),
        # the fields are there but unusable: said so, not "needs ... ; this one has" them
        ({"instruction": "q", "output": None}, "record 1: its 'output' is null, not text"),
        ({"instruction": 7, "output": "a"}, "its 'instruction' is the number 7, not text"),
        ({"messages": []}, "record 1: its 'messages' is an empty list"),
        ({"conversations": "hi"}, "its 'conversations' is text, not a list"),
        # turns are numbered from 1, as records are
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            "record 1, message 2: role 'bot'",
        ),
    ],
)
def test_bad_records(tok: Any, record: dict[str, Any], needle: str) -> None:
    with pytest.raises(BadDataError) as exc:
        data.prepare("x", tok, 128, records=[record])
    assert needle in one_line(exc)


def test_records_are_read_past_a_byte_order_mark(tmp_path: Path) -> None:
    """Windows editors start UTF-8 with a BOM, which json.loads refuses on its own."""
    records = tinyllm.alpaca_records(2)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    whole = tmp_path / "bom.json"
    whole.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert data.read_records(str(jsonl)) == records == data.read_records(str(whole))


def test_bad_files(tok: Any, tmp_path: Path) -> None:
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(BadDataError) as exc:
        data.prepare(str(bad_line), tok, 128)
    assert "line 2 is not JSON" in one_line(exc)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("[1, 2]")
    with pytest.raises(BadDataError) as exc:
        data.prepare(str(scalar), tok, 128)
    assert "record 1" in one_line(exc) and "not an object" in str(exc.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BadDataError, match="holds no records"):
        data.prepare(str(empty), tok, 128)


def test_chat_records_need_a_chat_template(tmp_path: Path) -> None:
    bare = tinyllm.build_tokenizer(template=None)
    with pytest.raises(ChatTemplateError) as exc:
        data.prepare("x", bare, 128, records=tinyllm.alpaca_records(2))
    assert "no chat template" in one_line(exc) and "alpaca records" in str(exc.value)
    # plain text needs none
    assert data.prepare("x", bare, 128, records=[{"text": "hello"}]).summary.train_examples == 1
