"""What the dashboard warns about: pure functions of samples, the training log and the
plan's prediction. Each returns the alerts it finds (an empty list when all is well).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from zeroplan.watch.monitor import GPUSample
from zeroplan.watch.runlog import Prediction, TrainingView

# The estimator's stated error for what nvidia-smi shows: the caching allocator's slack
# varies between runs of the same shape, so measured nvidia-smi "used" falls up to ~15%
# either side of device_used_bytes (docs/memory.md, "How accurate it is": worst row 15.0%).
# Memory above the prediction by more than this is a real surprise, not noise.
ESTIMATOR_ERROR = 0.15

# Above this fraction of the card the next allocation spike may be an OOM (the caching
# allocator's blocks are rounded to 2 MiB and a new segment is often 20 MiB or more).
CARD_FULL_FRACTION = 0.95

# A rank that has logged nothing for this long (and for 3 of its own step times) is
# called hung; DeepSpeed's NCCL collectives otherwise wait 30 minutes before failing.
DEFAULT_HANG_AFTER_S = 120.0

# Clock-event reasons that mean lost speed, and how bad. gpu_idle, applications clocks,
# sync boost and display clocks are not problems.
THROTTLE_LEVELS: dict[str, str] = {
    "sw_power_cap": "warn",
    "hw_slowdown": "crit",
    "sw_thermal_slowdown": "crit",
    "hw_thermal_slowdown": "crit",
    "hw_power_brake_slowdown": "crit",
}

# Power capping is only a problem when it costs clock: NVML sets sw_power_cap whenever the
# board sits at its power limit, also with the SM clock at 99% of its maximum. It is
# reported when the SM clock is below this fraction of its maximum for this many samples
# in a row (at 1 Hz: seconds), and the alert says by how much.
CLOCK_LOW_FRACTION = 0.90
CLOCK_LOW_SAMPLES = 3

GIB = 2**30


@dataclass(frozen=True)
class Alert:
    """One thing a person should look at. level: ``warn`` or ``crit``."""

    level: str
    # over_prediction, card_full, throttle, hang, node_silent, not_reporting, rank_gone,
    # run_failed
    kind: str
    subject: str  # "GPU 3", "rank 2"
    message: str
    severity: float = 0.0  # orders alerts of one kind, worst first (bytes, seconds, ...)

    def line(self) -> str:
        """As one line of text: ``CRIT GPU 3: ...``."""
        return f"{self.level.upper()} {self.subject}: {self.message}"

    @property
    def key(self) -> tuple[str, str]:
        """What the alert is about, without its changing numbers."""
        return (self.kind, self.subject)


def over_prediction(gpu: GPUSample, prediction: Prediction | None) -> list[Alert]:
    """Memory used above the plan's predicted nvidia-smi peak by more than the estimator's
    error: used > device_used × (1 + ESTIMATOR_ERROR)."""
    used = gpu.memory_used_bytes
    if prediction is None or used is None:
        return []
    limit = prediction.device_used_bytes * (1 + ESTIMATOR_ERROR)
    if used <= limit:
        return []
    over = used / prediction.device_used_bytes - 1
    return [
        Alert(
            "warn",
            "over_prediction",
            f"GPU {gpu.index}",
            f"{used / GIB:.1f} GiB used, {over:.0%} above the predicted "
            f"{prediction.device_used_bytes / GIB:.1f} GiB (error ±{ESTIMATOR_ERROR:.0%})",
            over,
        )
    ]


def card_full(gpu: GPUSample) -> list[Alert]:
    """Memory used above CARD_FULL_FRACTION of the card."""
    used, total = gpu.memory_used_bytes, gpu.memory_total_bytes
    if used is None or not total or used <= CARD_FULL_FRACTION * total:
        return []
    return [
        Alert(
            "crit",
            "card_full",
            f"GPU {gpu.index}",
            f"{used / total:.0%} of the card in use ({used / GIB:.1f}/{total / GIB:.1f} GiB): "
            "close to out of memory",
            used / total,
        )
    ]


def clock_is_low(gpu: GPUSample) -> bool:
    """The SM clock below CLOCK_LOW_FRACTION of its maximum (False when either is unknown)."""
    if gpu.sm_clock_mhz is None or not gpu.sm_clock_max_mhz:
        return False
    return gpu.sm_clock_mhz < CLOCK_LOW_FRACTION * gpu.sm_clock_max_mhz


def throttling(gpu: GPUSample, low_clock_samples: int = 0) -> list[Alert]:
    """Clocks held down by power or temperature (THROTTLE_LEVELS); the worst level wins.

    Thermal and hardware slowdowns are critical at once. Power capping alone warns only
    when it costs clock: ``low_clock_samples`` (the caller's count of consecutive samples,
    this one included, with the SM clock below CLOCK_LOW_FRACTION of its maximum) has
    reached CLOCK_LOW_SAMPLES.
    """
    bad = [r for r in gpu.throttle_reasons if r in THROTTLE_LEVELS]
    if not bad:
        return []
    level = "crit" if any(THROTTLE_LEVELS[r] == "crit" for r in bad) else "warn"
    if level == "warn" and low_clock_samples < CLOCK_LOW_SAMPLES:
        return []
    detail = []
    if gpu.temperature_c is not None:
        detail.append(f"{gpu.temperature_c:.0f}°C")
    if gpu.power_w is not None and gpu.power_limit_w:
        detail.append(f"{gpu.power_w:.0f}/{gpu.power_limit_w:.0f} W")
    if gpu.sm_clock_mhz is not None and gpu.sm_clock_max_mhz:
        clock = f"SM {gpu.sm_clock_mhz}/{gpu.sm_clock_max_mhz} MHz"
        if clock_is_low(gpu):
            drop = 1 - gpu.sm_clock_mhz / gpu.sm_clock_max_mhz
            clock += f", {drop:.0%} below max"
            if low_clock_samples > 1:
                clock += f" for {low_clock_samples} samples"
        detail.append(clock)
    extra = f" ({', '.join(detail)})" if detail else ""
    return [
        Alert(
            level, "throttle", f"GPU {gpu.index}", f"throttled: {', '.join(bad)}{extra}", len(bad)
        )
    ]


def hang_threshold(hang_after_s: float, seconds_per_step: float | None) -> float:
    """Seconds of silence that mean a hang: ``hang_after_s``, or 3 steps if steps are slower."""
    return max(hang_after_s, 3 * seconds_per_step) if seconds_per_step else hang_after_s


def silent_ranks(
    training: TrainingView | None,
    now: float,
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
    world_size: int | None = None,
) -> list[Alert]:
    """Ranks whose last metric is older than :func:`hang_threshold` (a hang), and — once
    some rank has logged — ranks of ``world_size`` that never have. Ranks that logged
    ``end`` are done, not silent."""
    if training is None or training.finished:
        return []
    limit = hang_threshold(hang_after_s, training.seconds_per_step)
    alerts = []
    hosts = {r.host for r in training.ranks if r.host}
    silent_by_host: dict[str, list[int]] = {}
    for r in training.ranks:
        silent = now - r.last_t
        if r.event != "end" and silent > limit:
            where = f" on {r.host}" if r.host and len(hosts) > 1 else ""
            alerts.append(
                Alert(
                    "crit",
                    "hang",
                    f"rank {r.rank}{where}",
                    f"no metric for {silent:.0f} s (step {r.step}; limit {limit:.0f} s): hung?",
                    silent,
                )
            )
            if r.host:
                silent_by_host.setdefault(r.host, []).append(r.rank)
    if len(hosts) > 1:
        # every rank of a node silent: the node (or its link) more likely than a rank
        for host, ranks in sorted(silent_by_host.items()):
            if len(ranks) == sum(1 for r in training.ranks if r.host == host):
                alerts.append(
                    Alert(
                        "crit",
                        "node_silent",
                        f"node {host}",
                        f"all its ranks ({_ranks(sorted(ranks))}) silent: the node or its "
                        "network is down?",
                    )
                )
    first = min(r.last_t for r in training.ranks)
    if world_size and now - first > limit:
        seen = {r.rank for r in training.ranks}
        missing = [i for i in range(world_size) if i not in seen]
        if missing:
            alerts.append(
                Alert(
                    "warn",
                    "not_reporting",
                    "ranks" if len(missing) > 1 else f"rank {missing[0]}",
                    f"{_ranks(missing)} of {world_size} never logged a metric",
                )
            )
    return alerts


def gone_ranks(
    training: TrainingView | None,
    exit_codes: Mapping[int, int | None] | None = None,
    alive_pids: Iterable[int] | None = None,
    this_host: str | None = None,
) -> list[Alert]:
    """Ranks that stopped without logging ``end``.

    ``exit_codes`` (from the launcher: rank -> exit status, None while running) is the
    authority; without it a rank that logged its ``pid`` on ``this_host`` is gone when
    that pid is not in ``alive_pids``.
    """
    ended = {r.rank for r in training.ranks if r.event == "end"} if training else set()
    alerts = []
    if exit_codes is not None:
        for rank, code in sorted(exit_codes.items()):
            if code is None or (code == 0 and rank in ended):
                continue
            how = f"exited with status {code}" if code else "exited without logging 'end'"
            alerts.append(Alert("crit", "rank_gone", f"rank {rank}", how))
        return alerts
    if training is None or alive_pids is None:
        return []
    alive = set(alive_pids)
    for r in training.ranks:
        if r.rank in ended or r.pid is None or (r.host is not None and r.host != this_host):
            continue
        if r.pid not in alive:
            alerts.append(
                Alert(
                    "crit",
                    "rank_gone",
                    f"rank {r.rank}",
                    f"process {r.pid} is gone (last step {r.step}, no 'end')",
                )
            )
    return alerts


def all_alerts(
    gpus: Iterable[GPUSample],
    prediction: Prediction | None,
    training: TrainingView | None,
    now: float,
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
    exit_codes: Mapping[int, int | None] | None = None,
    alive_pids: Iterable[int] | None = None,
    this_host: str | None = None,
    low_clock_samples: Mapping[int, int] | None = None,
    run_finished: bool = False,
    run_failed: str | None = None,
) -> list[Alert]:
    """Every alert, critical first, then by GPU / rank order of discovery.

    ``low_clock_samples``: per GPU index, consecutive samples with a low SM clock (see
    :func:`throttling`). ``run_finished``: the run folder says the run is over, so no rank
    is hung, missing or gone. ``run_failed``: how a run that is over failed or diverged
    (runlog.RunState.outcome), one critical alert: its ranks are no longer there to be
    called gone.
    """
    alerts: list[Alert] = []
    if run_failed:
        alerts.append(Alert("crit", "run_failed", "run", run_failed))
    streaks = low_clock_samples or {}
    for g in gpus:
        alerts += card_full(g) + over_prediction(g, prediction)
        alerts += throttling(g, streaks.get(g.index, int(clock_is_low(g))))
    world = prediction.world_size if prediction else None
    if not run_finished:
        alerts += silent_ranks(training, now, hang_after_s, world)
        alerts += gone_ranks(training, exit_codes, alive_pids, this_host)
    return sorted(alerts, key=lambda a: a.level != "crit")


def merged_lines(alerts: Iterable[Alert]) -> list[str]:
    """Alerts for a screen: one line per level and kind, the worst one's message, the
    other subjects named (``WARN GPU 1 (also GPU 0, 2, 3): ...``)."""
    groups: dict[tuple[str, str], list[Alert]] = {}
    for a in alerts:
        groups.setdefault((a.level, a.kind), []).append(a)
    lines = []
    for (_level, _kind), group in groups.items():
        worst = max(group, key=lambda a: a.severity)
        others = [a.subject for a in group if a is not worst]
        if not others:
            lines.append(worst.line())
            continue
        noun = worst.subject.split(" ")[0]
        names = [o.split(" ", 1)[-1] if o.startswith(noun + " ") else o for o in others]
        shown = ", ".join(names[:6]) + (f" +{len(names) - 6}" if len(names) > 6 else "")
        lines.append(
            f"{worst.level.upper()} {worst.subject} (also {noun} {shown}): {worst.message}"
        )
    return lines


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8])) + (" …" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"
