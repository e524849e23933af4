"""`zeroplan report RUN`: the predicted-vs-measured table and the picture, from the recorded
8×RTX 4090 run in tests/data/watch_run (GPU 5 peaked at 23.2 GiB against 19.9 predicted)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from zeroplan.commands.cli import cli, main
from zeroplan.watch.report import load_run, peaks_kept, speed_verdict, summarize

RECORDED = Path(__file__).parent / "data" / "watch_run"
GIB = 2**30


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RECORDED, run)
    return run


def test_summary_compares_each_gpu_and_rank_with_the_plan() -> None:
    s = summarize(load_run(RECORDED))
    assert [g.gpu for g in s.gpus] == list(range(8))
    predicted = json.loads((RECORDED / "plan.json").read_text())["best"]["device_used_bytes"]
    g5 = s.gpus[5]
    assert g5.predicted_bytes == predicted and g5.measured_peak_bytes == int(23.2 * GIB)
    assert g5.error == pytest.approx(23.2 * GIB / predicted - 1) and g5.within_error is False
    assert all(g.within_error for g in s.gpus if g.gpu != 5)
    assert s.gpus[0].measured_peak_bytes == int(20.12 * GIB)  # the later, higher sample
    assert len(s.ranks) == 8 and s.ranks[0].measured_allocated_bytes == int(15.2 * GIB)
    assert s.ranks[0].error == pytest.approx(15.2 / 15.644 - 1, abs=1e-3)
    assert (s.last_step, s.total_steps) == (40, 400)
    # rank 3 fell silent after step 10: 30 of the 40 steps had 7 ranks' tokens
    assert s.tokens_per_s_median == pytest.approx(sum(1100 + r for r in range(8) if r != 3))
    assert s.predicted_tokens_per_s == pytest.approx(10034.29, abs=0.01)


def test_report_says_when_the_plans_step_is_host_bound(run_dir: Path) -> None:
    """A plan whose step the host sets (plan.json best.host_bound) is named so beside its
    speed: those steps repeat least exactly; a plan.json without the key (older plans)
    reads as not host-bound."""
    assert summarize(load_run(run_dir)).predicted_host_bound is False
    plan_file = run_dir / "plan.json"
    plan_json = json.loads(plan_file.read_text())
    plan_json["best"]["host_bound"] = True
    plan_file.write_text(json.dumps(plan_json))
    assert summarize(load_run(run_dir)).to_json()["predicted_host_bound"] is True
    result = CliRunner().invoke(cli, ["report", str(run_dir)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "(plan 10,034); the plan's step is host-bound" in result.output


def test_report_says_whether_the_speed_missed_by_more_than_held_out_predictions_did(
    run_dir: Path,
) -> None:
    """plan.json's best.error_p90 (9 in 10 predictions like it came within it on runs no
    fit saw) against the run's median speed: within it the miss is the model's usual; outside
    it the report says to look for what the model does not know. Older plans: no verdict."""
    assert summarize(load_run(run_dir)).speed_within_band is None  # the recorded plan
    plan_file = run_dir / "plan.json"
    plan_json = json.loads(plan_file.read_text())
    for band, verdict in ((0.09, False), (0.40, True)):
        plan_json["best"]["error_p90"] = band
        plan_file.write_text(json.dumps(plan_json))
        s = summarize(load_run(run_dir))
        # 10,034 planned against 7,725 measured: the plan was 30% too fast
        assert s.speed_error == pytest.approx(10034.29 / 7725 - 1, abs=1e-4)
        assert s.to_json()["speed_within_band"] is verdict
        out = CliRunner().invoke(cli, ["report", str(run_dir)], env={"COLUMNS": "400"}).output
        out = " ".join(out.split())
        assert "the plan was 30% too fast" in out
        if verdict:
            assert "within the 40% that 9 in 10 predictions like it stayed within" in out
        else:
            assert "beyond the 9% that 9 in 10 predictions like it stayed within" in out
            assert "look for what the speed model does not know" in out
    # a run faster than the plan by more than the band: the model under-rates the setup
    assert "under-rates this setup" in speed_verdict(-0.22, 0.196)
    assert speed_verdict(-0.05, 0.196).endswith(
        "within the 20% that 9 in 10 predictions like it stayed within"
    )


def test_report_compares_no_speed_where_the_ranks_trained_on_the_cpu(run_dir: Path) -> None:
    """launch --force without a GPU trains on the CPU (applied.json's device): the plan's
    speed is its GPUs', so the report gives it without a miss or a verdict."""
    plan_file = run_dir / "plan.json"
    plan_json = json.loads(plan_file.read_text())
    plan_json["best"]["error_p90"] = 0.09
    plan_file.write_text(json.dumps(plan_json))
    (run_dir / "applied.json").write_text(json.dumps({"device": "cpu"}))
    s = summarize(load_run(run_dir))
    assert s.on_cpu and s.speed_error is None and s.speed_within_band is None
    assert s.to_json()["trained_on_cpu"] is True
    out = CliRunner().invoke(cli, ["report", str(run_dir)], env={"COLUMNS": "400"}).output
    out = " ".join(out.split())
    assert "(plan 10,034 on its GPUs; not compared: the ranks trained on the CPU)" in out
    assert "too fast" not in out
    (run_dir / "applied.json").write_text(json.dumps({"device": "cuda"}))
    assert summarize(load_run(run_dir)).speed_error is not None
    (run_dir / "applied.json").write_text("{not json")  # unreadable: compared as before
    assert summarize(load_run(run_dir)).on_cpu is False


def test_report_writes_png_and_html_and_prints_the_table(run_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(run_dir)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Peak memory per GPU: predicted vs measured" in out
    row5 = next(line for line in out.splitlines() if line.strip().startswith("5 "))
    assert "19.92" in row5 and "23.20" in row5 and "+16.5%" in row5 and "NO" in row5
    assert "steps 40/400 · final loss" in out and "(plan 10,034)" in out
    png, html = run_dir / "report.png", run_dir / "report.html"
    assert f"wrote {png}, {html}" in out

    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[:2] == (1250, 1100)
    assert len({tuple(p) for p in pixels[::10, ::10].reshape(-1, pixels.shape[2])}) > 50
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 1 and "<td>+16.5%</td>" in page


def test_report_json_and_a_chosen_png_path(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "pics" / "run.png"
    result = CliRunner().invoke(
        cli, ["report", str(run_dir), "--json", "--no-html", "-o", str(target)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[: result.output.rindex("}") + 1])
    assert [g["within_error"] for g in data["gpus"]].count(False) == 1
    assert data["estimator_error"] == 0.15
    assert target.exists() and not target.with_suffix(".html").exists()


def test_report_without_a_plan_or_samples(run_dir: Path) -> None:
    (run_dir / "plan.json").unlink()
    (run_dir / "gpu_samples.jsonl").unlink()
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[: result.output.rindex("}") + 1])
    assert data["gpus"] == [] and data["ranks"][0]["predicted_allocated_bytes"] is None
    assert not (run_dir / "report.png").exists()  # --json alone prints, draws nothing


def test_report_with_nothing_recorded_is_a_user_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroplan: error: nothing to report in") and err.count("\n") == 1


def test_report_without_matplotlib_names_the_extra(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir)])
    assert exit_info.value.code == 2
    assert "pip install 'zeroplan[report]'" in capsys.readouterr().err


def test_report_json_alone_needs_no_matplotlib_and_writes_nothing(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(run_dir.iterdir())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: plain `pip install .`
    main(["report", str(run_dir), "--json"])
    assert json.loads(capsys.readouterr().out)["estimator_error"] == 0.15
    assert sorted(run_dir.iterdir()) == before


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        ("", "'-o' / '--out': is empty"),
        ("r.txt", "r.txt: the report is a PNG picture"),
        ("FILE/r.png", "is a file, not a folder"),  # its folder is a file
        ("rr.png", "rr.html: it is a folder"),  # the page's name is taken by a folder
    ],
)
def test_report_to_a_path_it_cannot_write_is_one_line_and_writes_nothing(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    out: str,
    needle: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    (tmp_path / "rr.html").mkdir()
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir), "-o", out])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroplan: error: ") and err.count("\n") == 1 and needle in err
    assert sorted(tmp_path.rglob("*")) == before  # no PNG, no hidden ./.png, no temporary


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_into_a_read_only_run_folder_is_one_line(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["report", str(run_dir)])
    finally:
        run_dir.chmod(0o755)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not writable; give -o a path in a folder you can write" in err
    assert err.count("\n") == 1


def test_report_that_fails_while_writing_leaves_neither_file(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from zeroplan.watch import report

    def disk_full(*args: object) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_html", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir), "-o", str(tmp_path / "new" / "rr.png")])
    assert exit_info.value.code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the PNG, its temporary and the folder made for it


def test_long_runs_are_thinned_for_the_picture_keeping_the_peaks() -> None:
    points = [(float(i), 1.0) for i in range(10_000)]
    points[4321] = (4321.0, 9.0)
    kept = peaks_kept(points, 3000)
    assert len(kept) <= 3000 and (4321.0, 9.0) in kept
    assert peaks_kept(points[:10], 3000) == points[:10]


def test_report_says_how_the_run_ended(run_dir: Path) -> None:
    """`report --json` had no status: a run stopped at step 11 of 300 and one that
    completed read alike."""
    assert summarize(load_run(run_dir)).to_json()["status"] == "running"  # nothing says more
    began = 1767000000.0
    stop = {"exit_code": 130, "reason": "interrupted", "failed_rank": None, "ranks": {}}
    record = {"started": began, "ended": began + 300, "result": stop}
    (run_dir / "launch.json").write_text(json.dumps(record))
    (run_dir / "result.json").write_text(json.dumps({"status": "interrupted", "global_step": 40}))
    data = summarize(load_run(run_dir)).to_json()
    assert (data["status"], data["outcome"]) == ("stopped", "stopped by SIGINT at step 40")
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--no-html"])
    assert result.exit_code == 0, result.output
    assert "stopped by SIGINT at step 40 · steps 40/400" in result.output


def test_a_resumed_runs_total_steps_are_its_latest_sessions(run_dir: Path) -> None:
    """Started with --max-steps 400, resumed with --max-steps 600: the report said 400."""
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write("\n" + json.dumps({"t": 1767000400.0, "rank": 0, "step": 41, "total_steps": 600}))
        f.write("\n")
    assert summarize(load_run(run_dir)).total_steps == 600
