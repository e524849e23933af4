"""Data-aware planning: token lengths without torch equal the training side's, the cap and the
over-long rule, the cache, and one-line errors for bad data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tinyllm
from conftest import offline_env

from zeroplan.datatokens import find_tokenizer, load_tokenizer, profile_data, token_lengths
from zeroplan.errors import BadDataError, TokenizerNotFoundError
from zeroplan.lengths import LengthProfile, fit_to_cap, resolve_cap

# a Llama-3-like template: special tokens as variables, a loop, trimmed blocks, a system turn
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
)
RECORDS = {
    "alpaca": [
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
        {"instruction": "Finish it.", "input": "the quick brown fox", "output": "jumps over."},
        {"instruction": "Say hello " * 10, "output": "hello world " * 20},
    ],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Why is the sky blue?"},
                {"role": "assistant", "content": "Sunlight scatters off the air."},
                {"role": "user", "content": "And sunsets?"},
                {"role": "assistant", "content": "Longer paths scatter blue away."},
            ]
        }
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "human", "value": "Say hello."},
                {"from": "gpt", "value": "hello world"},
            ]
        }
    ],
    "text": [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "hello"}],
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEROPLAN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    out = {}
    for name, template in (("tiny", tinyllm.TEMPLATE), ("llama3", LLAMA3_LIKE)):
        path = tmp_path_factory.mktemp(name)
        tinyllm.build_tokenizer(template).save_pretrained(path)
        out[name] = path
    return out


@pytest.mark.parametrize("template", ["tiny", "llama3"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_lengths_equal_what_training_tokenizes(
    model_dirs: dict[str, Path], tmp_path: Path, template: str, fmt: str
) -> None:
    from transformers import AutoTokenizer

    from zeroplan.launch.data import prepare

    folder = model_dirs[template]
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", RECORDS[fmt])
    profile, cached = token_lengths(str(data), load_tokenizer(folder), system="Be kind.")
    assert not cached and profile.format == fmt
    prepared = prepare(str(data), AutoTokenizer.from_pretrained(folder), 10_000, system="Be kind.")
    assert list(profile.lengths) == [len(e["input_ids"]) for e in prepared.train]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_is_read_past(
    model_dirs: dict[str, Path], tmp_path: Path, suffix: str
) -> None:
    """Windows editors start UTF-8 files with a BOM; it was 'line 1 is not JSON'."""
    plain = tinyllm.write_jsonl(tmp_path / "plain.jsonl", RECORDS["alpaca"])
    body = plain.read_text() if suffix == ".jsonl" else json.dumps(RECORDS["alpaca"])
    marked = tmp_path / f"bom{suffix}"
    marked.write_bytes(b"\xef\xbb\xbf" + body.encode())
    tok = load_tokenizer(model_dirs["tiny"])
    assert token_lengths(str(marked), tok)[0].lengths == token_lengths(str(plain), tok)[0].lengths


def test_second_profile_comes_from_the_cache(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", RECORDS["alpaca"] * 10)
    tok = load_tokenizer(model_dirs["tiny"])
    first, hit1 = token_lengths(str(data), tok)
    second, hit2 = token_lengths(str(data), tok)
    assert (hit1, hit2) == (False, True) and first.lengths == second.lengths
    third, hit3 = token_lengths(str(data), tok, system="another system prompt")
    assert not hit3 and third.lengths != first.lengths  # the key holds the system prompt
    data.write_text(data.read_text() + json.dumps(RECORDS["alpaca"][0]) + "\n")
    fourth, hit4 = token_lengths(str(data), tok)
    assert not hit4 and fourth.records == first.records + 1  # and the data's bytes


def test_a_cached_file_copied_to_another_suffix_is_still_refused(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The cache is keyed by the bytes: `cp a.jsonl a2.txt; zeroplan plan --data a2.txt`
    was answered from a.jsonl's entry, where launch then refused the .txt."""
    data = tinyllm.write_jsonl(tmp_path / "a.jsonl", RECORDS["alpaca"])
    tok = load_tokenizer(model_dirs["tiny"])
    assert token_lengths(str(data), tok)[0].records == len(RECORDS["alpaca"])
    copy = tmp_path / "a2.txt"
    copy.write_bytes(data.read_bytes())
    with pytest.raises(BadDataError, match=r"a2.txt: unknown data file type '.txt'"):
        token_lengths(str(copy), tok)


def test_empty_texts_are_nothing_to_learn_for_the_plan_too(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """launch/data.py drops {"text": ""} (EOS alone: no token to predict); the plan counts
    it as 0 tokens, keeps it out of the packing, and refuses a file of nothing else."""
    recs = [{"text": ""}, {"text": "the quick brown fox"}, {"text": " "}]
    data = tinyllm.write_jsonl(tmp_path / "t.jsonl", recs)
    profile, _ = token_lengths(str(data), load_tokenizer(model_dirs["tiny"]))
    assert profile.lengths[0] == profile.lengths[2] == 0 and profile.untrained == 2
    assert fit_to_cap(profile, 64).kept == 1
    empty = tinyllm.write_jsonl(tmp_path / "e.jsonl", [{"text": ""}] * 2)
    profile, _ = token_lengths(str(empty), load_tokenizer(model_dirs["tiny"]))
    with pytest.raises(BadDataError, match=r"all 2 records of .* are empty texts"):
        fit_to_cap(profile, 64)


def test_cap_percentiles_and_the_overlong_rule() -> None:
    p = LengthProfile("d", "alpaca", "t", tuple(range(1, 101)))
    assert (p.longest, p.percentile(50), p.percentile(99), p.mean) == (100, 50, 99, 50.5)
    assert resolve_cap(p, None, None) == (128, "the longest record")
    assert resolve_cap(p, "auto", 100) == (100, "the model's context window")
    assert resolve_cap(p, "p50", None) == (64, "the 50th percentile")
    assert resolve_cap(p, "90", None) == (90, "given")
    dropped = fit_to_cap(p, 64)
    assert (dropped.dropped, dropped.kept, dropped.train_tokens) == (36, 64, sum(range(1, 65)))
    cut = fit_to_cap(p, 64, "truncate")
    assert (cut.truncated, cut.kept, cut.train_tokens) == (36, 100, sum(range(1, 65)) + 36 * 64)
    assert sum(c for _, _, c in p.histogram(8)) == 100
    with pytest.raises(BadDataError, match="p99"):
        resolve_cap(p, "median", None)
    with pytest.raises(BadDataError, match=r"all 100 records .* longest has 100.*--seq-len 100"):
        fit_to_cap(LengthProfile("d", "alpaca", "t", (100,) * 100), 50)


def test_all_overlong_suggests_only_lengths_the_model_takes() -> None:
    """Records longer than the context window: no --seq-len past it (refused: a dead end),
    and no 'auto' to a plan already on it."""
    huge = LengthProfile("huge.jsonl", "alpaca", "t", (5_000_010,))

    def advice(cap: int, reason: str) -> str:
        with pytest.raises(BadDataError) as info:
            fit_to_cap(huge, cap, "drop", reason, window=512)
        return str(info.value).split(": use ", 1)[1]

    on_auto = advice(512, "the model's context window")
    assert (
        on_auto == "--overlong truncate (the longest is past the model's 512-token context window)"
    )
    assert (
        advice(256, "given") == "--overlong truncate, or --seq-len 512 (the model's context window)"
    )
    # within the window: the length that keeps the longest, and auto to a length given
    fits = LengthProfile("d", "alpaca", "t", (300,))
    with pytest.raises(BadDataError, match=r"use --seq-len 300 \(or auto\), or --overlong"):
        fit_to_cap(fits, 256, "drop", "given", window=512)


def test_a_packing_is_kept_with_the_profile() -> None:
    p = LengthProfile("d", "alpaca", "t", (10, 20, 30, 40))
    fit = fit_to_cap(p, 64)
    assert fit.pack_at(128).rows == 1 and fit.pack_at(128).fill == pytest.approx(100 / 128)
    assert p.packs["64/drop/128"] == [1, 100]


def test_no_tokenizer_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        TokenizerNotFoundError, match=r"looked in .*Hugging Face cache.*--tokenizer"
    ):
        find_tokenizer("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B")
    with pytest.raises(TokenizerNotFoundError, match=r"no tokenizer\.json there"):
        find_tokenizer("x", None, str(tmp_path))


def test_profile_of_a_model_folder(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", RECORDS["messages"])
    profile, _ = profile_data(str(data), str(model_dirs["llama3"]), None)
    assert profile.records == 1 and profile.tokenizer == str(model_dirs["llama3"])


def _config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({**tinyllm.TINY_LLAMA, "vocab_size": 320}))


def _plan(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zeroplan", "plan", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"instruction": "a", "output": "b"}\n{not json\n', "line 2 is not JSON"),
        ('{"question": "a"}\n', "record 1 has fields [question]"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "record 2: alpaca"),
        ("", "holds no records"),
        pytest.param(
            json.dumps({"instruction": "a", "output": "the quick brown fox " * 300}) + "\n",
            "use --overlong truncate (the longest is past the model's 512-token context window)",
            id="one record past the tiny model's 512-token window, planned on auto",
        ),
    ],
)
def test_bad_data_is_one_line_exit_2_nothing_written(
    model_dirs: dict[str, Path], tmp_path: Path, content: str, needle: str
) -> None:
    _config(model_dirs["tiny"])
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    env = offline_env(tmp_path / "home")
    done = _plan([str(model_dirs["tiny"]), "--data", str(data), "-o", "out"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_plan_with_data_reports_the_data(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    _config(model_dirs["tiny"])
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", RECORDS["alpaca"] * 20)
    env = offline_env(tmp_path / "home")
    args = [str(model_dirs["tiny"]), "--data", str(data), "--gpus", "1xH100", "--json"]
    done = _plan([*args, "--epochs", "2"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    d = plan["data"]
    cap = min(512, -(-d["longest_tokens"] // 64) * 64)  # the longest, rounded up; the window
    assert d["records"] == 60 and d["seq_len"] == cap and d["dropped"] == 0
    assert plan["request"]["seq_len"] == cap
    assert plan["request"]["tokens_to_train"] == 2 * d["train_tokens"]
    best = plan["best"]
    assert 0 < best["fill"] <= 1 and best["steps_per_epoch"] >= 1
    # tokens/s counts real tokens: the full-length rate times the fill
    assert best["tokens_per_s"] == pytest.approx(
        best["setup"]["micro_batch"] * best["setup"]["grad_accum"] * cap * best["fill"]
        / best["step_seconds"]
    )  # fmt: skip
    lengths, _ = token_lengths(str(data), load_tokenizer(model_dirs["tiny"]))
    over = _plan([*args, "--seq-len", "64"], env, tmp_path)
    assert json.loads(over.stdout)["data"]["dropped"] == sum(n > 64 for n in lengths.lengths) > 0
    short = _plan([*args, "--seq-len", "8"], env, tmp_path)
    assert short.returncode == 2 and "--overlong truncate" in short.stderr


def test_estimate_with_data_takes_the_longest_record(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    _config(model_dirs["tiny"])
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", RECORDS["alpaca"] * 5)
    env = offline_env(tmp_path / "home")
    base = [sys.executable, "-m", "zeroplan", "estimate", str(model_dirs["tiny"])]
    base += ["--data", str(data), "--micro-batch", "4", "--json"]
    done = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    est = json.loads(done.stdout)
    longest = est["data"]["longest_tokens"]
    assert est["setup"]["seq_len"] == -(-longest // 64) * 64 == est["data"]["seq_len"]
    assert est["data"]["seq_len_from"] == "the longest record"
    assert 0 < est["data"]["micro_batch_fill"] <= 1
    given = subprocess.run([*base, "--seq-len", "32"], capture_output=True, text=True, env=env)
    assert json.loads(given.stdout)["setup"]["seq_len"] == 32
