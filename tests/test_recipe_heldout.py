"""Held-out recipes: ones the readers were not written against, resolved key by key.

tests/data/heldout_recipes/<trainer>/ holds recipes written in the style of each trainer's
shipped examples (LLaMA-Factory 0.9.5 examples/train_*, axolotl 0.18 examples/<family>, TRL
1.16's ``trl sft`` configs) for catalog models, and ``expected.yaml``: what that trainer runs
for each, written by hand from its source with the line of every default relied on. A recipe
zeroplan cannot model is expected to be refused in one line, exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from zeroplan.commands.cli import main
from zeroplan.recipes import read_recipe

HELDOUT = Path(__file__).parent / "data" / "heldout_recipes"
TRAINERS = ("llamafactory", "axolotl", "trl")
# every resolved recipe's expectation names these (so none is left unchecked by omission)
ALWAYS = (
    "method",
    "micro_batch",
    "grad_accum",
    "seq_len",
    "grad_ckpt",
    "optim",
    "precision",
    "attn",
    "packing",
    "padding_mask",
    "zero",
    "offload",
    "fused_loss",
)
LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
# checked from the mapping or the Recipe rather than the TrainSetup fields
NOT_SETUP = ("packing", "lora_alpha", "ignored")


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    cases = []
    for trainer in TRAINERS:
        expected = yaml.safe_load((HELDOUT / trainer / "expected.yaml").read_text("utf-8"))
        for name, want in expected.items():
            cases.append((trainer, name, want))
    return cases


CASES = _cases()
RESOLVED = [c for c in CASES if "refused" not in c[2]]
REFUSED = [c for c in CASES if "refused" in c[2]]


def _ids(cases: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    return [f"{t}/{n}" for t, n, _ in cases]


def test_every_recipe_has_an_expectation_and_each_trainer_enough() -> None:
    for trainer in TRAINERS:
        folder = HELDOUT / trainer
        recipes = {p.name for p in folder.iterdir() if p.is_file() and p.name != "expected.yaml"}
        names = {n for t, n, _ in CASES if t == trainer}
        assert recipes == names, trainer
        assert len(names) >= 6, trainer
        assert sum(1 for t, _, _ in RESOLVED if t == trainer) >= 5, trainer


@pytest.mark.parametrize(("trainer", "name", "want"), RESOLVED, ids=_ids(RESOLVED))
def test_heldout_recipe_resolves_as_its_trainer_runs_it(
    trainer: str, name: str, want: dict[str, Any]
) -> None:
    required = ALWAYS + (LORA if want["method"] != "full" else ())
    required += ("lora_kernels",) if trainer == "axolotl" else ()
    assert not [k for k in required if k not in want], f"{name}: expectation incomplete"

    recipe, _ = read_recipe(HELDOUT / trainer / name)
    assert recipe.format == trainer
    mapping = {r.setting: r.value for r in recipe.rows}
    got: dict[str, Any] = {}
    for key, value in want.items():
        if key == "packing":
            got[key] = recipe.packing
        elif key == "lora_alpha":
            got[key] = mapping["lora_alpha"]
        elif key == "ignored":
            got[key] = sorted(k for k, _ in recipe.ignored)
            want = {**want, key: sorted(value)}
        elif key == "lora_targets":
            got[key] = list(recipe.setup[key])
        else:
            got[key] = recipe.setup.get(key, "<absent>")
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f"{trainer}/{name}: (zeroplan, trainer) {wrong}"


@pytest.mark.parametrize(("trainer", "name", "want"), REFUSED, ids=_ids(REFUSED))
def test_heldout_recipe_zeroplan_cannot_model_is_refused_in_one_line(
    trainer: str, name: str, want: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["estimate", "--recipe", str(HELDOUT / trainer / name), "--gpus", "1xH100"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zeroplan: error: "), err
    assert want["refused"] in lines[0]
