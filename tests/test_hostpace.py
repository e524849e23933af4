"""The launch's timing of this host's dispatch pace (zeroplan.launch.hostpace)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from zeroplan.launch import hostpace  # noqa: E402


def test_the_workload_dispatches_the_operations_the_pace_divides_by():
    step = hostpace._workload(torch, "cpu")
    assert hostpace.count_ops(torch, step) == hostpace.OPS


def test_the_pace_is_a_median_no_faster_than_the_fastest_run():
    pace = hostpace.measure("cpu", calls=3, runs=3)
    assert 0 < pace.fastest_op_us <= pace.op_us
    assert pace.to_dict()["ops"] == hostpace.OPS and pace.device == "cpu"


def test_the_workload_leaves_no_gradient_behind():
    step = hostpace._workload(torch, "cpu")
    step()
    # the weights are the closure's: a second step starts from no gradient, as the first did
    cells = [c.cell_contents for c in step.__closure__ or ()]
    weights = next(c for c in cells if isinstance(c, list))
    assert all(w.grad is None for w in weights)
