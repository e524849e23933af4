"""Today's plan for the realdata_speed.py runs, against what those runs measured.

    python benchmarks/realdata_predict.py

The launched runs of ``realdata_h200_8b_gqa.jsonl`` and ``realdata_h200_1b_gqa.jsonl``
(and the lean steps of ``realdata_h200_lean.jsonl``) ran the architectures of the catalog
with the 320-token vocabulary of the tokenizer built in tests/tinyllm.py (no network on the
GPU machine). This rebuilds those configs (no torch: a config.json), asks the speed model
for the setup each run used (micro-batch, seq-len and adapters from the run's plan), and
prints predicted against measured: the lean step, the launched rate per token position,
and the launched real tokens/s at each run's packing fill. It also prints what
``zeroplan plan`` would choose for the same job today, which may differ from what ran.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tinyllm  # noqa: E402
from fit_speed import realdata_lean  # noqa: E402  (the same lean steps the fit reads)

from zeroplan import speed  # noqa: E402
from zeroplan.hardware import parse_cluster  # noqa: E402
from zeroplan.models import load_model  # noqa: E402
from zeroplan.planner import PlanRequest, plan  # noqa: E402
from zeroplan.trainsetup import TrainSetup  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = (
    # (catalog file, method, runs file, the adapters, global batch)
    ("meta-llama--Meta-Llama-3-8B-Instruct", "qlora", "realdata_h200_8b_gqa.jsonl",
     ("q_proj", "k_proj", "v_proj", "o_proj"), 8),
    ("meta-llama--Llama-3.2-1B", "lora", "realdata_h200_1b_gqa.jsonl", ("all-linear",), 16),
    # the same job as planned this session (DeepSpeed ZeRO-0 on one GPU)
    ("meta-llama--Llama-3.2-1B", "lora", "realdata_h200_1b_zero0.jsonl", ("all-linear",), 16),
)  # fmt: skip


def main() -> None:
    vocab = len(tinyllm.build_tokenizer())
    lean = {method: seconds for method, (_, seconds) in realdata_lean().items()}
    cluster = parse_cluster("1xH200")
    with tempfile.TemporaryDirectory() as tmp:
        for catalog, method, runs_file, targets, global_batch in RUNS:
            arch = json.loads((ROOT / "zeroplan/catalog/models" / f"{catalog}.json").read_text())
            arch["vocab_size"] = vocab
            config = Path(tmp) / catalog / "config.json"
            config.parent.mkdir(exist_ok=True)
            config.write_text(json.dumps(arch))
            spec = load_model(str(config))
            rows = [json.loads(x) for x in (RESULTS / runs_file).read_text().splitlines()]
            ran = rows[0].get("setup") or {}
            mb = ran.get("micro_batch", global_batch)
            setup = TrainSetup(
                method=method, micro_batch=mb, seq_len=704, lora_targets=targets,
                grad_accum=ran.get("grad_accum", 1), zero=ran.get("zero"),
                grad_ckpt=ran.get("grad_ckpt", False), fused_loss=ran.get("fused_loss", False),
            )  # fmt: skip
            lean_s = speed.step_time(spec, setup, cluster, launched=False).total_s
            step = speed.step_time(spec, setup, cluster)
            how = "plain loop" if setup.zero is None else f"DeepSpeed ZeRO-{setup.zero}"
            print(
                f"{catalog} {method}, {how}, micro-batch {mb} x 704 on one H200 "
                f"(vocabulary {vocab}, {runs_file}):"
            )
            if method in lean and setup.zero is None:
                print(
                    f"  lean step: predicted {lean_s:.3f} s, measured {lean[method]:.3f} s "
                    f"(tokens/s {lean[method] / lean_s - 1:+.1%})"
                )
            for r in rows:
                measured = r["tokens_per_s"]
                predicted = step.tokens_per_s * r["fill"]
                print(
                    f"  launched on {r['data']:9}: predicted {predicted:9,.0f} real tokens/s, "
                    f"measured {measured:9,.0f} ({predicted / measured - 1:+.1%}, fill {r['fill']:.3f})"
                )
            today = plan(
                PlanRequest(
                    spec=spec, cluster=cluster, method=method, seq_len=704,
                    global_batch=global_batch, lora_targets=targets,
                )
            )  # fmt: skip
            if today.best is not None:
                s = today.best.setup
                print(
                    f"  today's plan for the job: {s.method}, ZeRO {s.zero}, micro-batch "
                    f"{s.micro_batch} x {s.grad_accum}, checkpointing {s.grad_ckpt}, fused loss "
                    f"{s.fused_loss}: {today.best.step.tokens_per_s:,.0f} tokens/s per position"
                )


if __name__ == "__main__":
    main()
