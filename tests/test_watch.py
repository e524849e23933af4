"""`zeroplan watch`: sampling (fake and real NVML), reading a run folder, alerts, the screen
as a person sees it at 80 and 200 columns, plain lines, the CLI, recording, and a
dashboard that keeps going when something breaks.

tests/data/watch_run is a recorded 8×RTX 4090 run: plan.json from `zeroplan plan`,
metrics.jsonl from 8 ranks (rank 3 went silent after step 10; an eval line; a line that
is not JSON; a half-written last line), gpu_samples.jsonl with GPU 5 nearly full and
GPU 6 thermally throttled.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from zeroplan.commands.cli import cli, main
from zeroplan.errors import BadPlanError
from zeroplan.watch import alerts as al
from zeroplan.watch.alerts import Alert
from zeroplan.watch.dashboard import (
    DashboardView,
    bar_cells,
    duration,
    memory_bar,
    plain_lines,
    render,
    sparkline,
    view_json,
)
from zeroplan.watch.loop import run_dashboard, watch_once
from zeroplan.watch.monitor import (
    FakeBackend,
    FakeGPU,
    GPUDataUnavailable,
    GPUSample,
    HostSample,
    NvmlBackend,
    Snapshot,
    open_backend,
    throttle_names,
)
from zeroplan.watch.runlog import (
    JsonlTail,
    MetricRecord,
    Prediction,
    SampleRecorder,
    TrainingLog,
    parse_record,
    read_jsonl,
    read_prediction,
)

RECORDED = Path(__file__).parent / "data" / "watch_run"
GIB = 2**30
MIB = 2**20


# -- recorded data ---------------------------------------------------------------------------


def recorded_view() -> DashboardView:
    """The recorded run's last moment, judged as the dashboard would judge it then."""
    rows = list(read_jsonl(RECORDED / "gpu_samples.jsonl"))
    last_t = max(r["t"] for r in rows)
    gpus = [GPUSample.from_json(r) for r in rows if r["t"] > last_t - 1]
    host_row = next(read_jsonl(RECORDED / "host_samples.jsonl"))
    host_row.pop("host")
    host = HostSample(**host_row)
    log = TrainingLog(RECORDED / "metrics.jsonl")
    log.poll()
    training = log.view()
    prediction = read_prediction(RECORDED)
    now = last_t
    snap = Snapshot(t=now, gpus=tuple(gpus), host=host)
    found = al.all_alerts(snap.gpus, prediction, training, now)
    return DashboardView(snap, training, prediction, tuple(found), run_dir="runs/llama-4090")


def screen(view: DashboardView, width: int) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(view, width))
    return console.export_text()


def sample(index: int = 0, **kw: Any) -> GPUSample:
    fields: dict[str, Any] = dict(
        t=1000.0,
        index=index,
        name="NVIDIA H100 80GB HBM3",
        memory_used_bytes=40 * GIB,
        memory_total_bytes=80 * GIB,
        util_percent=99.0,
        temperature_c=60.0,
        power_w=650.0,
        power_limit_w=700.0,
        sm_clock_mhz=1980,
        sm_clock_max_mhz=1980,
    )
    fields.update(kw)
    return GPUSample(**fields)


PRED = Prediction(
    device_used_bytes=40 * GIB, required_bytes=38 * GIB, peak_allocated_bytes=34 * GIB
)


# -- sampling -------------------------------------------------------------------------------


def test_fake_backend_eight_gpus_and_sample_json_fields() -> None:
    backend = FakeBackend(8, clock=lambda: 1234.5)
    gpus = backend.sample()
    assert [g.index for g in gpus] == list(range(8))
    row = gpus[3].to_json()
    assert {
        "t",
        "gpu",
        "name",
        "memory_used_bytes",
        "memory_total_bytes",
        "util_percent",
        "temperature_c",
        "power_w",
        "power_limit_w",
        "sm_clock_mhz",
        "mem_clock_mhz",
        "throttle_mask",
        "throttle_reasons",
        "processes",
    } <= set(row)
    assert row["t"] == 1234.5 and row["gpu"] == 3
    assert 0 < row["memory_used_bytes"] < row["memory_total_bytes"]
    assert row["processes"][0]["command"].startswith("python")
    assert GPUSample.from_json(row) == gpus[3]


def test_throttle_names_from_the_nvml_mask() -> None:
    assert throttle_names(0) == ()
    assert throttle_names(None) == ()
    assert throttle_names(0x44) == ("sw_power_cap", "hw_thermal_slowdown")
    assert throttle_names(0x1 | 0x8000) == ("gpu_idle", "0x8000")


def test_no_nvidia_driver_gives_a_clear_line() -> None:
    """On this CPU machine the real pynvml raises NVMLError: GPUDataUnavailable with a line to show."""
    try:
        backend = NvmlBackend()
    except GPUDataUnavailable as exc:
        message = str(exc)
    else:  # a GPU machine: nothing to check here
        backend.close()
        pytest.skip("NVML works on this machine")
    assert message.startswith("No NVIDIA GPU data")
    assert "NVML" in message and "\n" not in message
    backend_or_none, reason = open_backend()
    assert backend_or_none is None and reason == message


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml() -> types.ModuleType:
    """A pynvml stand-in with 2 GPUs: GPU 1 has no power reading and an old driver
    without the v2 memory query; a process is listed as compute and graphics."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _FakeNVMLError  # type: ignore[attr-defined]
    m.NVML_TEMPERATURE_GPU, m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM = 0, 1, 2  # type: ignore[attr-defined]
    m.nvmlMemory_v2 = 0x02000028  # type: ignore[attr-defined]
    calls: list[str] = []
    m.calls = calls  # type: ignore[attr-defined]
    ns = types.SimpleNamespace

    def memory(h: int, version: int | None = None) -> Any:
        if version is not None and h == 1:
            raise _FakeNVMLError("Function Not Found")
        if version is not None:
            return ns(used=30 * GIB, total=80 * GIB, reserved=500 * MIB)
        return ns(used=30 * GIB + 500 * MIB, total=80 * GIB)

    def power(h: int) -> int:
        if h == 1:
            raise _FakeNVMLError("Not Supported")
        return 312_345

    procs = {0: [ns(pid=os.getpid(), usedGpuMemory=29 * GIB)], 1: []}
    m.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"  # type: ignore[attr-defined]
    m.nvmlDeviceGetMaxClockInfo = lambda h, c: 1980  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    m.nvmlDeviceGetUtilizationRates = lambda h: ns(gpu=87, memory=40)  # type: ignore[attr-defined]
    m.nvmlDeviceGetTemperature = lambda h, s: 71  # type: ignore[attr-defined]
    m.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000  # type: ignore[attr-defined]
    m.nvmlDeviceGetClockInfo = lambda h, c: 1755 if c == 1 else 2619  # type: ignore[attr-defined]
    m.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x4 if h == 0 else 0  # type: ignore[attr-defined]
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: procs[h]  # type: ignore[attr-defined]
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: procs[h]  # type: ignore[attr-defined]
    return m


def test_nvml_backend_reads_every_field_and_survives_missing_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = NvmlBackend()
    g0, g1 = backend.sample()
    assert g0.name == "NVIDIA H100 80GB HBM3" and g0.uuid == "GPU-0"
    assert g0.memory_used_bytes == 30 * GIB  # v2: without the driver's reserved memory
    assert g1.memory_used_bytes == 30 * GIB + 500 * MIB  # v1 on the older driver
    assert (g0.util_percent, g0.temperature_c, g0.power_w) == (87.0, 71.0, 312.345)
    assert g1.power_w is None and g1.power_limit_w == 700.0  # Not Supported -> None
    assert (g0.sm_clock_mhz, g0.sm_clock_max_mhz, g0.mem_clock_mhz) == (1755, 1980, 2619)
    assert g0.throttle_reasons == ("sw_power_cap",) and g1.throttle_reasons == ()
    # listed as compute and graphics: one process, memory counted once, user and command found
    (proc,) = g0.processes
    assert proc.pid == os.getpid() and proc.memory_bytes == 29 * GIB
    assert proc.command and "python" in proc.command.lower() and proc.user
    backend.close()
    backend.close()
    assert fake.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    assert NvmlBackend([1]).sample()[0].index == 1
    with pytest.raises(GPUDataUnavailable, match="GPUs 0-1 only"):
        NvmlBackend([5])


# -- the run folder -------------------------------------------------------------------------


def test_jsonl_tail_holds_back_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.read_new() == []  # no file yet
    path.write_text('{"a": 1}\n{"b":')
    assert tail.read_new() == ['{"a": 1}']
    assert tail.read_new() == []
    with path.open("a") as f:
        f.write(' 2}\n\n{"c": 3}\n')
    assert tail.read_new() == ['{"b": 2}', '{"c": 3}']
    path.write_text('{"d": 4}\n')  # rewritten, shorter: start again
    assert tail.read_new() == ['{"d": 4}']


def test_parse_record_tolerates_unknown_keys_and_rejects_non_records() -> None:
    rec = parse_record(
        '{"t": 5, "rank": 1, "step": 3, "loss": 1.5, "new_key": [1], "event": "eval"}'
    )
    assert rec == MetricRecord(t=5.0, rank=1, step=3, loss=1.5, event="eval")
    for bad in ("", "[1, 2]", '{"rank": 0, "step": 1}', '{"t": 1, "rank": "0", "step": 1}', "{"):
        assert parse_record(bad) is None


def test_training_log_reads_the_recorded_run() -> None:
    log = TrainingLog(RECORDED / "metrics.jsonl")
    assert log.poll() == 40 * 7 + 10 + 1  # 7 ranks to step 40, rank 3 to step 10, one eval
    tr = log.view()
    assert tr is not None
    assert tr.bad_lines == 1  # "this line is not json"; the half-written last line waits
    assert (tr.step, tr.total_steps) == (40, 400)
    assert tr.loss == pytest.approx(2.0 * 2.718281828 ** (-40 / 15) + 1.0, abs=0.05)
    assert tr.eval_loss == 1.61
    assert len(tr.loss_history) == 40  # one per step, from the lead rank
    assert tr.seconds_per_step == pytest.approx(6.0)
    assert tr.eta_s == pytest.approx(360 * 6.0)
    # tokens/s: the latest value of every rank, added up (rank 3's last value included)
    assert tr.tokens_per_s == pytest.approx(sum(1100.0 + r for r in range(8)))
    assert [r.rank for r in tr.ranks] == list(range(8))
    assert tr.ranks[3].step == 10 and not tr.finished


def test_rank_peak_is_the_allocators_peak_when_logged() -> None:
    log = TrainingLog(os.devnull)
    log.add(MetricRecord(t=1.0, rank=0, step=1, mem_allocated_bytes=10, peak_allocated_bytes=15))
    log.add(MetricRecord(t=2.0, rank=0, step=2, mem_allocated_bytes=11))
    log.add(MetricRecord(t=2.0, rank=1, step=2, mem_allocated_bytes=12))
    tr = log.view()
    assert tr is not None
    assert [r.peak_allocated_bytes for r in tr.ranks] == [15, 12]
    assert parse_record('{"t": 1, "rank": 0, "step": 1, "peak_allocated_bytes": 7}') == (
        MetricRecord(t=1.0, rank=0, step=1, peak_allocated_bytes=7)
    )


def test_training_log_end_events_finish_the_run(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [
        {
            "t": 10.0 + s,
            "rank": r,
            "step": s,
            "total_steps": 5,
            "loss": 1.0 / s,
            "tokens_per_s": 10.0,
        }
        for s in (1, 2)
        for r in (0, 1)
    ]
    lines += [{"t": 20.0, "rank": r, "step": 2, "event": "end"} for r in (0, 1)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    log = TrainingLog(path)
    log.poll()
    tr = log.view()
    assert tr is not None and tr.finished and tr.eta_s == 0.0
    assert tr.tokens_per_s is None  # ended ranks make no tokens
    assert al.silent_ranks(tr, now=10_000.0) == []


def test_read_prediction_follows_plan_json(tmp_path: Path) -> None:
    p = read_prediction(RECORDED)
    assert p is not None
    data = json.loads((RECORDED / "plan.json").read_text())
    assert p.device_used_bytes == data["best"]["device_used_bytes"]
    assert p.peak_allocated_bytes == data["best"]["peak_allocated_bytes"]
    assert p.world_size == 8 and p.cluster == "8×RTX-4090"
    assert read_prediction(tmp_path) is None  # no plan.json: no prediction
    (tmp_path / "plan.json").write_text(json.dumps({"best": None, "world_size": 8}))
    assert read_prediction(tmp_path) is None  # nothing fitted
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(BadPlanError, match="cannot be read as JSON"):
        read_prediction(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps({"best": {"required_bytes": 1}}))
    with pytest.raises(BadPlanError, match="device_used_bytes"):
        read_prediction(tmp_path)


# -- alerts: each one fires, and each one can stay quiet -----------------------------------


def test_over_prediction_alert_uses_the_estimators_error() -> None:
    assert al.ESTIMATOR_ERROR == 0.15
    assert al.over_prediction(sample(memory_used_bytes=int(40 * GIB * 1.14)), PRED) == []
    (a,) = al.over_prediction(sample(memory_used_bytes=int(40 * GIB * 1.16)), PRED)
    assert (a.kind, a.subject, a.level) == ("over_prediction", "GPU 0", "warn")
    assert "16% above the predicted 40.0 GiB" in a.message
    assert al.over_prediction(sample(memory_used_bytes=79 * GIB), None) == []  # no plan
    assert al.over_prediction(sample(memory_used_bytes=None), PRED) == []


def test_card_full_alert_above_95_percent() -> None:
    assert al.card_full(sample(memory_used_bytes=int(0.95 * 80 * GIB))) == []
    (a,) = al.card_full(sample(memory_used_bytes=int(0.96 * 80 * GIB)))
    assert a.level == "crit" and "96% of the card" in a.message
    assert al.card_full(sample(memory_total_bytes=None)) == []


def test_throttle_alert_power_is_a_warning_heat_is_critical() -> None:
    assert al.throttling(sample(throttle_reasons=("gpu_idle", "sync_boost"))) == []
    capped = sample(throttle_reasons=("sw_power_cap",), sm_clock_mhz=1500)
    (power,) = al.throttling(capped, low_clock_samples=3)
    assert power.level == "warn" and "sw_power_cap" in power.message
    assert "650/700 W" in power.message
    assert "SM 1500/1980 MHz, 24% below max for 3 samples" in power.message
    (heat,) = al.throttling(sample(throttle_reasons=("sw_power_cap", "hw_thermal_slowdown")))
    assert heat.level == "crit" and "60°C" in heat.message


def test_power_capping_at_full_clock_or_briefly_is_no_alert() -> None:
    """NVML reports sw_power_cap at 99% of the max clock: that costs nothing."""
    at_99 = sample(throttle_reasons=("sw_power_cap",), sm_clock_mhz=1960)
    assert not al.clock_is_low(at_99)
    assert al.throttling(at_99, low_clock_samples=0) == []
    assert al.all_alerts([at_99], None, None, now=0.0) == []
    dip = sample(throttle_reasons=("sw_power_cap",), sm_clock_mhz=1700)
    assert al.clock_is_low(dip)
    assert al.throttling(dip, low_clock_samples=2) == []  # two samples: not yet
    (alert,) = al.all_alerts([dip], None, None, now=0.0, low_clock_samples={0: 5})
    assert "14% below max for 5 samples" in alert.message


def test_the_dashboard_counts_low_clock_samples_in_a_row(run_dir: Path) -> None:
    from zeroplan.watch.loop import Collector

    # a power-capped fake GPU runs at 1410 of 1980 MHz (29% below max) on every sample
    collector = Collector(run_dir, FakeBackend([FakeGPU(throttle_mask=0x4)]), record=False)
    try:
        views = [collector.collect() for _ in range(4)]
    finally:
        collector.close()
    throttled = [[a for a in v.alerts if a.kind == "throttle"] for v in views]
    assert [bool(t) for t in throttled] == [False, False, True, True]
    assert "29% below max for 4 samples" in throttled[-1][0].message


def test_a_finished_run_is_never_hung() -> None:
    training = _training({0: (0.0, "train"), 1: (0.0, "train")})
    assert any(a.kind == "hang" for a in al.all_alerts([], PRED, training, now=1e6))
    assert al.all_alerts([], PRED, training, now=1e6, run_finished=True) == []


def _training(ranks: dict[int, tuple[float, str]], sps: float | None = None) -> Any:
    log = TrainingLog(os.devnull)
    for rank, (t, event) in ranks.items():
        log.add(MetricRecord(t=t, rank=rank, step=7, event=event))
    tr = log.view()
    assert tr is not None
    if sps is not None:
        import dataclasses

        tr = dataclasses.replace(tr, seconds_per_step=sps)
    return tr


def test_hang_alert_after_n_silent_seconds_or_three_steps() -> None:
    tr = _training({0: (1000.0, "train"), 1: (1000.0 - 121, "train"), 2: (500.0, "end")})
    (a,) = al.silent_ranks(tr, now=1000.0, hang_after_s=120)
    assert (a.kind, a.subject, a.level) == ("hang", "rank 1", "crit")
    assert "no metric for 121 s" in a.message
    assert al.silent_ranks(tr, now=1000.0, hang_after_s=130) == []
    # steps of 60 s: silence is judged against 3 steps (180 s), not 120 s
    slow = _training({0: (1000.0, "train"), 1: (1000.0 - 150, "train")}, sps=60.0)
    assert al.silent_ranks(slow, now=1000.0, hang_after_s=120) == []
    assert al.hang_threshold(120, 60.0) == 180 and al.hang_threshold(120, None) == 120


def test_several_nodes_every_rank_shown_with_its_node_and_a_silent_node_named() -> None:
    log = TrainingLog(os.devnull)
    for rank, host, t in ((0, "gpu07", 1000.0), (1, "gpu07", 1000.0), (2, "gpu08", 800.0),
                          (3, "gpu08", 790.0)):  # fmt: skip
        log.add(MetricRecord(t=t, rank=rank, step=7, host=host, tokens_per_s=100.0))
    tr = log.view()
    assert tr is not None
    found = al.silent_ranks(tr, now=1000.0, hang_after_s=120)
    assert {a.subject for a in found if a.kind == "hang"} == {"rank 2 on gpu08", "rank 3 on gpu08"}
    (node,) = [a for a in found if a.kind == "node_silent"]
    assert node.subject == "node gpu08" and "ranks 2, 3" in node.message
    view = recorded_view()
    text = screen(DashboardView(view.snapshot, tr, view.prediction, ()), 200)
    assert "2 nodes (gpu07, gpu08): the GPU table above is this machine's" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("3  gpu08"))
    assert " 7 " in row
    # one node: no node column, no note
    one = TrainingLog(os.devnull)
    one.add(MetricRecord(t=1000.0, rank=0, step=7, host="gpu07"))
    text = screen(DashboardView(view.snapshot, one.view(), view.prediction, ()), 200)
    assert "nodes (" not in text


def test_ranks_that_never_report_are_named() -> None:
    tr = _training({0: (1000.0, "train"), 1: (1000.0, "train")})
    assert al.silent_ranks(tr, now=1000.0, world_size=4) == []  # too early to say
    found = al.silent_ranks(tr, now=1200.0, hang_after_s=120, world_size=4)
    (a,) = [a for a in found if a.kind == "not_reporting"]
    assert a.subject == "ranks" and "ranks 2, 3 of 4 never logged a metric" in a.message
    assert al.silent_ranks(tr, now=1200.0, hang_after_s=120, world_size=2)[0].kind == "hang"


def test_rank_gone_from_the_launchers_exit_codes_or_a_vanished_pid() -> None:
    tr = _training({0: (1.0, "end"), 1: (1.0, "train"), 2: (1.0, "train")})
    found = al.gone_ranks(tr, exit_codes={0: 0, 1: None, 2: -9})
    assert [(a.subject, a.message) for a in found] == [("rank 2", "exited with status -9")]
    (quiet_exit,) = al.gone_ranks(tr, exit_codes={1: 0})
    assert "without logging 'end'" in quiet_exit.message
    # no launcher: a rank that logged its pid on this host and whose process is gone
    log = TrainingLog(os.devnull)
    log.add(MetricRecord(t=1.0, rank=0, step=1, pid=111, host="box"))
    log.add(MetricRecord(t=1.0, rank=1, step=1, pid=222, host="box"))
    log.add(MetricRecord(t=1.0, rank=2, step=1, pid=333, host="other-node"))
    gone = al.gone_ranks(log.view(), alive_pids={111}, this_host="box")
    assert [a.subject for a in gone] == ["rank 1"]
    assert al.gone_ranks(log.view(), alive_pids={111, 222}, this_host="box") == []


def test_all_alerts_critical_first_and_merged_for_the_screen() -> None:
    gpus = [
        sample(0, memory_used_bytes=50 * GIB),
        sample(1, memory_used_bytes=55 * GIB),
        sample(2, memory_used_bytes=79 * GIB),
    ]
    found = al.all_alerts(gpus, PRED, None, now=0.0)
    assert found[0].kind == "card_full" and {a.level for a in found[1:]} == {"warn"}
    lines = al.merged_lines(found)
    assert lines[0].startswith("CRIT GPU 2: 99% of the card")
    # the worst over-prediction leads, the others are named
    assert lines[1].startswith("WARN GPU 2 (also GPU 0, 1): 79.0 GiB used, 98% above")
    assert al.merged_lines([Alert("warn", "x", "rank 1", "m")]) == ["WARN rank 1: m"]


# -- the screen, as a person sees it ---------------------------------------------------------


def test_small_formatters() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5], 10) == "▅▅▅"
    assert sparkline([1.0, float("nan"), 3.0], 3) == "▁ █"
    assert sparkline([], 5) == ""
    assert sparkline([98.0, 100.0], 2) == "▁█" and sparkline([98.0, 100.0], 2, floor=0) == "██"
    assert bar_cells(50, 100, 75, 20) == (10, 15)
    assert bar_cells(120, 100, 200, 20) == (20, 19)  # over the card: clamped
    assert duration(59) == "59 s" and duration(3723) == "1h02m" and duration(None) == "-"
    assert duration(200_000) == "2d 7h" and duration(182) == "3m02s"
    bar = memory_bar(50, 100, 75, 20).plain
    assert bar == "█" * 10 + "░" * 5 + "┃" + "░" * 4


def test_recorded_run_at_200_columns() -> None:
    text = screen(recorded_view(), 200)
    lines = text.splitlines()
    assert all(len(line) <= 200 for line in lines)
    assert "runs/llama-4090 · meta-llama/Llama-3.1-8B-Instruct on 8×RTX-4090" in lines[0]
    # the alerts, worst first
    alerts = text[text.index("alerts") : text.index("GPU  name")]
    assert "CRIT GPU 5: 97% of the card in use (23.2/24.0 GiB)" in alerts
    assert (
        "CRIT GPU 6: throttled: sw_power_cap, hw_thermal_slowdown (87°C, 450/450 W, SM 1875/3120 MHz, 40% below max)"
        in alerts
    )
    assert "CRIT rank 3: no metric for 182 s (step 10; limit 120 s): hung?" in alerts
    assert "WARN GPU 5: 23.2 GiB used, 16% above the predicted 19.9 GiB" in alerts
    # one row per GPU: bar with the predicted peak marked, numbers, clocks, throttle reasons
    assert "memory (┃ = predicted peak 19.9 GiB)" in text
    gpu6 = next(line for line in lines if line.startswith("  6  GeForce RTX 4090"))
    assert "┃" in gpu6 and "20.4/24.0" in gpu6 and "97%" in gpu6 and "87°C" in gpu6
    assert "450/450" in gpu6 and "1875/3120" in gpu6 and "sw_power_cap, hw_thermal_slowdown" in gpu6
    gpu0 = next(line for line in lines if line.startswith("  0  GeForce RTX 4090"))
    bar = gpu0.split("GeForce RTX 4090")[1].strip().split(" ")[0]
    assert len(bar) == 50 and bar.index("┃") == int(
        19.92 / 23.99 * 50
    )  # the mark is where 19.9 GiB is
    assert bar.count("█") > bar.count("░")
    # processes with their command lines
    assert "41006  ana" in text and "-m zeroplan.launch.sft --local_rank=6 --plan plan.json" in text
    assert "host CPU 38% of 32 cores · load 9.1 · RAM 71.0/125.0 GiB · swap 0.0/8.0 GiB" in text
    # training: step, ETA, loss sparkline, eval, lr, tokens/s against the plan, ranks
    assert (
        "step 40/400" in text and "10%" in text and "ETA 36m00s" in text and "6.00 s/step" in text
    )
    loss_line = next(line for line in lines if line.startswith("loss "))
    assert "▁" in loss_line and "█" in loss_line and "eval 1.6100" in loss_line
    assert "lr 2.00e-04" in loss_line
    assert "tokens/s 8,828 (plan 10,034)" in text
    # a plan whose step the host sets says so beside its speed
    bound = recorded_view()
    assert bound.prediction is not None
    bound = dataclasses.replace(
        bound, prediction=dataclasses.replace(bound.prediction, host_bound=True)
    )
    assert "tokens/s 8,828 (plan 10,034, host-bound)" in screen(bound, 200)
    # and how close 9 in 10 held-out predictions of such steps came (plan.json error_p90)
    banded = dataclasses.replace(
        bound, prediction=dataclasses.replace(bound.prediction, error_p90=0.196)
    )
    assert "tokens/s 8,828 (plan 10,034 ±20%, host-bound)" in screen(banded, 200)
    rank3 = next(line for line in lines if line.strip().startswith("3    10"))
    assert "3m02s ago" in rank3 and "15.2 / 15.6" in rank3
    assert "1 unreadable metrics lines skipped" in text


def test_padding_share_is_shown_next_to_tokens_per_s() -> None:
    # the plan counts full-length sequences; the ranks count real tokens: the padding share
    # says how much of the gap is padding
    assert parse_record('{"t": 1, "rank": 0, "step": 1, "padding": 0.25}') == (
        MetricRecord(t=1.0, rank=0, step=1, padding=0.25)
    )
    log = TrainingLog(os.devnull)
    log.add(MetricRecord(t=1.0, rank=0, step=1, tokens_per_s=900.0, padding=0.25))
    log.add(MetricRecord(t=1.0, rank=1, step=1, tokens_per_s=800.0, padding=0.4))
    tr = log.view()
    assert tr is not None and tr.padding == 0.25  # the lead rank's
    view = recorded_view()
    text = screen(DashboardView(view.snapshot, tr, view.prediction, ()), 200)
    assert "tokens/s 1,700 (plan 10,034) · 25% padding" in text
    # how the ranks make their batches (applied.json's choice) is shown beside it
    line = '{"t": 2, "rank": 0, "step": 2, "padding": 0.02, "batching": "packed, varlen attention"}'
    log.add(parse_record(line) or MetricRecord(t=0, rank=0, step=0))
    tr = log.view()
    text = screen(DashboardView(view.snapshot, tr, view.prediction, ()), 200)
    assert "· 2% padding · packed, varlen attention" in text


def test_recorded_run_at_80_columns_keeps_the_essentials() -> None:
    text = screen(recorded_view(), 80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "memory ┃=19.9 GiB" in text
    gpu5 = next(line for line in lines if line.startswith("  5  RTX 4090"))
    assert "┃" in gpu5 and "23.2/24.0" in gpu5 and "97%" in gpu5
    # clocks and throttle reasons: only on wide screens; here the alert says it
    gpu6 = next(line for line in lines if line.startswith("  6  RTX 4090"))
    assert "1875" not in gpu6 and "hw_thermal" not in gpu6
    assert "CRIT GPU 6: throttled: sw_power_cap, hw_thermal_slowdown" in text
    assert "step 40/400" in text and "tokens/s 8,828" in text
    assert "plan: meta-llama/Llama-3.1-8B-Instruct on 8×RTX-4090" in text
    # commands: without the program's path, cut at the edge, not wrapped
    assert "  python -u -m zeroplan.launch.sft --local_rank=0 --plan …" in text
    assert sum("ago" in line for line in lines) == 8


def test_no_gpu_screen_still_shows_training() -> None:
    view = recorded_view()
    import dataclasses

    snap = Snapshot(
        t=view.snapshot.t,
        gpus=(),
        host=None,
        gpu_error="No NVIDIA GPU data: NVML says 'NVML Shared Library Not Found' (no NVIDIA driver here?)",
    )
    nogpu = dataclasses.replace(view, snapshot=snap, alerts=())
    for width in (80, 200):
        text = screen(nogpu, width)
        assert "No NVIDIA GPU data" in text and "training panel below still works" in text
        assert "step 40/400" in text and "GPU  name" not in text
    assert "no GPU data" in plain_lines(nogpu)[0]


def test_plain_lines_for_logs() -> None:
    lines = plain_lines(recorded_view())
    first = lines[0]
    assert "step 40/400" in first and "tok/s 8,828" in first and "ETA 36m00s" in first
    assert "GPU GiB 20.1 20.2 20.2 20.3 20.3 23.2 20.4 20.5 of 24.0 (pred 19.9)" in first
    assert "CPU 38% RAM 71.0/125.0 GiB" in first
    assert any("ALERT CRIT rank 3: no metric" in line for line in lines[1:])
    assert all("\n" not in line for line in lines)


def test_view_json_is_strict_json() -> None:
    view = recorded_view()
    data = json.loads(json.dumps(view_json(view), allow_nan=False))
    assert len(data["gpus"]) == 8 and data["gpus"][6]["throttle_reasons"] == [
        "sw_power_cap",
        "hw_thermal_slowdown",
    ]
    assert data["prediction"]["device_used_bytes"] == view.prediction.device_used_bytes  # type: ignore[union-attr]
    assert data["training"]["step"] == 40 and len(data["training"]["ranks"]) == 8
    assert {a["kind"] for a in data["alerts"]} == {
        "card_full",
        "over_prediction",
        "throttle",
        "hang",
    }


# -- the command -----------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    return run


def test_watch_once_json_through_click(run_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["watch", str(run_dir), "--once", "--json", "--fake-gpus", "8"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [g["gpu"] for g in data["gpus"]] == list(range(8))
    assert data["gpu_error"] is None and data["training"]["step"] == 40
    assert data["prediction"]["world_size"] == 8
    assert data["host"]["ram_total_bytes"] > 0
    assert any(a["kind"] == "hang" for a in data["alerts"])  # the recording is old by now
    # --once does record its one sample
    rows = (run_dir / "gpu_samples.jsonl").read_text().splitlines()
    assert len(rows) == 16 + 8


def test_watch_once_screen_without_a_driver(run_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["watch", str(run_dir), "--once", "--no-record"], env={"COLUMNS": "100"}
    )
    assert result.exit_code == 0, result.output
    if "No NVIDIA GPU data" not in result.output:
        pytest.skip("this machine has NVIDIA GPUs")
    assert "training panel below still works" in result.output
    assert "step 40/400" in result.output and "Traceback" not in result.output


def test_watch_once_plain_and_gpu_selection(run_dir: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "watch",
            str(run_dir),
            "--once",
            "--plain",
            "--fake-gpus",
            "8",
            "--gpus",
            "1,3",
            "--no-record",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("[") and "GPU GiB " in result.output
    assert result.output.splitlines()[0].count("/") >= 1
    data = json.loads(
        CliRunner()
        .invoke(cli, ["watch", "--once", "--json", "--fake-gpus", "8", "--gpus", "1,3"])
        .output
    )
    assert [g["gpu"] for g in data["gpus"]] == [1, 3] and data["training"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["watch", "no/such/run"], "run folder no/such/run does not exist"),
        (["watch", "--interval", "0"], "--interval 0 is out of range"),
        (["watch", "--interval", "99999"], "--interval 99999 is out of range"),
        (["watch", "--gpus", "a,b"], "--gpus 'a,b' is not a list of GPU indices"),
        (["watch", "--hang-after", "-5"], "--hang-after -5 must be a positive"),
        (["report", "no/such/run"], "run folder no/such/run does not exist"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("zeroplan: error: ") and message in err


def test_ctrl_c_in_watch_exits_130_without_a_traceback(run_dir: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zeroplan.commands.cli",
            "watch",
            str(run_dir),
            "--fake-gpus",
            "2",
            "--interval",
            "0.2",
            "--plain",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it, even when this test runs as a background job
        # (a shell without job control starts those with SIGINT ignored, which a child keeps)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the dashboard is running
    assert "step 40/400" in first
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip() == "zeroplan: interrupted"
    assert not (run_dir / "watch_errors.log").exists()


def test_watch_is_imported_lazily() -> None:
    """`zeroplan estimate` / `plan` must not pay for NVML, psutil, matplotlib or rich.live."""
    code = (
        "import sys, zeroplan.commands.cli; "
        "bad = [m for m in ('matplotlib', 'psutil', 'pynvml', 'rich.live', 'zeroplan.watch.monitor', "
        "'zeroplan.watch.loop', 'zeroplan.watch.report', 'torch') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the loop: recording, launcher use, and a dashboard that keeps going ----------------------


def _run_in_thread(**kwargs: Any) -> tuple[threading.Event, threading.Thread, dict[str, int]]:
    stop = threading.Event()
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.update(n=run_dashboard(stop_event=stop, **kwargs))
    )
    thread.start()
    return stop, thread, result


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_run_dashboard_records_samples_and_prints_plain_lines(run_dir: Path) -> None:
    out = io.StringIO()
    stop, thread, result = _run_in_thread(
        run_dir=run_dir, interval=0.05, mode="plain", stream=out, plain_every_s=0.0, fake_gpus=8
    )
    gpu_file = run_dir / "gpu_samples.jsonl"
    _wait_for(lambda: gpu_file.read_text().count("\n") >= 16 + 8 * 3)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and result["n"] >= 3
    rows = [json.loads(line) for line in gpu_file.read_text().splitlines()[16:]]
    assert {r["gpu"] for r in rows} == set(range(8)) and all(r["host"] for r in rows)
    assert all(isinstance(r["processes"], list) for r in rows)
    assert (run_dir / "host_samples.jsonl").read_text().count("\n") >= 1 + 3
    assert out.getvalue().count("step 40/400") >= 3
    assert not (run_dir / "watch_errors.log").exists()


def test_second_dashboard_on_a_run_does_not_record_twice(run_dir: Path) -> None:
    first = SampleRecorder(run_dir)
    second = SampleRecorder(run_dir)
    try:
        assert first.active and not second.active and second.holder == f"pid {os.getpid()}"
        view = watch_once(run_dir, fake_gpus=2, record=True)
        assert any("another dashboard" in note for note in view.notes)
    finally:
        first.close()
        second.close()
    third = SampleRecorder(run_dir)
    assert third.active  # the lock went with the first
    third.close()


def test_a_run_folder_it_cannot_write_is_watched_without_recording(run_dir: Path) -> None:
    (run_dir / ".watch.lock").mkdir()  # cannot be opened for writing, even by root
    view = watch_once(run_dir, fake_gpus=1, record=True)
    assert any(note.startswith(f"not recording: cannot write to {run_dir}") for note in view.notes)
    assert view.training is not None and view.training.step == 40
    assert not (run_dir / "host_samples.jsonl").read_text().count("\n") > 1


class _Exploding:
    """A backend that fails every other sample."""

    def __init__(self) -> None:
        self.calls = 0
        self.fake = FakeBackend([FakeGPU(throttle_mask=0x40)])

    def sample(self) -> list[GPUSample]:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("NVML went away")
        return self.fake.sample()

    def close(self) -> None:
        raise OSError("and cannot close either")


def test_a_failing_sampler_never_stops_the_loop(run_dir: Path) -> None:
    backend = _Exploding()
    out = io.StringIO()
    stop, thread, result = _run_in_thread(
        run_dir=run_dir, interval=0.02, mode="plain", stream=out, plain_every_s=0.0, backend=backend
    )
    _wait_for(lambda: backend.calls >= 6)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and result["n"] >= 2
    log = (run_dir / "watch_errors.log").read_text()
    assert "sampling failed (#1)" in log and "RuntimeError: NVML went away" in log
    assert "closing the samplers failed" in log
    assert "ALERT CRIT GPU 0: throttled: hw_thermal_slowdown" in out.getvalue()


def test_a_broken_live_screen_falls_back_to_plain_lines(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zeroplan.watch.loop as watch_module

    def broken(view: DashboardView, width: int) -> Any:
        raise KeyError("bad layout")

    monkeypatch.setattr(watch_module, "render", broken)
    out = io.StringIO()
    stop, thread, _ = _run_in_thread(
        run_dir=run_dir, interval=0.02, mode="live", stream=out, plain_every_s=0.0, fake_gpus=2
    )
    _wait_for(lambda: out.getvalue().count("step 40/400") >= 2)
    stop.set()
    thread.join(timeout=10)
    text = out.getvalue()
    assert "the live dashboard failed (KeyError('bad layout')); plain lines follow" in text
    assert "drawing the live screen failed" in (run_dir / "watch_errors.log").read_text()


def test_live_screen_draws_and_uses_the_launchers_exit_codes(run_dir: Path) -> None:
    out = io.StringIO()
    stop, thread, _ = _run_in_thread(
        run_dir=run_dir,
        interval=0.02,
        mode="live",
        stream=out,
        width=120,
        fake_gpus=2,
        rank_exit_codes=lambda: {0: None, 1: 1},
    )
    _wait_for(lambda: "rank 1: exited with status 1" in out.getvalue())
    stop.set()
    thread.join(timeout=10)
    assert "predicted peak 19.9 GiB" in out.getvalue()
    assert not (run_dir / "watch_errors.log").exists()


def test_run_dashboard_survives_a_bad_plan_and_a_missing_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text("{oops")
    out = io.StringIO()
    stop, thread, _ = _run_in_thread(
        run_dir=run, interval=0.02, mode="plain", stream=out, fake_gpus=1
    )
    _wait_for(lambda: "no metrics yet" in out.getvalue())
    stop.set()
    thread.join(timeout=10)
    gone = tmp_path / "gone"
    stop = threading.Event()
    stop.set()
    assert run_dashboard(gone, stop, mode="plain", stream=io.StringIO(), fake_gpus=1) == 0
    assert not gone.exists()


def test_multi_line_commands_stay_on_one_row() -> None:
    from zeroplan.watch.dashboard import short_command

    cmd = "/usr/bin/python3 -c \nimport torch\nx = 1\n"
    assert short_command(cmd) == "python3 -c import torch x = 1"


# -- a finished run is read-only; one recorder for a live one; no lock left behind -----------


def _end_every_rank(run_dir: Path, t: float = 1767000300.0) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write("\n")  # the recording ends in a cut line
        for rank in range(8):
            f.write(json.dumps({"t": t, "rank": rank, "step": 41, "event": "end"}) + "\n")


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("how", ["end events", "launch result"])
def test_watching_a_finished_run_writes_nothing_into_it(run_dir: Path, how: str) -> None:
    if how == "end events":
        _end_every_rank(run_dir)
    else:
        (run_dir / "launch.json").write_text(json.dumps({"result": {"exit_code": 0}}))
    before = _snapshot(run_dir)
    result = CliRunner().invoke(
        cli, ["watch", str(run_dir), "--once", "--json", "--fake-gpus", "8"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # ranks log `end` however they stop: only launch.json's result says it completed
    status = "ended" if how == "end events" else "completed"
    assert data["status"] == status
    assert any(n.startswith("not recording: the run has ended (") for n in data["notes"])
    assert _snapshot(run_dir) == before  # no samples appended, no .watch.lock
    # a dashboard left running on it does not record either
    out = io.StringIO()
    stop, thread, _ = _run_in_thread(
        run_dir=run_dir, interval=0.02, mode="plain", stream=out, plain_every_s=0.0, fake_gpus=2
    )
    time.sleep(0.2)
    stop.set()
    thread.join(timeout=10)
    assert _snapshot(run_dir) == before


def test_a_live_run_is_recorded_by_one_dashboard_and_its_lock_removed(run_dir: Path) -> None:
    view = watch_once(run_dir, fake_gpus=2, record=True)
    assert any(note.startswith("recording to") for note in view.notes)
    assert (run_dir / "gpu_samples.jsonl").read_text().count("\n") == 16 + 2
    assert not (run_dir / ".watch.lock").exists()  # removed at exit
    first = SampleRecorder(run_dir)
    second = SampleRecorder(run_dir)
    assert first.active and not second.active
    assert (run_dir / ".watch.lock").read_text() == str(os.getpid())
    first.close()
    second.close()
    assert not (run_dir / ".watch.lock").exists()


def test_the_lock_of_a_dead_dashboard_is_taken_over(run_dir: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (run_dir / ".watch.lock").write_text(dead.stdout.strip())  # its flock died with it
    recorder = SampleRecorder(run_dir)
    try:
        assert recorder.active and recorder.holder is None
        assert (run_dir / ".watch.lock").read_text() == str(os.getpid())
    finally:
        recorder.close()
    assert not (run_dir / ".watch.lock").exists()


def test_a_resumed_run_is_not_finished_while_it_starts(run_dir: Path) -> None:
    from zeroplan.watch.runlog import run_state

    _end_every_rank(run_dir, t=time.time() - 60)  # the first session ended a minute ago
    assert run_state(run_dir).finished
    (run_dir / "launch.json").write_text(json.dumps({"commands": []}))  # --resume started
    state = run_state(run_dir)
    assert not state.finished and state.session_start is not None
    view = watch_once(run_dir, fake_gpus=1, record=False)
    assert view.training is not None and not view.training.finished
    # the launcher's own dashboard never reads the old end lines as this session's
    stop, thread, _ = _run_in_thread(
        run_dir=run_dir,
        interval=0.02,
        mode="json",
        stream=(out := io.StringIO()),
        fake_gpus=1,
        rank_exit_codes=lambda: dict.fromkeys(range(8)),
    )
    _wait_for(lambda: out.getvalue().count("\n") >= 1)
    stop.set()
    thread.join(timeout=10)
    first = json.loads(out.getvalue().splitlines()[0])
    assert first["training"]["finished"] is False


# -- how a run ended: completed, stopped, failed, diverged --------------------------------


def _ended_launch(run_dir: Path, result: dict[str, Any], rank0: dict[str, Any] | None) -> None:
    """launch.json with the launch's result, and rank 0's result.json of that session."""
    began = time.time() - 30
    record = {"commands": [], "started": began, "ended": began + 20, "result": result}
    (run_dir / "launch.json").write_text(json.dumps(record))
    if rank0 is not None:
        (run_dir / "result.json").write_text(json.dumps(rank0))


def _once(run_dir: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["watch", str(run_dir), "--once", *args, "--fake-gpus", "1"])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_stopped_run_reads_as_stopped_not_finished(run_dir: Path) -> None:
    """Ctrl-C at step 11 of 300: every rank logs `end` on the way out, and watch said
    "finished"."""
    _end_every_rank(run_dir)
    stop = {"exit_code": 130, "reason": "interrupted", "failed_rank": None, "ranks": {}}
    _ended_launch(run_dir, stop, {"status": "interrupted", "global_step": 41, "signal": "SIGTERM"})
    data = json.loads(_once(run_dir, "--json"))
    assert (data["status"], data["outcome"]) == ("stopped", "stopped by SIGINT at step 41")
    plain = _once(run_dir, "--plain")
    assert "stopped by SIGINT at step 41" in plain and "finished" not in plain
    assert "· stopped by SIGINT at step 41" in _once(run_dir)


def test_a_failed_run_says_so_and_alerts(run_dir: Path) -> None:
    """A rank killed with -9: launch.json said exit 1, "rank failed"; watch said "the run
    has finished", without an alert."""
    failed = {"exit_code": 1, "reason": "rank failed", "failed_rank": 0, "ranks": {"0": -9}}
    failed["message"] = "rank 0 failed (killed by SIGKILL) on node0"
    _ended_launch(run_dir, failed, None)
    data = json.loads(_once(run_dir, "--json"))
    assert data["status"] == "failed"
    (alert,) = [a for a in data["alerts"] if a["kind"] == "run_failed"]
    assert alert["level"] == "crit"
    assert alert["message"] == "failed: rank 0 failed (killed by SIGKILL) on node0"
    assert "ALERT CRIT run: failed: rank 0 failed (killed by SIGKILL)" in _once(run_dir, "--plain")
    # a rank that failed because the loss diverged: result.json says which step
    _ended_launch(run_dir, failed, {"status": "diverged", "global_step": 2})
    assert json.loads(_once(run_dir, "--json"))["outcome"] == "diverged at step 2 (loss not finite)"


def test_an_earlier_sessions_result_is_not_this_ones(run_dir: Path) -> None:
    from zeroplan.watch.runlog import run_state

    (run_dir / "result.json").write_text(json.dumps({"status": "interrupted", "global_step": 9}))
    old = time.time() - 3600
    os.utime(run_dir / "result.json", (old, old))  # the stop before this --resume
    done = {"exit_code": 0, "reason": "done", "failed_rank": None, "ranks": {"0": 0}}
    _ended_launch(run_dir, done, None)
    os.utime(run_dir / "result.json", (old, old))
    state = run_state(run_dir)
    assert (state.status, state.outcome) == ("completed", "completed")


def test_ranks_on_the_cpu_are_not_held_to_the_plans_gpu_numbers(run_dir: Path) -> None:
    """launch --force without a GPU: watch compared CPU tokens/s with the GPU plan
    ("plan 10,034 ±34%") where report said "not compared", and showed "- / 14.6" peaks."""
    (run_dir / "applied.json").write_text(json.dumps({"device": "cpu"}))
    text = _once(run_dir, "--no-record")
    assert "(plan 10,034 on GPUs: not compared on the CPU)" in text
    assert "peak alloc / pred" not in text and " / 15.6" not in text
    assert json.loads(_once(run_dir, "--json", "--no-record"))["trained_on_cpu"] is True


def test_a_plan_folder_is_not_watched_into(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`zeroplan watch PLANFOLDER --once` recorded gpu_samples.jsonl beside the plan."""
    folder = tmp_path / "plan"
    folder.mkdir()
    shutil.copy(RECORDED / "plan.json", folder / "plan.json")
    (folder / "launch.sh").write_text("#!/bin/sh\n")
    for command in ("watch", "report"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, str(folder), *(["--once"] if command == "watch" else [])])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"zeroplan: error: {folder} holds a plan, not a run")
        assert err.count("\n") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["launch.sh", "plan.json"]


def test_a_watched_run_that_ends_says_how(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`zeroplan watch RUN` left running while the run ends asks the folder again."""
    from zeroplan.watch import loop

    monkeypatch.setattr(loop, "STATE_EVERY_S", 0.0)
    (run_dir / "launch.json").write_text(json.dumps({"commands": []}))  # a live launch
    collector = loop.open_collector(run_dir, fake_gpus=1, record=False)
    try:
        assert collector.collect().status == "running"
        stop = {"exit_code": 143, "reason": "interrupted", "failed_rank": None, "ranks": {}}
        _ended_launch(run_dir, stop, None)
        view = collector.collect()
    finally:
        collector.close()
    assert (view.status, view.outcome) == ("stopped", "stopped by SIGTERM")


def test_a_watched_run_that_ends_is_not_called_hung(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the folder says the run is over, its quiet ranks are not hung or gone: the
    collector read that only when it started, so a run that ended while watched kept
    its silent-rank alerts."""
    from zeroplan.watch import loop

    monkeypatch.setattr(loop, "STATE_EVERY_S", 0.0)
    (run_dir / "launch.json").write_text(json.dumps({"commands": []}))  # a live launch
    collector = loop.open_collector(run_dir, fake_gpus=1, record=False, hang_after_s=1.0)
    try:
        live = collector.collect()
        stop = {"exit_code": 143, "reason": "interrupted", "failed_rank": None, "ranks": {}}
        _ended_launch(run_dir, stop, None)
        ended = collector.collect()
    finally:
        collector.close()
    quiet = {"hang", "node_silent", "not_reporting", "rank_gone"}
    assert live.status == "running" and {a.kind for a in live.alerts} & quiet
    assert ended.status == "stopped" and not {a.kind for a in ended.alerts} & quiet
