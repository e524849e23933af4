"""Print, in a few lines each, what a GPU call's runs measured and where their steps' time
went: every results row (its run, real tokens/s, the prediction) and every host probe
(benchmarks/host_probe: a row's ``probe`` or a probe-*.json file): GPU milliseconds per
step by kind of kernel, the top kernels, and the host's memcpy calls by the operators that
made them. The call's files may not all come back (the device returns eight); this output
does, in the call's printed tail.

    python benchmarks/probe_summary.py $OUT/*.jsonl $OUT/probe-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def probe_lines(name: str, probe: dict[str, Any], top: int = 12) -> list[str]:
    """The probe's profile in a few lines (empty when it has none), then the operators that
    read GPU values on the host in its watched step (HostReads)."""
    reads = [
        f"    host read {n:6.0f}/step  {where[:160]}"
        for where, n in (probe.get("host_reads_per_step") or {}).items()
    ]
    prof = probe.get("profile") or {}
    if not prof:
        return [f"  probe {name}:", *reads] if reads else []
    busy = prof.get("gpu_busy_s_per_step", 0.0)
    out = [
        f"  probe {name}: wall {prof.get('wall_s_per_step', 0):.3f} s/step (profiled), "
        f"GPU busy {busy:.3f} s, kernels {prof.get('kernels_per_step', 0):.0f}, "
        f"launches {prof.get('launch_calls_per_step', 0):.0f}",
        f"    ms/step by kind: {prof.get('gpu_ms_per_step_by_kind')}",
    ]
    for k in prof.get("top_gpu", [])[:top]:
        out.append(
            f"    {k['ms_per_step']:8.3f} ms  {k['calls_per_step']:6.0f}×  {k['kernel'][:90]}"
        )
    for chain, n in (prof.get("memcpy_callers_per_step") or {}).items():
        out.append(f"    memcpy {n:6.1f}/step  {chain[:150]}")
    for row in prof.get("copy_kernel_callers_per_step") or []:
        out.append(
            f"    copy kernels {row['ms_per_step']:7.3f} ms {row['calls_per_step']:6.0f}×  "
            f"{row['caller'][:140]}"
        )
    return out + reads


def summarise(paths: list[Path]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if not path.exists():
            continue
        if path.suffix == ".json":
            try:
                out += probe_lines(path.stem, json.loads(path.read_text()))
            except (ValueError, KeyError) as exc:
                out.append(f"{path.name}: unreadable ({exc})")
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            tps = row.get("tokens_per_s")
            pred = row.get("predicted_tokens_per_s")
            out.append(
                f"{path.stem}/{row.get('run')}: "
                + (f"{tps:,.0f} tok/s" if tps else f"no speed ({row.get('skipped', '')})")
                + (f", predicted {pred:,.0f}" if pred else "")
                + (f", peak share {row['peak_share']:.1%}" if row.get("peak_share") else "")
            )
            if isinstance(row.get("probe"), dict):
                out += probe_lines(str(row.get("run")), row["probe"])
    return out


if __name__ == "__main__":
    print("\n".join(summarise([Path(p) for p in sys.argv[1:]])))
