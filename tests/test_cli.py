"""The ``zeroplan`` command, through click's CliRunner and through real subprocesses.

User mistakes must end as exactly one line on stderr starting ``zeroplan: error:``, exit
status 2, nothing on stdout and never a traceback; the light core must not import torch.
"""

from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # float options: nan and inf are no number zeroplan can use (was: a traceback, a nan cost)
        (["plan", "qwen2.5-0.5b", "--dataset-tokens", "inf"], "'inf' is not a count"),
        (["plan", "qwen2.5-0.5b", "--price-per-gpu-hour", "nan"], "'nan' is not a finite"),
        (["plan", "qwen2.5-0.5b", "--margin", "inf"], "'inf' is not a finite"),
        (["estimate", "qwen2.5-0.5b", "--lora-dropout", "nan"], "'nan' is not a finite"),
        (["config", "qwen2.5-0.5b", "--zero", "2", "--grad-clip", "inf"], "not a finite"),
        # cluster sizes past any machine
        (["estimate", "qwen2.5-0.5b", "--gpus", "99999999999999999999x4090"], "at most 64 GPUs"),
        (["plan", "qwen2.5-0.5b", "--gpus", "5000x8xH100"], "at most 4,096 nodes"),
        (["config", "qwen2.5-0.5b", "--gpus", "65xH100", "--zero", "2"], "at most 64 GPUs"),
        # a typo, and no model at all
        (["estimate", "llama-3.1-8b-instrct"], "(did you mean llama-3.1-8b-instruct?)"),
        (["estimate", ""], "the model name is empty"),
        # options that contradict the method
        (["estimate", "qwen2.5-0.5b", "--method", "full", "--lora-r", "8"], "--lora-r: full"),
        (["estimate", "qwen2.5-0.5b", "--method", "full", "--lora-bf16"], "has no adapters"),
        (["config", "qwen2.5-0.5b", "--zero", "2", "--method", "full", "--lora-targets", "q_proj"],
         "--lora-targets: full fine-tuning has no adapters"),
        (["plan", "qwen2.5-0.5b", "--method", "full", "--lora-dropout", "0.1"], "no adapters"),
        (["estimate", "qwen2.5-0.5b", "--upcast-non-quantized"], "use --method qlora"),
        (["plan", "qwen2.5-0.5b", "--method", "qlora", "--no-quantization"], "forbids"),
        # FlashAttention-2 on cards before Ampere
        (["estimate", "qwen2.5-0.5b", "--gpus", "1xV100", "--attn", "flash_attention_2"],
         "FlashAttention-2 needs an Ampere or newer GPU"),
        (["config", "qwen2.5-0.5b", "--gpus", "2xT4", "--zero", "2", "--attn",
          "flash_attention_2"], "T4 is older"),
        # a negative length is too short, whether or not there is --data
        (["plan", "qwen2.5-0.5b", "--seq-len", "-1"], "--seq-len must be at least 1, got -1"),
        (["estimate", "qwen2.5-0.5b", "--micro-batch", "0"], "0 is not in the range x>=1"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)  # fmt: skip
def test_contradictions_and_impossible_values_are_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert needle in one_line_error(argv, capsys)


def test_lora_options_turned_off_beside_full_are_no_contradiction() -> None:
    result = invoke(["estimate", "qwen2.5-0.5b", "--method", "full", "--no-lora-bf16", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["setup"]["method"] == "full"


def test_explain_beside_json_says_it_is_not_in_the_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["estimate", "qwen2.5-0.5b", "--json", "--explain"])
    captured = capsys.readouterr()
    assert "per_gpu" in json.loads(captured.out)
    assert captured.err == (
        "zeroplan: note: --explain writes its formulas into the table, which --json replaces\n"
    )


def test_default_seq_len_is_held_to_a_short_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model of 512 positions is planned at 512 when --seq-len is left out, and says so;
    a length the user gives past it is still refused."""
    config = json.loads(
        (Path(__file__).parents[1] / "zeroplan/catalog/models/Qwen--Qwen2.5-0.5B.json").read_text()
    )
    model = tmp_path / "short" / "config.json"
    model.parent.mkdir()
    model.write_text(json.dumps({**config, "max_position_embeddings": 512}))
    est = invoke(["estimate", str(model), "--json"])
    assert est.exit_code == 0, est.output
    answer = json.loads(est.stdout)
    assert answer["setup"]["seq_len"] == 512
    assert any("--seq-len's default of 2,048 is longer" in n for n in answer["notes"])
    plan = invoke(["plan", str(model), "--json"])
    assert plan.exit_code == 0, plan.output
    planned = json.loads(plan.stdout)
    assert planned["best"]["setup"]["seq_len"] == 512
    assert any("512 tokens, short's context window" in a for a in planned["assumptions"])
    assert invoke(["config", str(model), "--zero", "2"]).exit_code == 0
    refused = one_line_error(["estimate", str(model), "--seq-len", "2048"], capsys)
    assert "context window of 512 tokens" in refused


def test_help_shows_ranges_examples_and_what_config_needs() -> None:
    for command in ("estimate", "config", "plan"):
        text = invoke([command, "--help"]).stdout
        assert "x>=1" in text, command
    config = " ".join(invoke(["config", "--help"]).stdout.split())
    assert "--seq-len INTEGER RANGE" in config and "--micro-batch INTEGER RANGE" in config
    assert "--zero 0-3 DeepSpeed ZeRO stage (config needs one)" in config
    assert "-o, --output, --out FILE" in config or "-o, --output, --out PATH" in config
    assert "zeroplan chat runs/" in invoke(["chat", "--help"]).stdout


def test_config_out_is_an_alias_of_output(tmp_path: Path) -> None:
    written = tmp_path / "ds.json"
    result = invoke(["config", "qwen2.5-0.5b", "--zero", "2", "--out", str(written)])
    assert result.exit_code == 0, result.output
    assert json.loads(written.read_text())["zero_optimization"]["stage"] == 2


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


# ----------------------------------------------------------------------------- -o and stdout


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """main(argv)'s stderr, which must be one `zeroplan: error:` line with exit status 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("zeroplan: error: ")
    return captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "qwen2.5-0.5b", "--zero", "2", "-o", ""],
        ["plan", "qwen2.5-0.5b", "-o", ""],
        ["merge", "RUN", "-o", ""],
        ["launch", "qwen2.5-0.5b", "--data", "d.jsonl", "-o", " "],
    ],
    ids=lambda argv: argv[0],
)
def test_an_empty_output_path_is_refused(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """-o '' (an unset shell variable) is Path('.'): the current folder, or a traceback."""
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    assert "is empty: give a path" in one_line_error(argv, capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def adapter_run(tmp_path: Path) -> Path:
    """A run folder as far as the checks look: final/ holds an adapter naming its base."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "a/b"}))
    return tmp_path / "run"


@pytest.fixture
def without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The [train] extra not installed (a plain `pip install .`): none of it imports."""
    for name in ("torch", "transformers", "peft"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.usefixtures("without_torch")
@pytest.mark.parametrize(
    "argv", [["generate", "RUN", "-p", "hi"], ["chat", "RUN"], ["merge", "RUN", "-o", "OUT"]]
)
def test_generate_chat_and_merge_without_torch_name_the_extra(
    argv: list[str], adapter_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = {"RUN": str(adapter_run), "OUT": str(tmp_path / "merged")}
    err = one_line_error([names.get(a, a) for a in argv], capsys)
    assert "needs torch, which is not installed here: pip install 'zeroplan[train]'" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.usefixtures("without_torch")
@pytest.mark.parametrize(
    ("run", "out", "needle"),
    [
        ("EMPTY", "new", "holds no trained weights"),
        ("RUN", "full", "full is not empty: merge into a new folder"),
        ("RUN", "FILE/merged", "FILE is a file, not a folder"),
    ],
)
def test_merge_checks_the_run_and_the_target_before_loading_anything(
    run: str,
    out: str,
    needle: str,
    adapter_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Said at once, not after seconds of importing torch and loading the base (with no
    torch here, a check that came later would say torch is missing instead)."""
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "FILE").write_text("")
    runs = {"EMPTY": tmp_path / "EMPTY", "RUN": adapter_run}
    assert needle in one_line_error(["merge", str(runs[run]), "-o", str(tmp_path / out)], capsys)
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "full") == ["keep.txt"]


def test_an_interrupted_merge_leaves_no_folder(
    adapter_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeroplan.launch import infer

    def interrupted(weights: Path, info: dict[str, Any], base: str, folder: Path) -> None:
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(infer, "_require_stack", lambda adapter, why: None)
    monkeypatch.setattr(infer, "_save_merged", interrupted)
    with pytest.raises(SystemExit) as info:
        main(["merge", str(adapter_run), "-o", str(tmp_path / "out" / "merged")])
    assert info.value.code == 130
    # neither the half-saved model, its temporary folder, nor the folder made for it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    "argv", [["plan", "qwen2.5-0.5b"], ["estimate", "qwen2.5-0.5b", "--json"]], ids=["rich", "echo"]
)
def test_a_reader_that_left_ends_zeroplan_quietly_as_sigpipe_would(
    argv: list[str], subprocess_env: dict[str, str]
) -> None:
    """`zeroplan plan | head -1`: status 141 (128 + SIGPIPE, as cat's), nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first line
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "zeroplan", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_output_that_cannot_be_written_is_one_line(subprocess_env: dict[str, str]) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "zeroplan", "estimate", "qwen2.5-0.5b", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env,
            timeout=60,
        )
    assert proc.returncode == 2
    assert proc.stderr == (
        "zeroplan: error: cannot write the output: No space left on device; free the space "
        "or send it elsewhere\n"
    )
