"""zeroplan launch / zeroplan env: the commands it builds, what it refuses before anything
starts, and real 2-process runs through torchrun on CPU with a stand-in rank program
(tests/standin_rank.py: same arguments as zeroplan.launch.sft, a few ms per step).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tinyllm
from click.testing import CliRunner
from fakenvml import fake_pynvml

from zeroplan.commands.cli import cli, main
from zeroplan.errors import (
    BadClusterSpecError,
    BadPlanError,
    ExpertDropoutError,
    GPUCountError,
    HostUnreachableError,
    NoGPUError,
    PredictedOOMError,
    ResumeError,
    RunDirExistsError,
    TokenizerNotFoundError,
    TrackerLoginError,
)
from zeroplan.hardware import GPU, parse_cluster
from zeroplan.launch import procs, progress
from zeroplan.launch.preflight import check_run_dir, preflight
from zeroplan.launch.runner import (
    Command,
    Launch,
    Node,
    TrainOptions,
    build_launch,
    default_launcher,
    find_plan,
    launch_env,
    plan_model,
    read_plan,
    resolve_nodes,
    select_nodes,
    torchrun_knows,
    write_files,
)
from zeroplan.launch.supervise import Supervisor
from zeroplan.launch.trackers import check_tracker, tracker_env
from zeroplan.planfiles import local_model, model_location, model_name
from zeroplan.trainsetup import TrainSetup

pytestmark = pytest.mark.usefixtures("isolated_hf")

ROOT = Path(__file__).resolve().parent.parent
STANDIN = Path(__file__).resolve().parent / "standin_rank.py"
QWEN = "Qwen/Qwen2.5-0.5B"
H100, RTX4090 = parse_cluster("H100").gpu, parse_cluster("4090").gpu


def make_plan(
    folder: Path, model: str = QWEN, gpus: str = "2xH100", setup: TrainSetup | None = None
) -> Path:
    """plan.json as `zeroplan plan -o folder` writes it, with ``setup`` as the choice."""
    data = plan_model(model, parse_cluster(gpus), {"seq_len": 256})
    data["best"]["setup"] = (setup or TrainSetup(method="lora", seq_len=256)).to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(data, indent=2))
    return folder / "plan.json"


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    return path


def launch_for(
    tmp_path: Path,
    data: Path,
    *,
    nodes: tuple[Node, ...] | None = None,
    launcher: str = "torchrun",
    gpu: Any = H100,
    setup: TrainSetup | None = None,
    gpus: str = "2xH100",
    **kw: Any,
) -> Launch:
    plan = read_plan(make_plan(tmp_path / "plan", gpus=gpus, setup=setup))
    return build_launch(
        plan,
        run_dir=tmp_path / "run",
        data=str(data),
        nodes=nodes or resolve_nodes(count=plan["world_size"]),
        launcher=launcher,
        gpu=gpu,
        train=kw.pop("train", TrainOptions()),
        port=kw.pop("port", 29611),
        inherited={},
        **kw,
    )


# -- the commands ---------------------------------------------------------------------------


def test_torchrun_one_node_command_files_and_passthrough(tmp_path: Path, data_file: Path) -> None:
    train = TrainOptions(
        epochs=2.0,
        max_steps=7,
        lr=1e-4,
        eval_fraction=0.1,
        resume=True,
        overlong="truncate",
        data_format="alpaca",
        system_prompt="Be brief.",
        save_steps=5,
        logging_steps=2,
    )
    la = launch_for(tmp_path, data_file, train=train, port=None)
    run = tmp_path.resolve() / "run"
    (cmd,) = la.commands
    argv = list(cmd.argv)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    i = argv.index("--module")
    opts = argv[3:i]
    assert opts[: opts.index("--master-port")] == [
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
    ]
    assert 1024 < la.port < 65536 and opts[opts.index("--master-port") + 1] == str(la.port)
    if torchrun_knows("--shutdown-timeout"):
        assert opts[opts.index("--shutdown-timeout") + 1] == "30"
    else:
        assert "--shutdown-timeout" not in opts
    assert argv[i + 1 :] == [
        "zeroplan.launch.ranklog",
        str(run / "logs"),
        "--",
        "-m",
        "zeroplan.launch.sft",
        "--plan",
        str(run / "plan.json"),
        "--data",
        str(data_file.resolve()),
        "--out",
        str(run),
        "--resume",
        "--epochs",
        "2.0",
        "--max-steps",
        "7",
        "--lr",
        "0.0001",
        "--eval-fraction",
        "0.1",
        "--overlong",
        "truncate",
        "--format",
        "alpaca",
        "--system-prompt",
        "Be brief.",
        "--save-steps",
        "5",
        "--logging-steps",
        "2",
    ]
    assert set(la.files) == {"plan.json", "launch.json"}  # no ZeRO: no ds_config.json
    assert json.loads(la.files["launch.json"])["commands"][0]["argv"] == argv
    written = write_files(la)
    assert {p.name for p in written} == {"plan.json", "launch.json"} and (run / "logs").is_dir()
    assert json.loads((run / "plan.json").read_text())["best"] == la.plan["best"]


def test_deepspeed_one_node_zero3_writes_its_config(tmp_path: Path, data_file: Path) -> None:
    zero3 = TrainSetup(method="lora", seq_len=256, zero=3)
    assert default_launcher(zero3) == "deepspeed" and default_launcher(TrainSetup()) == "torchrun"
    la = launch_for(tmp_path, data_file, launcher="deepspeed", setup=zero3)
    argv = list(la.commands[0].argv)
    assert argv[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert argv[3:9] == ["--num_gpus", "2", "--master_port", "29611", "--no_local_rank", "--module"]
    assert argv[9:12] == ["zeroplan.launch.ranklog", str(la.log_dir), "--"]
    cfg = json.loads(la.files["ds_config.json"])
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_batch_size"] == 2
    # --include picks GPUs: passed on exactly (DeepSpeed), or as CUDA_VISIBLE_DEVICES (torchrun)
    nodes = resolve_nodes(count=2, include="localhost:1,3", present=parse_cluster("4xH100"))
    assert nodes == (Node("localhost", (1, 3), True),)
    ds = launch_for(tmp_path, data_file, launcher="deepspeed", nodes=nodes, filtered=True)
    assert ds.commands[0].argv[3:5] == ("--include", "localhost:1,3")
    tr = launch_for(tmp_path, data_file, nodes=nodes, filtered=True)
    assert tr.commands[0].env == {"CUDA_VISIBLE_DEVICES": "1,3"}


def test_multi_node_deepspeed_hostfile_and_env_file(tmp_path: Path, data_file: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=8\nnode-b slots=8  # second box\n")
    nodes = resolve_nodes(count=16, hostfile=hosts)
    assert [(n.host, len(n.slots), n.local) for n in nodes] == [
        ("node-a", 8, False),
        ("node-b", 8, False),
    ]
    la = launch_for(
        tmp_path, data_file, launcher="deepspeed", nodes=nodes, gpu=RTX4090, gpus="2x8x4090"
    )
    run = la.run_dir
    argv = list(la.commands[0].argv)
    assert argv[3:7] == ["--hostfile", str(run / "hostfile"), "--master_addr", "node-a"]
    assert la.files["hostfile"] == "node-a slots=8\nnode-b slots=8\n"
    # several 4090 nodes: no P2P inside a box, but InfiniBand stays on between boxes
    assert "NCCL_P2P_DISABLE=1\n" in la.files["deepspeed_env"]
    assert "NCCL_IB_DISABLE" not in la.files["deepspeed_env"]
    assert la.env["DS_ENV_FILE"] == str(run / "deepspeed_env")


def test_multi_node_torchrun_one_command_per_node_over_ssh(tmp_path: Path, data_file: Path) -> None:
    nodes = (Node("node-a", tuple(range(8)), False), Node("node-b", tuple(range(8)), False))
    la = launch_for(tmp_path, data_file, nodes=nodes, gpus="2x8xH100")
    assert [c.host for c in la.commands] == ["node-a", "node-b"]
    for rank, cmd in enumerate(la.commands):
        assert cmd.argv[:6] == ("ssh", "-tt", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5")
        remote = shlex.split(cmd.argv[-1])
        assert remote[:5] == ["cd", os.getcwd(), "&&", "exec", "env"]
        i = remote.index("torch.distributed.run")
        assert remote[i + 1 : i + 11] == [
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--nproc-per-node",
            "8",
            "--master-addr",
            "node-a",
            "--master-port",
            "29611",
        ]
    assert la.files["hostfile"] == "node-a slots=8\nnode-b slots=8\n"
    uneven = (Node("node-a", (0, 1), False), Node("node-b", (0,), False))
    with pytest.raises(BadClusterSpecError, match="use --launcher deepspeed"):
        launch_for(tmp_path, data_file, nodes=uneven)


def test_environment_for_4090_and_h100(tmp_path: Path) -> None:
    one = (Node("localhost", (0, 1), True),)
    two = (Node("a", (0, 1), False), Node("b", (0, 1), False))
    base = {"PYTHONUNBUFFERED": "1", "ZEROPLAN_RUN_DIR": str(tmp_path)}
    alloc = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    omp = {"OMP_NUM_THREADS": "8"}  # 16 cores, 2 ranks per node

    def env(gpu: GPU, nodes: tuple[Node, ...], inherited: dict[str, str]) -> dict[str, str]:
        return launch_env(gpu, nodes, tmp_path, inherited, cpu_cores=16)

    assert env(H100, one, {}) == {**base, **omp, **alloc}
    assert env(RTX4090, one, {}) == {
        **base,
        **omp,
        **alloc,
        "NCCL_P2P_DISABLE": "1",
        "NCCL_IB_DISABLE": "1",
    }
    assert env(RTX4090, two, {}) == {**base, **omp, **alloc, "NCCL_P2P_DISABLE": "1"}
    # one GPU talks to nobody and has every core; a variable the user set is theirs
    assert env(RTX4090, (Node("localhost", (0,), True),), {}) == {
        **base,
        "OMP_NUM_THREADS": "16",
        **alloc,
    }
    mine = {
        "NCCL_P2P_DISABLE": "0",
        "PYTORCH_ALLOC_CONF": "expandable_segments:False",
        "OMP_NUM_THREADS": "3",
    }
    assert env(RTX4090, one, mine) == {**base, "NCCL_IB_DISABLE": "1"}


def test_omp_threads_share_the_cores_among_a_nodes_ranks(tmp_path: Path) -> None:
    """torchrun would give each of several ranks 1 thread (CPU Adam on one core)."""
    eight = (Node("localhost", tuple(range(8)), True),)
    assert launch_env(H100, eight, tmp_path, {}, cpu_cores=64)["OMP_NUM_THREADS"] == "8"
    assert launch_env(H100, eight, tmp_path, {}, cpu_cores=6)["OMP_NUM_THREADS"] == "1"
    uneven = (Node("a", (0, 1, 2, 3), False), Node("b", (0, 1), False))
    assert launch_env(H100, uneven, tmp_path, {}, cpu_cores=32)["OMP_NUM_THREADS"] == "8"


def test_include_exclude_follow_deepspeed() -> None:
    pool = {"a": 4, "b": 4}
    assert select_nodes(pool, include="a:0,2@b") == (
        Node("a", (0, 2), False),
        Node("b", (0, 1, 2, 3), False),
    )
    assert select_nodes(pool, exclude="a@b:3") == (Node("b", (0, 1, 2), False),)
    for bad, needle in [
        (dict(include="c"), "not in a, b"),
        (dict(include="a:7"), "GPU 7 on a"),
        (dict(include="a:x"), "host\\[:gpu"),
        (dict(include="a", exclude="b"), "cannot be used together"),
        (dict(exclude="a@b"), "leaves no GPU"),
    ]:
        with pytest.raises(BadClusterSpecError, match=needle):
            select_nodes(pool, **bad)  # type: ignore[arg-type]


def test_plan_files_and_model_folders_are_told_apart(tmp_path: Path) -> None:
    plan = make_plan(tmp_path / "p")
    assert find_plan(str(tmp_path / "p")) == plan and find_plan(str(plan)) == plan
    model = tmp_path / "tiny"
    model.mkdir()
    config = ROOT / "zeroplan/catalog/models/Qwen--Qwen2.5-0.5B.json"
    shutil.copy(config, model / "config.json")
    assert find_plan(str(model)) is None and find_plan(str(model / "config.json")) is None
    assert find_plan(QWEN) is None
    assert local_model(str(model / "config.json")) == str(model.resolve())
    assert local_model("tiny", near=tmp_path) == str(model.resolve())
    assert local_model(QWEN) is None
    (tmp_path / "empty.json").write_text(json.dumps({"model": "x", "best": None}))
    (tmp_path / "none.json").write_text(
        json.dumps({"model": "x", "cluster": "1xH100", "world_size": 1, "best": None})
    )
    with pytest.raises(BadPlanError, match="not a plan zeroplan wrote"):
        read_plan(tmp_path / "empty.json")
    with pytest.raises(BadPlanError, match="nothing to launch"):
        read_plan(tmp_path / "none.json")


def test_a_json_that_is_neither_plan_nor_config_is_said_to_be_neither(tmp_path: Path) -> None:
    """{} was read as a config.json: "architecture 'None' is not modelled ... open an issue"."""
    bad = tmp_path / "bad_plan.json"
    bad.write_text("{}")
    assert find_plan(str(bad)) == bad
    with pytest.raises(BadPlanError) as info:
        read_plan(bad)
    assert "is not a plan zeroplan wrote" in str(info.value)
    assert "nor a model's config.json (it has no model_type)" in str(info.value)


# -- dry run --------------------------------------------------------------------------------


def test_dry_run_prints_everything_and_starts_nothing(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("zeroplan.hardware.local_cluster", lambda: parse_cluster("2x4090"))
    plan = make_plan(tmp_path / "p")
    run = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        ["launch", str(plan.parent), "--data", str(data_file), "-o", str(run), "--dry-run"],
        catch_exceptions=False,
    )
    out = result.output
    assert result.exit_code == 0, out
    assert not run.exists()  # nothing written
    assert "nothing is started" in out and "ranks      2 with torchrun (localhost: GPUs 0,1)" in out
    assert "this host  2×RTX-4090" in out
    for line in (
        "  NCCL_P2P_DISABLE=1",
        "  NCCL_IB_DISABLE=1",
        "  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
    ):
        assert line in out.splitlines()
    assert "-m torch.distributed.run --nnodes 1 --nproc-per-node 2" in out
    assert f"-m zeroplan.launch.sft --plan {run.resolve()}/plan.json" in out
    for name in ("plan.json", "launch.json", "logs/launcher.log", "metrics.jsonl"):
        assert f"{run.resolve()}/{name}" in out
    assert "made for 2×H100-SXM-80GB" in out
    assert "preflight" in out and "estimate: " in out and "fits" in out
    assert "note: the plan was made for H100-SXM-80GB, this machine has RTX-4090" in out


def test_a_dry_run_that_would_be_refused_prints_everything_and_exits_2(
    tmp_path: Path, data_file: Path, subprocess_env: dict[str, str]
) -> None:
    """No GPU here: the dry run shows the commands, files and checks, then exits 2."""
    if importlib.util.find_spec("pynvml") is not None:
        from zeroplan.hardware import local_cluster

        if local_cluster() is not None:
            pytest.skip("this machine has NVIDIA GPUs")
    plan = make_plan(tmp_path / "p")
    run = tmp_path / "run"
    args = ["launch", str(plan.parent), "--data", str(data_file), "-o", str(run), "--dry-run"]
    done = subprocess.run(
        [sys.executable, "-m", "zeroplan", *args],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "nothing is started" in done.stdout and "\ncommands\n" in done.stdout
    assert "refuses: no NVIDIA GPU" in done.stdout and "\nfiles\n" in done.stdout
    assert done.stderr.startswith("zeroplan: error: no NVIDIA GPU")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not run.exists()


def test_launch_refuses_a_seq_len_past_the_context_window(
    tmp_path: Path, data_file: Path, subprocess_env: dict[str, str]
) -> None:
    args = ["launch", "meta-llama/Meta-Llama-3-8B-Instruct", "--gpus", "1xH100"]
    args += ["--seq-len", "16384", "--data", str(data_file), "-o", str(tmp_path / "r")]
    done = subprocess.run(
        [sys.executable, "-m", "zeroplan", *args, "--dry-run"],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("zeroplan: error: --seq-len 16,384 is longer")
    assert "context window of 8,192 tokens" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
    assert not (tmp_path / "r").exists()


def test_launch_plans_a_model_id_on_the_gpus_given(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("zeroplan.hardware.local_cluster", lambda: parse_cluster("4xH100"))
    result = CliRunner().invoke(
        cli,
        [
            "launch",
            QWEN,
            "--gpus",
            "4xH100",
            "--seq-len",
            "512",
            "--lora-r",
            "8",
            "--lora-targets",
            "q_proj,v_proj",
            "--data",
            str(data_file),
            "-o",
            str(tmp_path / "r"),
            "--dry-run",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "made for 4×H100-SXM-80GB" in result.output and "--nproc-per-node 4" in result.output
    # the job options are zeroplan plan's: the adapter planned is the one asked for
    assert "adapter    LoRA r=8 on q_proj, v_proj, 512 tokens a sequence" in result.output
    # planning options with a plan are a mistake, not silently ignored
    plan = make_plan(tmp_path / "p")
    bad = CliRunner().invoke(
        cli, ["launch", str(plan), "--data", str(data_file), "--method", "full", "--dry-run"]
    )
    assert bad.exit_code == 2 and "--method plan a model" in bad.output
    cores = CliRunner().invoke(
        cli,
        ["launch", str(plan), "--data", str(data_file), "--cpu-cores-per-node", "8", "--dry-run"],
    )
    assert cores.exit_code == 2 and "--cpu-cores-per-node plan a model" in cores.output


def tiny_model_folder(path: Path) -> Path:
    """A tiny Llama's config.json and tokenizer (chat template included), no weights: what
    planning, a dry run and preflight read."""
    import tinyllm

    tok = tinyllm.build_tokenizer()
    tok.save_pretrained(path)
    config = {**tinyllm.TINY_LLAMA, "vocab_size": len(tok), "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_launch_plans_a_recipe_as_plan_recipe_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """launch --recipe: the recipe's model, method, LoRA settings, sequence length and
    global batch are the job, planned on the GPUs given as zeroplan plan --recipe plans it;
    the dry run shows the mapping as plan prints it, then the launch."""
    from zeroplan.launch.envcheck import installed
    from zeroplan.planner import describe

    model = tiny_model_folder(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tinyllm.alpaca_records(16)))
    recipe = tmp_path / "train.yaml"
    recipe.write_text(
        f"model_name_or_path: {model}\n"
        "stage: sft\nfinetuning_type: lora\nlora_target: all\nlora_rank: 4\n"
        "cutoff_len: 64\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 3\n"
        "bf16: true\n"
    )
    monkeypatch.setattr("zeroplan.hardware.local_cluster", lambda: parse_cluster("2xH100"))
    monkeypatch.setenv("COLUMNS", "200")  # the mapping's lines unwrapped
    run = tmp_path / "run"
    args = ["--recipe", str(recipe), "--data", str(data), "--gpus", "2"]
    result = CliRunner().invoke(
        cli, ["launch", *args, "-o", str(run), "--dry-run"], catch_exceptions=False
    )
    out = result.output
    assert result.exit_code == 0, out
    assert not run.exists()  # nothing written
    assert f"recipe {recipe}: LLaMA-Factory 0.9.5 (llamafactory)" in out
    assert re.search(r"^ *lora_r +4 +lora_rank *$", out, re.MULTILINE)
    assert re.search(r"^ *grad_ckpt +True +default *$", out, re.MULTILINE)  # LLaMA-Factory's
    assert "adapter    LoRA r=4 on all-linear, 64 tokens a sequence" in out
    assert "made for 2×H100-SXM-80GB" in out and "--nproc-per-node 2" in out
    assert f"(model: {model})" in out and "estimate: " in out and "fits" in out

    # the same plan as zeroplan plan --recipe on that cluster (the setup the plan chose,
    # not the recipe's micro-batch; its global batch 2 × 3 × 2 GPUs kept)
    fused = [] if installed("liger_kernel") else ["--no-fused-loss"]
    plan_args = ["plan", "--recipe", str(recipe), "--data", str(data), "--gpus", "2xH100"]
    main([*plan_args, *fused, "--json"])
    planned = json.loads(capsys.readouterr().out)
    best = TrainSetup(**planned["best"]["setup"])
    assert best.micro_batch * best.grad_accum * 2 == 12 and best.lora_r == 4
    assert f"lora · {planned['best']['family'].split(' · ')[1]}, {describe(best)}" in out

    # an option beside the recipe overrides it, as in zeroplan plan
    result = CliRunner().invoke(
        cli, ["launch", *args, "--lora-r", "8", "--dry-run"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"^ *lora_r +8 +--lora-r \(the recipe's: 4\) *$", result.output, re.MULTILINE)
    assert "adapter    LoRA r=8 on all-linear, 64 tokens a sequence" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Missing argument 'MODEL_OR_PLAN' (or give --recipe FILE)"),
        ([QWEN, "--recipe", "RECIPE"], "and --recipe: give one"),
        (["--recipe", "FREEZE"], "finetuning_type: freeze is not modelled"),
        (["--recipe", "RECIPE", "--recipe-format", "axolotl"], "no base_model: add it"),
        (["--recipe", "missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_launch_recipe_is_one_line_exit_2_nothing_written(
    tmp_path: Path,
    data_file: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    recipe = tmp_path / "train.yaml"
    recipe.write_text("model_name_or_path: llama-3.2-1b\nfinetuning_type: lora\n")
    freeze = tmp_path / "freeze.yaml"
    freeze.write_text("model_name_or_path: llama-3.2-1b\nfinetuning_type: freeze\n")
    named = {"RECIPE": str(recipe), "FREEZE": str(freeze)}
    run = tmp_path / "run"
    argv = ["launch", *(named.get(a, a) for a in args), "--data", str(data_file), "-o", str(run)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--gpus", "1xH100"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2, err
    assert err.startswith("zeroplan: error: ") and err.count("\n") == 1 and message in err
    assert out == "" and not run.exists()


# -- preflight: one line each, before anything starts ---------------------------------------


def run_cli(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zeroplan", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        **kw,
    )


@pytest.fixture
def launch_env_vars(subprocess_env: dict[str, str]) -> dict[str, str]:
    """No GPU visible whatever the machine, and fast stand-in steps."""
    return {**subprocess_env, "CUDA_VISIBLE_DEVICES": "", "STANDIN_STEP_S": "0.05"}


def test_missing_data_is_one_line_and_nothing_starts(
    tmp_path: Path, launch_env_vars: dict[str, str]
) -> None:
    plan = make_plan(tmp_path / "p")
    run = tmp_path / "run"
    proc = run_cli(
        ["launch", str(plan), "--data", str(tmp_path / "nope.jsonl"), "-o", str(run), "--force"],
        launch_env_vars,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"zeroplan: error: data file {tmp_path}/nope.jsonl does not exist"
    )
    assert not run.exists()


def test_no_gpu_is_refused_unless_forced(tmp_path: Path, data_file: Path) -> None:
    la = launch_for(tmp_path, data_file)
    (err,) = preflight(la, None).errors
    assert isinstance(err, NoGPUError) and "--force" in str(err)
    forced = preflight(la, None, force=True)
    assert forced.ok and any("on CPU" in note for note in forced.notes)


def test_a_dry_run_without_a_gpu_is_not_told_to_dry_run(tmp_path: Path, data_file: Path) -> None:
    la = launch_for(tmp_path, data_file)
    (err,) = preflight(la, None).errors
    assert "--dry-run shows the commands" in str(err)
    # a dry run is already showing them: its refusal does not offer one
    (dry,) = preflight(la, None, hosts=False, dry_run=True).errors
    assert isinstance(dry, NoGPUError)
    assert "--dry-run" not in str(dry) and "--force starts the ranks" in str(dry)


def test_a_missing_torch_is_said_in_a_sentence(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh venv's dry run read 'every rank runs PyTorch needs torch'."""
    from zeroplan.launch import envcheck

    real = envcheck.installed
    monkeypatch.setattr(envcheck, "installed", lambda name: name != "torch" and real(name))
    la = launch_for(tmp_path, data_file)
    errors = [str(e) for e in preflight(la, parse_cluster("2xH100")).errors]
    assert (
        "training (every rank runs PyTorch) needs torch, which is not installed here: "
        "pip install 'zeroplan[train]'"
    ) in errors


@pytest.mark.parametrize(
    ("gpus", "needle"), [("-1", "--gpus must be at least 1, got -1"), ("65", "at most 64")]
)
def test_launch_gpu_counts_out_of_range_are_one_line(
    gpus: str, needle: str, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-1 was looked up as a GPU name: 'unknown GPU '-1'' and the whole catalog."""
    with pytest.raises(SystemExit) as info:
        main(["launch", QWEN, "--data", str(data_file), "--gpus", gpus, "--dry-run"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "unknown GPU" not in err


def test_model_folder_without_tokenizer(tmp_path: Path, data_file: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    shutil.copy(ROOT / "zeroplan/catalog/models/Qwen--Qwen2.5-0.5B.json", model / "config.json")
    plan = read_plan(make_plan(tmp_path / "p", model=str(model)))
    assert plan["model"] == "my-model"  # the plan keeps a name, and the folder beside it
    source = str(model.resolve())
    assert plan["model_path"] == source
    la = build_launch(
        plan,
        run_dir=tmp_path / "run",
        data=str(data_file),
        nodes=resolve_nodes(count=2),
        launcher="torchrun",
        gpu=H100,
        train=TrainOptions(),
    )
    assert la.plan["model"] == "my-model" and la.plan["model_path"] == source
    assert la.model == source  # what preflight checks and zeroplan.launch.sft loads
    (err,) = preflight(la, parse_cluster("2xH100")).errors
    assert isinstance(err, TokenizerNotFoundError)
    assert str(err).startswith(f"model folder {model.resolve()} has no tokenizer")
    (model / "tokenizer.json").write_text("{}")
    assert preflight(la, parse_cluster("2xH100")).ok


def test_plan_then_launch_a_local_model_folder_from_elsewhere(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's two steps for a local model, with one H100 present (only NVML is faked):
    the plan is made in one folder and launched from another, so the model's folder name
    alone resolves nowhere; preflight's memory check must load it from where it is."""
    model = tmp_path / "models" / "my-model"
    model.mkdir(parents=True)
    shutil.copy(ROOT / "zeroplan/catalog/models/Qwen--Qwen2.5-0.5B.json", model / "config.json")
    (model / "tokenizer.json").write_text("{}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_pynvml([("NVIDIA H100 80GB HBM3", 85_520_809_984)])
    )
    monkeypatch.chdir(tmp_path)
    plan_args = ["./models/my-model", "--seq-len", "512", "--no-fused-loss", "--no-liger"]
    made = CliRunner().invoke(cli, ["plan", *plan_args, "-o", "runs/plan"])
    assert made.exit_code == 0, made.output
    plan = json.loads((tmp_path / "runs/plan/plan.json").read_text())
    assert plan["model"] == "my-model"  # the name, for display
    assert plan["model_path"] == str(model.resolve())  # where it is, from any folder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = elsewhere / "run"
    args = ["launch", "../runs/plan", "--data", str(data_file), "-o", str(run), "--dry-run"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    out = result.output
    assert result.exit_code == 0, out
    assert "this host  1×H100-SXM-80GB" in out
    assert "estimate: " in out and "of 79.6 GiB per GPU: fits" in out
    assert f"(model: {model.resolve()})" in out  # the run's plan.json points the ranks there
    assert not run.exists()

    # what the ranks read: the run folder's plan.json, as build_launch writes it
    from zeroplan.launch.sft import read_plan as read_run_plan

    la = build_launch(
        read_plan(tmp_path / "runs/plan/plan.json"),
        run_dir=run,
        data=str(data_file),
        nodes=resolve_nodes(count=1),
        launcher="torchrun",
        gpu=H100,
        train=TrainOptions(),
    )
    (run / "sub").mkdir(parents=True)
    (run / "plan.json").write_text(la.files["plan.json"])
    monkeypatch.chdir(run / "sub")
    assert read_run_plan(run / "plan.json").model == str(model.resolve())
    assert json.loads(la.files["plan.json"])["model"] == "my-model"


def test_older_plan_files_still_say_where_the_model_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan.json files from before model_path: a relative model_source (from the folder the
    plan was made in), and a run folder's plan where launch --model wrote the location as
    ``model`` and the name as ``model_name``."""
    model = tmp_path / "models" / "my-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    old = {"model": "my-model", "model_source": "models/my-model/config.json"}
    monkeypatch.chdir(tmp_path)
    assert model_location(old) == str(model.resolve()) and model_name(old) == "my-model"
    monkeypatch.chdir(model)
    assert model_location(old) == "my-model"  # not found from here: the name is all there is
    assert model_location(old, near=tmp_path) == str(model.resolve())
    launched = {"model": "/w/my-model", "model_name": "my-model", "model_source": "x/config.json"}
    assert (model_location(launched), model_name(launched)) == ("/w/my-model", "my-model")
    hub = {"model": QWEN, "model_path": None, "model_source": "catalog"}
    assert (model_location(hub), model_name(hub)) == (QWEN, QWEN)


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_report_to_a_tracker_that_is_not_installed_starts_nothing(
    tmp_path: Path, data_file: Path, tracker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    plan, run = make_plan(tmp_path / "p"), tmp_path / "run"
    args = ["launch", str(plan), "--data", str(data_file), "-o", str(run), "--force"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--report-to", tracker])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"zeroplan: error: --report-to {tracker} needs {tracker}, which is not installed "
        f"here: pip install {tracker}\n"
    )
    assert not run.exists()  # nothing started, nothing written


def test_report_to_an_unknown_tracker_is_a_usage_error(tmp_path: Path, data_file: Path) -> None:
    plan = make_plan(tmp_path / "p")
    args = ["launch", str(plan), "--data", str(data_file), "--report-to", "comet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "'comet' is not one of 'none', 'tensorboard', 'wandb', 'mlflow'" in result.output


def test_wandb_needs_a_login_or_offline_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text("")  # an installed wandb, as find_spec sees it
    monkeypatch.syspath_prepend(str(site))
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    with pytest.raises(TrackerLoginError, match=r"no api\.wandb\.ai entry in .*/home/\.netrc"):
        check_tracker("wandb", env)
    check_tracker("wandb", env, login=False)  # a rank that does not log needs no login
    check_tracker("wandb", {**env, "WANDB_MODE": "offline"})
    check_tracker("wandb", {**env, "WANDB_API_KEY": "k"})
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    check_tracker("wandb", env)
    with pytest.raises(TrackerLoginError, match=r"no wandb\.example\.com entry"):
        check_tracker("wandb", {**env, "WANDB_BASE_URL": "https://wandb.example.com"})


def test_trackers_write_into_the_run_folder_unless_told_otherwise(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert tracker_env("tensorboard", run, {}) == {"TENSORBOARD_LOGGING_DIR": str(run / "tb")}
    assert tracker_env("wandb", run, {}) == {"WANDB_DIR": str(run)}
    assert tracker_env("mlflow", run, {}) == {"MLFLOW_TRACKING_URI": f"file://{run}/mlruns"}
    assert tracker_env("mlflow", run, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == {}
    assert tracker_env("none", run, {}) == {}
    la = launch_for(tmp_path, tmp_path / "d.jsonl", train=TrainOptions(report_to="tensorboard"))
    assert la.report_to == "tensorboard"
    assert la.rank_argv[-2:] == ("--report-to", "tensorboard")


def test_more_gpus_than_present(tmp_path: Path, data_file: Path) -> None:
    la = launch_for(tmp_path, data_file, nodes=resolve_nodes(count=4), gpus="4xH100")
    (err,) = preflight(la, parse_cluster("2x4090"), force=True).errors
    assert isinstance(err, GPUCountError)
    assert str(err).startswith("this run needs 4 GPUs on this machine, which has 2 (2×RTX-4090)")
    picked = launch_for(tmp_path, data_file, nodes=(Node("localhost", (0, 5), True),))
    (err,) = preflight(picked, parse_cluster("2x4090")).errors
    assert "GPU 5 does not exist" in str(err)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs an ssh client")
def test_unreachable_host(tmp_path: Path, data_file: Path) -> None:
    nodes = (Node("localhost", (0, 1), True), Node("nonexistent-host.invalid", (0, 1), False))
    la = launch_for(tmp_path, data_file, nodes=nodes, gpus="2x2xH100")
    t0 = time.monotonic()
    (err,) = preflight(la, parse_cluster("2xH100")).errors
    assert isinstance(err, HostUnreachableError) and time.monotonic() - t0 < 20
    assert "\n" not in str(err)
    assert str(err).startswith("host not reachable over ssh (nonexistent-host.invalid: ")
    assert preflight(la, parse_cluster("2xH100"), hosts=False).ok  # the dry run does not try


def test_predicted_oom_is_refused_with_the_planners_fix_and_forced(
    tmp_path: Path, data_file: Path
) -> None:
    # what the story ran: LoRA of Llama-3.1-8B, micro-batch 4, no checkpointing, on 24 GB
    story = TrainSetup(method="lora", micro_batch=4, seq_len=2048, grad_accum=4)
    plan = plan_model("llama-3.1-8b-instruct", parse_cluster("7xH100"))
    planned = build_launch(
        plan,
        run_dir=tmp_path / "run",
        data=str(data_file),
        nodes=resolve_nodes(count=7),
        launcher="torchrun",
        gpu=RTX4090,
        train=TrainOptions(),
    )
    plan["best"]["setup"] = story.to_dict()
    la = build_launch(
        plan,
        run_dir=tmp_path / "run",
        data=str(data_file),
        nodes=resolve_nodes(count=7),
        launcher="torchrun",
        gpu=RTX4090,
        train=TrainOptions(),
    )
    (err,) = preflight(la, parse_cluster("7x4090")).errors
    assert isinstance(err, PredictedOOMError)
    msg = str(err)
    assert msg.startswith("predicted out of memory on 7×RTX-4090: micro-batch 4, × 4 accumulation")
    assert "the planner's choice for 7×RTX-4090 is" in msg
    assert "zeroplan plan meta-llama/Llama-3.1-8B-Instruct --gpus 7xRTX-4090" in msg
    assert msg.endswith("--force starts it anyway") and "\n" not in msg
    forced = preflight(la, parse_cluster("7x4090"), force=True)
    assert forced.ok and forced.estimate is not None and not forced.estimate.fits
    assert any("predicted out of memory" in n for n in forced.notes)
    # the planner's own choice, on the H100s it was made for, fits
    on_h100 = preflight(planned, parse_cluster("7xH100"))
    assert on_h100.estimate is not None and on_h100.estimate.fits
    assert not [e for e in on_h100.errors if isinstance(e, PredictedOOMError)]


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path: Path, data_file: Path) -> None:
    la = launch_for(tmp_path, data_file)
    la.run_dir.mkdir()
    (la.run_dir / "metrics.jsonl").write_text(json.dumps({"rank": 0, "step": 1}) + "\n")
    saved(la.run_dir, 1)
    (err,) = preflight(la, None, force=True).errors
    assert isinstance(err, RunDirExistsError) and "--resume continues it" in str(err)
    resumed = launch_for(tmp_path, data_file, train=TrainOptions(resume=True))
    assert preflight(resumed, None, force=True).ok


def saved(run: Path, step: int) -> Path:
    """A finished save, as the Trainer leaves it (trainer_state.json last)."""
    ckpt = run / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def tiny_launch(
    tmp_path: Path,
    data: Path,
    *,
    plan_dir: str = "plan",
    run: Path | None = None,
    train: TrainOptions | None = None,
    **setup: Any,
) -> Launch:
    """A one-GPU launch of a plan (in tmp_path/plan_dir) for a tiny model folder with a
    tokenizer and chat template: preflight reads and renders the data with them."""
    model = tmp_path / "model"
    if not model.is_dir():
        model.mkdir()
        tiny_model_folder(model)
    chosen = TrainSetup(**{"method": "lora", "seq_len": 64, **setup})
    plan_path = make_plan(tmp_path / plan_dir, model=str(model), gpus="1xH100", setup=chosen)
    return build_launch(
        read_plan(plan_path),
        run_dir=run or tmp_path / "run",
        data=str(data),
        nodes=resolve_nodes(count=1),
        launcher="torchrun",
        gpu=H100,
        train=train or TrainOptions(),
        port=29611,
        inherited={},
        source=plan_path,
    )


def refusals(la: Launch) -> list[str]:
    return [str(e) for e in preflight(la, None, force=True).errors]


GOOD = {"instruction": "Say hello.", "output": "hello world"}


@pytest.mark.parametrize(
    ("name", "body", "needle"),
    [
        ("empty.jsonl", "", "holds no records"),
        ("bad.jsonl", "not json\n", "line 1 is not JSON"),
        ("fields.jsonl", '{"foo": 1}\n', "has fields [foo]"),
        ("long.jsonl", json.dumps({**GOOD, "output": "hello " * 200}), "longer than --seq-len 64"),
        ("user.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ("copy.txt", json.dumps(GOOD), "unknown data file type '.txt'"),
        ("none.json", "[]", "holds no records"),
        ("empty_text.jsonl", '{"text": ""}\n{"text": ""}\n', "are empty texts"),
    ],
)
def test_records_the_ranks_would_stop_on_are_refused_before_anything_starts(
    tmp_path: Path, name: str, body: str, needle: str
) -> None:
    """Each failed inside the rank after 5-10 s (exit 1) and left plan.json, launch.json,
    logs/ and samples in the run folder; preflight reads and renders the records as
    zeroplan plan --data does (the plan's tokenizer and chat template, its sequence length)."""
    data = tmp_path / name
    data.write_text(body)
    (error,) = refusals(tiny_launch(tmp_path, data))
    assert needle in error and "\n" not in error


def test_a_bad_data_file_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, launch_env_vars: dict[str, str]
) -> None:
    la = tiny_launch(tmp_path, tmp_path / "unused.jsonl")
    data = tmp_path / "user.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    run = tmp_path / "r"
    args = ["launch", str(la.source), "--data", str(data), "-o", str(run), "--force"]
    proc = run_cli(args, launch_env_vars)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "record 1 has no assistant message" in proc.stderr and not run.exists()


def test_resuming_with_another_plan_is_refused_and_the_runs_plan_kept(
    tmp_path: Path, data_file: Path
) -> None:
    """`--resume -o RUN` with a plan of another LoRA rank rewrote RUN/plan.json, then the rank
    failed on the adapter's shape, and every later resume used the wrong plan."""
    first = tiny_launch(tmp_path, data_file, lora_r=16)
    write_files(first)
    saved(first.run_dir, 6)
    kept = (first.run_dir / "plan.json").read_bytes()
    resume = TrainOptions(resume=True)
    other = tiny_launch(tmp_path, data_file, plan_dir="other", train=resume, lora_r=4)
    (error,) = refusals(other)
    assert error.startswith(f"--resume: {first.run_dir} was trained with another plan (lora_r 16")
    assert (first.run_dir / "plan.json").read_bytes() == kept
    # a plan that differs only in how fast a step runs continues the run
    faster = tiny_launch(tmp_path, data_file, plan_dir="fast", train=resume, grad_ckpt=True)
    checks = preflight(faster, None, force=True)
    assert (
        checks.ok and f"resuming from {first.run_dir}/checkpoints/checkpoint-6" in checks.notes[0]
    )


def saved_by(run: Path, step: int, ranks: int) -> Path:
    """A finished save of a run of ``ranks`` processes: the Trainer's random-number state,
    one file a rank (one file, unnumbered, from a run of one)."""
    ckpt = saved(run, step)
    names = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]
    for name in names:
        (ckpt / name).write_bytes(b"")
    return ckpt


def test_resuming_zero_on_another_gpu_count_is_refused_before_anything_starts(
    tmp_path: Path, data_file: Path
) -> None:
    """A ZeRO-2 run saved on 2 GPUs, resumed on 1: preflight passed and the launch rewrote
    the folder's launch.json, for every rank to raise DeepSpeed's "The checkpoint being
    loaded used a DP world size of 2 but the current world size is 1" as it loads it."""
    first = tiny_launch(tmp_path, data_file, zero=2)
    first = dataclasses.replace(first, nodes=resolve_nodes(count=2))
    write_files(first)
    ckpt = saved_by(first.run_dir, 6, 2)
    resume = TrainOptions(resume=True)
    one = dataclasses.replace(first, resume=True, train=resume, nodes=resolve_nodes(count=1))
    checks = preflight(one, None, force=True)
    error = str(checks.errors[0])  # the one the launch raises
    assert isinstance(checks.errors[0], ResumeError) and "\n" not in error
    assert error.startswith(
        f"--resume: {ckpt.name} in {first.run_dir} was saved by 2 GPUs under ZeRO-2, and "
        "this launch has 1 GPU"
    )
    assert "--gpus 2" in error and "-o NEW_DIR" in error
    # on as many GPUs as saved it, it resumes
    two = dataclasses.replace(one, nodes=resolve_nodes(count=2))
    assert not any(isinstance(e, ResumeError) for e in preflight(two, None, force=True).errors)


@pytest.mark.parametrize("zero", [None, 0])
def test_resuming_without_zero_on_another_gpu_count_says_what_changes(
    tmp_path: Path, data_file: Path, zero: int | None
) -> None:
    """Without ZeRO's split (or at ZeRO-0) the optimizer state is whole: any count loads it;
    the note says the global batch changes and so where this epoch's data resumes."""
    first = tiny_launch(tmp_path, data_file, zero=zero, micro_batch=2, grad_accum=3)
    write_files(first)
    saved_by(first.run_dir, 6, 2)
    resumed = dataclasses.replace(first, resume=True, train=TrainOptions(resume=True))
    checks = preflight(resumed, None, force=True)
    assert not any(isinstance(e, ResumeError) for e in checks.errors)
    (note,) = [n for n in checks.notes if n.startswith("resuming from")]
    assert "checkpoint-6 (step 6), saved by 2 GPUs, on 1: " in note
    assert "the global batch becomes 2 × 3 × 1 = 6 sequences (12 before)" in note
    assert note.endswith("some of this epoch's data is trained twice")
    four = dataclasses.replace(resumed, nodes=resolve_nodes(count=4))
    (note,) = [n for n in preflight(four, None, force=True).notes if n.startswith("resuming")]
    assert "on 4: " in note and note.endswith("skipped untrained")
    # the same count, or a checkpoint that does not tell: the plain note
    same = dataclasses.replace(resumed, nodes=resolve_nodes(count=2))
    assert check_run_dir(same) == f"resuming from {first.run_dir}/checkpoints/checkpoint-6 (step 6)"


def test_a_checkpoint_tells_how_many_processes_saved_it(tmp_path: Path) -> None:
    from zeroplan.launch.sft import checkpoint_world_size

    assert checkpoint_world_size(saved_by(tmp_path, 1, 1)) == 1
    assert checkpoint_world_size(saved_by(tmp_path, 2, 8)) == 8
    assert checkpoint_world_size(saved(tmp_path, 3)) is None


def test_a_refused_resume_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, data_file: Path, launch_env_vars: dict[str, str]
) -> None:
    first = tiny_launch(tmp_path, data_file, zero=3)
    first = dataclasses.replace(first, nodes=resolve_nodes(count=2))
    write_files(first)
    saved_by(first.run_dir, 6, 2)
    before = sorted(p.relative_to(first.run_dir) for p in first.run_dir.rglob("*"))
    kept = (first.run_dir / "launch.json").read_bytes()
    args = ["launch", str(first.run_dir), "--resume", "--data", str(data_file), "--gpus", "1"]
    proc = run_cli([*args, "--force"], launch_env_vars)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "was saved by 2 GPUs under ZeRO-3, and this launch has 1 GPU" in proc.stderr
    assert sorted(p.relative_to(first.run_dir) for p in first.run_dir.rglob("*")) == before
    assert (first.run_dir / "launch.json").read_bytes() == kept


def test_another_plans_folder_is_not_a_run_folder(tmp_path: Path, data_file: Path) -> None:
    """-o onto a folder `zeroplan plan -o` wrote replaced its plan without a word; the
    folder's own plan may be launched into it (its plan stays, the run lives beside it)."""
    theirs = tiny_launch(tmp_path, data_file, plan_dir="theirs", lora_r=4)
    ours = tiny_launch(tmp_path, data_file, run=tmp_path / "theirs")
    (error,) = refusals(ours)
    assert error.startswith(f"{tmp_path}/theirs holds another plan")
    own = dataclasses.replace(theirs, run_dir=tmp_path / "theirs")
    assert preflight(own, None, force=True).ok


def test_what_a_folder_holds_decides_whether_it_takes_a_launch_or_a_resume(
    tmp_path: Path, data_file: Path
) -> None:
    """A launch stopped before its first step left plan.json, launch.json, logs/ and samples
    and locked its folder ("already holds a run (logs)"), and --resume there started the
    ranks to fail on the missing checkpoint."""
    la = tiny_launch(tmp_path, data_file)
    write_files(la)
    (la.run_dir / "gpu_samples.jsonl").write_text("{}\n")
    resumed = dataclasses.replace(la, resume=True, train=TrainOptions(resume=True))
    (error,) = refusals(resumed)
    assert error.startswith(f"--resume: {la.run_dir} holds no checkpoint to continue from")
    assert "start it again without --resume" in error
    assert preflight(la, None, force=True).ok  # nothing trained: the same -o starts again
    (la.run_dir / "metrics.jsonl").write_text(json.dumps({"rank": 0, "step": 3}) + "\n")
    (error,) = refusals(la)  # steps without a checkpoint: kept, not mixed with a new run
    assert "already holds a run (the steps logged in metrics.jsonl" in error
    assert "delete the folder" in error


def test_resuming_a_completed_run_is_refused_before_the_ranks_start(
    tmp_path: Path, data_file: Path
) -> None:
    """It printed only "done: the rank finished in 2 s"; the reason was in rank0.log."""
    la = tiny_launch(tmp_path, data_file, train=TrainOptions(resume=True))
    la.run_dir.mkdir()
    saved(la.run_dir, 12)
    result = {"status": "completed", "global_step": 12, "epochs": 1.0, "max_steps_given": 12}
    (la.run_dir / "result.json").write_text(json.dumps(result))
    (error,) = refusals(la)
    assert error.startswith(f"nothing to resume: {la.run_dir} completed at step 12")
    assert "pass a larger --max-steps" in error
    more = dataclasses.replace(la, train=TrainOptions(resume=True, max_steps=20))
    assert preflight(more, None, force=True).ok


def test_a_stop_says_what_it_did_and_what_is_left(tmp_path: Path, data_file: Path) -> None:
    """A second Ctrl-C 0.3 s after the first said "(3 with SIGKILL after 30 s)", and a stop
    before the first save said "--resume continues from the last checkpoint"."""
    from zeroplan.launch.supervise import what_is_left

    la = launch_for(tmp_path, data_file)
    write_files(la)
    sup = Supervisor(la, say=lambda s: None)
    sup.signal_t, sup.killed_at_once = [10.0, 10.3], True
    assert sup._how_stopped(3) == "a second signal 0.3 s after the first killed 3 processes at once"
    sup.killed_at_once = False
    assert (
        sup._how_stopped(1)
        == "every rank was stopped (1 process with SIGKILL after the 30 s grace)"
    )
    assert sup._how_stopped(0) == "every rank was stopped"
    assert what_is_left(la.run_dir).startswith("the run saved nothing and trained no step")
    (la.run_dir / "metrics.jsonl").write_text(json.dumps({"rank": 0, "step": 2}) + "\n")
    assert what_is_left(la.run_dir).startswith("no checkpoint was saved, so there is nothing")
    for step in (6, 11):
        saved(la.run_dir, step)
    assert what_is_left(la.run_dir) == "--resume continues from checkpoint-11"


def test_launching_a_model_takes_the_plans_kernel_switches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a CPU the refusal said "plan again without it (--no-fused-loss)", an option launch
    did not have when it plans a model itself."""
    monkeypatch.setattr("zeroplan.hardware.local_cluster", lambda: None)
    # the plan takes the fused loss as where liger-kernel is installed (CI installs none;
    # preflight's package check would then refuse before the CPU's)
    import zeroplan.launch.envcheck as envcheck

    found = envcheck.installed
    monkeypatch.setattr(envcheck, "installed", lambda m: m == "liger_kernel" or found(m))
    (tmp_path / "model").mkdir()
    model = tiny_model_folder(tmp_path / "model")
    data = tinyllm.write_jsonl(tmp_path / "d.jsonl", tinyllm.alpaca_records(8))
    args = ["launch", str(model), "--data", str(data), "-o", str(tmp_path / "r"), "--force"]
    args += ["--kernels", "none", "--dry-run", "--save-total-limit", "2"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "plan again without it (--no-fused-loss)" in capsys.readouterr().err
    result = CliRunner().invoke(cli, [*args, "--no-fused-loss"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "--save-total-limit 2" in result.output  # passed on to every rank
    plan = make_plan(tmp_path / "p")
    with pytest.raises(SystemExit) as exc:
        main(["launch", str(plan), "--data", str(data), "--no-liger"])
    assert exc.value.code == 2 and "--no-liger plan a model" in capsys.readouterr().err


# -- progress lines and the dashboard fallback ----------------------------------------------


def test_progress_lines_from_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rec = {"rank": 0, "step": 3, "total_steps": 10, "loss": 1.25, "tokens_per_s": 900.0}
    path.write_text(
        json.dumps(rec) + "\n" + json.dumps({**rec, "rank": 1, "loss": 9.0}) + '\n{"rank": 0, "st'
    )
    tail, prog = progress.MetricsTail(path), progress.Progress()
    prog.add(tail.read())
    assert prog.line() == "step 3/10 · loss 1.2500 · 1,800 tokens/s"
    assert prog.line() is None  # the step has not moved
    with path.open("a") as f:  # the half-written line completes
        f.write('ep": 4, "total_steps": 10, "loss": 1.0, "tokens_per_s": 1000.0}\n')
    prog.add(tail.read())
    assert prog.line() == "step 4/10 · loss 1.0000 · 1,900 tokens/s"


def test_a_failing_dashboard_falls_back_to_plain_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(run_dir: Path, stop: threading.Event) -> None:
        raise RuntimeError("no terminal")

    monkeypatch.setattr(progress, "find_dashboard", lambda: broken)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"rank": 0, "step": 1, "total_steps": 2, "loss": 0.5}) + "\n")
    said: list[str] = []
    out = io.StringIO()
    stop = threading.Event()
    thread = progress.start_display(
        tmp_path,
        stop,
        progress.MetricsTail(path),
        progress.Progress(),
        dashboard=True,
        every_s=0.05,
        out=out,
        say=said.append,
    )
    deadline = time.monotonic() + 5
    while not out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(timeout=5)
    assert said == [
        "the dashboard failed (RuntimeError('no terminal')): plain progress lines follow"
    ]
    assert out.getvalue().splitlines()[0].endswith("step 1/2 · loss 0.5000")


# -- real runs: torchrun, two CPU processes -------------------------------------------------


def launch_args(
    plan: Path,
    data: Path,
    run: Path,
    *extra: str,
    launcher: str = "torchrun",
    dashboard: bool = False,
) -> list[str]:
    """`zeroplan launch` with the stand-in; ``dashboard``: the monitor side's dashboard (in
    its plain mode: stdout is a pipe) rather than zeroplan's own plain progress lines."""
    return [
        "launch",
        str(plan),
        "--data",
        str(data),
        "-o",
        str(run),
        "--force",
        "--launcher",
        launcher,
        "--rank-program",
        str(STANDIN),
        "--progress-every",
        "0.2",
        *([] if dashboard else ["--no-dashboard"]),
        *extra,
    ]


def ours(run: Path) -> list[int]:
    """Processes still running (not zombies) whose command line names the run folder."""
    left = []
    for pid, p in procs.process_table().items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(run).encode() in cmdline and not p.zombie:
            left.append(pid)
    return left


def test_real_two_rank_run_finishes_with_per_rank_logs(
    tmp_path: Path, data_file: Path, launch_env_vars: dict[str, str]
) -> None:
    plan, run = make_plan(tmp_path / "p"), tmp_path / "run"
    env = {**launch_env_vars, "STANDIN_PG": "1"}  # gloo process group from torchrun's env
    proc = run_cli(launch_args(plan, data_file, run, "--max-steps", "4", dashboard=True), env)
    assert proc.returncode == 0, proc.stderr
    assert "starting 2 ranks with torchrun" in proc.stderr
    assert "done: all 2 ranks finished" in proc.stderr
    assert "step 4/4 · loss 0.5000 · 2,000 tokens/s" in proc.stdout  # the last step, at the end
    for rank in (0, 1):
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}/2 starts" in log and f"rank {rank} step 4/4" in log
        assert json.loads((run / "logs" / f"rank{rank}.exit.json").read_text())["returncode"] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["rank"], r["step"]) for r in records if r["event"] == "train"} == {
        (r, s) for r in (0, 1) for s in range(1, 5)
    }
    record = json.loads((run / "launch.json").read_text())
    assert record["result"] == {
        "exit_code": 0,
        "reason": "done",
        "failed_rank": None,
        "ranks": {"0": 0, "1": 0},
        "message": "all 2 ranks finished",
    }
    assert json.loads((run / "plan.json").read_text())["model"] == QWEN
    assert not ours(run)


def test_a_crashing_rank_stops_the_other_and_is_named(
    tmp_path: Path, data_file: Path, launch_env_vars: dict[str, str]
) -> None:
    plan, run = make_plan(tmp_path / "p"), tmp_path / "run"
    env = {**launch_env_vars, "STANDIN_CRASH_RANK": "1", "STANDIN_CRASH_STEP": "3"}
    t0 = time.monotonic()
    proc = run_cli(launch_args(plan, data_file, run, "--max-steps", "400"), env)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - t0 < 15  # rank 0 alone would run 400 × 0.05 s
    msg = proc.stderr[proc.stderr.index("rank 1 failed") :]
    assert msg.startswith("rank 1 failed (exit status 1) on localhost; the other rank was stopped.")
    assert f"Last lines of {run.resolve()}/logs/rank1.log:" in msg
    assert "RuntimeError: stand-in crash on rank 1 at step 3" in msg
    rank0 = (run / "logs" / "rank0.log").read_text()
    assert "rank 0 done" not in rank0 and "signals received: 1" in rank0
    ended = json.loads((run / "launch.json").read_text())["result"]
    assert ended["failed_rank"] == 1
    # what watch and report say of it: the line, without the log tail
    assert (
        ended["message"] == "rank 1 failed (exit status 1) on localhost; the other rank was stopped"
    )
    assert not ours(run)


@pytest.mark.parametrize(
    "launcher",
    [
        "torchrun",
        pytest.param(
            "deepspeed",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"
            ),
        ),
    ],
)
def test_ctrl_c_stops_every_rank_once_and_keeps_the_checkpoint(
    tmp_path: Path, data_file: Path, launch_env_vars: dict[str, str], launcher: str
) -> None:
    """torchrun puts each rank in a session of its own and forwards SIGTERM to it; DeepSpeed's
    launch.py signals each rank's process tree: either way each rank gets exactly one."""
    plan, run = make_plan(tmp_path / "p"), tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zeroplan.commands.cli",
            *launch_args(plan, data_file, run, "--max-steps", "5000", launcher=launcher),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launch_env_vars,
        start_new_session=True,
    )
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 60
        ranks: set[int] = set()
        while ranks != {0, 1} and time.monotonic() < deadline:
            time.sleep(0.1)
            if metrics.exists():
                ranks = {json.loads(line)["rank"] for line in metrics.read_text().splitlines()}
        assert ranks == {0, 1}, "the ranks never logged"
        rank_pids = {json.loads(line)["pid"] for line in metrics.read_text().splitlines()}
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "SIGINT received: stopping the ranks" in err
    assert "stopped by SIGINT: every rank was stopped; --resume continues from checkpoint-" in err
    for rank in (0, 1):
        marker = json.loads((run / f"checkpoint-rank{rank}.json").read_text())
        assert marker["rank"] == rank and marker["step"] >= 1
        assert "signals received: 1" in (run / "logs" / f"rank{rank}.log").read_text()
    table = procs.process_table()
    assert not [pid for pid in rank_pids if pid in table], "a rank (or its zombie) is left"
    assert not ours(run)
    assert json.loads((run / "launch.json").read_text())["result"]["reason"] == "interrupted"


def test_what_ignores_sigterm_is_killed_and_reaped_orphans_too(
    tmp_path: Path, data_file: Path
) -> None:
    """A launcher that ignores SIGTERM and a 'rank' in a session of its own (as torchrun
    starts them) that does too: SIGKILL after the grace period, nothing left, no zombie."""
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'],"
        " start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    la = dataclasses.replace(
        launch_for(tmp_path, data_file),
        commands=(Command("localhost", (sys.executable, "-c", script)),),
    )
    write_files(la)
    sup = Supervisor(la, grace_s=0.3, kill_margin_s=0.2, say=lambda s: None)
    subreaper = procs.set_subreaper(True)
    try:
        assert sup._start() is None
        deadline = time.monotonic() + 20
        while len(sup.known) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            sup._refresh()
        seen = dict(sup.known)
        assert len(seen) == 1
        (launcher,) = sup.popens
        assert next(iter(seen.values())).pgid != launcher.pid  # its own session
        assert sup._terminate("test") == 2
    finally:
        if subreaper:
            procs.set_subreaper(False)
    table = procs.process_table()
    assert launcher.returncode == -signal.SIGKILL
    assert not [pid for pid in seen if pid in table and table[pid].start == seen[pid].start]


def test_ranks_stopped_on_request_are_not_reported_gone(tmp_path: Path, data_file: Path) -> None:
    la = launch_for(tmp_path, data_file)
    write_files(la)
    sup = Supervisor(la, say=lambda s: None)
    exit0 = la.log_dir / "rank0.exit.json"
    exit0.write_text(json.dumps({"rank": 0, "returncode": 143, "signal": None, "t": 1.0}))
    assert sup.rank_exit_codes() == {0: 143, 1: None}  # before any stop: rank 0 is gone
    sup.signals.append(signal.SIGINT)
    assert sup.rank_exit_codes() == {0: None, 1: None}  # stopped on request: not gone
    exit0.write_text(json.dumps({"rank": 0, "returncode": 1, "signal": None, "t": 1.0}))
    assert sup.rank_exit_codes() == {0: 1, 1: None}  # a crash while stopping still shows


# -- zeroplan env ---------------------------------------------------------------------------


def test_env_prints_versions_and_problems(subprocess_env: dict[str, str]) -> None:
    from importlib.metadata import version

    t0 = time.monotonic()
    proc = run_cli(["env"], subprocess_env)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 10
    lines = proc.stdout.splitlines()
    assert any(line.split() == ["torch", version("torch")] for line in lines)
    assert any(line.split()[:2] == ["transformers", version("transformers")] for line in lines)
    for name in ("deepspeed", "bitsandbytes", "flash-attn", "peft", "trl"):
        assert any(line.startswith(name) for line in lines), name
    as_json = json.loads(run_cli(["env", "--json"], subprocess_env).stdout)
    assert as_json["packages"]["torch"] == version("torch")
    if as_json["torch_cuda"] is None and as_json["torch_rocm"] is None:
        assert any("CPU-only build" in p for p in as_json["problems"])
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from zeroplan.launch.envcheck import collect; collect(); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=60,
    )
    assert check.stdout.strip() == "[]"


def test_env_problems_are_told_from_versions_alone() -> None:
    from zeroplan.launch.envcheck import GPUInfo, problems_and_notes

    packages = {"torch": "2.5.1+cu124", "bitsandbytes": "0.45.0", "transformers": "4.40.0"}
    gpus = (GPUInfo(0, "NVIDIA GeForce RTX 4090", 24 * 2**30, True),)
    problems, _ = problems_and_notes(
        {**packages, "nvidia-ml-py": "12.0", "deepspeed": "0.16.0"},
        gpus,
        None,
        "11.8",
        (True, "12.4", None),
        (),
        {"transformers": "4.46"},
        {"ninja": False, "c++": True},
    )
    assert problems == [
        "transformers 4.40.0 is older than zeroplan needs (>= 4.46)",
        "the driver supports CUDA up to 11.8, torch was built for CUDA 12.4: update the NVIDIA "
        "driver or install a torch built for CUDA 11.8",
        "DeepSpeed's ops are not pre-built and cannot be compiled here (no ninja): ZeRO-Offload "
        "(CPU Adam) will fail; ZeRO without offload works",
    ]


def test_a_model_planned_for_this_machine_uses_only_kernels_it_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Planning for launch here must not choose Liger's fused loss when it is not installed:
    preflight would then refuse the plan it just made."""
    from zeroplan.launch import envcheck

    # a job whose plan takes the fused loss where it may: seq 4096 on one 24 GB card
    job = {"seq_len": 4096, "global_batch": 8}
    found = envcheck.installed
    monkeypatch.setattr(envcheck, "installed", lambda m: m != "liger_kernel" and found(m))
    data = plan_model("llama-3.1-8b-instruct", parse_cluster("1x4090"), job)
    assert data["best"]["setup"]["fused_loss"] is False
    monkeypatch.setattr(envcheck, "installed", lambda m: m == "liger_kernel" or found(m))
    data = plan_model("llama-3.1-8b-instruct", parse_cluster("1x4090"), job)
    assert data["best"]["setup"]["fused_loss"] is True


def test_moe_all_linear_with_dropout_is_refused_at_preflight(
    tmp_path: Path, data_file: Path, launch_env_vars: dict[str, str]
) -> None:
    """PEFT cannot put dropout on the expert banks all-linear wraps: the run would fail at
    start, so preflight refuses it with the working alternatives (issue 29)."""

    def moe_launch(folder: Path, dropout: float) -> tuple[Path, Launch]:
        setup = TrainSetup(method="lora", seq_len=256, lora_dropout=dropout)  # all-linear
        plan = make_plan(folder, model="Qwen/Qwen3-30B-A3B", gpus="1xH200", setup=setup)
        la = build_launch(
            read_plan(plan),
            run_dir=folder / "run",
            data=str(data_file),
            nodes=resolve_nodes(count=1),
            launcher="torchrun",
            gpu=H100,
            train=TrainOptions(),
        )
        return plan, la

    plan, la = moe_launch(tmp_path / "p", 0.05)
    (err,) = preflight(la, None, force=True).errors
    assert isinstance(err, ExpertDropoutError)
    assert "--lora-dropout 0" in str(err) and "q_proj,k_proj,v_proj,o_proj" in str(err)
    run = tmp_path / "run"
    proc = run_cli(
        ["launch", str(plan), "--data", str(data_file), "-o", str(run), "--force"],
        launch_env_vars,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "lora.ParamWrapper" in proc.stderr, proc.stderr
    assert not run.exists()
    # the working alternative passes
    assert preflight(moe_launch(tmp_path / "ok", 0.0)[1], None, force=True).ok
