"""The tables people read at common terminal widths: one line per row at 80 and 100
columns (rich Console(width=...)), more columns on a wider terminal, never wider cells."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from zeroplan.commands.render import render_gpus, render_models, render_plan
from zeroplan.hardware import GPU_CATALOG, parse_cluster
from zeroplan.lengths import LengthProfile, fit_to_cap
from zeroplan.models import catalog_models, load_model
from zeroplan.planner import PlanRequest, plan, plan_json

pytestmark = pytest.mark.usefixtures("isolated_hf")

ROW = "│"  # rich's vertical line inside a body row (the header's is ┃)


def rendered(draw: Any, width: int) -> list[str]:
    out = io.StringIO()
    draw(Console(width=width, file=out, color_system=None))
    return out.getvalue().splitlines()


def body_rows(lines: list[str]) -> list[str]:
    return [line for line in lines if ROW in line]


def a_plan(model: str, gpus: str, **request: Any) -> dict[str, Any]:
    return plan_json(plan(PlanRequest(load_model(model), parse_cluster(gpus), **request)))


def with_data() -> dict[str, Any]:
    """The widest plan table: a data set (fill, steps per epoch, real tokens/s), a time and a
    cost, lora and qlora rows (--method auto) with and without DeepSpeed on two nodes."""
    lengths = tuple((i * 37) % 2000 + 20 for i in range(2000))
    fit = fit_to_cap(LengthProfile("train.jsonl", "alpaca", "t", lengths), 2048)
    return a_plan(
        "Qwen/Qwen2.5-7B-Instruct",
        "2x8x4090",
        method="auto",
        data=fit,
        epochs=3,
        global_batch=64,
        price_per_gpu_hour=1.25,
    )


PLANS = {
    "data, two nodes, auto": with_data,
    "full, offload, one 4090": lambda: a_plan(
        "meta-llama/Llama-3.1-8B-Instruct",
        "1x4090",
        method="full",
        seq_len=4096,
        dataset_tokens=10**8,
        price_per_gpu_hour=1.0,
    ),
    "auto, 7x4090": lambda: a_plan(
        "Qwen/Qwen2.5-7B-Instruct", "7x4090", method="auto", dataset_tokens=10**8
    ),
}


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize("case", list(PLANS))
def test_plan_rows_take_one_line(case: str, width: int) -> None:
    data = PLANS[case]()
    lines = rendered(lambda c: render_plan(data, c), width)
    rows = body_rows(lines)
    assert len(rows) == 1 + len(data["alternatives"]), "\n".join(lines)
    assert all(len(line) <= width for line in rows)
    assert [r.split(ROW)[0].strip() for r in rows] == [str(n) for n in range(1, len(rows) + 1)]


def test_plan_says_once_what_every_row_shares_and_shows_it_when_wide() -> None:
    data = a_plan("Qwen/Qwen2.5-7B-Instruct", "7x4090", method="qlora", dataset_tokens=10**8)
    # every row of this plan is QLoRA (its other columns differ): the method is said once
    assert {c["setup"]["method"] for c in [data["best"], *data["alternatives"]]} == {"qlora"}
    narrow = rendered(lambda c: render_plan(data, c), 80)
    assert not any("qlora" in r for r in body_rows(narrow))
    assert any(line.startswith("every row: ") and "method qlora" in line for line in narrow)
    wide = rendered(lambda c: render_plan(data, c), 200)
    rows = body_rows(wide)
    assert all("qlora" in r for r in rows)
    assert not any(line.startswith("every row: ") for line in wide)
    # more columns, not wider cells: the table is as wide as its widest cells
    assert max(len(r) for r in rows) < 150


@pytest.mark.parametrize("width", [80, 100, 200])
def test_gpus_and_models_fit(width: int) -> None:
    gpus = list(GPU_CATALOG.values())
    lines = rendered(lambda c: render_gpus(gpus, c), width)
    rows = body_rows(lines)
    assert len(rows) == len(gpus) and all(len(line) <= width for line in lines)
    assert rows[0].split(ROW)[0].strip() == gpus[0].name
    assert len(rows[0].split(ROW)) == 8  # every column, already at 80

    names = catalog_models()
    models = [(m, (s := load_model(m)).model_type, s.total_params) for m in names]
    lines = rendered(lambda c: render_models(models, c), width)
    rows = body_rows(lines)
    assert len(rows) == len(models) and all(len(line) <= width for line in lines)
    assert [r.split(ROW)[0].strip() for r in rows] == names
