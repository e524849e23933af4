"""The ``zeroplan`` command, through click's CliRunner and through real subprocesses.

User mistakes must end as exactly one line on stderr starting ``zeroplan: error:``, exit
status 2, nothing on stdout and never a traceback; the light core must not import torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from zeroplan.commands.cli import cli, main
from zeroplan.hardware import GPU_CATALOG
from zeroplan.models import catalog_models

pytestmark = pytest.mark.usefixtures("isolated_hf")

CONTRACT = [
    "estimate",
    "llama-3.1-8b-instruct",
    "--gpus",
    "7x4090",
    "--method",
    "lora",
    "--micro-batch",
    "4",
    "--seq-len",
    "2048",
]
# Llama-3.1-8B by hand (see test_memory_terms): Ψ and LoRA r=16 all-linear Ψ_t
PSI, PSI_T = 8_030_261_248, 41_943_040
MIB = 2**20

PER_GPU_KEYS = {
    "weights_bytes",
    "gradients_bytes",
    "optimizer_bytes",
    "activations_bytes",
    "logits_bytes",
    "buffers_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "device_used_bytes",
    "gpu_memory_bytes",
    "headroom_bytes",
}
SETUP_KEYS = {
    "method",
    "zero",
    "offload",
    "micro_batch",
    "seq_len",
    "grad_ckpt",
    "lora_r",
    "lora_targets",
    "optim",
    "attn",
}


def invoke(args: list[str]) -> Any:
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "250"}, catch_exceptions=False)
    return result


def run(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zeroplan", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=cwd,
    )


def check_contract(data: dict[str, Any]) -> None:
    assert data["model"]["name"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert data["model"]["total_params"] == PSI
    assert data["model"]["trainable_params"] == PSI_T
    assert set(data["setup"]) >= SETUP_KEYS
    assert data["setup"]["method"] == "lora" and data["setup"]["micro_batch"] == 4
    assert data["setup"]["seq_len"] == 2048 and data["setup"]["zero"] is None
    per_gpu = data["per_gpu"]
    assert PER_GPU_KEYS | {"fits"} <= set(per_gpu)
    for key in PER_GPU_KEYS:
        assert type(per_gpu[key]) is int, key
    assert type(per_gpu["fits"]) is bool
    assert type(data["cpu_bytes"]) is int and data["cpu_bytes"] == 0
    # the numbers, by hand: bf16 base + fp32 adapters, fp32 grads, AdamW 8 B, 12 B/logit
    assert per_gpu["weights_bytes"] == 2 * PSI + 4 * PSI_T
    assert per_gpu["gradients_bytes"] == 4 * PSI_T
    assert per_gpu["optimizer_bytes"] == 8 * PSI_T
    assert per_gpu["logits_bytes"] == 12 * 4 * 2048 * 128_256
    assert per_gpu["gpu_memory_bytes"] == 24564 * MIB  # what an RTX 4090's driver reports
    assert per_gpu["headroom_bytes"] == per_gpu["gpu_memory_bytes"] - per_gpu["required_bytes"]
    assert (
        per_gpu["peak_allocated_bytes"] < per_gpu["required_bytes"] <= per_gpu["device_used_bytes"]
    )
    assert per_gpu["fits"] is (per_gpu["headroom_bytes"] >= 0) is False
    assert (
        per_gpu["peak_allocated_bytes"]
        <= per_gpu["peak_reserved_bytes"]
        <= per_gpu["device_used_bytes"]
    )
    assert per_gpu["peak_allocated_bytes"] == sum(per_gpu["at_peak_bytes"].values())
    assert data["cluster"]["world_size"] == 7 and data["cluster"]["gpu"] == "RTX-4090"


# ----------------------------------------------------------------------------- CliRunner


def test_estimate_json_contract_cli_runner() -> None:
    result = invoke([*CONTRACT, "--json"])
    assert result.exit_code == 0, result.output
    check_contract(json.loads(result.stdout))


def test_estimate_table_shows_terms_and_verdict() -> None:
    result = invoke(CONTRACT)
    assert result.exit_code == 0
    out = result.stdout
    for label in (
        "weights",
        "gradients",
        "optimizer states",
        "activations",
        "logits / loss",
        "comm buffers",
        "peak allocated",
        "peak reserved",
        "nvidia-smi used",
    ):
        assert label in out, label
    assert "Does not fit" in out and "RTX-4090" in out
    assert "formula" not in out  # only with --explain

    fits = invoke(
        [
            "estimate",
            "llama-3.2-1b",
            "--gpus",
            "1xH100",
            "--method",
            "qlora",
            "--grad-ckpt",
            "--seq-len",
            "512",
        ]
    )
    assert fits.exit_code == 0
    assert "Fits" in fits.stdout and "Does not fit" not in fits.stdout


def test_estimate_table_largest_term_first() -> None:
    out = invoke(CONTRACT).stdout
    # activations (≈63 GiB) > weights (≈15 GiB) > logits (≈12 GiB) > optimizer > gradients
    positions = [
        out.index(f"\n {label}")
        for label in ("activations", "weights", "logits / loss", "optimizer states")
    ]
    assert positions == sorted(positions)


def test_estimate_explain_shows_formulas() -> None:
    out = invoke([*CONTRACT, "--explain"]).stdout
    assert "formula" in out
    assert "2 B × 8,030,261,248 params (bf16)" in out
    assert "12 B × 8,192 tokens × 128,256 vocab" in out
    assert "8 B × 41,943,040 trainable" in out


def test_models_lists_the_catalog() -> None:
    out = invoke(["models"]).stdout
    for repo in catalog_models():
        assert repo in out
    listed = json.loads(invoke(["models", "--json"]).stdout)
    assert [row["name"] for row in listed] == catalog_models()
    llama = next(row for row in listed if row["name"] == "meta-llama/Llama-3.1-8B")
    assert llama == {"name": "meta-llama/Llama-3.1-8B", "model_type": "llama", "total_params": PSI}


def test_gpus_lists_the_catalog() -> None:
    out = invoke(["gpus"]).stdout
    for name in GPU_CATALOG:
        assert name in out
    listed = json.loads(invoke(["gpus", "--json"]).stdout)
    assert [row["name"] for row in listed] == list(GPU_CATALOG)
    assert all(type(row["memory_bytes"]) is int for row in listed)


@pytest.mark.parametrize("command", [[], ["estimate"], ["models"], ["gpus"]])
def test_help_exits_zero(command: list[str]) -> None:
    result = invoke([*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.stdout


# ----------------------------------------------------------------------------- main() in-process


def test_main_turns_user_mistakes_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["estimate", "llama-3.2-1b", "--zero", "5"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("zeroplan: error: --zero must be 0, 1, 2 or 3")
    assert captured.err.count("\n") == 1


# ----------------------------------------------------------------------------- subprocesses


def test_estimate_json_contract_subprocess(subprocess_env: dict[str, str]) -> None:
    proc = run([*CONTRACT, "--json"], subprocess_env)
    assert proc.returncode == 0, proc.stderr
    check_contract(json.loads(proc.stdout))


def test_console_script(subprocess_env: dict[str, str]) -> None:
    script = Path(sys.executable).with_name("zeroplan")
    if not script.exists():
        pytest.skip("zeroplan console script not installed next to this interpreter")
    proc = subprocess.run(
        [str(script), *CONTRACT, "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    check_contract(json.loads(proc.stdout))
    help_proc = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, env=subprocess_env, timeout=60
    )
    assert help_proc.returncode == 0 and "estimate" in help_proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["estimate", "acme/no-such-model"], "unknown model 'acme/no-such-model'"),
        (["estimate", "no-such-model"], "unknown model 'no-such-model'"),
        (["estimate", "llama-3.2-1b", "--gpus", "7x9999"], "unknown GPU"),
        (["estimate", "llama-3.2-1b", "--micro-batch", "0"], "--micro-batch"),
        (["estimate", "llama-3.2-1b", "--seq-len", "0"], "--seq-len"),
        (["estimate", "llama-3.2-1b", "--zero", "5"], "--zero"),
        (["estimate", "llama-3.2-1b", "--lora-r", "0"], "--lora-r"),
        (["estimate", "llama-3.2-1b", "--lora-targets", "nonexistent_proj"], "nonexistent_proj"),
        (["estimate", "llama-3.2-1b", "--offload", "optimizer"], "--zero"),
        (["estimate", "llama-3.2-1b", "--method", "dora"], "--method"),
        (["estimate", "llama-3.2-1b", "--micro-batch", "many"], "--micro-batch"),
        (["estimate", "mistralai/Mixtral-8x7B-v0.1", "--method", "qlora"], "mixture-of-experts"),
        (["estimate"], "MODEL"),
        (["no-such-command"], "no-such-command"),
        (["estimate", "CONFIG_NOT_JSON"], "not valid JSON"),
        (["estimate", "phi-4", "--seq-len", "32768"], "phi-4's context window of 16,384"),
        (["plan", "qwen3-8b", "--seq-len", "65536"], "context window of 40,960 tokens"),
        (["estimate", "llama-3.2-1b", "--gpus", "1xH100", "--no-p2p"], "--no-p2p describes"),
        (["plan", "llama-3.2-1b", "--gpus", "1x4090", "--p2p"], "one GPU per node"),
        (["plan", "llama-3.2-1b", "--gpus", "2x8xH100", "--inter-node-gbs", "0"], "got 0"),
        (["estimate", "llama-3.2-1b", "--gpus", "2x8xH100", "--inter-node-gbs", "-5"], "GB/s"),
        (["plan", "llama-3.2-1b", "--method", "auto", "--no-quantization"], "--method lora"),
        (["estimate", "llama-3.2-1b", "--optim", "adafactor"], "adamw_torch_fused, adamw_torch"),
        (["estimate", "llama-3.2-1b", "--loop", "accelerate"], "'trainer', 'plain'"),
        (
            [
                "estimate",
                "llama-3.2-1b",
                "--zero",
                "2",
                "--offload",
                "optimizer",
                "--optim",
                "paged_adamw_8bit",
            ],
            "runs DeepSpeed's own CPU Adam",
        ),
        (["estimate", "llama-3.2-1b", "--zero", "2", "--autocast"], "--autocast with DeepSpeed"),
        # mixture of experts (issue 29): what PEFT cannot run, and what was never measured
        (
            ["estimate", "qwen3-30b-a3b", "--lora-dropout", "0.05"],
            "use --lora-dropout 0, or --lora-targets q_proj,k_proj",
        ),
        (["estimate", "mixtral-8x7b", "--method", "full"], "full fine-tuning of a mixture"),
        (["plan", "qwen3-30b-a3b", "--method", "full"], "use --method lora --lora-targets"),
        (["estimate", "qwen3-30b-a3b", "--lora-targets", "q_proj", "--zero", "3"], "DeepSpeed"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_input_is_one_line_exit_2(
    args: list[str], needle: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    if "CONFIG_NOT_JSON" in args:
        bad = tmp_path / "config.json"
        bad.write_text('{"model_type": "llama", "hidden_size": 64,,}', encoding="utf-8")
        args = [str(bad) if a == "CONFIG_NOT_JSON" else a for a in args]
    proc = run(args, subprocess_env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and proc.stderr.endswith("\n"), proc.stderr
    assert lines[0].startswith("zeroplan: error: ")
    assert needle in lines[0]


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["estimate", "llama-3.2-1b", "--json"], "per_gpu"),
        (["plan", "llama-3.1-8b-instruct", "--gpus", "7x4090", "--json"], "best"),
    ],
)
def test_estimate_and_plan_do_not_import_the_heavy_stack(
    subprocess_env: dict[str, str], argv: list[str], key: str
) -> None:
    code = (
        "import sys, io, contextlib, zeroplan.commands.cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    zeroplan.commands.cli.main({argv!r})\n"
        f"assert '\"{key}\"' in out.getvalue()\n"
        "heavy = ('torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes', 'accelerate', 'trl')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_precision_on_estimate_config_and_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """fp16 is the default on a card without bf16, may be asked for anywhere, and bf16 on
    such a card is one line and exit 2."""
    runner = CliRunner()

    def js(*args: str) -> Any:
        result = runner.invoke(cli, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    assert js("estimate", "llama-3.2-1b", "--gpus", "1xT4")["setup"]["precision"] == "fp16"
    assert js("estimate", "llama-3.2-1b", "--gpus", "1xH100")["setup"]["precision"] == "bf16"
    h100_fp16 = js("estimate", "llama-3.2-1b", "--gpus", "1xH100", "--precision", "fp16")
    assert h100_fp16["setup"]["precision"] == "fp16"
    assert js("plan", "llama-3.2-1b", "--gpus", "1xT4")["best"]["setup"]["precision"] == "fp16"
    cfg = runner.invoke(cli, ["config", "llama-3.2-1b", "--gpus", "2xV100", "--zero", "2"])
    assert cfg.exit_code == 0, cfg.output
    assert "bf16" not in json.loads(cfg.stdout) and json.loads(cfg.stdout)["fp16"]["enabled"]
    for command in ("estimate", "plan", "config"):
        args = [command, "llama-3.2-1b", "--gpus", "1xT4", "--precision", "bf16"]
        if command == "config":
            args += ["--zero", "2"]
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2, command
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert captured.err.startswith("zeroplan: error: --precision bf16: T4 has no bf16")


def test_does_not_fit_suggests_only_switches_not_already_on() -> None:
    """A setup that does not fit is told what it could still change, not what it has on."""
    on = invoke(
        ["estimate", "llama-3.1-8b-instruct", "--gpus", "1x4090", "--micro-batch", "8",
         "--grad-ckpt", "--fused-loss", "--zero", "3"]
    )  # fmt: skip
    assert "Does not fit" in on.output
    advice = on.output[on.output.index("Try ") :].split(", or let")[0]
    assert "--grad-ckpt" not in advice and "--fused-loss" not in advice
    assert "a smaller --micro-batch" in advice and "--method qlora" in advice
    off = invoke(["estimate", "llama-3.1-8b-instruct", "--gpus", "1x4090", "--micro-batch", "8"])
    assert "Try --grad-ckpt, a smaller --micro-batch" in off.output
