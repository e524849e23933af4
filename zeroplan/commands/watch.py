"""``zeroplan watch`` and ``zeroplan report``: parse, call, render.

Imported by zeroplan.commands.cli at start-up, so only click is imported here at module level;
NVML, psutil, rich's live screen and matplotlib are imported when a command runs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import click

from zeroplan.commands.params import OutPath
from zeroplan.errors import BadWatchOptionError

MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 3600.0


def _gpu_indices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        indices = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise BadWatchOptionError(
            f"--gpus '{text}' is not a list of GPU indices such as 0,1,2"
        ) from None
    if not indices or indices[0] < 0:
        raise BadWatchOptionError(f"--gpus '{text}' is not a list of GPU indices such as 0,1,2")
    return indices


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--interval",
    type=float,
    default=1.0,
    show_default=True,
    help=f"Seconds between samples ({MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g}).",
)
@click.option("--once", is_flag=True, help="Sample once, show it and exit.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="JSON instead of the screen: one object (--once) or one per line.",
)
@click.option(
    "--plain", is_flag=True, help="Plain lines instead of the live screen (the default off a TTY)."
)
@click.option("--gpus", "gpu_list", default=None, metavar="0,1,..", help="Only these GPU indices.")
@click.option(
    "--hang-after",
    type=float,
    default=None,
    metavar="S",
    help="Call a rank hung after S silent seconds (or 3 of its steps, if longer). Default: 120.",
)
@click.option(
    "--no-record", is_flag=True, help="Do not append samples to RUN_DIR/gpu_samples.jsonl."
)
@click.option("--fake-gpus", type=int, default=None, hidden=True)
def watch(
    run_dir: Path | None,
    interval: float,
    once: bool,
    as_json: bool,
    plain: bool,
    gpu_list: str | None,
    hang_after: float | None,
    no_record: bool,
    fake_gpus: int | None,
) -> None:
    """Live GPUs and training: memory against the plan's predicted peak, utilization,
    temperature, power, clocks and throttling, processes, host CPU and RAM; with RUN_DIR
    also step, loss, learning rate, tokens/s, ETA and how long each rank has been silent.

    \b
    zeroplan watch                      # this machine's GPUs
    zeroplan watch runs/llama7x4090     # ... and the run in that folder, recorded there
    zeroplan watch runs/x --once --json

    Alerts: memory above the prediction by more than the estimator's error (15%), above
    95% of the card, a rank silent too long (hung) or gone, thermal or power throttling.
    Without an NVIDIA driver the GPU panel says so and the training panel still works.
    """
    from zeroplan.watch.alerts import DEFAULT_HANG_AFTER_S
    from zeroplan.watch.runlog import check_run_dir

    if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:
        raise BadWatchOptionError(
            f"--interval {interval:g} is out of range: give {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} seconds"
        )
    hang = DEFAULT_HANG_AFTER_S if hang_after is None else hang_after
    if not hang > 0:
        raise BadWatchOptionError(f"--hang-after {hang:g} must be a positive number of seconds")
    indices = _gpu_indices(gpu_list)
    if run_dir is not None:
        check_run_dir(run_dir)

    if once:
        from zeroplan.watch.dashboard import view_json
        from zeroplan.watch.loop import watch_once

        view = watch_once(
            run_dir,
            fake_gpus=fake_gpus,
            gpu_indices=indices,
            record=not no_record and run_dir is not None,
            hang_after_s=hang,
        )
        if as_json:
            click.echo(json.dumps(view_json(view), indent=2, allow_nan=False))
        elif plain:
            from zeroplan.watch.dashboard import plain_lines

            click.echo("\n".join(plain_lines(view)))
        else:
            from rich.console import Console

            from zeroplan.watch.dashboard import render

            console = Console()
            console.print(render(view, console.width))
        return

    from zeroplan.watch.loop import Mode, run_dashboard

    mode: Mode = "json" if as_json else "plain" if plain else "auto"
    run_dashboard(
        run_dir,
        threading.Event(),  # set by nobody: runs until Ctrl-C
        interval=interval,
        mode=mode,
        stream=sys.stdout,
        plain_every_s=interval,
        hang_after_s=hang,
        record=not no_record,
        gpu_indices=indices,
        fake_gpus=fake_gpus,
        quit_when_output_closed=True,
    )
    if not _stdout_open():
        # `zeroplan watch --json | head`: the reader left; exit quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _stdout_open() -> bool:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        return False
    return True


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=OutPath(dir_okay=False),
    default=None,
    help="Where to write the PNG (a .png path). Default: RUN_DIR/report.png; with --json, "
    "no picture unless -o is given.",
)
@click.option(
    "--html/--no-html", default=True, show_default=True, help="Also write report.html beside it."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def report(run_dir: Path, out: Path | None, html: bool, as_json: bool) -> None:
    """A picture of the run against its plan: memory per GPU over time with the predicted
    peak, loss, tokens/s, and the table of predicted vs measured peak per GPU.

    Reads RUN_DIR/plan.json, metrics.jsonl and gpu_samples.jsonl (recorded by `zeroplan
    watch` or `zeroplan launch`). The picture needs matplotlib: pip install
    'zeroplan[report]'; --json alone prints the summary and writes nothing.
    """
    from zeroplan.watch.report import (
        load_run,
        render_summary,
        report_paths,
        summarize,
        write_report,
    )

    data = load_run(run_dir)
    # --json is for scripts: it draws (and needs matplotlib) only when -o asks for a picture
    paths = report_paths(data.run_dir, out, html) if out is not None or not as_json else []
    summary = summarize(data)
    written = write_report(data, summary, paths) if paths else []
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        from rich.console import Console

        render_summary(summary, Console())
    if written:
        click.echo("wrote " + ", ".join(str(p) for p in written), err=True)
