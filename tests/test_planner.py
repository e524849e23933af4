"""The planner and the speed model: search, constraint, ranking, explanations, files, CLI."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from zeroplan import speed as speed_model
from zeroplan.commands.cli import cli
from zeroplan.errors import BadSetupError
from zeroplan.hardware import parse_cluster, with_links
from zeroplan.models import load_model
from zeroplan.planner import Plan, PlanRequest, candidate_setups, evaluate, plan, plan_json
from zeroplan.speed import comm_bytes_per_step, flops_per_token, peak_tflops, step_time
from zeroplan.trainsetup import TrainSetup

ROOT = Path(__file__).resolve().parent.parent
L8 = load_model("meta-llama/Llama-3.1-8B-Instruct")


def story_request(**kw: object) -> PlanRequest:
    args: dict[str, object] = dict(
        spec=L8, cluster=parse_cluster("7x4090"), method="lora", seq_len=2048, global_batch=112
    )
    args.update(kw)
    return PlanRequest(**args)  # type: ignore[arg-type]


def test_flops_full_is_six_psi_per_token_without_attention() -> None:
    setup = TrainSetup(method="full", seq_len=1)
    linear = sum(sum(lin.params for lin in ls) * n for ls, n in L8.linears_by_layer_kind())
    head = L8.vocab_size * L8.hidden_size
    attention = 2 * 1 * L8.q_dim * L8.num_layers
    assert flops_per_token(L8, setup) == 6 * (linear + head) + 3 * attention
    # LoRA skips the frozen weights' gradients; checkpointing adds a forward of the layers
    lora = flops_per_token(L8, TrainSetup(method="lora", seq_len=1))
    assert lora == 4 * (linear + head) + 3 * attention
    ckpt = flops_per_token(L8, TrainSetup(method="lora", seq_len=1, grad_ckpt=True))
    assert ckpt - lora == 2 * linear + attention


def test_zero3_moves_the_weights_every_micro_batch() -> None:
    n, psi = 7, L8.total_params
    z3 = TrainSetup(zero=3, grad_accum=4)
    nt = comm_bytes_per_step(L8, TrainSetup(zero=2), n) / (2 * 2 * 6 / 7)
    assert comm_bytes_per_step(L8, z3, n) == pytest.approx(4 * 6 / 7 * (2 * 2 * psi + 2 * nt))
    assert comm_bytes_per_step(L8, TrainSetup(zero=3), 1) == 0
    # on PCIe without P2P, ZeRO-3 LoRA at a small micro-batch loses to DDP
    c = parse_cluster("7x4090")
    ddp = step_time(L8, TrainSetup(micro_batch=2, grad_ckpt=True, grad_accum=8), c)
    z3s = step_time(L8, TrainSetup(micro_batch=2, grad_ckpt=True, grad_accum=8, zero=3), c)
    assert z3s.tokens_per_s < ddp.tokens_per_s


def test_zero3_hooks_set_a_floor_on_the_hosts_clock() -> None:
    # speed_2xh200_zero3_shape.jsonl: Llama-3.1-8B LoRA with checkpointing on two H200s took
    # 2.78 s a micro-batch at 1 x 2048 and 2.90 s at 4 x 2048 under ZeRO-3 (DDP: 0.56, 1.14)
    two = parse_cluster("2xH200")
    l8 = load_model("meta-llama/Llama-3.1-8B")
    one, four = (
        step_time(l8, TrainSetup(micro_batch=b, grad_ckpt=True, zero=3), two, launched=False)
        for b in (1, 4)
    )
    assert one.host_bound and four.total_s < 1.2 * one.total_s
    ddp = step_time(l8, TrainSetup(micro_batch=1, grad_ckpt=True), two, launched=False)
    assert one.total_s > 3 * ddp.total_s


def test_deepspeed_adds_its_engine_step_once_per_optimizer_step() -> None:
    from zeroplan.speed import FITTED

    one = parse_cluster("1xH200")
    for accum in (1, 4):
        plain = step_time(L8, TrainSetup(method="full", micro_batch=1, grad_accum=accum), one)
        z0 = step_time(L8, TrainSetup(method="full", micro_batch=1, grad_accum=accum, zero=0), one)
        # full fine-tuning: nothing else differs between the plain loop and ZeRO-0 on one GPU
        assert z0.total_s - plain.total_s == pytest.approx(FITTED.deepspeed_step_s)


def test_8bit_adamw_steps_each_tensor_outside_zero_and_flat_partitions_inside() -> None:
    from zeroplan.speed import FITTED, optimizer_seconds, parameter_tensors, trainable_tensors

    q05, h200 = load_model("Qwen/Qwen2.5-0.5B"), parse_cluster("1xH200").gpu
    full = TrainSetup(method="full", optim="adamw_8bit")
    # Qwen2.5's attention has biases: 12 tensors a layer, embeddings tied, final norm
    assert trainable_tensors(q05, full) == parameter_tensors(q05, full) == 24 * 12 + 2
    plain = optimizer_seconds(q05, full, h200, 1)
    fused = optimizer_seconds(q05, TrainSetup(method="full", optim="adamw_torch_fused"), h200, 1)
    assert plain - fused > 290 * FITTED.optimizer_8bit_tensor_s  # and its bytes on top
    # DeepSpeed (ZeRO-0 too: its bf16 optimizer) hands bitsandbytes flat partitions
    for stage in (0, 1):
        ds = TrainSetup(method="full", optim="adamw_8bit", zero=stage)
        zero = optimizer_seconds(q05, ds, h200, 1)
        assert plain - zero == pytest.approx(290 * FITTED.optimizer_8bit_tensor_s)
    lora = TrainSetup(method="lora", optim="adamw_8bit")
    assert trainable_tensors(q05, lora) == 2 * 24 * 7  # A and B of every adapted linear


def test_foreach_adamw_streams_its_counted_passes() -> None:
    """torch's default foreach AdamW makes 21 parameter-sized reads and writes where the
    fused kernel makes 7: 44 B per parameter against 16 (no fitted row ran it; one H100
    timed Qwen2.5-7B's foreach step at 0.127 s, the count says 0.100)."""
    from zeroplan.speed import ADAMW_BYTES, FOREACH_ADAMW_BYTES, optimizer_seconds

    assert FOREACH_ADAMW_BYTES == ADAMW_BYTES + 2 * (21 - 7) == 44
    q7, h100 = load_model("Qwen/Qwen2.5-7B"), parse_cluster("1xH100").gpu
    foreach = optimizer_seconds(q7, TrainSetup(method="full", loop="plain"), h100, 1)
    fused = optimizer_seconds(q7, TrainSetup(method="full"), h100, 1)
    assert foreach / fused == pytest.approx(44 / 16)
    assert 0.09 < foreach < 0.11
    # under CPU offload DeepSpeed's CPU Adam steps (offload_seconds), not the GPU
    off = TrainSetup(method="full", optim="adamw_torch", zero=2, offload="optimizer")
    assert optimizer_seconds(q7, off, h100, 1) == 0.0


def test_checkpointing_adds_the_recompute_to_the_hosts_clock() -> None:
    from zeroplan.speed import FITTED, host_seconds

    plain = host_seconds(L8, TrainSetup(method="lora"))
    ckpt = host_seconds(L8, TrainSetup(method="lora", grad_ckpt=True))
    assert ckpt == pytest.approx(plain * (1 + FITTED.host_recompute))


def test_cpu_adam_runs_on_the_ranks_threads_and_zero2_sends_gradients_every_micro_batch() -> None:
    from zeroplan.hardware import PCIE_EFFECTIVE_GBS
    from zeroplan.speed import FITTED, cpu_adam_seconds, offload_seconds, trainable_params

    n = 1.24e9
    # serial + per-thread seconds per parameter: 1 thread is several times 16
    assert cpu_adam_seconds(n, 1) > 4 * cpu_adam_seconds(n, 16)
    assert cpu_adam_seconds(n, 4) == pytest.approx(
        n * (FITTED.cpu_adam_serial_s + FITTED.cpu_adam_thread_s / 4)
    )
    two = parse_cluster("2xH100")
    z2 = TrainSetup(method="full", zero=2, offload="optimizer", grad_accum=4)
    z1 = TrainSetup(method="full", zero=1, offload="optimizer", grad_accum=4)
    psi_rank = trainable_params(L8, z2) / 2
    pcie = PCIE_EFFECTIVE_GBS[two.gpu.pcie_gen] * 1e9
    adam = cpu_adam_seconds(psi_rank, two.cpu_threads_per_rank, ranks=2)
    # the node's two ranks share its memory traffic: each steps slower than one rank alone
    assert adam > cpu_adam_seconds(psi_rank, two.cpu_threads_per_rank, ranks=1)
    # ZeRO-2: the gradients go down after each of the 4 micro-batches, the parameters up once
    assert offload_seconds(L8, z2, two) == pytest.approx((4 + 1) * 2 * psi_rank / pcie + adam)
    assert offload_seconds(L8, z1, two) == pytest.approx((1 + 1) * 2 * psi_rank / pcie + adam)
    # more cores per node, a faster offloaded step
    rich = with_links(two, cpu_cores_per_node=64)
    assert offload_seconds(L8, z2, rich) < offload_seconds(L8, z2, two)


def test_seed_story_plan_fits_with_margin_and_beats_the_story_remedy() -> None:
    req = story_request()
    p = plan(req)
    assert p.best is not None
    best = p.best
    assert best.setup.micro_batch * best.setup.grad_accum * 7 == 112  # global batch kept
    assert best.estimate.required_bytes <= 0.95 * best.estimate.gpu_memory_bytes
    # the story: ZeRO-3, micro-batch 2 (×8 to keep the batch), checkpointing
    remedy = evaluate(req, TrainSetup(zero=3, micro_batch=2, grad_accum=8, grad_ckpt=True))
    assert remedy.fits
    # ZeRO-3's hooks are host time a 4090's long micro-batch mostly hides, and its weight
    # gathers are prefetched behind compute: the remedy loses by less than its traffic says
    assert best.step.tokens_per_s > 1.1 * remedy.step.tokens_per_s
    # and what the story ran (micro-batch 4 × 4, no checkpointing) does not fit
    story = evaluate(req, TrainSetup(micro_batch=4, grad_accum=4))
    assert not story.fits
    assert all(c.fits for c in p.ranked)
    assert p.rejected and all(p.rejected.values())


def test_every_candidate_keeps_the_global_batch_and_search_is_fast() -> None:
    req = story_request()
    setups = list(candidate_setups(req))
    assert len(setups) > 500
    assert all(s.micro_batch * s.grad_accum * 7 == 112 for s in setups)
    start = time.perf_counter()
    plan(story_request(global_batch=None))  # every micro-batch: the largest search
    assert time.perf_counter() - start < 2.0


def test_objective_memory_picks_the_smallest_footprint() -> None:
    p = plan(story_request(objective="memory"))
    assert p.best is not None
    assert p.best.estimate.required_bytes == min(c.estimate.required_bytes for c in p.ranked)


def test_impossible_request_gets_the_cluster_or_change_that_would_fit() -> None:
    p = plan(
        PlanRequest(
            spec=load_model("llama-3.1-70b"), cluster=parse_cluster("1x4090"), method="full"
        )
    )
    assert p.best is None and p.ranked == []
    assert p.suggestion is not None and "RTX-4090 would fit" in p.suggestion
    assert "--method lora" in p.suggestion


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"global_batch": 100}, "multiple of 7"),
        ({"global_batch": 3}, "smaller than the 7"),
        ({"margin": 1.5}, "--margin"),
        ({"objective": "speed"}, "--objective"),
        # the API refuses what the CLI's option types refuse (nan fails no comparison)
        ({"price_per_gpu_hour": float("nan")}, "--price-per-gpu-hour must be a finite"),
        ({"price_per_gpu_hour": float("inf")}, "--price-per-gpu-hour must be a finite"),
        ({"epochs": float("inf")}, "--epochs must be positive"),
        # a 4-bit base is what --no-quantization forbids: qlora beside it contradicts it
        ({"method": "qlora", "allow_quantization": False}, "use --method lora, or drop"),
    ],
)
def test_bad_requests(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(BadSetupError, match=needle):
        story_request(**kw)


def test_cli_plan_json_and_files(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    args = ["plan", "llama-3.1-8b-instruct", "--gpus", "7x4090", "--global-batch", "112"]
    args += ["--dataset-tokens", "50M", "--price-per-gpu-hour", "0.4", "--json", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["best"]["hours"] == pytest.approx(50e6 / data["best"]["tokens_per_s"] / 3600)
    assert data["best"]["cost"] == pytest.approx(data["best"]["hours"] * 7 * 0.4)
    assert json.loads((out / "plan.json").read_text()) == data
    assert 'zeroplan launch "$here/plan.json"' in (out / "launch.sh").read_text()


def test_cli_plan_writes_a_deepspeed_config_for_zero_plans(tmp_path: Path) -> None:
    req = story_request(global_batch=None)
    p = plan(req)
    assert p.best is not None
    from zeroplan.planfiles import write_plan

    zero = next(c for c in p.ranked if c.setup.zero == 3)
    zp = type(p)(req, zero, [zero], {}, 1)
    files = {f.name for f in write_plan(zp, tmp_path / "z3")}
    assert files == {"plan.json", "ds_config.json", "launch.sh"}
    cfg = json.loads((tmp_path / "z3" / "ds_config.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    assert plan_json(zp)["best"]["setup"]["zero"] == 3


@functools.cache
def small_plan(gpus: str) -> Plan:
    return plan(PlanRequest(spec=load_model("qwen2.5-0.5b"), cluster=parse_cluster(gpus)))


def test_launch_sh_runs_from_any_folder(tmp_path: Path) -> None:
    """sh runs/plan/launch.sh --data x.jsonl from the project's root: plan.json and the
    hostfile are the script's own folder's, the data stays the caller's."""
    from zeroplan.planfiles import write_plan

    write_plan(small_plan("2x8xH100"), tmp_path / "runs" / "plan")
    bin_dir = tmp_path / "bin"  # a stand-in zeroplan that prints what it was given
    bin_dir.mkdir()
    (bin_dir / "zeroplan").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (bin_dir / "zeroplan").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    for cwd in (tmp_path, tmp_path / "runs"):
        script = (tmp_path / "runs" / "plan" / "launch.sh").relative_to(cwd)
        done = subprocess.run(
            ["sh", str(script), "--data", "x.jsonl"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        args = done.stdout.splitlines()
        assert args[0] == "launch" and args[-2:] == ["--data", "x.jsonl"]
        assert (cwd / args[1]).resolve() == tmp_path / "runs" / "plan" / "plan.json"
        hostfile = args[args.index("--hostfile") + 1]
        assert (cwd / hostfile).resolve() == tmp_path / "runs" / "plan" / "hostfile"


def test_a_plan_is_refused_before_any_file_moves_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeroplan.errors import ConfigWriteError
    from zeroplan.planfiles import write_plan

    out = tmp_path / "p1"
    write_plan(small_plan("1xH100"), out)
    before = (out / "plan.json").read_text()
    (out / "launch.sh").unlink()
    (out / "launch.sh").mkdir()  # a folder where the plan writes a file
    with pytest.raises(ConfigWriteError, match=f"{out}/launch.sh: it is a folder"):
        write_plan(small_plan("2xH100"), out)
    assert (out / "plan.json").read_text() == before  # not replaced
    (out / "launch.sh").rmdir()
    # a failure once files move: the temporary folder goes too, in the folder and beside it
    moves = 0

    def fails_second(src: object, dst: object) -> None:
        nonlocal moves
        moves += 1
        if moves == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", fails_second)
    with pytest.raises(ConfigWriteError, match="No space left on device"):
        write_plan(small_plan("2xH100"), out)
    with pytest.raises(ConfigWriteError, match="No space left on device"):
        moves = 1  # the new folder's one rename fails
        write_plan(small_plan("2xH100"), tmp_path / "new" / "p2")
    monkeypatch.undo()
    hidden = [p for p in tmp_path.rglob(".*")]
    assert hidden == [] and not (tmp_path / "new").exists()


def test_replanning_removes_the_earlier_plans_files_only(tmp_path: Path) -> None:
    from zeroplan.planfiles import write_plan

    out = tmp_path / "plan"
    write_plan(small_plan("2x8xH100"), out)
    (out / "notes.txt").write_text("mine")
    said: list[str] = []
    write_plan(small_plan("1xH100"), out, say=said.append)
    assert sorted(p.name for p in out.iterdir()) == ["launch.sh", "notes.txt", "plan.json"]
    assert said == [
        f"removed hostfile, launch.sbatch of the earlier plan in {out}: this plan does not use them"
    ]
    # a run folder (launch.json): its ds_config.json and hostfile are the run's, kept
    run = tmp_path / "run"
    write_plan(small_plan("2x8xH100"), run)
    (run / "launch.json").write_text("{}")
    write_plan(small_plan("1xH100"), run, say=said.append)
    assert (run / "hostfile").exists() and len(said) == 1


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_new_plan_folder_follows_the_umask(tmp_path: Path, mask: int) -> None:
    from zeroplan.planfiles import write_plan

    old = os.umask(mask)
    try:
        write_plan(small_plan("1xH100"), tmp_path / "plan")
    finally:
        os.umask(old)
    assert (tmp_path / "plan").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "plan" / "launch.sh").stat().st_mode & 0o777 == 0o777 & ~mask


def test_cli_plan_nothing_fits_exit_1_and_bad_count_exit_2() -> None:
    cmd = [sys.executable, "-m", "zeroplan", "plan", "llama-3.1-70b", "--gpus", "1x4090"]
    done = subprocess.run([*cmd, "--method", "full"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and "Nothing fits" in done.stdout
    bad = subprocess.run(
        [*cmd, "--dataset-tokens", "lots"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("zeroplan: error:") and "50M" in bad.stderr


def checked(script: str) -> str:
    """What ``benchmarks/<script> --check`` printed; it must have passed."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_speed_constants_are_what_the_measured_rows_fit() -> None:
    """benchmarks/fit_speed.py --check fails when zeroplan/speed.py drifts from the data."""
    out = checked("fit_speed.py")
    assert "efficiency" in out
    # and reports the error on rows each refit did not see
    for line in ("leave one model family out", "Qwen2.5 held out", "seq 4096 held out"):
        assert line in out
    for line in ("leave one GPU out", "2×H200, NCCL_P2P_DISABLE=1", "CPU Adam"):
        assert line in out
    assert "one-GPU shapes fitted on (the median of" in out
    assert "held-out predictions of GPU-bound steps within" in out


def test_fit_speed_quotes_the_90th_percentile_of_held_out_errors_by_bound() -> None:
    """held_out_p90: the nearest-rank 90th percentile of |error|, host-bound and GPU-bound
    steps apart, mixture-of-experts rows left out (family_note quotes them)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fit_speed

    def row(model: str, mb: int) -> dict[str, object]:
        env = {"gpu": "NVIDIA H200", "gpu_total_bytes": 150109880320}
        return {
            "model": model,
            "method": "lora",
            "micro_batch": mb,
            "seq_len": 512,
            "zero": None,
            "grad_ckpt": False,
            "lora_r": 16,
            "lora_targets": "all-linear",
            "lora_dropout": 0.05,
            "optim": "adamw_torch_fused",
            "attn": "sdpa",
            "fused_loss": False,
            "world_size": 1,
            "env": env,
        }

    host = [(row("meta-llama/Llama-3.2-1B", 1), e / 100) for e in range(-10, 0)]
    gpu = [(row("meta-llama/Llama-3.1-8B", 16), e / 100) for e in range(1, 21)]
    moe = [(row("Qwen/Qwen3-30B-A3B", 1), 0.9)]
    p90 = fit_speed.held_out_p90([*host, *gpu, *moe])
    assert p90 == {True: (pytest.approx(0.09), 10), False: (pytest.approx(0.18), 20)}


def test_fit_speed_reads_a_shape_measured_in_several_processes_as_their_median() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fit_speed

    def row(seconds: float, micro_batch: int = 1, world: int = 1) -> dict[str, object]:
        return {
            "model": "meta-llama/Llama-3.2-1B", "method": "lora", "micro_batch": micro_batch,
            "seq_len": 512, "grad_ckpt": False, "fused_loss": False, "grad_accum": 1,
            "optim": "adamw_torch_fused", "zero": None if world == 1 else 2,
            "world_size": world, "env": {"gpu": "NVIDIA H200"}, "warmup_steps": 2,
            "step_seconds": [seconds] * 8,
        }  # fmt: skip

    rows = [row(0.1), row(0.1, micro_batch=2), row(0.5), row(0.1, world=2), row(0.2)]
    merged = fit_speed.shape_medians(rows)
    # one point per one-GPU shape, where its first reading was; other rows as they were
    assert [r["micro_batch"] for r in merged] == [1, 2, 1]
    assert fit_speed.measured_seconds(merged[0]) == pytest.approx(0.2)
    assert merged[0]["_readings"] == 3 and "_readings" not in merged[1]
    assert fit_speed.measured_seconds(merged[1]) == pytest.approx(0.1)
    assert merged[2]["world_size"] == 2
    # the spread between processes is still read from every reading
    assert fit_speed.repeat_spread(rows) == [pytest.approx(4.0)]


def test_no_fused_loss_keeps_liger_out_of_every_candidate() -> None:
    req = story_request(allow_fused_loss=False)
    assert not any(s.fused_loss for s in candidate_setups(req))
    p = plan(req)
    assert p.best is not None and not p.best.setup.fused_loss
    assert not any("fused loss" in a for a in p.assumptions)
    # allowed, it is weighed; chosen where it earns its place (a long sequence on one
    # 24 GB card: without it the fp32 logits of 4,096 tokens × 128k vocabulary hold the
    # micro-batch down), and then the plan says what it needs
    allowed = plan(story_request())
    assert any(c.setup.fused_loss for c in allowed.ranked)
    spec, one = load_model("llama-3.1-8b-instruct"), parse_cluster("1x4090")
    fused = plan(PlanRequest(spec=spec, cluster=one, seq_len=4096, global_batch=8))
    assert fused.best is not None and fused.best.setup.fused_loss
    assert any("zeroplan[fused]" in a for a in fused.assumptions)


def test_offload_plans_must_fit_the_hosts_ram_when_given() -> None:
    big = dict(spec=load_model("llama-3.1-70b"), cluster=parse_cluster("2x8xH100"), method="full")
    free = plan(PlanRequest(**big))  # type: ignore[arg-type]
    assert free.best is not None and free.best.setup.offload != "none"
    assert any("CPU RAM per node" in a for a in free.assumptions)
    # the CPU Adam's speed rests on the hosts' cores: assumed, and said so, unless given
    assert any("--cpu-cores-per-node" in a for a in free.assumptions)
    cores = dict(big, cluster=with_links(big["cluster"], cpu_cores_per_node=96))  # type: ignore[arg-type]
    told = plan(PlanRequest(**cores))  # type: ignore[arg-type]
    assert not any("--cpu-cores-per-node" in a for a in told.assumptions)
    need = free.best.estimate.cpu_bytes_per_node
    capped = plan(PlanRequest(**big, cpu_ram_per_node=need // 2))  # type: ignore[arg-type]
    assert capped.best is not None
    assert capped.best.estimate.cpu_bytes_per_node <= need // 2 * 0.95
    assert any("does not fit the host" in why for why in capped.rejected.values())


def test_plan_text_keeps_square_brackets() -> None:
    """rich markup must not eat 'zeroplan[fused]' from the notes."""
    args = ["plan", "llama-3.1-8b-instruct", "--gpus", "1x4090", "--seq-len", "4096"]
    result = CliRunner().invoke(cli, args)  # a plan with the fused loss
    assert result.exit_code == 0, result.output
    assert "zeroplan[fused]" in " ".join(result.output.split())


def test_a_card_without_bf16_plans_fp16_and_says_so() -> None:
    """T4 / V100: the setup resolves to fp16 mixed precision, and the estimate says so."""
    cluster = parse_cluster("1xT4")
    setup = TrainSetup(method="qlora", micro_batch=1, seq_len=512, grad_ckpt=True)
    cand = evaluate(PlanRequest(spec=L8, cluster=cluster, seq_len=512), setup)
    assert cand.setup.precision == "fp16" and cand.estimate.setup["precision"] == "fp16"
    assert cand.estimate.calibrated is True  # measured with fp16 forced on an H200
    assert any("fp16 mixed precision" in note for note in cand.estimate.notes)
    p = plan(PlanRequest(spec=load_model("llama-3.2-1b"), cluster=cluster, seq_len=512))
    assert p.best is not None and p.best.setup.precision == "fp16"
    assert all(c.setup.precision == "fp16" for c in p.ranked)
    assert any("T4 has no bf16" in a and "fp16 peak (65" in a for a in p.assumptions)
    # a card with bf16 plans bf16 and gets no such line, unless fp16 is asked for
    h100 = plan(PlanRequest(spec=load_model("llama-3.2-1b"), cluster=parse_cluster("1xH100")))
    assert h100.best is not None and h100.best.setup.precision == "bf16"
    assert not any("fp16" in a for a in h100.assumptions)
    h100_fp16 = PlanRequest(
        spec=load_model("llama-3.2-1b"), cluster=parse_cluster("1xH100"), precision="fp16"
    )
    assert any("fp16 peak (989.4" in a for a in plan(h100_fp16).assumptions)


def test_bf16_asked_on_a_card_without_it_is_refused() -> None:
    with pytest.raises(BadSetupError, match="T4 has no bf16"):
        PlanRequest(spec=L8, cluster=parse_cluster("1xT4"), precision="bf16")


@pytest.mark.parametrize("card", ["1xT4", "1xV100", "1xV100-32GB"])
def test_flash_attention_2_on_a_card_before_ampere_is_refused(card: str) -> None:
    """flash-attn 2 needs compute capability 8.0: refused where the setup meets the card,
    as bf16 is, so estimate, config and plan all say it."""
    req = PlanRequest(spec=load_model("llama-3.2-1b"), cluster=parse_cluster(card), seq_len=512)
    with pytest.raises(BadSetupError, match="FlashAttention-2 needs an Ampere or newer GPU"):
        evaluate(req, TrainSetup(seq_len=512, attn="flash_attention_2"))
    ampere = dataclasses.replace(req, cluster=parse_cluster("1xA10"))
    assert evaluate(ampere, TrainSetup(seq_len=512, attn="flash_attention_2")).fits


def test_a_request_notes_its_makers_assumptions() -> None:
    note = "sequences of 512 tokens, the model's context window"
    p = plan(story_request(notes=(note,)))
    assert note in p.assumptions
    assert note in plan_json(p)["assumptions"]


def test_cli_estimate_on_a_v100_is_fp16() -> None:
    args = ["estimate", "llama-3.2-1b", "--gpus", "8xV100", "--method", "lora"]
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "fp16 mixed precision" in result.output
    data = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert data["calibrated"] is True and data["cluster"]["gpu"] == "V100-SXM2-16GB"
    assert data["setup"]["precision"] == "fp16"


def test_seq_len_within_the_window_is_planned_and_past_it_refused() -> None:
    from zeroplan.errors import ContextWindowError

    phi4 = load_model("phi-4")
    assert phi4.max_position_embeddings == 16_384
    assert plan(PlanRequest(spec=phi4, cluster=parse_cluster("8xH100"), seq_len=16_384)).best
    with pytest.raises(ContextWindowError, match="use --seq-len 16384 or less"):
        PlanRequest(spec=phi4, cluster=parse_cluster("8xH100"), seq_len=16_385)
    with pytest.raises(ContextWindowError):
        evaluate(story_request(), TrainSetup(seq_len=200_000))


def test_cost_uses_the_dated_typical_price_unless_given(tmp_path: Path) -> None:
    from zeroplan.prices import TYPICAL_PRICE_PER_GPU_HOUR

    args = ["plan", "llama-3.2-1b", "--gpus", "4xL4", "--dataset-tokens", "10M"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    price = TYPICAL_PRICE_PER_GPU_HOUR["L4"]
    assert data["request"]["price_per_gpu_hour"] == price
    assert data["request"]["price_source"] == "typical on-demand price, dated 2026-11"
    assert data["best"]["cost"] == pytest.approx(data["best"]["hours"] * 4 * price)
    text = CliRunner().invoke(cli, args, env={"COLUMNS": "200"}).output
    assert "cost" in text and "typical on-demand price, dated 2026-11" in text
    # the user's price wins, and is named as theirs
    mine = json.loads(
        CliRunner().invoke(cli, [*args, "--price-per-gpu-hour", "0.1", "--json"]).output
    )
    assert mine["request"]["price_source"] == "--price-per-gpu-hour"
    assert mine["best"]["cost"] == pytest.approx(mine["best"]["hours"] * 4 * 0.1)
    # no tokens, no cost; a GPU without a table price, no cost
    assert "cost" not in json.loads(CliRunner().invoke(cli, [*args[:4], "--json"]).output)["best"]
    no_price = ["plan", "llama-3.2-1b", "--gpus", "1x4080", "--dataset-tokens", "10M", "--json"]
    assert "cost" not in json.loads(CliRunner().invoke(cli, no_price).output)["best"]


def test_price_table_covers_the_cloud_gpus() -> None:
    from zeroplan.hardware import GPU_CATALOG
    from zeroplan.prices import TYPICAL_PRICE_PER_GPU_HOUR

    assert set(TYPICAL_PRICE_PER_GPU_HOUR) <= set(GPU_CATALOG)
    for gpu in ("H100-SXM-80GB", "H200-SXM-141GB", "A100-SXM-80GB", "A100-SXM-40GB", "L4"):
        assert TYPICAL_PRICE_PER_GPU_HOUR[gpu] > 0
    for gpu in ("A10G", "T4", "L40S", "V100-SXM2-16GB", "B200-SXM-180GB"):
        assert TYPICAL_PRICE_PER_GPU_HOUR[gpu] > 0


def test_estimate_reports_the_speed_of_any_setup() -> None:
    """estimate --json carries the step time of the setup asked for, not only the plan's
    winner; the plan's best setup estimated on its own predicts the same tokens/s."""
    from zeroplan import estimate

    best = plan(story_request()).best
    assert best is not None
    s = best.setup
    args = ["estimate", "llama-3.1-8b-instruct", "--gpus", "7x4090", "--method", s.method]
    args += ["--micro-batch", str(s.micro_batch), "--grad-accum", str(s.grad_accum)]
    args += ["--optim", s.optim, "--grad-ckpt" if s.grad_ckpt else "--no-grad-ckpt"]
    args += ["--fused-loss" if s.fused_loss else "--no-fused-loss", "--kernels", s.kernels]
    args += ["--fused-lora" if s.fused_lora else "--no-fused-lora"]
    args += ["--zero", str(s.zero)] if s.zero is not None else []
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    speed = json.loads(result.output)["speed"]
    assert speed["tokens_per_s"] == pytest.approx(best.step.tokens_per_s)
    assert speed["tokens_per_s_per_gpu"] == pytest.approx(speed["tokens_per_s"] / 7)
    assert speed["step_seconds"] == pytest.approx(
        speed["compute_seconds"]
        + speed["comm_exposed_seconds"]
        + speed["offload_seconds"]
        + speed["launch_seconds"]
    )
    assert speed["tokens_per_s"] * speed["step_seconds"] == pytest.approx(
        s.tokens * s.grad_accum * 7
    )
    assert speed["link_gbs"] == speed_model.FITTED.host_staged_gbs  # a 4090: no P2P
    text = CliRunner().invoke(cli, args, env={"COLUMNS": "250"}).output
    assert f"Predicted speed: {speed['tokens_per_s']:,.0f} tokens/s on 7 GPUs" in text
    # the Python API's result carries it too
    est = estimate(L8, gpus="7x4090", setup=s)
    assert est.speed == step_time(L8, s, parse_cluster("7x4090"))
    assert est.to_json()["speed"] == speed


def test_estimate_says_when_the_host_sets_the_pace() -> None:
    """A micro-batch whose host clock (Python, launches) is longer than its GPU clock is
    host-bound: estimate says so, with both clocks, and a GPU-bound one does not."""
    small = ["estimate", "llama-3.2-1b", "--gpus", "1xH200", "--micro-batch", "1"]
    small += ["--seq-len", "512"]
    speed = json.loads(CliRunner().invoke(cli, [*small, "--json"]).output)["speed"]
    assert speed["host_bound"]
    assert speed["host_seconds_per_micro_batch"] > 3 * speed["gpu_seconds_per_micro_batch"]
    text = CliRunner().invoke(cli, small, env={"COLUMNS": "250"}).output
    assert "The host sets this step's pace" in text
    # and how far such predictions were off on runs no fit saw: the step's band (host-bound
    # and GPU-bound apart) and, for the launched step estimate quotes, the launched runs'
    k = speed_model
    assert speed["step_error_p90"] == k.HELD_OUT_P90_HOST_BOUND
    assert speed["launched_error_p90"] == k.LAUNCHED_P90_HOST_BOUND
    assert speed["error_p90"] == max(k.HELD_OUT_P90_HOST_BOUND, k.LAUNCHED_P90_HOST_BOUND)
    band = f"9 in 10 predictions like this came within {speed['error_p90']:.0%}"
    text = " ".join(text.split())  # one paragraph, wrapped
    assert band in text and f"host-bound steps timed alone: {k.HELD_OUT_P90_HOST_BOUND:.0%}" in text
    large = ["estimate", "llama-3.1-8b", "--gpus", "1xH200", "--micro-batch", "4"]
    speed = json.loads(CliRunner().invoke(cli, [*large, "--json"]).output)["speed"]
    assert not speed["host_bound"]
    assert speed["step_error_p90"] == k.HELD_OUT_P90_GPU_BOUND < k.LAUNCHED_P90_GPU_BOUND
    assert speed["error_p90"] == k.LAUNCHED_P90_GPU_BOUND  # the wider of the two
    text = " ".join(CliRunner().invoke(cli, large, env={"COLUMNS": "250"}).output.split())
    assert "host sets" not in text
    assert f"GPU-bound steps timed alone: {k.HELD_OUT_P90_GPU_BOUND:.0%}" in text
    assert f"launched runs on real records: {k.LAUNCHED_P90_GPU_BOUND:.0%}" in text
    # the plan names its choice's band, and every band among its assumptions
    plan = ["plan", "llama-3.1-8b", "--gpus", "1xH200", "--seq-len", "2048"]
    out = CliRunner().invoke(cli, [*plan, "--global-batch", "8"], env={"COLUMNS": "250"}).output
    out = " ".join(out.split())
    assert f"(row 1): 9 in 10 predictions like it came within {k.LAUNCHED_P90_GPU_BOUND:.0%}" in out
    assert f", {k.HELD_OUT_P90_HOST_BOUND:.0%} where the host does" in out
    launched = f"{k.LAUNCHED_P90_GPU_BOUND:.0%} and {k.LAUNCHED_P90_HOST_BOUND:.0%} of their plan"
    assert f"launched runs on real records within {launched}" in out


def test_a_card_no_step_was_timed_on_is_named_beside_the_speed() -> None:
    """The constants and the bands come from H100 and H200 steps: estimate (a note) and plan
    (an assumption) say so for any other card, and not for those two."""
    note = "no step was timed on this card (RTX-4090)"
    est = CliRunner().invoke(cli, ["estimate", "llama-3.2-1b", "--gpus", "1x4090", "--json"])
    assert any(note in n for n in json.loads(est.output)["notes"])
    req = PlanRequest(spec=L8, cluster=parse_cluster("7x4090"), seq_len=2048, global_batch=112)
    assert any(note in a for a in plan(req).assumptions)
    for gpus in ("1xH200", "2xH100-SXM-80GB"):
        est = CliRunner().invoke(cli, ["estimate", "llama-3.2-1b", "--gpus", gpus, "--json"])
        assert not any("no step was timed" in n for n in json.loads(est.output)["notes"])


def test_a_lean_steps_band_is_the_steps_own_and_a_launched_one_the_wider() -> None:
    """StepTime.error_p90: a step timed alone carries its bound's held-out band; a launched
    step (launch_s > 0) the wider of that and the launched runs' of its bound
    (speed.LAUNCHED_P90_GPU_BOUND / _HOST_BOUND)."""
    setup = TrainSetup(method="lora", micro_batch=4, seq_len=2048)
    cluster = parse_cluster("1xH200")
    lean = step_time(L8, setup, cluster, launched=False)
    launched = step_time(L8, setup, cluster)
    assert lean.launch_s == 0 < launched.launch_s and not lean.host_bound
    assert lean.error_p90 == speed_model.HELD_OUT_P90_GPU_BOUND
    assert launched.error_p90 == max(
        speed_model.HELD_OUT_P90_GPU_BOUND, speed_model.LAUNCHED_P90_GPU_BOUND
    )
    small = TrainSetup(method="lora", micro_batch=1, seq_len=512)
    host = step_time(L8, small, cluster)
    assert host.host_bound
    assert host.error_p90 == max(
        speed_model.HELD_OUT_P90_HOST_BOUND, speed_model.LAUNCHED_P90_HOST_BOUND
    )


def test_launched_band_is_what_the_launched_runs_measured() -> None:
    """benchmarks/realdata_predict.py --check fails when speed.LAUNCHED_P90_GPU_BOUND or
    _HOST_BOUND drifts from the launched real-data runs against their predictions."""
    out = checked("realdata_predict.py")
    assert "9 in 10 of the 49 launched runs of GPU-bound steps within" in out
    assert "9 in 10 of the 54 launched runs of host-bound steps within" in out


def test_lora_keeps_the_bf16_base_and_shows_the_4bit_one_aside() -> None:
    """--method lora is planned on the bf16 base whenever one fits, even where a 4-bit base
    is predicted faster; that one is a line of its own with its speed and what it changes."""
    p = plan(story_request())
    assert p.best is not None and p.best.setup.method == "lora"
    assert all(c.setup.method == "lora" for c in p.ranked)
    assert not any(fam.startswith("qlora") for fam in p.rejected)
    alt = p.quantized_alternative
    assert alt is not None and alt.setup.method == "qlora" and alt.fits
    data = plan_json(p)
    q = data["quantized_alternative"]
    assert q["tokens_per_s"] == pytest.approx(alt.step.tokens_per_s)
    assert q["speedup"] == pytest.approx(alt.step.tokens_per_s / p.best.step.tokens_per_s - 1)
    assert "4-bit NF4" in q["changes"] and "--method auto" in q["changes"]
    text = " ".join(
        CliRunner()
        .invoke(cli, ["plan", "llama-3.1-8b-instruct", "--gpus", "7x4090", "--global-batch", "112"])
        .output.split()
    )
    assert "4-bit base, not chosen: qlora · " in text and f"{q['speedup']:+.0%}" in text
    # --no-quantization (the old opt-out, still accepted): no 4-bit setup at all
    plain = plan(story_request(allow_quantization=False))
    assert plain.quantized_alternative is None and plain.best is not None
    assert plain.best.setup == p.best.setup
    assert plan_json(plain)["quantized_alternative"] is None


def test_method_auto_takes_the_faster_base_and_says_so() -> None:
    auto = plan(story_request(method="auto"))
    lora = plan(story_request())
    assert auto.best is not None and lora.best is not None and lora.quantized_alternative
    # auto takes whichever base lora's plan predicts faster: with Liger's kernels on both
    # (and dropout 0) the 4-bit base keeps few enough activations on a 4090 to drop
    # checkpointing, and wins; without them it wins too
    faster = max(lora.best, lora.quantized_alternative, key=lambda c: c.step.tokens_per_s)
    assert auto.best.setup.method == faster.setup.method == "qlora"
    assert not auto.best.setup.grad_ckpt and auto.best.setup.kernels == "liger"
    assert auto.best.step.tokens_per_s == pytest.approx(faster.step.tokens_per_s)
    assert any("--method auto: qlora is predicted fastest" in a for a in auto.assumptions)
    plain = plan(story_request(method="auto", allow_kernels=False))
    assert plain.best is not None and plain.best.setup.method == "qlora"
    assert plain.quantized_alternative is None
    assert any("--method auto: qlora is predicted fastest" in a for a in plain.assumptions)
    with pytest.raises(BadSetupError, match="--no-quantization"):
        story_request(method="auto", allow_quantization=False)
    with pytest.raises(BadSetupError, match="--method must be one of"):
        story_request(method="qlora4")


def test_lora_falls_back_to_a_4bit_base_only_when_bf16_does_not_fit() -> None:
    big = dict(spec=load_model("llama-3.1-70b"), cluster=parse_cluster("2xH100"), method="lora")
    p = plan(PlanRequest(**big))  # type: ignore[arg-type]
    assert p.best is not None and p.best.setup.method == "qlora"
    assert any("no setup with the bf16 base fits" in a for a in p.assumptions)
    assert all(
        why.startswith("does not fit") for f, why in p.rejected.items() if f.startswith("lora")
    )
    refused = plan(PlanRequest(**big, allow_quantization=False))  # type: ignore[arg-type]
    assert refused.best is None


def test_speed_uses_the_peak_of_the_setups_precision() -> None:
    t4, h100 = parse_cluster("1xT4"), parse_cluster("1xH100")
    assert (
        peak_tflops(TrainSetup(), t4.gpu)
        == peak_tflops(TrainSetup(precision="fp16"), t4.gpu)
        == 65.0
    )
    assert peak_tflops(TrainSetup(), h100.gpu) == h100.gpu.bf16_tflops
    assert peak_tflops(TrainSetup(precision="fp16"), h100.gpu) == h100.gpu.fp16_tflops
    with pytest.raises(BadSetupError, match="no bf16"):
        peak_tflops(TrainSetup(precision="bf16"), t4.gpu)


def test_a_family_tied_on_speed_says_what_it_lost_on() -> None:
    from zeroplan.planner import _tie_lost_on

    ddp = TrainSetup(micro_batch=4, grad_accum=2)
    assert _tie_lost_on(TrainSetup(micro_batch=4, grad_accum=2, zero=0), ddp) == "adds moving parts"
    assert _tie_lost_on(TrainSetup(micro_batch=2, grad_accum=4), ddp) == (
        "takes more micro-batches per step"
    )
    # without checkpointing, as simple and as many micro-batches: it holds more memory
    ckpt = TrainSetup(micro_batch=4, grad_accum=2, grad_ckpt=True)
    assert _tie_lost_on(ddp, ckpt) == "leaves less memory to spare"
    # as simple, as many micro-batches, another shape predicted slower: speed breaks the tie
    assert _tie_lost_on(ddp, ckpt, slower=True) == "is the slower one"
    # the story's plan: on the fused LoRA linears the autocast step moves what DeepSpeed
    # bf16's does, so ZeRO-0, 1 and 2 tie with the chosen DDP and say why they lost
    p = plan(story_request())
    assert p.best is not None and p.best.setup.zero is None
    for family in ("lora · ZeRO-0", "lora · ZeRO-1", "lora · ZeRO-2"):
        assert "a tie within 3%), but adds moving parts" in p.rejected[family]


def test_the_fused_loss_is_a_moving_part_only_where_it_alone_brings_liger_in() -> None:
    """Launched beside Liger's kernels the fused loss adds nothing to install, so in a tie it
    wins on memory (kernels9_h100.jsonl: the default 8B QLoRA plan 1.4% faster with it, 17 GB
    lighter); in another trainer's recipe (plan --emit) or without Liger's kernels it is a
    moving part of its own, and the plainer setup wins the tie."""
    from zeroplan.planner import complexity

    fused = TrainSetup(method="qlora", kernels="liger", fused_loss=True)
    plain = TrainSetup(method="qlora", kernels="liger", fused_loss=False)
    assert complexity(fused) == complexity(plain)
    assert complexity(fused, launched=False) == complexity(plain) + 1
    own = TrainSetup(method="qlora", kernels="none", fused_loss=True)
    assert complexity(own) == complexity(plain) + 1
    spec = load_model("meta-llama/Llama-3.1-8B-Instruct")
    job = dict(spec=spec, cluster=parse_cluster("1xH100"), method="qlora", seq_len=704)
    launched = plan(PlanRequest(**job))  # type: ignore[arg-type]
    emitted = plan(PlanRequest(**job, launched=False))  # type: ignore[arg-type]
    assert launched.best is not None and emitted.best is not None
    # micro-batch 8 or 16: with CUDA graphs (the default) the two come within the tie
    assert launched.best.setup.fused_loss and launched.best.setup.micro_batch in (8, 16)
    assert not emitted.best.setup.fused_loss


def test_noise_floor_scores_a_perfect_model_against_the_fits_readings() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "noise_floor.py"), "--draws", "50"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "host-bound:" in out and "GPU-bound:" in out
    worst = out.split("worst |error| median ")[1].split("%")[0]
    assert 0 < int(worst) < 100  # the readings' own spread, not 0: a model cannot beat it


def test_an_architecture_the_speed_model_never_saw_is_said_in_estimate_and_plan() -> None:
    from zeroplan.api import estimate

    gemma = load_model("google/gemma-3-1b-it")
    est = estimate(gemma, "1xH200", method="lora", micro_batch=1, seq_len=512)
    assert any("gemma3_text is not among the architectures" in n for n in est.notes)
    assert not any("Mixture of experts" in n for n in est.notes)
    mixtral = estimate(
        "mistralai/Mixtral-8x7B-v0.1", "1xH200", method="lora", lora_targets="q_proj,v_proj"
    )
    assert any(
        "Mixture of experts: the speed comes from a model of the MoE step" in n
        for n in mixtral.notes
    )
    p = plan(PlanRequest(spec=gemma, cluster=parse_cluster("1xH200"), seq_len=512, global_batch=8))
    assert any("gemma3_text" in a for a in p.assumptions)
    # a fitted family, or a model built on one (a Llama distill), says nothing
    for name in ("meta-llama/Llama-3.2-1B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"):
        assert not any("speed:" in n for n in estimate(name, "1xH200").notes)


def test_every_speed_grid_line_parses_before_it_costs_device_time() -> None:
    """A typo in a grid line (an option, a shape, a model) would surface only on the GPU
    machine, after its start: each line of every named grid parses here, with its shapes and
    its model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import shlex

    import speed_grid

    for name, lines in speed_grid.GRIDS.items():
        for line in lines:
            args = speed_grid.parse_args(shlex.split(line))
            assert args.model, (name, line)
            load_model(args.model)
            for text in args.shapes.split(","):
                speed_grid.Shape.parse(text)
    with pytest.raises(SystemExit, match="bad shape"):
        speed_grid.Shape.parse("4x")


def test_liger_is_planned_only_where_its_launched_step_was_measured() -> None:
    """Liger's kernels were timed on bf16 LoRA and QLoRA steps: the plan chooses them there
    and leaves full fine-tuning on the model's own kernels."""
    from zeroplan.planner import kernels_choice

    req = PlanRequest(spec=load_model("llama-3.1-8b-instruct"), cluster=parse_cluster("1xH100"))
    assert kernels_choice(req, "lora") == kernels_choice(req, "qlora") == "liger"
    assert kernels_choice(req, "full") == "none"
    assert kernels_choice(dataclasses.replace(req, allow_kernels=False), "qlora") == "none"
    qlora = plan(dataclasses.replace(req, method="qlora", seq_len=1024))
    assert qlora.best is not None and qlora.best.setup.kernels == "liger"
    full = plan(dataclasses.replace(req, method="full", seq_len=1024))
    assert full.best is None or full.best.setup.kernels == "none"


def test_the_4bit_alternative_is_the_setup_method_auto_would_take() -> None:
    """The '4-bit base, not chosen' line ranks 4-bit setups as --method auto ranks them (ties
    within 3% to the simpler setup), so the two name the same setup."""
    lora = plan(story_request(allow_kernels=False))
    auto = plan(story_request(method="auto", allow_kernels=False))
    assert lora.quantized_alternative is not None and auto.best is not None
    assert auto.best.setup.method == "qlora"
    assert lora.quantized_alternative.setup == auto.best.setup


def test_the_plan_keeps_peft_layers_where_the_fused_ones_would_slow_a_host_bound_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fused LoRA linears keep at most PEFT's tensors and take passes off the GPU; on the host,
    timed on an H100 machine's, they cost 0.6-0.7 of PEFT's (hostops.FUSED_ADAPTER_HOST_US).
    Each setup is weighed both ways and the faster kept, one row per setup: with the ratios
    a CPU times (1.15 and 1.06 over bf16 and fp32 adapters) a host-bound step keeps PEFT's."""
    from zeroplan import hostops

    one = parse_cluster("1xH100")
    small = load_model("meta-llama/Llama-3.2-1B")
    # eager (under CUDA graphs, the default, the host does not set the pace)
    request = PlanRequest(
        spec=small,
        cluster=one,
        seq_len=512,
        global_batch=1,
        allow_quantization=False,
        allow_cuda_graphs=False,
    )
    host_paced = plan(request)
    best = host_paced.best
    assert best is not None and best.step.host_bound and best.setup.fused_lora
    peft = evaluate(host_paced.request, dataclasses.replace(best.setup, fused_lora=False))
    assert peft.step.tokens_per_s < best.step.tokens_per_s
    # no two ranked rows differ only in the layers
    keys = [dataclasses.replace(c.setup, fused_lora=False) for c in host_paced.ranked]
    assert len(keys) == len(set(keys))
    cpu_timed = {"bf16": (110, 127), "autocast": (137, 145), "4bit": (205, 131)}
    monkeypatch.setattr(hostops, "FUSED_ADAPTER_HOST_US", cpu_timed)
    slower_host = plan(request)
    kept = slower_host.best
    assert kept is not None and kept.step.host_bound and not kept.setup.fused_lora
    fused = evaluate(slower_host.request, dataclasses.replace(kept.setup, fused_lora=True))
    assert fused.step.tokens_per_s < kept.step.tokens_per_s
    # over fp32 adapters under autocast the fused linears keep each input once, where PEFT's
    # layers keep autocast's bf16 copy per adapter (memory.activations.shares_inputs)
    assert fused.estimate.required_bytes < kept.estimate.required_bytes
    assert any("run PEFT's own layers" in a for a in slower_host.assumptions)
    # a GPU-bound step takes them, and a 4-bit base, whose fused path asks less of the host
    gpu_paced = plan(PlanRequest(spec=L8, cluster=one, seq_len=2048, global_batch=16))
    assert gpu_paced.best is not None and not gpu_paced.best.step.host_bound
    assert gpu_paced.best.setup.fused_lora
    qlora = plan(
        PlanRequest(
            spec=L8,
            cluster=one,
            method="qlora",
            seq_len=512,
            global_batch=1,
            allow_cuda_graphs=False,
        )
    )
    assert qlora.best is not None and qlora.best.step.host_bound and qlora.best.setup.fused_lora


def test_cuda_graphs_where_the_launch_can_capture_them() -> None:
    """By default (plan --no-cuda-graphs turns it off) where it can run: one GPU, LoRA or
    QLoRA, no DeepSpeed, a dense model, a plan zeroplan launch runs: the decoder as CUDA
    graphs, and the host no longer sets the pace of a small step. Elsewhere eager."""
    small = load_model("meta-llama/Llama-3.2-1B")
    one = parse_cluster("1xH100")
    base = {"spec": small, "seq_len": 512, "global_batch": 1, "allow_quantization": False}
    graphed = plan(PlanRequest(cluster=one, **base)).best
    assert graphed is not None and graphed.setup.cuda_graphs and not graphed.step.host_bound
    eager = plan(PlanRequest(cluster=one, allow_cuda_graphs=False, **base)).best
    assert eager is not None and not eager.setup.cuda_graphs and eager.step.host_bound
    assert graphed.step.tokens_per_s > eager.step.tokens_per_s
    # never beside checkpointing (its RNG bookkeeping inside a capture is unrun)
    req = PlanRequest(cluster=one, allow_cuda_graphs=True, **base)
    setups = list(candidate_setups(req))
    assert any(s.cuda_graphs for s in setups)
    assert all(not s.grad_ckpt for s in setups if s.cuda_graphs)
    for req in (
        PlanRequest(
            cluster=parse_cluster("2xH100"), allow_cuda_graphs=True, **{**base, "global_batch": 2}
        ),
        PlanRequest(cluster=one, launched=False, allow_cuda_graphs=True, **base),
        PlanRequest(cluster=one, allow_cuda_graphs=True, **{**base, "method": "full"}),
    ):
        best = plan(req).best
        assert best is not None and not best.setup.cuda_graphs, req


def test_a_tie_falls_to_the_faster_micro_batch_then_to_the_lighter_setup() -> None:
    """Within TIE of the fastest, as simple and with as many micro-batches: the micro-batch
    shape predicted faster wins (graphs6, one H100: the 1B plan at 16 x 768, the lighter,
    ran 93.2% of the best of four, 32 x 768, predicted 2.7% faster, 98.6%), and of one
    shape the lighter setup (a tiny model's fused loss, a hair slower than its plain one,
    is still chosen: test_launch_runner's
    test_launching_a_model_takes_the_plans_kernel_switches)."""
    from zeroplan.api import resolve_cluster
    from zeroplan.planner import _rank

    spec = load_model("meta-llama/Llama-3.2-1B")
    req = PlanRequest(spec, resolve_cluster("1xH100"), seq_len=768, allow_quantization=False)
    p = plan(req)
    plain = [c for c in p.ranked if c.setup.zero is None][:2]
    assert [c.setup.micro_batch for c in plain] == [64, 32]
    assert plain[1].step.tokens_per_s >= 0.97 * plain[0].step.tokens_per_s  # a tie
    assert plain[0].estimate.required_bytes > 1.5 * plain[1].estimate.required_bytes
    # of one shape, a heavier twin predicted 0.5% faster ranks after the lighter setup
    best = p.best
    assert best is not None
    heavy = dataclasses.replace(
        best,
        estimate=dataclasses.replace(
            best.estimate, required_bytes=best.estimate.required_bytes + 2**30
        ),
        step=dataclasses.replace(best.step, tokens_per_s=best.step.tokens_per_s * 1.005),
    )
    assert _rank(req, [heavy, best])[0] is best
