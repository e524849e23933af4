"""The per-rank program without training: plan → applied options, and every early refusal.

What a plan chose must be what the Trainer gets (DESIGN.md: whatever the estimate assumes,
launch must do); what this machine cannot run, or bad input, is refused with one line
before any model is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

import tinyllm

from zeroplan.dsconfig import ds_config
from zeroplan.errors import (
    BadPlanError,
    BadSetupError,
    ChatTemplateError,
    DataNotFoundError,
    MissingDependencyError,
    ResumeError,
    ZeroplanError,
)
from zeroplan.launch import sft
from zeroplan.trainsetup import TrainSetup, cpu_refusal

# third-party noise: something DeepSpeed or bitsandbytes imports uses torch.jit.script_method
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinyllm.build_model_dir(tmp_path_factory.mktemp("tiny"))


def opts(tmp_path: Path, *extra: str, data: str | None = None) -> sft.Options:
    plan = tmp_path / "run" / "plan.json"
    return sft.parse_args(
        [
            "--plan",
            str(plan),
            "--data",
            data or str(tmp_path / "d.jsonl"),
            "--out",
            str(plan.parent),
            *extra,
        ]
    )


def one_line(exc: pytest.ExceptionInfo[Any]) -> str:
    assert isinstance(exc.value, ZeroplanError)
    text = str(exc.value)
    assert text and "\n" not in text
    return text


# --------------------------------------------------------------------------- the plan


def test_read_plan_gives_back_the_chosen_setup(tmp_path: Path, model_dir: Path) -> None:
    setup = {"micro_batch": 2, "grad_accum": 3, "grad_ckpt": True, "lora_r": 4}
    setup["lora_targets"] = ("q_proj", "v_proj")
    path = tinyllm.write_plan(tmp_path, model_dir, **setup)
    planned = sft.read_plan(path)
    # the H100's precision, the model's attention: a plan resolves both
    assert planned.setup == TrainSetup(seq_len=64, precision="bf16", attn="sdpa", **setup)
    assert planned.world_size == 1
    # the plan was made from a local config.json: its folder is the model to load
    assert planned.model == str(model_dir.resolve())


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "no plan file"),
        ("{", "is not JSON"),
        ('{"x": 1}', "is not a zeroplan plan"),
        ('{"model": "m", "best": null}', "found no setup that fits"),
        ('{"model": "m", "best": {"setup": {"method": "dora"}}}', "--method must be one of"),
    ],
)
def test_bad_plans(tmp_path: Path, text: str | None, needle: str) -> None:
    path = tmp_path / "plan.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises((BadPlanError, BadSetupError)) as exc:
        sft.read_plan(path)
    assert needle in one_line(exc)


# --------------------------------------------------------------------------- applied options


def test_training_arguments_follow_the_setup(tmp_path: Path) -> None:
    setup = TrainSetup(micro_batch=4, grad_accum=8, grad_ckpt=True, optim="paged_adamw_8bit")
    kw = sft.training_kwargs(setup, opts(tmp_path), cuda=True, ds_path=None, has_eval=False)
    assert kw["per_device_train_batch_size"] == 4
    assert kw["gradient_accumulation_steps"] == 8
    assert kw["activation_checkpointing"] is True
    assert kw["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert kw["optim"] == "paged_adamw_8bit"
    assert (kw["bf16"], kw["use_cpu"], kw["deepspeed"]) == (True, False, None)
    assert kw["learning_rate"] == 2e-4 and kw["max_steps"] == -1
    assert kw["dataset_kwargs"] == {"skip_prepare_dataset": True} and kw["packing"] is False
    assert kw["eval_strategy"] == "no" and kw["prediction_loss_only"] is True
    assert kw["save_strategy"] == "epoch" and kw["report_to"] == "none"
    cpu = sft.training_kwargs(
        TrainSetup(method="full"), opts(tmp_path, "--max-steps", "7"), False, None, True
    )
    assert (cpu["bf16"], cpu["use_cpu"], cpu["optim"]) == (False, True, "adamw_torch")
    assert (
        cpu["activation_checkpointing"] is False and cpu["activation_checkpointing_kwargs"] is None
    )
    assert (
        cpu["learning_rate"] == 2e-5 and cpu["max_steps"] == 7 and cpu["eval_strategy"] == "epoch"
    )
    gpu = sft.training_kwargs(TrainSetup(), opts(tmp_path, "--save-steps", "5"), True, None, False)
    assert gpu["optim"] == "adamw_torch_fused" and gpu["save_strategy"] == "steps"
    old = sft.training_kwargs(TrainSetup(grad_ckpt=True), opts(tmp_path), True, None, False, set())
    assert old["gradient_checkpointing"] is True and "activation_checkpointing" not in old


@pytest.mark.parametrize(
    ("optim", "hf"),
    [("adamw_8bit", "adamw_bnb_8bit"), ("paged_adamw", "paged_adamw_32bit"), ("sgd", "sgd")],
)
def test_optimizer_names(optim: str, hf: str) -> None:
    from transformers.training_args import OptimizerNames

    assert sft.HF_OPTIM[optim] == hf
    assert OptimizerNames(hf)  # a name the installed transformers knows


def test_optimizer_names_follow_the_plan(tmp_path: Path) -> None:
    """HF's names pass through; an old plan's "adamw" is fused AdamW, as before; fused only
    on a GPU and without CPU offload (where DeepSpeed's CPU Adam steps)."""

    def hf(setup: TrainSetup, cuda: bool = True) -> str:
        return str(sft.training_kwargs(setup, opts(tmp_path), cuda, None, False)["optim"])

    assert hf(TrainSetup(optim="adamw")) == hf(TrainSetup()) == "adamw_torch_fused"
    assert hf(TrainSetup(optim="adamw_torch")) == hf(TrainSetup(loop="plain")) == "adamw_torch"
    assert hf(TrainSetup(optim="adamw_torch_fused"), cuda=False) == "adamw_torch"
    assert hf(TrainSetup(zero=2, offload="optimizer")) == "adamw_torch"
    assert hf(TrainSetup(optim="paged_adamw_32bit")) == "paged_adamw_32bit"


def test_autocast_follows_the_plan(tmp_path: Path) -> None:
    def bf16(setup: TrainSetup) -> bool:
        return bool(sft.training_kwargs(setup, opts(tmp_path), True, None, False)["bf16"])

    assert bf16(TrainSetup()) is True
    # a bf16 model without the Trainer's autocast: PEFT's fp32 adapters see fp32 inputs
    assert bf16(TrainSetup(autocast=False)) is False
    assert bf16(TrainSetup(zero=2)) is True  # DeepSpeed bf16, no autocast


def test_fp16_setups_train_in_fp16_as_the_estimate_assumes(tmp_path: Path) -> None:
    """fp16: the Trainer's fp16 (AMP + GradScaler, or DeepSpeed fp16), never bf16; the model
    loads fp16, full fine-tuning without DeepSpeed fp32 (AMP); QLoRA computes in fp16."""

    def flags(setup: TrainSetup, cuda: bool = True) -> tuple[bool, bool]:
        kw = sft.training_kwargs(setup, opts(tmp_path), cuda, None, False)
        return kw["fp16"], kw["bf16"]

    def dtype(setup: TrainSetup) -> str:
        return str(sft.model_kwargs(setup, cuda=True, local_rank=0)["dtype"])

    assert flags(TrainSetup(precision="fp16")) == (True, False)
    assert flags(TrainSetup(precision="fp16", zero=2)) == (True, False)
    assert flags(TrainSetup(precision="fp16"), cuda=False) == (False, False)
    assert flags(TrainSetup(precision="bf16")) == flags(TrainSetup()) == (False, True)
    assert dtype(TrainSetup(precision="fp16")) == "float16"
    assert dtype(TrainSetup(precision="fp16", method="full", zero=3)) == "float16"
    assert dtype(TrainSetup(precision="fp16", method="full")) == "float32"
    assert dtype(TrainSetup(method="full")) == "bfloat16"
    q = sft.quantization_kwargs(TrainSetup(method="qlora", precision="fp16", zero=3))
    assert q is not None
    assert (q["bnb_4bit_compute_dtype"], q["bnb_4bit_quant_storage"]) == ("float16", "float16")


def test_an_old_plan_still_loads_and_launches_fused_adamw(tmp_path: Path, model_dir: Path) -> None:
    """A plan.json written before the loop switches: optim "adamw", no loop keys."""
    path = tinyllm.write_plan(tmp_path, model_dir)
    data = json.loads(path.read_text())
    setup = data["best"]["setup"]
    for key in ("loop", "autocast", "keep_outputs"):
        del setup[key]
    setup["optim"] = "adamw"
    path.write_text(json.dumps(data))
    planned = sft.read_plan(path)
    assert planned.setup == TrainSetup(seq_len=64, precision="bf16", attn="sdpa")
    kw = sft.training_kwargs(planned.setup, opts(tmp_path), True, None, False)
    assert (kw["optim"], kw["bf16"]) == ("adamw_torch_fused", True)


def test_a_plan_that_keeps_outputs_is_refused(tmp_path: Path, model_dir: Path) -> None:
    """The Trainer drops the model's output before backward: launch cannot run such a plan."""
    path = tinyllm.write_plan(tmp_path, model_dir, keep_outputs=True)
    with pytest.raises(BadPlanError) as exc:
        sft.read_plan(path)
    assert "zeroplan launch runs the HF Trainer loop" in one_line(exc)


def test_every_optim_name_is_known_to_transformers() -> None:
    from transformers.training_args import OptimizerNames

    for hf in [*sft.HF_OPTIM.values(), "adamw_torch_fused"]:
        OptimizerNames(hf)


def test_lora_and_quantization(tmp_path: Path) -> None:
    lora = sft.lora_kwargs(TrainSetup(lora_r=16, lora_dropout=0.05))
    assert lora == {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    named = sft.lora_kwargs(TrainSetup(lora_targets=("q_proj", "k_proj")), alpha=8)
    assert named is not None and named["target_modules"] == ["q_proj", "k_proj"]
    assert named["lora_alpha"] == 8
    assert sft.lora_kwargs(TrainSetup(method="full")) is None
    assert sft.quantization_kwargs(TrainSetup()) is None
    q = sft.quantization_kwargs(TrainSetup(method="qlora"))
    assert q == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
    }
    q3 = sft.quantization_kwargs(TrainSetup(method="qlora", zero=3))
    assert q3 is not None and q3["bnb_4bit_quant_storage"] == "bfloat16"
    import torch

    cfg = sft.bnb_config(TrainSetup(method="qlora", zero=3))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.bnb_4bit_quant_storage == torch.bfloat16
    assert sft.bnb_config(TrainSetup()) is None


def test_model_loading_arguments() -> None:
    assert sft.model_kwargs(TrainSetup(attn="sdpa"), cuda=False, local_rank=0) == {
        "dtype": "float32",
        "attn_implementation": "sdpa",
    }
    # a setup no plan resolved: transformers' default, which is the model's own
    unset = sft.model_kwargs(TrainSetup(), cuda=False, local_rank=0)
    assert unset["attn_implementation"] is None
    gpu = sft.model_kwargs(TrainSetup(attn="eager"), cuda=True, local_rank=3)
    assert gpu == {"dtype": "bfloat16", "attn_implementation": "eager", "device_map": {"": 3}}
    # DeepSpeed places (ZeRO-3: partitions) the weights itself
    assert "device_map" not in sft.model_kwargs(TrainSetup(zero=3), True, 0)
    assert "device_map" not in sft.model_kwargs(TrainSetup(method="qlora", zero=3), True, 0)
    assert sft.model_kwargs(TrainSetup(method="qlora", zero=2), True, 1)["device_map"] == {"": 1}


def test_zero_plans_get_their_deepspeed_config(tmp_path: Path) -> None:
    setup = TrainSetup(zero=3, grad_ckpt=True, micro_batch=2, grad_accum=4)
    ds = tmp_path / "ds_config.json"
    kw = sft.training_kwargs(setup, opts(tmp_path), cuda=True, ds_path=ds, has_eval=False)
    assert kw["deepspeed"] == str(ds)
    # PEFT under ZeRO-3: TRL forces reentrant checkpointing, so it is asked for openly
    assert kw["activation_checkpointing_kwargs"] == {"use_reentrant": True}
    # the Trainer refuses a config whose batch keys disagree with its arguments
    cfg = ds_config(setup, world_size=8)
    assert cfg["train_micro_batch_size_per_gpu"] == kw["per_device_train_batch_size"]
    assert cfg["gradient_accumulation_steps"] == kw["gradient_accumulation_steps"]
    assert cfg["gradient_clipping"] == kw["max_grad_norm"]


@pytest.mark.parametrize("kernel", ["varlen", "mask"])
def test_packed_batches_and_the_deepspeed_config_agree(tmp_path: Path, kernel: str) -> None:
    """Under varlen one Trainer row holds the whole planned micro-batch: DeepSpeed's
    micro-batch must be that row (on 2xH200 a ZeRO-2 launch said 4 against the Trainer's 1)."""
    from zeroplan.launch import data as zdata

    setup = TrainSetup(zero=2, micro_batch=4, grad_accum=2, seq_len=64)
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(12))
    tok = tinyllm.build_tokenizer()
    prepared = zdata.prepare(str(data), tok, 64)
    o = opts(tmp_path, "--packed-attention", kernel)
    batching = sft._batching(o, setup, prepared, tok, cuda=False)
    assert batching.per_device == (1 if kernel == "varlen" else 4)
    assert batching.capacity == (256 if kernel == "varlen" else 64)
    cfg = ds_config(batching.rows_setup(setup), world_size=2)
    assert cfg["train_micro_batch_size_per_gpu"] == batching.per_device
    assert cfg["train_batch_size"] == batching.per_device * 2 * 2


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (
            TrainSetup(method="qlora"),
            "--method qlora (bitsandbytes quantizes on the GPU) needs a CUDA GPU: plan again "
            "without it (--method lora) to train on the CPU",
        ),
        (
            TrainSetup(optim="adamw_8bit"),
            "the adamw_8bit optimizer (bitsandbytes) needs a CUDA GPU: plan again without it "
            "to train on the CPU",
        ),
        (TrainSetup(zero=2), "DeepSpeed ZeRO-2 needs a CUDA GPU"),
        (TrainSetup(attn="flash_attention_2"), "flash_attention_2 needs a CUDA GPU"),
        (TrainSetup(fused_loss=True), "fused loss (Liger's Triton kernels) needs a CUDA GPU"),
        # every CPU-refused part in one line, and the plan options that leave them out
        (
            TrainSetup(method="qlora", fused_loss=True, zero=2),
            "--method qlora (bitsandbytes quantizes on the GPU), the fused loss (Liger's Triton "
            "kernels) and DeepSpeed ZeRO-2 need a CUDA GPU: plan again without them "
            "(--method lora, --no-fused-loss) to train on the CPU",
        ),
    ],
)
def test_preflight_on_a_cpu(setup: TrainSetup, needle: str) -> None:
    with pytest.raises(MissingDependencyError) as exc:
        sft.preflight(setup, cuda=False)
    assert needle in one_line(exc)
    assert cpu_refusal(TrainSetup()) is None  # a plain LoRA setup runs on the CPU


def test_fused_loss_without_liger_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name)
    )
    with pytest.raises(MissingDependencyError) as exc:
        sft.preflight(TrainSetup(fused_loss=True), cuda=True)
    assert one_line(exc) == (
        "the plan uses the fused loss (Liger fused linear cross-entropy), but liger-kernel is not "
        "installed: pip install liger-kernel, or plan again without it"
    )
    sft.preflight(TrainSetup(), cuda=True)  # a plain LoRA plan needs nothing extra


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--save-steps", "-2"], "--save-steps must be at least 1"),
    ],
)
def test_bad_options(tmp_path: Path, argv: list[str], needle: str) -> None:
    with pytest.raises(BadSetupError) as exc:
        opts(tmp_path, *argv)
    assert needle in one_line(exc)


# --------------------------------------------------------------------------- early refusals


def test_missing_data_file_exits_2_with_one_line(
    tmp_path: Path, model_dir: Path, subprocess_env: dict[str, str]
) -> None:
    plan = tinyllm.write_plan(tmp_path / "run", model_dir)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zeroplan.launch.sft",
            "--plan",
            str(plan),
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(plan.parent),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"zeroplan: error: no data file {tmp_path / 'missing.jsonl'}\n"
    assert not (plan.parent / "applied.json").exists()


def test_no_chat_template_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tinyllm.build_model_dir(tmp_path / "bare", template=None)
    tinyllm.write_plan(tmp_path / "run", bare)
    tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(4))
    monkeypatch.setattr(sft, "_load_model", _must_not_load)
    with pytest.raises(ChatTemplateError) as exc:
        sft.run(opts(tmp_path), sft.StopFlag(), [])
    assert "has no chat template, and alpaca records are rendered with one" in one_line(exc)


def test_bad_records_are_refused_before_the_model_loads(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tinyllm.write_plan(tmp_path / "run", model_dir)
    tinyllm.write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "input": "i"}])
    monkeypatch.setattr(sft, "_load_model", _must_not_load)
    with pytest.raises(ZeroplanError) as exc:
        sft.run(opts(tmp_path), sft.StopFlag(), [])
    assert one_line(exc).startswith(
        "record 1 looks like alpaca but has fields [input, instruction]"
    )


def test_resume_needs_a_checkpoint_and_a_new_run_needs_none(
    tmp_path: Path, model_dir: Path
) -> None:
    tinyllm.write_plan(tmp_path / "run", model_dir)
    tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(4))
    with pytest.raises(ResumeError) as exc:
        sft.run(opts(tmp_path, "--resume"), sft.StopFlag(), [])
    assert "no checkpoint in" in one_line(exc)
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "checkpoint-9").mkdir()  # unfinished: no trainer_state
    assert sft.last_checkpoint(tmp_path / "run") is None
    (ckpt / "trainer_state.json").write_text("{}")
    assert sft.last_checkpoint(tmp_path / "run") == ckpt
    with pytest.raises(ResumeError) as exc:
        sft.run(opts(tmp_path), sft.StopFlag(), [])
    assert "pass --resume" in one_line(exc)


def test_resuming_a_completed_run_trains_nothing_unless_asked_for_more_steps(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # seen on a real run: a Ctrl-C that lands after the last step, then --resume, trained a
    # step past --max-steps (transformers resumes a checkpoint at its last step that way)
    tinyllm.write_plan(tmp_path / "run", model_dir)
    tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(4))
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-12"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    result: dict[str, Any] = {"status": "completed", "global_step": 12, "max_steps": 12}
    result |= {"epochs": 1.0, "max_steps_given": 12}
    (tmp_path / "run" / "result.json").write_text(json.dumps(result))
    monkeypatch.setattr(sft, "_load_model", _must_not_load)
    assert sft.run(opts(tmp_path, "--resume", "--max-steps", "12"), sft.StopFlag(), []) == 0
    assert "nothing to resume: the run completed at step 12" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the model was loaded"):
        sft.run(opts(tmp_path, "--resume", "--max-steps", "20"), sft.StopFlag(), [])
    # --resume alone keeps the limits the run was started with (--max-steps 12): done
    assert sft.run(opts(tmp_path, "--resume"), sft.StopFlag(), []) == 0
    assert "nothing to resume: the run completed at step 12" in capsys.readouterr().err
    # new limits given with --resume hold instead: the rest of the epoch is asked for
    with pytest.raises(AssertionError, match="the model was loaded"):
        sft.run(opts(tmp_path, "--resume", "--epochs", "1"), sft.StopFlag(), [])
    # an epoch-long run: the same --epochs is done, more epochs are more to train
    result["max_steps_given"] = None
    (tmp_path / "run" / "result.json").write_text(json.dumps(result))
    assert sft.run(opts(tmp_path, "--resume"), sft.StopFlag(), []) == 0
    with pytest.raises(AssertionError, match="the model was loaded"):
        sft.run(opts(tmp_path, "--resume", "--epochs", "2"), sft.StopFlag(), [])
    result["status"] = "interrupted"
    (tmp_path / "run" / "result.json").write_text(json.dumps(result))
    with pytest.raises(AssertionError, match="the model was loaded"):
        sft.run(opts(tmp_path, "--resume"), sft.StopFlag(), [])


def test_resume_keeps_the_limits_the_run_was_started_with(tmp_path: Path) -> None:
    """Started with --max-steps 120, stopped at step 48: --resume alone still means 120."""
    run = tmp_path / "run"
    run.mkdir()
    base = ["--plan", str(run / "plan.json"), "--data", "d.jsonl", "--out", str(run)]
    # nothing recorded: the defaults
    assert (sft.parse_args([*base, "--resume"]).max_steps, sft.parse_args([*base]).epochs) == (
        None,
        1.0,
    )
    # a session killed before its result: applied.json's argv says what was asked
    (run / "applied.json").write_text(json.dumps({"argv": [*base, "--max-steps", "120"]}))
    assert sft.parse_args([*base, "--resume"]).max_steps == 120
    # the interrupted session's result.json
    result = {"status": "interrupted", "global_step": 48, "max_steps": 120}
    (run / "result.json").write_text(json.dumps({**result, "epochs": 2.0, "max_steps_given": 120}))
    resumed = sft.parse_args([*base, "--resume"])
    assert (resumed.max_steps, resumed.epochs) == (120, 2.0)
    # limits given now hold instead (either one replaces both)
    assert sft.parse_args([*base, "--resume", "--max-steps", "200"]).max_steps == 200
    more = sft.parse_args([*base, "--resume", "--epochs", "3"])
    assert (more.max_steps, more.epochs) == (None, 3.0)
    # without --resume nothing is carried over
    assert sft.parse_args(base).max_steps is None


def test_missing_data_before_torch(tmp_path: Path, model_dir: Path) -> None:
    tinyllm.write_plan(tmp_path / "run", model_dir)
    with pytest.raises(DataNotFoundError):
        sft.run(opts(tmp_path, data=str(tmp_path / "x.json")), sft.StopFlag(), [])


def _must_not_load(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded before the input was checked")


# --------------------------------------------------------------------------- callbacks


def test_stop_on_signal_saves_and_stops() -> None:
    from zeroplan.launch.callbacks import StopOnSignal

    flag = sft.StopFlag()
    cb = StopOnSignal(flag)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    cb.on_step_end(None, None, control)
    assert (control.should_save, control.should_training_stop) == (False, False)
    flag.signum = 15
    cb.on_step_end(None, None, control)
    assert (control.should_save, control.should_training_stop) == (True, True)


@pytest.mark.parametrize(
    ("fp16", "logs", "stops_at"),
    [
        # bf16 / fp32: the first non-finite loss or gradient norm stops the run
        (False, [(2.0, 1.0), (float("nan"), 1.0)], 2),
        (False, [(2.0, float("nan")), (2.0, 1.0)], 1),
        (False, [(2.0, float("inf"))], 1),
        (False, [(2.0, 1.0), (1.9, None)], None),
        # fp16: the scaler skips overflowed steps (their norm is inf): three bad losses in a row
        (True, [(2.0, float("inf")), (2.0, float("inf"))], None),
        (
            True,
            [(float("nan"), None), (2.0, 1.0), (float("nan"), None), (float("nan"), None)],
            None,
        ),
        (True, [(float("nan"), None)] * 3, 3),
    ],
)
def test_a_diverged_run_stops_without_saving_that_step(
    fp16: bool, logs: list[tuple[float, float | None]], stops_at: int | None
) -> None:
    from zeroplan.launch.callbacks import StopOnDivergence

    cb = StopOnDivergence(fp16=fp16)
    control = SimpleNamespace(should_save=True, should_training_stop=False)
    state = SimpleNamespace(global_step=0)
    for step, (loss, norm) in enumerate(logs, start=1):
        state.global_step = step
        cb.on_log(None, state, control, logs={"eval_loss": float("nan")})  # not a train line
        cb.on_log(None, state, control, logs={"loss": loss, "grad_norm": norm})
        if control.should_training_stop:
            break
    if stops_at is None:
        assert cb.diverged is None and not control.should_training_stop
    else:
        assert cb.diverged is not None and cb.diverged.step == stops_at
        assert control.should_training_stop and not control.should_save


def _trainer_flow(tmp_path: Path, **args: Any) -> tuple[Any, Any, Any, Any]:
    """The Trainer's own callback order: its flow callback first, then the run's."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import (
        CallbackHandler,
        DefaultFlowCallback,
        TrainerControl,
        TrainerState,
    )

    from zeroplan.launch.callbacks import StopOnDivergence, StopOnSignal

    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **args)
    flag = sft.StopFlag()
    divergence = StopOnDivergence(fp16=False)
    handler = CallbackHandler(
        [DefaultFlowCallback, StopOnSignal(flag), divergence], None, None, None, None
    )
    state = TrainerState(
        max_steps=100, logging_steps=targs.logging_steps, save_steps=targs.save_steps
    )
    return handler, targs, state, TrainerControl()


def test_the_step_that_diverged_is_not_saved_at_the_epochs_end(tmp_path: Path) -> None:
    """Seen with --lr 1e30: the run diverged at step 2 and stopped, and the Trainer's end of
    the epoch (save_strategy epoch, the default) saved that step's NaN weights as
    checkpoint-2, which the message then called the last good one."""
    handler, targs, state, control = _trainer_flow(tmp_path, save_strategy="epoch")
    state.global_step = 2
    control = handler.on_step_end(targs, state, control)
    control = handler.on_log(targs, state, control, {"loss": float("nan"), "grad_norm": 1.0})
    assert control.should_training_stop and not control.should_save
    control = handler.on_epoch_end(targs, state, control)  # the Trainer's loop, after the stop
    assert not control.should_save and not control.should_evaluate


def test_a_step_that_saves_logs_first_so_its_weights_are_checked(tmp_path: Path) -> None:
    """A save between two log lines would keep weights no line checked: the step that saves
    is logged too (the Trainer logs before it saves), and a non-finite line vetoes it."""
    handler, targs, state, control = _trainer_flow(
        tmp_path, save_strategy="steps", save_steps=5, logging_steps=10
    )
    state.global_step = 5
    control = handler.on_step_end(targs, state, control)
    assert control.should_save and control.should_log
    control = handler.on_log(targs, state, control, {"loss": 2.0, "grad_norm": float("inf")})
    assert not control.should_save


def test_result_json_is_strict_json_and_names_the_limit_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A diverged loss is null, not NaN, in result.json; a run stopped before its first step
    (the Trainer's max_steps still 0) records the --max-steps it was given."""
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=2, max_steps=0))
    options = opts(tmp_path, "--max-steps", "50")
    d = sft.Divergence(2, float("nan"), float("inf"))
    assert sft._finish(options, trainer, 0, "diverged", sft.StopFlag(), None, d) == 3

    def no_nan(name: str) -> None:
        raise AssertionError(f"{name} in result.json")

    result = json.loads((run / "result.json").read_text(), parse_constant=no_nan)
    assert result["diverged"] == {"step": 2, "loss": None, "grad_norm": None}
    assert result["max_steps"] == 50
    # checkpoint-2 holds the step that diverged: not the last good one
    assert result["last_checkpoint"] is None
    assert "no checkpoint was saved before it" in capsys.readouterr().err


def test_resume_keeps_the_runs_logging_and_saving_cadence(tmp_path: Path) -> None:
    """Logged every 5 steps and saved every 3: a --resume without them went on every 10
    (the Trainer warned that the checkpoint's logging_steps differ), and without
    --save-steps saved each epoch."""
    run = tmp_path / "run"
    run.mkdir()
    training = {"logging_steps": 5, "save_strategy": "steps", "save_steps": 3}
    training |= {"save_total_limit": None, "eval_strategy": "no", "eval_steps": None}
    (run / "applied.json").write_text(json.dumps({"argv": [], "training": training}))
    base = ["--plan", str(run / "plan.json"), "--data", "d.jsonl", "--out", str(run)]
    resumed = sft.parse_args([*base, "--resume"])
    assert (resumed.logging_steps, resumed.save_steps, resumed.save_total_limit) == (5, 3, 0)
    assert resumed.eval_steps is None
    again = sft.parse_args([*base, "--resume", "--logging-steps", "2", "--save-total-limit", "4"])
    assert (again.logging_steps, again.save_steps, again.save_total_limit) == (2, 3, 4)
    fresh = sft.parse_args(base)  # a new run starts from the defaults
    assert (fresh.logging_steps, fresh.save_steps, fresh.save_total_limit) == (10, None, 3)


def test_checkpoints_are_pruned_to_the_newest_three_unless_told(tmp_path: Path) -> None:
    kw = sft.training_kwargs(TrainSetup(), opts(tmp_path), False, None, False)
    assert kw["save_total_limit"] == sft.DEFAULT_SAVE_TOTAL_LIMIT == 3
    kw = sft.training_kwargs(
        TrainSetup(), opts(tmp_path, "--save-total-limit", "0"), False, None, False
    )
    assert kw["save_total_limit"] is None  # 0 keeps every checkpoint
    with pytest.raises(BadSetupError, match="--save-total-limit must be 0"):
        opts(tmp_path, "--save-total-limit", "-1")


def test_a_launch_that_diverges_stops_and_says_so(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate of 1e30 blows the adapters past fp32's range after one step: the run
    stops at the first non-finite log line with one message, result.json says where, no
    weights are written, and the rank exits with EXIT_DIVERGED."""
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(32))
    run = tmp_path / "run"
    tinyllm.write_plan(run, model_dir, micro_batch=2, lora_r=8, lora_dropout=0.0)
    argv = ["--plan", str(run / "plan.json"), "--data", str(data), "--out", str(run)]
    # saved each epoch (the default): the epoch's end comes after the stop, and must not save
    argv += ["--max-steps", "8", "--logging-steps", "1", "--lr", "1e30"]
    assert sft.run(sft.parse_args(argv), sft.StopFlag(), argv) == sft.EXIT_DIVERGED
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "diverged" and result["final"] is None
    assert 1 <= result["diverged"]["step"] < 8
    assert not (run / "final").exists() and sft.last_checkpoint(run) is None
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["event"] == "train"]
    assert train[-1]["step"] == result["diverged"]["step"]  # nothing trained after it
    err = capsys.readouterr().err
    assert f"error: training diverged at step {result['diverged']['step']}" in err
    assert "no checkpoint was saved before it" in err


def test_metrics_lines(tmp_path: Path) -> None:
    from zeroplan.launch.callbacks import MetricsWriter

    counter = sft.Counter()
    path = tmp_path / "metrics.jsonl"
    cb = MetricsWriter(path, counter)
    args = SimpleNamespace(process_index=3)
    state = SimpleNamespace(global_step=0, max_steps=10)
    cb.on_train_begin(args, state, None)
    counter.add(500, 800)  # 500 real tokens in batches of 800 positions
    state.global_step = 5
    cb.on_log(args, state, None, logs={"loss": 1.5, "learning_rate": 1e-4, "grad_norm": 0.5})
    cb.on_log(args, state, None, logs={"eval_loss": 1.7, "eval_runtime": 0.1})
    cb.on_log(args, state, None, logs={"train_loss": 1.6, "train_runtime": 3.0})
    cb.on_train_end(args, state, None)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["train", "eval", "end"]
    train, ev, end = lines
    assert {k: train[k] for k in ("rank", "step", "total_steps", "loss", "lr", "grad_norm")} == {
        "rank": 3,
        "step": 5,
        "total_steps": 10,
        "loss": 1.5,
        "lr": 1e-4,
        "grad_norm": 0.5,
    }
    assert train["tokens_per_s"] > 0
    assert train["padding"] == pytest.approx(0.375)
    assert (ev["loss"], ev["lr"], ev["tokens_per_s"]) == (1.7, None, None)
    assert end["loss"] == 1.6
    assert train["mem_allocated_bytes"] is None  # no GPU here


def test_model_named_by_the_launcher_wins(tmp_path: Path, model_dir: Path) -> None:
    """`zeroplan launch --model` writes plan.json's model_path; an older launch rewrote
    plan.json's model and kept the planned name as model_name."""
    path = tinyllm.write_plan(tmp_path, model_dir)
    data = json.loads(path.read_text())
    assert sft.read_plan(path).model == str(model_dir.resolve())
    data.update(model_path="someone/other-model")
    path.write_text(json.dumps(data))
    assert sft.read_plan(path).model == "someone/other-model"
    del data["model_path"]
    data.update(model_name=data["model"], model="someone/other-model")
    path.write_text(json.dumps(data))
    assert sft.read_plan(path).model == "someone/other-model"
    data.update(model=str(tmp_path))
    path.write_text(json.dumps(data))
    assert sft.read_plan(path).model == str(tmp_path.resolve())


# --------------------------------------------------------------------------- inference input


def test_inference_refusals(tmp_path: Path, model_dir: Path) -> None:
    from zeroplan.errors import NoWeightsError
    from zeroplan.launch import infer

    run = tmp_path / "run"
    # the newest by step, not by name ("checkpoint-6" sorts after "checkpoint-11"), and a
    # finished save (checkpoint-12 was cut short: no trainer_state.json)
    for step in (5, 6, 11, 12):
        (run / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        if step != 12:
            (run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    with pytest.raises(NoWeightsError) as exc:
        infer.weights_dir(run)
    assert one_line(exc).endswith(f"the newest checkpoint is {run}/checkpoints/checkpoint-11")
    with pytest.raises(NoWeightsError) as exc:
        infer.merge_adapter(model_dir, tmp_path / "merged")  # full weights: nothing to merge
    assert "not a LoRA adapter" in one_line(exc)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}):
        with pytest.raises(BadSetupError):
            infer.generate(model_dir, "hi", **bad)
    with pytest.raises(BadSetupError, match="either a prompt or messages"):
        infer.chat_messages({}, None, None)
    msgs = infer.chat_messages({"system_prompt": "be brief"}, "hi", None)
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_chat_template_file_replaces_the_tokenizers(tmp_path: Path, model_dir: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text(tinyllm.TEMPLATE_NO_MARKERS)
    tok = sft._load_tokenizer(str(model_dir), opts(tmp_path, "--chat-template", str(template)))
    assert tok.chat_template == tinyllm.TEMPLATE_NO_MARKERS


def test_gemma2_packs_with_the_mask_not_varlen(tmp_path: Path) -> None:
    """torch's varlen kernel has no soft-cap: Gemma-2's packed rows keep the plan's eager
    attention under a block mask, and an explicit varlen is refused in one line."""
    from zeroplan.errors import BadSetupError
    from zeroplan.launch import batching as zbatch
    from zeroplan.launch import data as zdata

    assert zbatch.choose_packed_attention("auto", True, "gemma2") == "mask"
    with pytest.raises(BadSetupError, match="no soft-cap"):
        zbatch.choose_packed_attention("varlen", False, "gemma2")
    setup = TrainSetup(micro_batch=2, seq_len=64, attn="eager")
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(8))
    tok = tinyllm.build_tokenizer()
    prepared = zdata.prepare(str(data), tok, 64)
    batching = sft._batching(opts(tmp_path), setup, prepared, tok, False, "gemma2")
    assert (batching.packed_attention, batching.attn_impl) == ("mask", "eager")


def test_sliding_window_models_pack_with_the_mask_where_varlen_has_no_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sliding layers whose window is shorter than the records: auto packs them under the
    block mask (what the plan counted: trainsetup.packed_attention); an explicit varlen is
    refused in one line on a GPU whose torch's kernel takes no window (an older one), kept where it
    takes one (window_size) and on the CPU (the reference applies the window)."""
    from zeroplan.errors import BadSetupError
    from zeroplan.launch import batching as zbatch
    from zeroplan.launch import data as zdata

    monkeypatch.setattr(zbatch, "varlen_available", lambda: True)
    choose = zbatch.choose_packed_attention
    assert choose("auto", True, "gemma3_text", 512, 1024) == "mask"
    assert choose("auto", True, "gemma3_text", 512, 512) == "varlen"  # every record fits
    assert choose("auto", True, "llama", None, 8192) == "varlen"
    monkeypatch.setattr(zbatch, "varlen_takes_window", lambda: False)
    with pytest.raises(BadSetupError, match="takes no window") as err:
        choose("varlen", True, "gemma3_text", 512, 1024)
    assert "\n" not in str(err.value) and "--packed-attention mask" in str(err.value)
    assert choose("varlen", False, "gemma3_text", 512, 1024) == "varlen"  # CPU reference
    assert choose("varlen", True, "gemma3_text", 512, 512) == "varlen"
    monkeypatch.setattr(zbatch, "varlen_takes_window", lambda: True)
    assert choose("varlen", True, "gemma3_text", 512, 1024) == "varlen"

    setup = TrainSetup(micro_batch=2, seq_len=64)
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(8))
    tok = tinyllm.build_tokenizer()
    prepared = zdata.prepare(str(data), tok, 64)
    batching = sft._batching(opts(tmp_path), setup, prepared, tok, True, "mistral", 32)
    assert (batching.packed_attention, batching.capacity, batching.per_device) == ("mask", 64, 2)


def test_launch_reads_the_window_the_plan_reads(tmp_path: Path) -> None:
    """sft._model_type_and_window applies the core's rule (models.sliding_window_of) to the config as
    transformers fills it in: the same window as the plan's ModelSpec."""
    import transformers

    from zeroplan.models import spec_from_config

    base = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300}  # fmt: skip
    for extra in (
        {"model_type": "mistral"},
        {"model_type": "mistral", "sliding_window": None},
        {"model_type": "gemma3_text", "sliding_window": 48},
        {"model_type": "llama"},
    ):
        cfg = {**base, **extra}
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        transformers.AutoConfig.for_model(**cfg).save_pretrained(folder)
        model_type, window = sft._model_type_and_window(str(folder))
        assert model_type == extra["model_type"]
        assert window == spec_from_config(cfg).sliding_window


def test_a_gloo_process_group_is_destroyed_before_the_interpreter_exits(tmp_path: Path) -> None:
    """sft.release_gloo (called by main after the run): left to the interpreter's teardown,
    gloo's threads aborted a stopped rank (SIGABRT) in CI; destroyed here, nothing is left,
    and a reference cycle that holds the group (the Trainer's, over its DDP wrapper) is
    collected with it while the interpreter is whole (automatic collection off: only
    release_gloo's own can free it)."""
    import gc
    import weakref

    import torch.distributed as dist

    class Holder:  # a Trainer -> DDP -> reducer -> group chain, in one cycle
        pass

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    gc.disable()
    try:
        holder = Holder()
        holder.me, holder.group = holder, dist.group.WORLD  # type: ignore[attr-defined]
        held = weakref.ref(holder)
        del holder
        assert dist.is_initialized() and held() is not None
        sft.release_gloo()
        assert not dist.is_initialized()
        assert held() is None
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
    sft.release_gloo()  # nothing to release: no error
