"""A recipe's --data is counted as its trainer writes and cuts the records.

axolotl ``type: alpaca`` writes an alpaca prompt, LLaMA-Factory its ``template:``, TRL the
tokenizer's chat template (zeroplan.prompts); LLaMA-Factory and TRL cut a record longer than
the cap, axolotl drops it. Held against what the trainers padded on one H100
(benchmarks/results/recipes_gpu_h100*.jsonl, benchmarks/recipe_trainers.py): the same 64
generated records and small tokenizer, rebuilt here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zeroplan.errors import BadRecipeError
from zeroplan.packing import padded_batches, run_micro_batches
from zeroplan.recipes import read_recipe
from zeroplan.recipes.edit import edit_yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GPU_RECIPES = ROOT / "examples" / "recipes" / "gpu"
RECIPE_OF = {"trl": "trl_lora.yaml", "lf": "llamafactory_lora.yaml", "ax": "axolotl_lora.yml"}


def measured_rows() -> list[dict[str, Any]]:
    rows = []
    for name in ("recipes_gpu_h100.jsonl", "recipes_gpu_h100_mb8.jsonl"):
        rows += [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line]
    return [r for r in rows if r.get("per_step") and "gqa" not in r["run"]]


@pytest.fixture(scope="module")
def run_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The runs' tokenizer (tests/tinyllm.py's) and their 64 records, as the trainers read them."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tinyllm
    from gpu_fixtures import records

    work = tmp_path_factory.mktemp("runs")
    tinyllm.build_tokenizer().save_pretrained(work / "tok")
    recs = records(64, 40, 340)  # recipe_trainers.py --records 64: RECORD_WORDS 40-340
    (work / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    msgs = [
        {
            "messages": [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in recs
    ]
    (work / "messages.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    return {"tok": work / "tok", "alpaca": work / "alpaca.jsonl", "msgs": work / "messages.jsonl"}


def lengths_as(trainer: str, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The records' token lengths as the trainer's recipe says it writes them."""
    from zeroplan.datatokens import profile_data

    monkeypatch.setenv("ZEROPLAN_CACHE", str(data["tok"].parent / "cache"))
    recipe, _ = read_recipe(GPU_RECIPES / RECIPE_OF[trainer])
    source = data["msgs"] if trainer == "trl" else data["alpaca"]
    profile, _ = profile_data(str(source), str(data["tok"]), None, prompt=recipe.prompt)
    return list(profile.lengths)


@pytest.mark.parametrize("run", [r["run"] for r in measured_rows()])
def test_padded_lengths_are_the_trainers(
    run: str, run_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every micro-batch the trainer built was padded to one of the records' lengths as
    zeroplan counts them (LLaMA-Factory: rounded up to 8); a whole epoch's real tokens are
    the data's; the run's mean padded length is within 2.5 standard errors of the
    expected one (packing.padded_batches)."""
    row = next(r for r in measured_rows() if r["run"] == run)
    lengths = lengths_as(row["trainer"], run_data, monkeypatch)
    m = 8 if row["trainer"] == "lf" else 1
    rounded = {-(-n // m) * m for n in lengths}
    shapes = [p["shapes"][0] for p in row["per_step"]]
    b = shapes[0][0]
    assert all(s in rounded for _, s in shapes), sorted(set(s for _, s in shapes) - rounded)
    epoch = len(lengths) // b
    if len(shapes) >= epoch:  # the micro-batch-8 runs: 8 micro-batches are the 64 records
        assert sum(p["real"] for p in row["per_step"][:epoch]) == sum(lengths)
    # P(padded ≤ v) = F(v)^b: the mean and spread of a micro-batch's padded length
    values = sorted(rounded)
    below = [sum(1 for n in lengths if -(-n // m) * m <= v) / len(lengths) for v in values]
    p = [below[0] ** b] + [below[i] ** b - below[i - 1] ** b for i in range(1, len(values))]
    mean = sum(v * q for v, q in zip(values, p, strict=True))
    sd = math.sqrt(sum((v - mean) ** 2 * q for v, q in zip(values, p, strict=True)))
    assert mean == pytest.approx(padded_batches(lengths, b, m).longest)
    measured = sum(s for _, s in shapes) / len(shapes)
    assert abs(measured - mean) < 2.5 * sd / math.sqrt(len(shapes)), (measured, mean)


def test_axolotl_alpaca_is_not_the_chat_template(
    run_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measured axolotl run cannot be told from the chat template's lengths (the miss
    the earlier estimate made: 766 padded against 897 measured)."""
    from zeroplan.datatokens import profile_data

    monkeypatch.setenv("ZEROPLAN_CACHE", str(run_data["tok"].parent / "cache"))
    chat, _ = profile_data(str(run_data["alpaca"]), str(run_data["tok"]), None)
    alpaca = lengths_as("ax", run_data, monkeypatch)
    row = next(r for r in measured_rows() if r["run"] == "ax-lora+mb8")
    epoch_real = sum(p["real"] for p in row["per_step"][:8])
    assert chat.tokens_total != epoch_real == sum(alpaca) == 37050
    assert max(alpaca) == row["longest_padded_len"] == 992


def test_each_trainer_cuts_or_drops_as_its_source(tmp_path: Path) -> None:
    """LLaMA-Factory (cutoff_len) and TRL (max_length, keep_start) truncate; axolotl drops
    unless excess_length_strategy: truncate; raise is counted as drop; others refused."""
    assert read_recipe(GPU_RECIPES / "llamafactory_lora.yaml")[0].overlong == "truncate"
    assert read_recipe(GPU_RECIPES / "trl_lora.yaml")[0].overlong == "truncate"
    assert read_recipe(GPU_RECIPES / "axolotl_lora.yml")[0].overlong == "drop"
    base = (GPU_RECIPES / "axolotl_lora.yml").read_text()
    for value, expect in (("truncate", "truncate"), ("raise", "drop")):
        path = tmp_path / f"ax_{value}.yml"
        path.write_text(base + f"excess_length_strategy: {value}\n")
        recipe, _ = read_recipe(path)
        assert recipe.overlong == expect
        assert (value == "raise") == any("raise" in n for n in recipe.notes)
    path = tmp_path / "ax_bad.yml"
    path.write_text(base + "excess_length_strategy: wrap\n")
    with pytest.raises(BadRecipeError, match="excess_length_strategy: wrap"):
        read_recipe(path)


def test_prompt_formats_read_from_recipes(tmp_path: Path) -> None:
    """axolotl type: alpaca and LLaMA-Factory's llama3 are written as those trainers write
    them; TRL and an unknown LLaMA-Factory template use the chat template (the latter with a
    note); the mapping shows both settings."""
    ax, _ = read_recipe(GPU_RECIPES / "axolotl_lora.yml")
    lf, _ = read_recipe(GPU_RECIPES / "llamafactory_lora.yaml")
    trl, _ = read_recipe(GPU_RECIPES / "trl_lora.yaml")
    assert ax.prompt is not None and ax.prompt.kind == "axolotl_alpaca"
    assert lf.prompt is not None and lf.prompt.template is not None
    assert lf.prompt.template.name == "llama3" and trl.prompt is None
    rows = {r.setting: r for r in lf.rows}
    assert rows["prompt"].value.endswith("template llama3") and rows["overlong"].value == "truncate"
    odd = tmp_path / "lf.yaml"
    odd.write_text(
        edit_yaml((GPU_RECIPES / "llamafactory_lora.yaml").read_text(), {"template": "vicuna"})
    )
    recipe, _ = read_recipe(odd)
    assert recipe.prompt is None and any("template: vicuna" in n for n in recipe.notes)


def test_run_micro_batches_by_hand() -> None:
    """max_steps × accumulation when max_steps > 0, else epochs × ⌈records / (b · ranks)⌉."""
    assert run_micro_batches(64, 8, 1, 1, 3.0, 24) == 24
    assert run_micro_batches(64, 4, 2, 1, 1.0, 10) == 20
    assert run_micro_batches(64, 4, 1, 1, 3.0, -1) == 48
    assert run_micro_batches(64, 4, 1, 2, 1.5, None) == 12
    assert run_micro_batches(0, 4, 1, 1, 3.0) == 0


def test_estimate_recipe_data_follows_the_trainer(
    tmp_path: Path, run_data: dict[str, Path]
) -> None:
    """estimate --recipe --data of the axolotl run at micro-batch 8 for 24 steps: its alpaca
    prompt (padded length 879 expected, 896 measured), new shapes over its 24 micro-batches,
    a cap below the longest record drops for axolotl and cuts for LLaMA-Factory, and the
    warm-up stalls said apart from the rate (TRL, axolotl; not LLaMA-Factory)."""
    from conftest import offline_env

    model = tmp_path / "model"
    model.mkdir()
    for f in run_data["tok"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    catalog = ROOT / "zeroplan/catalog/models/meta-llama--Llama-3.2-1B-Instruct.json"
    (model / "config.json").write_text(catalog.read_text())
    env = offline_env(tmp_path / "home", ZEROPLAN_CACHE=str(tmp_path / "cache"))

    def estimate(name: str, edits: dict[str, Any], *flags: str) -> dict[str, Any]:
        text = (GPU_RECIPES / name).read_text().replace("meta-llama/Llama-3.2-3B-Instruct", "")
        key = "base_model" if name.startswith("axolotl") else "model_name_or_path"
        path = tmp_path / name
        path.write_text(edit_yaml(text.replace(f"{key}: \n", f"{key}: {model}\n"), edits))
        cmd = [sys.executable, "-m", "zeroplan", "estimate", "--recipe", str(path), "--json"]
        cmd += ["--data", str(run_data["alpaca"]), "--gpus", "1xH100", *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    # the run's variant: the recipe's micro-batch and max_steps, set again
    ax = estimate("axolotl_lora.yml", {"micro_batch_size": 8, "max_steps": 24})
    d = ax["data"]
    assert d["rendered"].endswith("type: alpaca") and d["micro_batches"] == 24
    assert d["padded_length"] == pytest.approx(879.4, abs=0.5)
    assert any("warm-up" in n for n in ax["notes"])
    assert any("max_steps 24" in n for n in ax["notes"])
    cut = estimate("axolotl_lora.yml", {}, "--seq-len", "600")
    assert cut["data"]["dropped"] > 0 and cut["data"]["truncated"] == 0
    lf = estimate("llamafactory_lora.yaml", {}, "--seq-len", "600")
    assert lf["data"]["truncated"] > 0 and lf["data"]["dropped"] == 0
    assert lf["data"]["micro_batches"] == 14  # the recipe's max_steps, accumulation 1
    assert not any("warm-up" in n for n in lf["notes"])


def test_warmup_stalls_are_the_runs() -> None:
    """recipes.WARMUP_STALLS holds every measured run's stalls (seconds over the step model,
    steps after the first) and the last step with one; LLaMA-Factory's runs have none."""
    import importlib.util

    from zeroplan.recipes import WARMUP_STALLS

    path = ROOT / "benchmarks" / "fit_padded_speed.py"
    spec = importlib.util.spec_from_file_location("fit_padded_speed", path)
    assert spec is not None and spec.loader is not None
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    for row in fit.rows():
        seconds, last = fit.warmup(row)
        low, high, last_step = WARMUP_STALLS.get(fit.FORMAT[row["trainer"]], (0.0, 0.0, 0))
        assert low - 0.05 <= seconds <= high + 0.05, (row["run"], seconds)
        assert last <= last_step, row["run"]


def test_llamafactory_pieces_by_hand() -> None:
    """llama3: BOS, the system slot, the user slot (with the assistant header), the answer
    with <|eot_id|>; an alpaca record's instruction and input joined by one newline."""
    from zeroplan.prompts import BOS, LLAMAFACTORY_TEMPLATES, llamafactory_pieces

    rec = {"instruction": "Say", "input": "hi", "output": "hello", "system": "Be brief."}
    pieces = llamafactory_pieces(LLAMAFACTORY_TEMPLATES["llama3"], rec, "alpaca", 0, None)
    assert [p for p, _ in pieces] == [
        BOS,
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nSay\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "hello<|eot_id|>",
    ]
    qwen = llamafactory_pieces(
        LLAMAFACTORY_TEMPLATES["qwen"], rec | {"system": ""}, "alpaca", 0, None
    )
    assert qwen[0][0].startswith("<|im_start|>system\nYou are Qwen")  # its default system
