"""Blind predictions for benchmarks/moe_targets_gpu.sh, written before its GPU call.

    python benchmarks/moe_targets_predict.py [--out benchmarks/results/launch_moe5_predicted.json]

For each of the call's launches (the cut, launch_gpu_check.RUNS' setup), what
``zeroplan estimate`` says on one H100 80GB and on one H200, for the cut model as
gpu_fixtures.build_model writes it (the small tokenizer's vocabulary): the peak allocated,
the tokens/s on full-length sequences (what the launch's plan.json quotes) and on the
call's own records as the launch packs them (what the band is checked against, as
fit_moe_speed.py does with the launch's fill), the band and whether the step is
host-bound. The launch packs each micro-batch as one varlen row of micro-batch × seq-len
tokens; the fill is read off ``estimate --data`` at micro-batch 1 and that row length (its
tokens/s at the run's own setup uses the same fill, but its JSON's ``data.fill`` is that of
rows of seq-len: 0.78 where the launch's rows are 0.97 full). Each is checked against plan.json as launch_gpu_check.py writes it
(gpu_fixtures.write_plan), so the CLI and the launch's plan agree. No GPU, no weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tinyllm  # noqa: E402
from gpu_fixtures import records  # noqa: E402
from launch_gpu_check import RUNS  # noqa: E402

from zeroplan.hardware import parse_cluster  # noqa: E402
from zeroplan.trainsetup import TrainSetup  # noqa: E402

# (catalog file, layers, run), in the call's order: by value, the last cut first
CALL = [
    ("mistralai--Mixtral-8x7B-v0.1", 4, "moe-all"),
    ("Qwen--Qwen3-30B-A3B", 8, "moe-qlora-attn"),
    ("Qwen--Qwen3-30B-A3B", 8, "moe-attn-router"),
    ("Qwen--Qwen3-30B-A3B", 8, "moe-host"),
    ("mistralai--Mixtral-8x7B-v0.1", 4, "moe-qlora-attn"),
    ("mistralai--Mixtral-8x7B-v0.1", 4, "moe-attn-router"),
]
CARDS = {"H100 80GB": "1xH100", "H200": "1xH200"}
GIB = 2**30


def cut_dir(work: Path, catalog: str, layers: int) -> Path:
    """config.json and tokenizer of the cut, as gpu_fixtures.build_model saves them."""
    from transformers import AutoConfig

    path = work / f"{catalog}-{layers}"
    if (path / "config.json").exists():
        return path
    tok = tinyllm.build_tokenizer()
    tok.save_pretrained(path)
    arch = json.loads((ROOT / "zeroplan/catalog/models" / f"{catalog}.json").read_text())
    arch.update(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_hidden_layers=layers,
    )
    arch.pop("torch_dtype", None)
    AutoConfig.for_model(**arch).save_pretrained(path)
    return path


def cli_args(setup: TrainSetup) -> list[str]:
    """The ``zeroplan estimate`` options of ``setup`` (the fields RUNS sets)."""
    return [
        *("--method", setup.method, "--micro-batch", str(setup.micro_batch)),
        *("--seq-len", str(setup.seq_len), "--lora-r", str(setup.lora_r)),
        *("--lora-targets", ",".join(setup.lora_targets)),
        *("--lora-dropout", f"{setup.lora_dropout:g}"),
        "--grad-ckpt" if setup.grad_ckpt else "--no-grad-ckpt",
    ]


def estimate(model: Path, setup: TrainSetup, gpus: str, data: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "zeroplan", "estimate", str(model), "--gpus", gpus, "--json"]
    cmd += [*cli_args(setup), *(["--data", str(data)] if data else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    out_default = ROOT / "benchmarks/results/launch_moe5_predicted.json"
    p.add_argument("--out", type=Path, default=out_default)
    p.add_argument(
        "--launches",
        default="",
        help="catalog:layers:run,... (default: moe_targets_gpu.sh's first call, CALL)",
    )
    args = p.parse_args()
    call = CALL
    if args.launches:
        parts = [item.split(":") for item in args.launches.split(",")]
        call = [(catalog, int(layers), run) for catalog, layers, run in parts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = tinyllm.write_jsonl(work / "data.jsonl", records(400))
        for catalog, layers, run in call:
            model, setup = cut_dir(work, catalog, layers), RUNS[run]
            row: dict[str, Any] = {"run": run, "arch": catalog, "layers": layers}
            row["setup"] = " ".join(cli_args(setup))
            for card, gpus in CARDS.items():
                full = estimate(model, setup, gpus, None)
                row_len = setup.micro_batch * setup.seq_len
                one_row = dataclasses.replace(setup, micro_batch=1, seq_len=row_len)
                fill = estimate(model, one_row, gpus, data)["data"]["fill"]
                plan = tinyllm.plan_for(model, setup, parse_cluster(gpus))["best"]
                speed = full["speed"]
                peak = full["per_gpu"]["peak_allocated_bytes"]
                # the launch's plan.json must quote what the CLI says
                assert plan["peak_allocated_bytes"] == peak, (plan["peak_allocated_bytes"], peak)
                assert abs(plan["tokens_per_s"] / speed["tokens_per_s"] - 1) < 1e-9
                row[card] = {
                    "peak_allocated_gib": round(peak / GIB, 3),
                    "fits": full["per_gpu"].get("fits"),
                    "tokens_per_s": round(speed["tokens_per_s"]),
                    "tokens_per_s_on_records": round(speed["tokens_per_s"] * fill),
                    "fill": fill,
                    "band": speed["error_p90"],
                    "host_bound": speed["host_bound"],
                    "gpu_ms_per_micro_batch": round(speed["gpu_seconds_per_micro_batch"] * 1e3, 1),
                    "host_ms_per_micro_batch": round(
                        speed["host_seconds_per_micro_batch"] * 1e3, 1
                    ),
                }
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
