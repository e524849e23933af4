"""benchmarks/host_pace.py: a host's dispatch pace, and the pace launches recorded beside
their steps (the launch timed it before its first step at 301616a; it told the slow hosts
apart no better than chance, host_pace_h100.jsonl)."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import host_pace  # noqa: E402


def test_the_workload_dispatches_the_operations_the_pace_divides_by() -> None:
    step = host_pace._workload(torch, "cpu")
    assert host_pace.count_ops(torch, step) == host_pace.OPS


def test_the_pace_is_a_median_no_faster_than_the_fastest_run() -> None:
    pace = host_pace.measure("cpu", calls=3, runs=3)
    assert 0 < pace.fastest_op_us <= pace.op_us
    assert pace.to_dict()["ops"] == host_pace.OPS and pace.device == "cpu"


def test_the_workload_leaves_no_gradient_behind() -> None:
    step = host_pace._workload(torch, "cpu")
    step()
    # the weights are the closure's: a second step starts from no gradient, as the first did
    cells = [c.cell_contents for c in step.__closure__ or ()]
    weights = next(c for c in cells if isinstance(c, list))
    assert all(w.grad is None for w in weights)


def test_a_launch_archive_gives_its_pace_beside_its_median_step(tmp_path: Path) -> None:
    run = tmp_path / "run-8b-mb1"
    run.mkdir()
    pace = {"op_us": 12.0, "fastest_op_us": 11.0, "ops": 232, "calls": 40, "runs": 9}
    (run / "applied.json").write_text(json.dumps({"host_pace": pace, "versions": {"torch": "x"}}))
    # ten steps 0.2 s apart after a slow first one; the median leaves the ends out
    times = [0.0, 1.0, *(1.0 + 0.2 * i for i in range(1, 10))]
    lines = [{"event": "train", "t": t} for t in times] + [{"event": "end", "t": 99.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    archive = tmp_path / "p1_runs.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname="run-8b-mb1")
    (row,) = host_pace.launched_rows(archive)
    assert row["op_us"] == 12.0 and row["versions"] == {"torch": "x"}
    assert row["step_ms_median"] == pytest.approx(200.0)
