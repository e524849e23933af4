"""Compare zeroplan's estimate with every measured row in benchmarks/results/memory_*.jsonl
and the memory rows of edges_*.jsonl (issue 30's edges: ZeRO-3 under a plain DeepSpeed
engine loop with and without ``zero.Init``, foreach AdamW under ZeRO-1/2, Gemma 3).

    python benchmarks/accuracy.py [FILES...] [--markdown] [--json]
    python benchmarks/accuracy.py --speed      # edges_*.jsonl's timed steps against speed.py

For each row that ran, the error of the estimated peak allocated (and reserved, and
nvidia-smi used) against the measurement; for every row, OOM or not, whether the
fits/does-not-fit verdict was right. Rows measured under
``torch.cuda.set_per_process_memory_fraction`` (an imitated smaller card) are judged on the
allocator's cap: the estimate's reserved peak against fraction × total memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zeroplan.errors import ModelNotFoundError
from zeroplan.hardware import DEFAULT_CPU_CORES_PER_GPU, Cluster, gpu_from_nvml_name
from zeroplan.memory import MemoryEstimate, estimate
from zeroplan.memory.overhead import PRESSURE_FRACTION
from zeroplan.models import load_model
from zeroplan.trainsetup import TrainSetup, parse_targets

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def setup_of(row: dict[str, Any]) -> TrainSetup:
    zero_cfg = (row.get("ds_config") or {}).get("zero_optimization", {})
    loop = row.get("loop", "trainer")  # rows from before the loop switches: the trainer's
    if row.get("zero_init") and loop == "plain":
        # the plain loop's switches with a model built inside zero.Init (the trainer's way):
        # TrainSetup.zero_init follows the loop, the other three are explicit below
        loop = "trainer"
    # what DeepSpeed did when the row's config left overlap_comm out: on at stage 3 only
    overlap = zero_cfg.get("overlap_comm", row["zero"] == 3)
    return TrainSetup(
        grad_accum=row.get("grad_accum", 1),
        overlap_comm=overlap,
        method=row["method"],
        micro_batch=row["micro_batch"],
        seq_len=row["seq_len"],
        zero=row["zero"],
        grad_ckpt=row["grad_ckpt"],
        lora_r=row["lora_r"],
        lora_targets=parse_targets(row["lora_targets"]),
        lora_dropout=row["lora_dropout"],
        # DeepSpeed's own CPU Adam (speed_grid.py --ds-adam) is what --offload brings
        optim="adamw" if row["optim"] == "deepspeed_cpu_adam" else row["optim"],
        offload=row.get("offload", "none"),
        attn=row["attn"],
        fused_loss=row["fused_loss"],
        loop=loop,
        autocast=row.get("autocast"),
        keep_outputs=row.get("keep_outputs"),
        precision=row.get("precision", ""),
    )


def cluster_of(row: dict[str, Any]) -> Cluster:
    env = row["env"]
    gpu = gpu_from_nvml_name(env["gpu"], env["gpu_total_bytes"])
    if row.get("memory_fraction"):
        gpu = dataclasses.replace(
            gpu, memory_bytes=int(env["gpu_total_bytes"] * row["memory_fraction"])
        )
    if row.get("p2p") is False:  # run with NCCL_P2P_DISABLE=1 (speed_grid.py records it)
        gpu = dataclasses.replace(gpu, p2p=False)
    world = row["world_size"]
    return Cluster(gpu=gpu, gpus_per_node=world, cpu_cores_per_node=omp_threads(row) * world)


def omp_threads_set(row: dict[str, Any]) -> int | None:
    """The OpenMP threads a row recorded: speed_grid.py's ``omp_threads``, or a tag ``ompN``
    (a run under ``OMP_NUM_THREADS=N``); None for older rows."""
    if row.get("omp_threads"):
        return int(row["omp_threads"])
    tag = row.get("tag") or ""
    return int(tag[3:]) if tag.startswith("omp") and tag[3:].isdigit() else None


def omp_threads(row: dict[str, Any]) -> int:
    """The OpenMP threads each rank of a row ran with (what CPU Adam spreads over): recorded
    (omp_threads_set), else torchrun's default for several processes (1), else the cores
    the process could use."""
    if (threads := omp_threads_set(row)) is not None:
        return threads
    if row.get("world_size", 1) > 1:
        return 1
    return int(row.get("env", {}).get("cpu_usable") or DEFAULT_CPU_CORES_PER_GPU)


def verdict_right(row: dict[str, Any], est: MemoryEstimate) -> bool:
    if row.get("memory_fraction"):
        # The allocator refuses past fraction × total; the CUDA context is outside that cap.
        predicted_fit = est.peak_allocated_bytes * (1 + PRESSURE_FRACTION) <= est.gpu_memory_bytes
    else:
        predicted_fit = est.fits
    return predicted_fit == (not row["oom"])


def compare(row: dict[str, Any]) -> dict[str, Any]:
    est = estimate(load_model(row["model"]), cluster_of(row), setup_of(row))
    out: dict[str, Any] = {
        "model": row["model"].split("/")[-1],
        "method": row["method"],
        "mb": row["micro_batch"],
        "seq": row["seq_len"],
        "ckpt": row["grad_ckpt"],
        "zero": row["zero"],
        "world": row["world_size"],
        "extra": " ".join(
            x
            for x in (
                row["optim"] if row["optim"] not in ("adamw", "adamw_torch_fused") else "",
                "plain loop" if row.get("loop") == "plain" else "",
                "no-autocast"
                if row.get("loop") != "plain" and row.get("autocast") is False
                else "",
                "keep" if row.get("loop") != "plain" and row.get("keep_outputs") else "",
                row["attn"] if row["attn"] != "sdpa" else "",
                "fused" if row["fused_loss"] else "",
                row["lora_targets"]
                if row["lora_targets"] != "all-linear" and row["method"] != "full"
                else "",
                row.get("tag") or "",
                "reentrant" if row.get("ckpt_mode") == "reentrant" else "",
                "no zero.Init" if row.get("zero_init") is False else "",
            )
            if x
        ),
        "oom": row["oom"],
        "phase": est.peak_phase,
        "est_alloc": est.peak_allocated_bytes,
        "verdict_ok": verdict_right(row, est),
    }
    if not row["oom"]:
        out["meas_alloc"] = row["peak_allocated_bytes"]
        out["err_alloc"] = est.peak_allocated_bytes / row["peak_allocated_bytes"] - 1
        out["err_reserved"] = est.peak_reserved_bytes / row["peak_reserved_bytes"] - 1
        # nvidia-smi's used bytes with only this process on the GPU
        if row.get("nvml_used_bytes"):
            out["err_used"] = est.device_used_bytes / row["nvml_used_bytes"] - 1
    return out


def known_model(row: dict[str, Any]) -> bool:
    """Whether the row's model resolves to a config here. A row measured on a local folder
    (``"model": "model"``, a catalog architecture with a tokenizer's small vocabulary, as
    realdata_speed.py builds it) does not record its config and cannot be estimated."""
    try:
        load_model(row["model"])
    except ModelNotFoundError:
        return False
    return True


def load_rows(files: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("what") == "speed":
                    continue  # a timed step (--speed), not a memory row
                if row.get("error") and not row.get("oom"):
                    continue  # a crash, not a measurement
                if row.get("liger_geglu"):
                    print(
                        f"skipped a row of {f.name}: Liger's GeGLU alone, which no setup describes"
                    )
                    continue
                if not known_model(row):
                    print(f"skipped a row of {f.name}: model {row['model']!r} has no config here")
                    continue
                rows.append(row)
    return rows


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    errs = [abs(r["err_alloc"]) for r in results if "err_alloc" in r]
    res = [abs(r["err_reserved"]) for r in results if "err_reserved" in r]
    used = [abs(r["err_used"]) for r in results if "err_used" in r]
    return {
        "rows": len(results),
        "measured": len(errs),
        "oom_rows": sum(r["oom"] for r in results),
        "median_abs_err_alloc": statistics.median(errs) if errs else None,
        "max_abs_err_alloc": max(errs) if errs else None,
        "median_abs_err_reserved": statistics.median(res) if res else None,
        "max_abs_err_reserved": max(res) if res else None,
        "median_abs_err_used": statistics.median(used) if used else None,
        "max_abs_err_used": max(used) if used else None,
        "verdicts_right": sum(r["verdict_ok"] for r in results),
    }


def speed_table(files: list[Path]) -> None:
    """Each timed lean step (benchmarks/edges.py speed: one GPU, ≥ 10 steps after two
    warm-up steps, their median) against speed.step_time(launched=False), which no fit saw:
    no fitted row ran the plain loop or foreach AdamW."""
    from zeroplan import speed

    print(
        f"{'model':22} {'method':6} {'shape':10} {'loop':18} {'measured':>9} {'predicted':>9} error"
    )
    for f in files:
        for line in f.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("what") != "speed" or row.get("oom"):
                continue
            spec = load_model(row["model"])
            st = speed.step_time(spec, setup_of(row), cluster_of(row), launched=False)
            err = st.tokens_per_s / row["tokens_per_s"] - 1
            loop = f"{row['loop']} {row['optim']}" + (
                " varlen" if row.get("varlen_segment") else ""
            )
            shape = f"{row['micro_batch']}x{row['seq_len']}" + (" ckpt" if row["grad_ckpt"] else "")
            print(
                f"{spec.name.split('/')[-1]:22} {row['method']:6} {shape:10} {loop:18} "
                f"{row['tokens_per_s']:9,.0f} {st.tokens_per_s:9,.0f} {err:+.1%}"
                f"{' host-bound' if st.host_bound else ''}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument(
        "--markdown", action="store_true", help="print a markdown table (docs/memory.md)"
    )
    p.add_argument("--json", action="store_true", help="print rows and summary as JSON")
    p.add_argument(
        "--speed", action="store_true", help="the timed steps of edges_*.jsonl against speed.py"
    )
    args = p.parse_args()
    if args.speed:
        speed_table(args.files or sorted(RESULTS.glob("edges_*.jsonl")))
        return
    files = args.files or sorted([*RESULTS.glob("memory_*.jsonl"), *RESULTS.glob("edges_*.jsonl")])
    results = [compare(r) for r in load_rows(files)]
    summary = summarize(results)
    if args.json:
        print(json.dumps({"rows": results, "summary": summary}, indent=1))
        return
    head = [
        "model",
        "method",
        "mb",
        "seq",
        "ckpt",
        "zero×N",
        "extra",
        "measured GiB",
        "estimated GiB",
        "error",
        "verdict",
    ]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print(
            f"{'model':22} {'method':6} {'mb':>3} {'seq':>5} {'ckpt':5} {'zero':6} {'extra':28} "
            f"{'meas':>7} {'est':>7} {'err':>7} verdict  phase"
        )
    for r in results:
        meas = f"{r['meas_alloc'] / GIB:.2f}" if "meas_alloc" in r else "OOM"
        err = f"{r['err_alloc']:+.1%}" if "err_alloc" in r else ""
        zero = "-" if r["zero"] is None else f"{r['zero']}×{r['world']}"
        ok = "ok" if r["verdict_ok"] else "WRONG"
        cells = [
            r["model"],
            r["method"],
            str(r["mb"]),
            str(r["seq"]),
            "on" if r["ckpt"] else "off",
            zero,
            r["extra"],
            meas,
            f"{r['est_alloc'] / GIB:.2f}",
            err,
            ok,
        ]
        if args.markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(
                f"{cells[0]:22} {cells[1]:6} {cells[2]:>3} {cells[3]:>5} {cells[4]:5} {cells[5]:6} {cells[6]:28} "
                f"{cells[7]:>7} {cells[8]:>7} {cells[9]:>7} {cells[10]:7}  {r['phase']}"
            )
    s = summary
    if s["measured"]:
        used = (
            f"nvidia-smi used median {s['median_abs_err_used']:.1%}, worst {s['max_abs_err_used']:.1%}"
            if s["median_abs_err_used"] is not None
            else "no nvidia-smi reading"
        )
        print(
            f"\n{s['rows']} rows ({s['oom_rows']} OOM): peak allocated error median {s['median_abs_err_alloc']:.1%}, "
            f"worst {s['max_abs_err_alloc']:.1%}; reserved median {s['median_abs_err_reserved']:.1%}, "
            f"worst {s['max_abs_err_reserved']:.1%}; {used}; fits/OOM verdict right on "
            f"{s['verdicts_right']}/{s['rows']}"
        )


if __name__ == "__main__":
    main()
