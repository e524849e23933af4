"""The launched loop without the host's needless waits and walks (zeroplan.launch.hostloop):
the same losses and gradient norms seed for seed, fewer walks over the module tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")

import tinyllm
import torch

from zeroplan.launch import hostloop, sft
from zeroplan.trainsetup import TrainSetup

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinyllm.build_model_dir(tmp_path_factory.mktemp("tiny"))


def test_training_arguments_wait_for_nothing() -> None:
    kw = sft.training_kwargs(
        TrainSetup(method="lora"), sft.Options(Path("p"), "d", Path("o")), True, None, False
    )
    assert kw["logging_nan_inf_filter"] is False
    assert kw["accelerator_config"] == {"non_blocking": True}
    assert kw["dataloader_pin_memory"] is True
    cpu = sft.training_kwargs(
        TrainSetup(method="lora"), sft.Options(Path("p"), "d", Path("o")), False, None, False
    )
    assert "accelerator_config" not in cpu and cpu["dataloader_pin_memory"] is False


def _lora_model(model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))


def test_train_walks_the_tree_only_when_the_mode_changes(model_dir: Path) -> None:
    model = _lora_model(model_dir)
    model.eval()
    walks = hostloop.LeanWalks(hostloop.trainable(model))
    walks.install(model)
    for _ in range(3):
        assert model.train() is model
    assert walks.walks == 1
    assert all(m.training for m in model.modules())
    model.eval()  # evaluation goes through it: every module back to eval, then train again
    assert walks.walks == 2 and not any(m.training for m in model.modules())
    model.train()
    assert walks.walks == 3 and all(m.training for m in model.modules())


def test_zero_grad_clears_what_trains_and_nothing_else_holds_one(model_dir: Path) -> None:
    model = _lora_model(model_dir)
    params = hostloop.trainable(model)
    assert params and len(params) < len(list(model.parameters()))
    hostloop.LeanWalks(params).install(model)
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in params)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def _run(tmp_path: Path, model_dir: Path, name: str) -> list[dict[str, Any]]:
    data = tmp_path / "d.jsonl"
    if not data.exists():
        tinyllm.write_jsonl(data, tinyllm.alpaca_records(16))
    run = tmp_path / name
    tinyllm.write_plan(run, model_dir, method="lora", micro_batch=2, lora_r=4)
    argv = ["--plan", str(run / "plan.json"), "--data", str(data), "--out", str(run)]
    argv += ["--max-steps", "4", "--logging-steps", "1", "--seed", "3", "--save-steps", "1000"]
    assert sft.run(sft.parse_args(argv), sft.StopFlag(), argv) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["event"] == "train"]


def test_the_lean_loop_learns_what_the_trainers_own_loop_learns(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lean = _run(tmp_path, model_dir, "lean")
    # the Trainer's own loop: every walk, the NaN filter's read, clipping over every parameter
    monkeypatch.setattr(hostloop, "sync_free_kwargs", lambda cuda: {})
    monkeypatch.setattr(hostloop.LeanWalks, "install", lambda self, model: None)
    monkeypatch.setattr(hostloop, "trainable", lambda model: None)
    plain = _run(tmp_path, model_dir, "plain")
    assert len(lean) == len(plain) == 4
    applied = json.loads((tmp_path / "lean" / "applied.json").read_text())
    assert applied["host_loop"] == {
        "logging_nan_inf_filter": False,
        "dataloader_pin_memory": False,
        "lean_walks": True,
    }
    for a, b in zip(lean, plain, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]


def test_the_flops_count_is_the_trainers(model_dir: Path) -> None:
    from transformers import Trainer

    model = _lora_model(model_dir)
    trainer = sft.lean_trainer_class().__new__(sft.lean_trainer_class())
    trainer.model = model
    inputs = {"input_ids": torch.zeros(3, 7, dtype=torch.long)}
    assert trainer.floating_point_ops(inputs) == Trainer.floating_point_ops(trainer, inputs)
    assert trainer.zp_params == model.num_parameters(exclude_embeddings=True)
    assert trainer.floating_point_ops({"pixel_values": torch.zeros(1)}) == 0


def test_freeze_heap_takes_what_was_built_out_of_the_collectors_walks() -> None:
    """Before training the rank freezes its heap (hostloop.freeze_heap): what it built (the
    records' token lists, the model) is no longer walked by a full collection, which can
    otherwise fall inside a step; new objects still are, and frozen ones still free by
    reference count."""
    import gc
    import weakref

    from zeroplan.launch import hostloop

    class Box:
        pass

    built = [[i] for i in range(1000)]
    kept = Box()
    try:
        frozen = hostloop.freeze_heap()
        assert frozen > 1000
        tracked = {id(o) for o in gc.get_objects()}
        assert id(built) not in tracked and id(built[0]) not in tracked
        later = [[1]]
        assert id(later) in {id(o) for o in gc.get_objects()}
        gone = weakref.ref(kept)
        del kept
        assert gone() is None
    finally:
        gc.unfreeze()
