"""Packing: the rows the plan counts, and a packed batch that trains exactly like the samples
one at a time (loss and gradients), with no attention across a sample boundary."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroplan.packing import pack_best_fit, pack_stats, padded_fill, steps_per_epoch


@given(st.lists(st.integers(1, 64), min_size=1, max_size=200), st.integers(64, 200))
@settings(max_examples=60, deadline=None)
def test_every_sample_lands_in_one_row_within_capacity(lengths: list[int], cap: int) -> None:
    rows = pack_best_fit(lengths, cap)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= cap for row in rows)
    # best fit never leaves two rows that could have been one
    totals = sorted(sum(lengths[i] for i in row) for row in rows)
    if len(totals) >= 2:
        assert totals[0] + totals[1] > cap or len(rows) <= 2 * sum(lengths) / cap + 1


def test_packing_is_deterministic_and_fills_rows() -> None:
    lengths = [700, 30, 650, 120, 90, 400, 300, 60, 768, 5]
    assert pack_best_fit(lengths, 768) == pack_best_fit(list(lengths), 768)
    stats = pack_stats(lengths, 768)
    assert stats.rows == 5  # 768 | 700+60+5 | 650+90 | 400+300+30 | 120
    assert stats.tokens == sum(lengths)
    assert stats.fill == pytest.approx(sum(lengths) / (5 * 768))


def test_overlong_and_empty_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_best_fit([10, 800], 768)
    with pytest.raises(ValueError, match="empty"):
        pack_best_fit([0], 768)


def test_padded_fill_and_steps() -> None:
    assert padded_fill([100, 50, 100, 100], 2) == pytest.approx(350 / 400)
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(0, 4) == 0


# --------------------------------------------------------------------------- with a model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinyllm  # noqa: E402

from zeroplan.launch import batching  # noqa: E402

TINY: dict[str, Any] = {**tinyllm.TINY_DECODER, "model_type": "llama"}


def tiny_model(attn: str) -> Any:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**TINY, attn_implementation=attn)
    cfg.use_cache = False  # a cache turns off transformers' packed-sequence mask (as launch does)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()
    return model


def samples(lengths: list[int], seed: int = 1) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3 :]  # a prompt, then the answer
        out.append({"input_ids": ids, "labels": labels})
    return out


def one_by_one(model: Any, examples: list[dict[str, list[int]]]) -> tuple[Any, list[Any]]:
    """Sum over samples of (summed token losses), and each sample's logits, unpacked."""
    total = torch.zeros(())
    logits = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        out = model(input_ids=ids)
        logits.append(out.logits[0])
        labels = torch.tensor(ex["labels"][1:])
        total = total + torch.nn.functional.cross_entropy(
            out.logits[0, :-1], labels, ignore_index=-100, reduction="sum"
        )
    return total, logits


def packed_forward(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Summed token loss and logits of one packed micro-batch as the Trainer runs it."""
    inputs = {k: v for k, v in batch.items() if not k.startswith("zp_") and k != "labels"}
    out = model(**inputs)
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    loss = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, TINY["vocab_size"]), shift.reshape(-1), ignore_index=-100,
        reduction="sum",
    )  # fmt: skip
    return loss, out.logits


def sample_logits(logits: Any, rows: list[dict[str, list[int]]], cap: int) -> list[Any]:
    """Each real sample's logits out of a packed batch (either layout), in row order."""
    per_row = logits.reshape(len(rows), cap, -1)
    out = []
    for r, row in enumerate(rows):
        start = 0
        for n in batching.segment_lengths(row["position_ids"]):
            out.append(per_row[r, start : start + n])
            start += n
    return out


LENGTHS = [20, 7, 13, 30, 5, 11, 17]
CAP = 32


@pytest.mark.parametrize(("kernel", "layout"), [("mask", "rows"), ("varlen", "flat")])
def test_packed_batch_equals_samples_one_by_one(kernel: str, layout: str) -> None:
    attn = batching.register_varlen() if kernel == "varlen" else "sdpa"
    model = tiny_model(attn)
    ref_model = tiny_model("sdpa")
    examples = samples(LENGTHS)
    packed = batching.pack_examples(examples, CAP, seed=0)
    collate = batching.PackedCollator(pad_id=0, capacity=CAP, layout=layout)
    batch = collate(packed.rows)
    assert batch["zp_real_tokens"] == sum(LENGTHS)
    assert batch["zp_slots"] == len(packed.rows) * CAP
    assert batch["input_ids"].shape == (
        (len(packed.rows), CAP) if layout == "rows" else (1, len(packed.rows) * CAP)
    )

    loss, logits = packed_forward(model, batch)
    ref_loss, ref_logits = one_by_one(ref_model, [examples[i] for i in _order(packed, examples)])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for g, r in zip(sample_logits(logits, packed.rows, CAP), ref_logits, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)

    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def _order(packed: batching.PackedRows, examples: list[dict[str, list[int]]]) -> list[int]:
    """Indices of the examples in the order they appear in the packed rows."""
    by_ids = {tuple(e["input_ids"]): i for i, e in enumerate(examples)}
    order = []
    for row in packed.rows:
        start = 0
        for n in batching.segment_lengths(row["position_ids"]):
            order.append(by_ids[tuple(row["input_ids"][start : start + n])])
            start += n
    return order


@pytest.mark.parametrize(("kernel", "layout"), [("mask", "rows"), ("varlen", "flat")])
def test_no_attention_crosses_a_sample_boundary(kernel: str, layout: str) -> None:
    """Changing one sample's tokens changes no other sample's logits."""
    attn = batching.register_varlen() if kernel == "varlen" else "sdpa"
    model = tiny_model(attn)
    model.eval()
    examples = samples([10, 12, 9])
    rows = batching.pack_examples(examples, CAP, seed=0).rows
    assert len(rows) == 1  # all three share one row
    collate = batching.PackedCollator(pad_id=0, capacity=CAP, layout=layout)
    before = model(**_inputs(collate(rows))).logits.reshape(-1, TINY["vocab_size"])
    changed = [dict(r) for r in rows]
    first = 10  # a row holds its samples in their original order: [10, 12, 9]
    changed[0]["input_ids"] = [
        (t + 7) % TINY["vocab_size"] for t in rows[0]["input_ids"][:first]
    ] + rows[0]["input_ids"][first:]
    after = model(**_inputs(collate(changed))).logits.reshape(-1, TINY["vocab_size"])
    assert not torch.allclose(before[:first], after[:first])
    torch.testing.assert_close(before[first:], after[first:], rtol=0, atol=1e-6)


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("zp_") and k != "labels"}


def test_first_label_of_every_packed_sample_is_ignored() -> None:
    examples = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ]
    row = batching.pack_examples(examples, 8).rows[0]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [-100, 6, 7, -100, 9]
    batch = batching.PackedCollator(pad_id=0, capacity=8, layout="flat")([row])
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    assert batch["max_length_q"] == 3
    assert batch["labels"][0, 5:].tolist() == [-100] * 3


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_a_part_filled_rows_padding_is_cut_into_short_segments(layout: str) -> None:
    """Attention costs a segment its length squared: a last row of 5 real tokens in 600
    slots pads with segments of at most PAD_SEGMENT tokens, not one of 595 (varlen
    attention's longest segment: the longest sample's or PAD_SEGMENT)."""
    row = batching.pack_examples([{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]}], 600)
    batch = batching.PackedCollator(pad_id=0, capacity=600, layout=layout)(row.rows)
    positions = batch["position_ids"].reshape(-1).tolist()
    lengths = batching.segment_lengths(positions)
    assert lengths == [5, 128, 128, 128, 128, 83] and batching.PAD_SEGMENT == 128
    assert batch["labels"].reshape(-1)[5:].eq(-100).all()
    assert batch["zp_real_tokens"] == 5 and batch["zp_slots"] == 600
    if layout == "flat":
        assert batch["cu_seq_lens_q"].tolist() == [0, 5, 133, 261, 389, 517, 600]
        assert batch["max_length_q"] == 128


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs a GPU")
def test_flash_varlen_matches_per_sample_sdpa_on_gpu() -> None:
    """The CUDA kernel against the reference (causal SDPA per sample), GQA, bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [37, 120, 5, 300, 50]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    t = cu[-1]
    q = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 2, t, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 2, t, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    out, _ = batching.varlen_attention_forward(
        None, q, k, v, None, scaling=64**-0.5, cu_seq_lens_q=cu_t, max_length_q=max(lens)
    )
    ref = batching._segments_sdpa(
        q[0].transpose(0, 1),
        k[0].transpose(0, 1).repeat_interleave(4, dim=1),
        v[0].transpose(0, 1).repeat_interleave(4, dim=1),
        cu,
        64**-0.5,
    )
    torch.testing.assert_close(out[0], ref, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- sliding windows

WINDOW = tinyllm.SLIDING_WINDOW  # tokens a sliding layer's query sees, itself included
SLIDING = tinyllm.SLIDING_CONFIGS  # records run to 30 tokens


def sliding_model(model_type: str, attn: str) -> Any:
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**SLIDING[model_type], attn_implementation=attn)
    cfg.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return model


@pytest.mark.parametrize("model_type", sorted(SLIDING))
@pytest.mark.parametrize(("kernel", "layout"), [("mask", "rows"), ("varlen", "flat")])
def test_sliding_window_packed_equals_records_one_by_one(
    model_type: str, kernel: str, layout: str
) -> None:
    """Records longer than the window: each packed record's logits and the summed loss are
    those of transformers' own eager sliding attention on the record alone (the varlen
    reference applies the window; transformers' block mask does too). Before the fix the
    varlen path attended to the whole record and failed here."""
    attn = batching.register_varlen() if kernel == "varlen" else "sdpa"
    model = sliding_model(model_type, attn)
    ref_model = sliding_model(model_type, "eager")
    examples = samples(LENGTHS)
    assert max(LENGTHS) > WINDOW
    packed = batching.pack_examples(examples, CAP, seed=0)
    batch = batching.PackedCollator(pad_id=0, capacity=CAP, layout=layout)(packed.rows)
    with torch.no_grad():
        loss, logits = packed_forward(model, batch)
        ref_loss, ref_logits = one_by_one(
            ref_model, [examples[i] for i in _order(packed, examples)]
        )
    for g, r in zip(sample_logits(logits, packed.rows, CAP), ref_logits, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)


def test_sliding_window_is_not_full_causal_attention() -> None:
    """The reference the test above checks against differs from full causal attention on
    these records (else it could not fail)."""
    full = sliding_model("mistral", "eager")
    examples = samples([30])
    sliding_logits = one_by_one(full, examples)[1][0]
    full.config.sliding_window = None  # the same weights, every key in view
    full_logits = one_by_one(full, examples)[1][0]
    torch.testing.assert_close(sliding_logits[:WINDOW], full_logits[:WINDOW])
    assert not torch.allclose(sliding_logits[WINDOW:], full_logits[WINDOW:], atol=1e-3)


def test_window_left_is_transformers_window_minus_one() -> None:
    """transformers' window w (key > query - w) is flash's left w - 1; the reference keeps
    exactly that many keys before each query."""
    assert batching.window_left(WINDOW) == WINDOW - 1
    assert batching.window_left(None) == -1
    t, d = 9, 4
    q, k, v = (torch.randn(t, 1, d) for _ in range(3))
    v = torch.eye(t).unsqueeze(1)[:, :, :t]  # each key's value names its position
    out = batching._segments_sdpa(q, k, v, [0, t], None, batching.window_left(3))
    seen = out[:, 0] > 0
    for i in range(t):
        assert seen[i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))
