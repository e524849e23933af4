"""DeepSpeed configs: every one zeroplan emits is parsed by DeepSpeed's own DeepSpeedConfig.

The parser runs for real, on the CPU, inside a real single-process gloo process group
(``deepspeed.init_distributed``). DeepSpeedConfig asks the process group for the rank and
the world size and asserts ``train_batch_size == micro × accumulation × world``; without a
group it silently assumes world size 1. For world sizes above 1 the tests hand it an
``mpu`` (Megatron's model-parallel unit, the interface DeepSpeed itself uses to learn the
data-parallel size) whose only method returns that size: nothing of DeepSpeed is patched.

DeepSpeed's parser is lenient in ways a test must make up for: unknown top-level keys are
ignored, and "auto" inside ``zero_optimization`` is dropped in favour of DeepSpeed's default.
So after parsing, every field is compared with what zeroplan meant to set.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeroplan.api import resolve_cluster
from zeroplan.commands.cli import cli, main
from zeroplan.dsconfig import (
    HF_AUTO_KEYS,
    PRESETS,
    ds_config,
    dumps,
    preset_config,
    quant_storage_dtype,
    write_config,
    write_presets,
)
from zeroplan.errors import BadSetupError, ConfigWriteError, ZeroplanError
from zeroplan.trainsetup import METHODS, OFFLOADS, OPTIMIZERS, TrainSetup

# third-party noise: DeepSpeed's imports and ZeRO-3 collectives use torch APIs torch deprecates
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
        ":FutureWarning"
    ),
]

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "ds_configs"
OFFLOADS_BY_STAGE = {0: ("none",), 1: ("none", "optimizer"), 2: ("none", "optimizer"), 3: OFFLOADS}


# ----------------------------------------------------------------------------- DeepSpeed's parser


class DataParallel:
    """An mpu that only knows the data-parallel world size, all DeepSpeedConfig asks of it."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ds_parser() -> Iterator[Any]:
    """DeepSpeedConfig, inside a real one-process gloo group for the module's duration."""
    pytest.importorskip("deepspeed")
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops
    import torch.distributed as tdist
    from deepspeed.runtime.config import DeepSpeedConfig

    if tdist.is_initialized():  # someone else's group: use it, leave it alone
        yield DeepSpeedConfig
        return
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
        }.items():
            mp.setenv(name, value)
        # On the CPU accelerator DeepSpeed JIT-compiles an optional shared-memory allreduce
        # kernel when the group starts (~50 s of g++ on a fresh cache). Gloo does the
        # collectives without it, and the config parser never touches it.
        mp.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)
        deepspeed.init_distributed(dist_backend="gloo", dist_init_required=True)
        try:
            yield DeepSpeedConfig
        finally:
            tdist.destroy_process_group()
            ds_comm.cdb = None


def parse(ds_parser: Any, cfg: dict[str, Any], world: int) -> Any:
    return ds_parser(copy.deepcopy(cfg), mpu=DataParallel(world))


def assert_parsed(
    parsed: Any,
    cfg: dict[str, Any],
    setup: TrainSetup,
    *,
    world: int,
    accum: int,
    clip: float,
) -> None:
    """DeepSpeed's reading of ``cfg`` is what ``setup`` and the arguments asked for."""
    from deepspeed.runtime import constants as c
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    # DeepSpeed ignores unknown top-level keys, so a misspelt one would pass the parser
    known = {
        c.TRAIN_BATCH_SIZE,
        c.TRAIN_MICRO_BATCH_SIZE_PER_GPU,
        c.GRADIENT_ACCUMULATION_STEPS,
        c.GRADIENT_CLIPPING,
        c.BFLOAT16,
        c.FP16,
        c.ZERO_ALLOW_UNTESTED_OPTIMIZER,
        ZERO_OPTIMIZATION,
    }
    assert set(cfg) <= known, set(cfg) - known
    assert parsed.world_size == world
    assert parsed.train_micro_batch_size_per_gpu == setup.micro_batch
    assert parsed.gradient_accumulation_steps == accum
    assert parsed.train_batch_size == setup.micro_batch * accum * world
    assert parsed.gradient_clipping == clip
    assert parsed.bfloat16_config.enabled is not setup.fp16
    assert parsed.float16_config.enabled is setup.fp16
    if setup.fp16:
        fp16 = parsed.float16_config
        assert fp16.loss_scale == 0  # dynamic
        assert fp16.initial_scale_power == 16 and fp16.loss_scale_window == 1000
        assert fp16.hysteresis == 2 and fp16.min_loss_scale == 1
    assert parsed.optimizer_name is None and parsed.scheduler_name is None
    assert parsed.zero_allow_untested_optimizer is (
        setup.zero != 0 and setup.optim not in ("adamw_torch_fused", "adamw_torch")
    )

    zc = parsed.zero_config
    assert parsed.zero_optimization_stage == setup.zero
    assert parsed.zero_enabled is (setup.zero != 0)
    if setup.zero != 0:
        assert zc.overlap_comm is True
        assert zc.contiguous_gradients is True
        assert zc.reduce_bucket_size == setup.reduce_bucket_elems
    if setup.zero in (1, 2):
        assert zc.allgather_bucket_size == setup.allgather_bucket_elems
    if setup.zero == 3:
        assert zc.prefetch_bucket_size == setup.stage3_prefetch_elems
        assert zc.max_live_parameters == setup.stage3_max_live_elems
        assert zc.param_persistence_threshold == setup.stage3_persistence_threshold
        assert zc.gather_16bit_weights_on_model_save is True
    if setup.offload == "none":
        assert zc.offload_optimizer is None and zc.offload_param is None
    else:
        assert zc.offload_optimizer.device == "cpu"
        assert zc.offload_optimizer.pin_memory is True
    if setup.offload == "optimizer+params":
        assert zc.offload_param.device == "cpu"
        assert zc.offload_param.pin_memory is True
    elif setup.offload == "optimizer":
        assert zc.offload_param is None


EXAMPLES = [
    TrainSetup(zero=0),
    TrainSetup(zero=1),
    TrainSetup(zero=1, offload="optimizer"),
    TrainSetup(zero=2, method="full", micro_batch=4),
    TrainSetup(zero=2, offload="optimizer", reduce_bucket_elems=200_000_000),
    TrainSetup(zero=2, optim="adamw_8bit"),
    TrainSetup(zero=3, method="qlora", stage3_persistence_threshold=0),
    TrainSetup(zero=3, offload="optimizer", stage3_prefetch_elems=10_000_000),
    TrainSetup(zero=3, offload="optimizer+params", method="full", micro_batch=2),
    TrainSetup(zero=3, optim="paged_adamw_8bit"),
    TrainSetup(zero=0, precision="fp16"),
    TrainSetup(zero=2, method="full", precision="fp16"),
    TrainSetup(zero=3, method="qlora", offload="optimizer", precision="fp16"),
]


@pytest.mark.parametrize(
    "setup", EXAMPLES, ids=lambda s: f"z{s.zero}-{s.offload}-{s.optim}-{s.precision or 'bf16'}"
)
def test_deepspeed_parses_what_we_emit(ds_parser: Any, setup: TrainSetup) -> None:
    cfg = ds_config(dataclasses.replace(setup, grad_accum=4), world_size=8, grad_clip=0.5)
    assert_parsed(parse(ds_parser, cfg, 8), cfg, setup, world=8, accum=4, clip=0.5)


def test_world_size_comes_from_the_real_process_group(ds_parser: Any) -> None:
    """Without an mpu DeepSpeedConfig asks the (real, one-process) group: world size 1."""
    setup = TrainSetup(zero=2, micro_batch=3, grad_accum=5)
    cfg = ds_config(setup, world_size=1)
    parsed = ds_parser(copy.deepcopy(cfg))
    assert_parsed(parsed, cfg, setup, world=1, accum=5, clip=1.0)


def test_deepspeed_checks_the_batch_against_the_world_size(ds_parser: Any) -> None:
    """The world size we pass is really used: a config made for 8 GPUs fails on 4."""
    cfg = ds_config(TrainSetup(zero=3, micro_batch=2, grad_accum=2), world_size=8)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        parse(ds_parser, cfg, 4)


@pytest.mark.parametrize(
    ("stage", "optim"), [(0, "adamw"), (1, "sgd"), (2, "adamw"), (2, "sgd"), (3, "adamw")]
)
def test_deepspeed_engine_steps_with_the_config(
    ds_parser: Any, stage: int, optim: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the parser: deepspeed.initialize takes the config and the client optimizer
    (as the HF Trainer hands it over) and runs optimizer steps on the CPU. SGD is outside
    DeepSpeed's tested-with-ZeRO list, so it also checks zero_allow_untested_optimizer."""
    import deepspeed
    import torch

    # ZeRO-3 swaps torch.nn.functional.linear for its own, process-wide and for good
    # ("This will persist unless manually reset"); put it back for the tests that follow.
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    small = 10_000  # buckets that a 17k-parameter model actually fills
    setup = TrainSetup(
        zero=stage,
        micro_batch=2,
        optim=optim,
        reduce_bucket_elems=small,
        allgather_bucket_elems=small,
        stage3_prefetch_elems=small // 10,
        stage3_max_live_elems=small,
        stage3_persistence_threshold=10,
    )
    cfg = ds_config(dataclasses.replace(setup, grad_accum=2), world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    params = list(model.parameters())
    opt = (
        torch.optim.AdamW(params, lr=1e-3) if optim == "adamw" else torch.optim.SGD(params, lr=0.1)
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    for _ in range(4):  # 4 micro-steps = 2 optimizer steps at accumulation 2
        loss = engine(torch.randn(2, 64, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 2
    assert engine.zero_optimization_stage() == stage
    assert engine.train_batch_size() == 2 * 2


@st.composite
def valid_setups(draw: st.DrawFn) -> TrainSetup:
    stage = draw(st.integers(0, 3))
    offload = draw(st.sampled_from(OFFLOADS_BY_STAGE[stage]))
    torch_adamw = st.sampled_from(("adamw", "adamw_torch_fused", "adamw_torch"))
    optim = draw(torch_adamw) if offload != "none" else draw(st.sampled_from(OPTIMIZERS))
    bucket = st.integers(1, 2_000_000_000)
    return TrainSetup(
        method=draw(st.sampled_from(METHODS)),
        zero=stage,
        offload=offload,
        optim=optim,
        micro_batch=draw(st.integers(1, 64)),
        reduce_bucket_elems=draw(bucket),
        allgather_bucket_elems=draw(bucket),
        stage3_prefetch_elems=draw(bucket),
        stage3_max_live_elems=draw(bucket),
        stage3_persistence_threshold=draw(st.integers(0, 10_000_000)),
        precision=draw(st.sampled_from(("", "bf16", "fp16"))),
    )


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    setup=valid_setups(),
    accum=st.integers(1, 64),
    world=st.integers(1, 16),
    clip=st.one_of(st.just(0.0), st.floats(0.01, 100.0)),
)
def test_property_every_config_parses(
    ds_parser: Any, setup: TrainSetup, accum: int, world: int, clip: float
) -> None:
    cfg = ds_config(dataclasses.replace(setup, grad_accum=accum), world_size=world, grad_clip=clip)
    assert json.loads(dumps(cfg)) == cfg  # what is written is what was built
    assert_parsed(parse(ds_parser, cfg, world), cfg, setup, world=world, accum=accum, clip=clip)


@settings(max_examples=50, deadline=None)
@given(
    stage=st.sampled_from([None, 0, 1, 2, 3]),
    offload=st.sampled_from(OFFLOADS),
    optim=st.sampled_from(OPTIMIZERS),
    method=st.sampled_from(METHODS),
)
def test_property_any_combination_is_a_config_or_a_user_error(
    stage: int | None, offload: str, optim: str, method: str
) -> None:
    """No option combination crashes: it yields a config or a one-line BadSetupError."""
    try:
        setup = TrainSetup(zero=stage, offload=offload, optim=optim, method=method)
        cfg = ds_config(setup, world_size=2)
    except BadSetupError as exc:
        assert "\n" not in str(exc)
        return
    assert cfg["zero_optimization"]["stage"] == stage


# ----------------------------------------------------------------------------- ds_config itself


def test_no_zero_is_refused() -> None:
    with pytest.raises(BadSetupError) as info:
        ds_config(TrainSetup(), world_size=1)
    assert str(info.value) == "no DeepSpeed config for a run without --zero; pass --zero 0-3"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"world_size": 0}, "world size"),
        ({"world_size": 1, "grad_clip": -1.0}, "--grad-clip"),
        ({"world_size": 1, "grad_clip": math.nan}, "--grad-clip"),
        ({"world_size": 1, "grad_clip": math.inf}, "--grad-clip"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(BadSetupError, match=needle):
        ds_config(TrainSetup(zero=2), **kwargs)


@pytest.mark.parametrize("optim", ["adamw_8bit", "sgd"])
def test_offload_needs_adamw(optim: str) -> None:
    """Offloaded, the step runs as DeepSpeed's CPU Adam; another optimizer would be a lie."""
    with pytest.raises(BadSetupError, match=f"--optim {optim}"):
        ds_config(TrainSetup(zero=2, offload="optimizer", optim=optim), world_size=1)


def test_shape_by_stage() -> None:
    assert ds_config(TrainSetup(zero=0), world_size=2)["zero_optimization"] == {"stage": 0}
    z2 = ds_config(TrainSetup(zero=2), world_size=2)["zero_optimization"]
    assert "allgather_bucket_size" in z2 and not any(k.startswith("stage3") for k in z2)
    z3 = ds_config(TrainSetup(zero=3), world_size=2)["zero_optimization"]
    assert "allgather_bucket_size" not in z3 and z3["stage3_gather_16bit_weights_on_model_save"]
    for setup in [*EXAMPLES, *PRESETS.values()]:
        cfg = ds_config(dataclasses.replace(setup, grad_accum=2), world_size=3)
        assert "optimizer" not in cfg and "scheduler" not in cfg
        assert cfg["train_batch_size"] == setup.micro_batch * 2 * 3


def test_untested_optimizer_flag_only_where_deepspeed_needs_it() -> None:
    assert "zero_allow_untested_optimizer" not in ds_config(TrainSetup(zero=2), world_size=1)
    assert "zero_allow_untested_optimizer" not in ds_config(
        TrainSetup(zero=0, optim="sgd"), world_size=1
    )
    assert ds_config(TrainSetup(zero=1, optim="sgd"), world_size=1)["zero_allow_untested_optimizer"]


@pytest.mark.parametrize(
    ("method", "zero", "expected"),
    [
        ("qlora", 3, "bfloat16"),
        ("qlora", 2, None),
        ("qlora", None, None),
        ("lora", 3, None),
        ("full", 3, None),
    ],
)
def test_quant_storage_dtype(method: str, zero: int | None, expected: str | None) -> None:
    assert quant_storage_dtype(TrainSetup(method=method, zero=zero)) == expected


# ----------------------------------------------------------------------------- write_config


def test_write_config_writes_the_json(tmp_path: Path) -> None:
    cfg = ds_config(TrainSetup(zero=3), world_size=2)
    out = write_config(cfg, tmp_path / "ds.json")
    assert out.read_text(encoding="utf-8") == dumps(cfg)
    assert json.loads(out.read_text(encoding="utf-8")) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["ds.json"]


def test_write_config_keeps_the_old_file_on_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ds.json"
    target.write_text("old\n", encoding="utf-8")

    def interrupted(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_config(ds_config(TrainSetup(zero=2), world_size=1), target)
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ds.json"]  # no temporary file left


def test_write_config_unserialisable_touches_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_config({"bad": object()}, tmp_path / "ds.json")
    assert list(tmp_path.iterdir()) == []


def test_write_config_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigWriteError, match="cannot write") as info:
        write_config({}, tmp_path / "no" / "ds.json")
    assert isinstance(info.value, ZeroplanError)


def test_write_config_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = write_config({}, tmp_path / "ds.json")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- presets


def test_presets_match_the_generator_byte_for_byte(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zeroplan.dsconfig", "--write-presets", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    generated = sorted(p.name for p in tmp_path.glob("*.json"))
    assert generated == sorted(p.name for p in PRESET_DIR.glob("*.json"))
    assert generated == sorted(f"{name}.json" for name in PRESETS)
    for name in generated:
        assert (tmp_path / name).read_bytes() == (PRESET_DIR / name).read_bytes(), (
            f"ds_configs/{name} is stale: run python -m zeroplan.dsconfig --write-presets ds_configs"
        )


def test_write_presets_returns_the_paths(tmp_path: Path) -> None:
    paths = write_presets(tmp_path / "new")
    assert [p.name for p in paths] == [f"{name}.json" for name in PRESETS]


def test_presets_leave_only_the_trainer_keys_auto() -> None:
    for name, setup in PRESETS.items():
        cfg = json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
        autos = {k for k, v in cfg.items() if v == "auto"}
        assert autos == set(HF_AUTO_KEYS), name
        assert "auto" not in json.dumps(cfg["zero_optimization"]), name
        assert cfg == preset_config(setup)


def test_qlora_preset_is_zero3_on_the_deepspeed_side() -> None:
    """QLoRA on ZeRO-3 differs on the model side only (quant storage, see the README)."""
    assert preset_config(PRESETS["qlora_zero3"]) == preset_config(PRESETS["zero3"])
    assert quant_storage_dtype(PRESETS["qlora_zero3"]) == "bfloat16"
    assert "bnb_4bit_quant_storage" in (PRESET_DIR / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse_once_auto_is_filled(ds_parser: Any, name: str) -> None:
    """Fill "auto" by hand as the Trainer would (world 4, batch 2, accumulation 8, clip 0.3)."""
    cfg = json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
    filled = {
        **cfg,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 8,
        "train_batch_size": 2 * 8 * 4,
        "gradient_clipping": 0.3,
    }
    setup = PRESETS[name]
    expected = dataclasses.replace(setup, micro_batch=2)
    assert_parsed(parse(ds_parser, filled, 4), filled, expected, world=4, accum=8, clip=0.3)


def _hf_fill(preset: dict[str, Any], *, bf16: bool, fp16: bool = False) -> dict[str, Any]:
    """The HF Trainer's own "auto" filling (HfTrainerDeepSpeedConfig), for 4 ranks."""
    hf_ds = pytest.importorskip("transformers.integrations.deepspeed")
    pytest.importorskip("accelerate")
    args = SimpleNamespace(
        world_size=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        max_grad_norm=0.3,
        learning_rate=1e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        save_on_each_node=False,
        fp16=fp16,
        fp16_full_eval=False,
        bf16=bf16,
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: 0,
    )
    hf = hf_ds.HfTrainerDeepSpeedConfig(preset)
    try:
        hf.trainer_config_process(args)
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=4096))
        hf.trainer_config_finalize(args, model, num_training_steps=100)
        return dict(hf.config)
    finally:
        hf_ds.unset_hf_deepspeed_config()  # its global weakref would make later tests ZeRO-3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_through_the_hf_trainer_fill(ds_parser: Any, name: str) -> None:
    cfg = json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
    filled = _hf_fill(cfg, bf16=True)
    setup = dataclasses.replace(PRESETS[name], micro_batch=2)
    assert_parsed(parse(ds_parser, filled, 4), filled, setup, world=4, accum=8, clip=0.3)


def test_fp16_config_through_the_hf_trainer_fill(ds_parser: Any) -> None:
    """An fp16 config asks the Trainer for fp16=True, which launch passes (and refuses bf16)."""
    cfg = ds_config(TrainSetup(zero=2, precision="fp16", micro_batch=2), world_size=4)
    for key in HF_AUTO_KEYS:
        cfg[key] = "auto"
    with pytest.raises(ValueError, match=r"ds fp16\.enabled=True vs hf fp16"):
        _hf_fill(cfg, bf16=False)
    filled = _hf_fill(cfg, bf16=False, fp16=True)
    assert "bf16" not in filled and filled["fp16"]["enabled"] is True
    setup = TrainSetup(zero=2, precision="fp16", micro_batch=2)
    assert_parsed(parse(ds_parser, filled, 4), filled, setup, world=4, accum=8, clip=0.3)


def test_presets_demand_bf16_in_the_trainer() -> None:
    cfg = json.loads((PRESET_DIR / "zero2.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match=r"ds bf16\.enabled=True vs hf bf16"):
        _hf_fill(cfg, bf16=False)


# ----------------------------------------------------------------------------- the CLI


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.usefixtures("isolated_hf")
def test_cli_config_writes_valid_json(ds_parser: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = invoke(["config", "llama-3.2-1b", "--zero", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    cfg = json.loads(out.read_text(encoding="utf-8"))
    world = resolve_cluster(None).world_size  # no --gpus: this machine's GPUs, else 1xH100
    assert_parsed(
        parse(ds_parser, cfg, world), cfg, TrainSetup(zero=3), world=world, accum=1, clip=1.0
    )


@pytest.mark.usefixtures("isolated_hf")
def test_cli_config_prints_to_stdout(ds_parser: Any) -> None:
    args = ["config", "llama-3.2-1b", "--gpus", "2x8xH100", "--zero", "2", "--offload"]
    args += ["optimizer", "--micro-batch", "4", "--grad-accum", "2", "--grad-clip", "0"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    cfg = json.loads(result.stdout)
    assert cfg["train_batch_size"] == 4 * 2 * 16
    setup = TrainSetup(zero=2, offload="optimizer", micro_batch=4)
    assert_parsed(parse(ds_parser, cfg, 16), cfg, setup, world=16, accum=2, clip=0.0)


@pytest.mark.usefixtures("isolated_hf")
def test_cli_config_warns_when_it_does_not_fit(tmp_path: Path) -> None:
    out = tmp_path / "ds.json"
    args = ["config", "llama-3.1-70b", "--method", "full", "--zero", "2", "--gpus", "1x4090"]
    result = invoke([*args, "-o", str(out)])
    assert result.exit_code == 0
    assert json.loads(out.read_text(encoding="utf-8"))["zero_optimization"]["stage"] == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zeroplan: warning: ")
    assert "does not fit" in lines[0]


@pytest.mark.usefixtures("isolated_hf")
def test_cli_config_qlora_zero3_notes_quant_storage() -> None:
    result = invoke(["config", "llama-3.1-8b", "--method", "qlora", "--zero", "3"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["zero_optimization"]["stage"] == 3
    assert "bnb_4bit_quant_storage=torch.bfloat16" in result.stderr


@pytest.mark.usefixtures("isolated_hf")
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["config", "llama-3.2-1b"], "without --zero"),
        (["config", "llama-3.2-1b", "--zero", "5"], "--zero must be"),
        (["config", "no-such-model", "--zero", "2"], "unknown model"),
        (["config", "llama-3.2-1b", "--zero", "2", "--grad-accum", "0"], "--grad-accum"),
        (["config", "llama-3.2-1b", "--zero", "2", "-o", "MISSING/ds.json"], "cannot write"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_cli_config_mistakes_are_one_line_exit_2(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in args]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("zeroplan: error: ")
    assert needle in captured.err


def test_config_and_estimate_share_the_setup_options() -> None:
    def options(name: str, own: set[str]) -> dict[str, Any]:
        return {
            p.name: (p.default, p.opts, getattr(p, "help", None))
            for p in cli.commands[name].params
            if p.name not in own
        }

    # the links and hosts (--p2p, --inter-node-gbs, --cpu-cores-per-node) only change the
    # predicted speed, which config lacks; --data and its companions choose the sequence
    # length from records, which config takes
    data = {"data", "tokenizer", "chat_template", "data_format", "system_prompt", "overlong"}
    links = {"p2p", "inter_node_gbs", "cpu_cores_per_node"}
    # --recipe reads the setup from another trainer's file (estimate and plan)
    recipe = {"recipe_path", "recipe_format"}
    estimate_opts = options("estimate", {"as_json", "explain", *links, *data, *recipe})
    assert estimate_opts == options("config", {"grad_clip", "output"})
    assert {"gpus", "zero", "offload", "micro_batch", "lora_dropout", "fused_loss"} <= set(
        estimate_opts
    )


def test_config_does_not_import_the_heavy_stack(subprocess_env: dict[str, str]) -> None:
    code = (
        "import sys, io, contextlib, json, zeroplan.commands.cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    zeroplan.commands.cli.main(['config', 'llama-3.2-1b', '--gpus', '1xH100', '--zero', '3'])\n"
        "assert json.loads(out.getvalue())['zero_optimization']['stage'] == 3\n"
        "heavy = ('torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes', 'accelerate')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
