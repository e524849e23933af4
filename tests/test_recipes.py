"""Recipes in and out: LLaMA-Factory, axolotl and TRL recipes read into a TrainSetup with each
trainer's own defaults, the DeepSpeed JSON they name resolved as the HF Trainer resolves it,
and plans written back into the user's file (or a fresh one) that the trainers accept.

The trainers' own parsers: TRL's ``TrlParser`` runs here (trl is in the test env). The
LLaMA-Factory and axolotl wheels install with ``pip install --no-deps --target DIR`` but pull
half a training stack on import, so their parsers run only when ``ZEROPLAN_RECIPE_PARSERS``
names such folders (colon-separated); otherwise the keys we write are checked against the
key sets read from those wheels (zeroplan/recipes/data/keys/, which the readers ship).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_dsconfig import _hf_fill, ds_parser, parse  # noqa: F401  (ds_parser: a fixture)

from zeroplan.commands.cli import main
from zeroplan.errors import BadRecipeError, RecipeNotFoundError
from zeroplan.recipes import axolotl, llamafactory, read_recipe, trl
from zeroplan.recipes import deepspeed as ds
from zeroplan.recipes.edit import edit_yaml
from zeroplan.recipes.write import emit_files
from zeroplan.trainsetup import TrainSetup

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "recipes"
LF_STORY = EXAMPLES / "llama31_8b_lora_7x4090.yaml"
TRL_STORY = EXAMPLES / "llama3_8b_qlora_1x4090.yaml"
KEYS = ROOT / "zeroplan" / "recipes" / "data" / "keys"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- defaults


def test_llamafactory_defaults_are_its_0_9_5_source() -> None:
    """Read off src/llamafactory/hparams/*.py at v0.9.5 and transformers' TrainingArguments."""
    got = {k: d.value for k, d in llamafactory.DEFAULTS.items()}
    assert got == {
        "stage": "sft",
        "finetuning_type": "lora",
        "quantization_bit": None,
        "lora_r": 8,
        "lora_alpha": None,  # 2 × lora_rank
        "lora_dropout": 0.0,
        "lora_targets": ("all-linear",),
        "micro_batch": 8,
        "grad_accum": 1,
        "seq_len": 2048,
        "grad_ckpt": True,
        "optim": "adamw_torch_fused",
        "bf16": False,
        "fp16": False,
        "attn": "auto",  # transformers' sdpa; eager for Gemma-2 (model_utils/attention.py)
        "packing": None,  # stage == "pt" (hparams/parser.py)
        "neat_packing": False,
        "fused_loss": False,
        "deepspeed": None,
        "template": None,  # the tokenizer's chat template (data/template.py)
        "epochs": 3.0,  # TrainingArguments' num_train_epochs
        "max_steps": -1,
    }


def test_axolotl_defaults_are_its_0_18_0_schema() -> None:
    """Read off src/axolotl/utils/schemas/*.py at v0.18.0."""
    got = {k: d.value for k, d in axolotl.DEFAULTS.items()}
    assert got == {
        "adapter": None,
        "load_in_4bit": False,
        "load_in_8bit": False,
        "lora_r": None,
        "lora_alpha": None,
        "lora_dropout": 0.0,
        "lora_target_linear": None,
        "lora_targets": None,
        "micro_batch": 1,
        "grad_accum": 1,
        "batch_size": None,
        "seq_len": 512,
        "grad_ckpt": False,
        "optim": "adamw_torch_fused",
        "bf16": None,  # auto
        "fp16": None,
        "attn": None,
        "packing": None,
        "plugins": (),
        "liger_flce": None,
        "cut_cross_entropy": None,
        "deepspeed": None,
        # None: axolotl decides (check_auto_enable_lora_kernels), see test_recipe_loops
        "lora_qkv_kernel": None,
        "lora_o_kernel": None,
        "lora_mlp_kernel": None,
        "lora_embedding_kernel": None,
        "trust_remote_code": None,
        "datasets": None,
        "excess_length": None,  # drop (utils/data/utils.py handle_long_seq_in_dataset)
        "epochs": 1.0,  # training.py num_epochs
        "max_steps": None,
    }


# setting -> (class, field) of TRL's / transformers' own dataclasses
_TRL_FIELDS = {
    "use_peft": ("ModelConfig", "use_peft"),
    "load_in_4bit": ("ModelConfig", "load_in_4bit"),
    "load_in_8bit": ("ModelConfig", "load_in_8bit"),
    "nested_quant": ("ModelConfig", "use_bnb_nested_quant"),
    "dtype": ("ModelConfig", "dtype"),
    "lora_r": ("ModelConfig", "lora_r"),
    "lora_alpha": ("ModelConfig", "lora_alpha"),
    "lora_dropout": ("ModelConfig", "lora_dropout"),
    "lora_targets": ("ModelConfig", "lora_target_modules"),
    "attn": ("ModelConfig", "attn_implementation"),
    "micro_batch": ("SFTConfig", "per_device_train_batch_size"),
    "grad_accum": ("SFTConfig", "gradient_accumulation_steps"),
    "seq_len": ("SFTConfig", "max_length"),
    "grad_ckpt": ("SFTConfig", "gradient_checkpointing"),
    "optim": ("SFTConfig", "optim"),
    "bf16": ("SFTConfig", "bf16"),
    "fp16": ("SFTConfig", "fp16"),
    "packing": ("SFTConfig", "packing"),
    "padding_free": ("SFTConfig", "padding_free"),
    "fused_loss": ("SFTConfig", "use_liger_kernel"),
    "deepspeed": ("SFTConfig", "deepspeed"),
    "epochs": ("SFTConfig", "num_train_epochs"),
    "max_steps": ("SFTConfig", "max_steps"),
}


def _field_default(cls: Any, name: str) -> Any:
    value = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    return getattr(value, "value", value)  # enums (OptimizerNames) as their string


def test_trl_defaults_are_trls_own() -> None:
    trl_mod = pytest.importorskip("trl")
    assert trl_mod.__version__ == trl.VERSION
    assert set(_TRL_FIELDS) == set(trl.DEFAULTS)
    for setting, (cls, name) in _TRL_FIELDS.items():
        want = _field_default(getattr(trl_mod, cls), name)
        assert trl.DEFAULTS[setting].value == want, setting


def test_hf_defaults_are_training_arguments_own() -> None:
    transformers = pytest.importorskip("transformers")
    ta = transformers.TrainingArguments
    assert trl.HF_DEFAULTS["bf16"].value == _field_default(ta, "bf16")
    assert trl.HF_DEFAULTS["grad_ckpt"].value == bool(_field_default(ta, "gradient_checkpointing"))
    assert trl.HF_DEFAULTS["micro_batch"].value == _field_default(ta, "per_device_train_batch_size")
    assert trl.HF_DEFAULTS["optim"].value == _field_default(ta, "optim")


# ----------------------------------------------------------------------------- reading


def test_the_7x4090_story_resolves_as_llamafactory_runs_it() -> None:
    recipe, spec = read_recipe(LF_STORY)
    assert (recipe.format, recipe.trainer) == ("llamafactory", "LLaMA-Factory 0.9.5")
    h = spec.hidden_size
    assert recipe.setup == {
        "method": "lora",
        "micro_batch": 4,
        "seq_len": 2048,
        "grad_accum": 4,
        "grad_ckpt": True,  # on unless disable_gradient_checkpointing
        "lora_r": 8,
        "lora_targets": ("all-linear",),
        "lora_dropout": 0.0,
        "optim": "adamw_torch_fused",
        "attn": "sdpa",
        "fused_loss": False,
        "precision": "bf16",
        "padding_mask": True,  # no packing: padded micro-batches with an attention mask
        # examples/deepspeed/ds_z3_config.json with HF's "auto" rules
        "zero": 3,
        "offload": "none",
        "reduce_bucket_elems": h * h,
        "allgather_bucket_elems": 500_000_000,
        "stage3_prefetch_elems": int(0.9 * h * h),
        "stage3_max_live_elems": 1_000_000_000,
        "stage3_persistence_threshold": 10 * h,
        "overlap_comm": False,
    }
    sources = {r.setting: r.source for r in recipe.rows}
    assert sources["lora_r"] == "default of LLaMA-Factory 0.9.5"
    assert sources["micro_batch"] == "recipe"
    assert sources["reduce_bucket_elems"].startswith("HF auto")
    TrainSetup(**recipe.setup)  # a valid setup


def test_the_qlora_story_resolves_as_trl_runs_it() -> None:
    recipe, _ = read_recipe(TRL_STORY)
    assert recipe.format == "trl"
    s = recipe.setup
    assert (s["method"], s["lora_r"], s["lora_dropout"]) == ("qlora", 16, 0.05)
    assert s["lora_targets"] == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (s["micro_batch"], s["grad_accum"], s["seq_len"]) == (1, 8, 768)
    assert (s["optim"], s["grad_ckpt"], s["zero"]) == ("paged_adamw_8bit", True, None)
    assert not recipe.packing


def test_trl_left_to_its_defaults(tmp_path: Path) -> None:
    """use_peft alone: r 16, alpha 32, dropout 0.05, PEFT's q_proj,v_proj for Llama,
    max_length 1024, checkpointing on, bf16; dtype float32 would be refused, so it is given."""
    p = write(
        tmp_path,
        "sft.yaml",
        """
        model_name_or_path: meta-llama/Llama-3.2-1B
        use_peft: true
        dtype: bfloat16
        dataset_name: trl-lib/Capybara
        """,
    )
    s = read_recipe(p)[0].setup
    assert s["lora_targets"] == ("q_proj", "v_proj")
    assert (s["lora_r"], s["lora_dropout"], s["seq_len"]) == (16, 0.05, 1024)
    assert (s["grad_ckpt"], s["precision"], s["micro_batch"]) == (True, "bf16", 8)


def test_axolotl_recipe(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "qlora.yml",
        """
        base_model: Qwen/Qwen2.5-7B-Instruct
        load_in_4bit: true
        adapter: qlora
        lora_r: 32
        lora_alpha: 16
        lora_target_linear: true
        sequence_len: 4096
        sample_packing: true
        micro_batch_size: 2
        gradient_accumulation_steps: 4
        gradient_checkpointing: true
        plugins:
          - axolotl.integrations.liger.LigerPlugin
        liger_fused_linear_cross_entropy: true
        unsloth_lora_mlp: true
        deepspeed: deepspeed_configs/zero3_bf16.json
        datasets:
          - path: mhenrichsen/alpaca_2k_test
            type: alpaca
        """,
    )
    recipe, spec = read_recipe(p)
    s = recipe.setup
    assert recipe.format == "axolotl" and recipe.packing
    assert (s["method"], s["lora_r"], s["lora_targets"]) == ("qlora", 32, ("all-linear",))
    assert (s["fused_loss"], s["seq_len"], s["lora_dropout"]) == (True, 4096, 0.0)
    assert (s["zero"], s["precision"], s["overlap_comm"]) == (3, "bf16", True)
    assert s["stage3_max_live_elems"] == 1  # max_live_parameters: 0
    assert s["reduce_bucket_elems"] == spec.hidden_size**2
    assert [k for k, _ in recipe.ignored] == ["unsloth_lora_mlp"]
    # its fused LoRA kernels: auto-enabled for LoRA / QLoRA when no lora_*_kernel key is set
    assert s["lora_kernels"]
    row = next(r for r in recipe.rows if r.setting == "lora_kernels")
    assert "auto-enabled for qlora" in row.source


def test_axolotl_batch_size_leaves_the_accumulation_at_1(tmp_path: Path) -> None:
    """axolotl 0.18.0's schema fills gradient_accumulation_steps with 1 before
    normalize_config could derive it from batch_size (checked with axolotl 0.19.0's own
    validate_config + normalize_config); both keys set is refused (check_gas_bsz)."""
    p = write(
        tmp_path,
        "full.yml",
        "base_model: meta-llama/Llama-3.2-1B\nmicro_batch_size: 2\nbatch_size: 16\n",
    )
    recipe = read_recipe(p)[0]
    s = recipe.setup
    assert (s["method"], s["micro_batch"], s["grad_accum"]) == ("full", 2, 1)
    assert any("batch_size 16 without gradient_accumulation_steps" in n for n in recipe.notes)
    both = write(tmp_path, "both.yml", p.read_text() + "gradient_accumulation_steps: 8\n")
    with pytest.raises(BadRecipeError, match="check_gas_bsz"):
        read_recipe(both)


def test_hf_json_training_arguments_vs_sftconfig(tmp_path: Path) -> None:
    base = {"per_device_train_batch_size": 2, "bf16": True, "output_dir": "x"}
    ta = tmp_path / "args.json"
    ta.write_text(json.dumps(base))
    recipe, _ = read_recipe(ta, model="llama-3.2-1b")
    assert recipe.format == "hf" and recipe.setup["grad_ckpt"] is False
    assert recipe.setup["method"] == "full"
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps({**base, "max_length": 512}))
    recipe, _ = read_recipe(sft, model="llama-3.2-1b")
    assert recipe.setup["grad_ckpt"] is True and recipe.setup["seq_len"] == 512


def test_deepspeed_file_beside_the_recipe_with_concrete_values(tmp_path: Path) -> None:
    (tmp_path / "z2.json").write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "zero_optimization": {
                    "stage": 2,
                    "offload_optimizer": {"device": "cpu"},
                    "reduce_bucket_size": 2e8,
                },
            }
        )
    )
    p = write(
        tmp_path,
        "r.yaml",
        "model_name_or_path: llama-3.2-1b\nfinetuning_type: full\ndeepspeed: z2.json\nbf16: true\n",
    )
    s = read_recipe(p)[0].setup
    assert (s["zero"], s["offload"], s["reduce_bucket_elems"]) == (2, "optimizer", 200_000_000)
    assert s["allgather_bucket_elems"] == 500_000_000  # DeepSpeed's default
    assert s["overlap_comm"] is False  # DeepSpeed's default below stage 3


def test_deepspeed_batch_that_disagrees_is_refused() -> None:
    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}
    with pytest.raises(BadRecipeError, match="train_micro_batch_size_per_gpu is 8"):
        ds.resolve(cfg, 4096, micro_batch=4, grad_accum=1, precision="bf16")


def test_no_known_keys_names_the_formats(tmp_path: Path) -> None:
    p = write(tmp_path, "x.yaml", "learning_rate: 1.0e-4\nfoo: bar\n")
    with pytest.raises(
        BadRecipeError, match=r"LLaMA-Factory 0\.9\.5.*axolotl 0\.18\.0.*TRL 1\.16\.0"
    ):
        read_recipe(p)


def test_recipe_format_forces_the_reader(tmp_path: Path) -> None:
    p = write(
        tmp_path, "x.yaml", "model_name_or_path: llama-3.2-1b\nper_device_train_batch_size: 2\n"
    )
    recipe, _ = read_recipe(p, fmt="llamafactory")
    assert recipe.format == "llamafactory" and recipe.setup["lora_r"] == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "finetuning_type: freeze\n",
            "finetuning_type: freeze is not modelled; supported: lora, full",
        ),
        (
            "optim: lion_8bit\n",
            "optim: lion_8bit is an optimizer zeroplan does not model; supported: adamw_torch_fused",
        ),
        ("quantization_bit: 8\n", "quantization_bit: 8 is not modelled; supported: 4"),
        ("stage: dpo\n", "stage: dpo is not modelled"),
        (
            "quantization_bit: 4\nquantization_method: bitsandbytes\n",
            "quantization_method: bitsandbytes is not modelled; supported: bnb",
        ),
    ],
)
def test_values_not_modelled_are_refused(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, "r.yaml", "model_name_or_path: llama-3.2-1b\ncutoff_len: 1024\n" + text)
    with pytest.raises(BadRecipeError, match=message.replace("(", r"\(")):
        read_recipe(p)


def test_trl_float32_base_is_refused(tmp_path: Path) -> None:
    p = write(
        tmp_path, "r.yaml", "model_name_or_path: llama-3.2-1b\nuse_peft: true\nmax_length: 512\n"
    )
    with pytest.raises(BadRecipeError, match=r"float32 \(TRL's default"):
        read_recipe(p)


def test_missing_deepspeed_file_says_where_it_looked(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "r.yaml",
        "model_name_or_path: llama-3.2-1b\ncutoff_len: 512\ndeepspeed: nope.json\n",
    )
    with pytest.raises(RecipeNotFoundError) as exc:
        read_recipe(p)
    assert str(tmp_path / "nope.json") in str(exc.value)
    assert "ds_z3_config.json" in str(exc.value)  # what it knows by name


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "model_name_or_path: x\ncutoff_len: [1, 2\n", "not YAML: line 3"),
        ("bad.json", '{\n  "per_device_train_batch_size": 2,\n  oops\n}\n', "not JSON: line 3"),
        ("free.yaml", "model_name_or_path: llama-3.2-1b\nfinetuning_type: freeze\n", "freeze"),
        (
            "ds.yaml",
            "model_name_or_path: llama-3.2-1b\ncutoff_len: 9\ndeepspeed: no.json\n",
            "looked at",
        ),
        ("none.yaml", "learning_rate: 0.1\n", "no key of a known recipe format"),
        # a typo'd key: LLaMA-Factory's and trl sft's parsers refuse the file, so does this
        (
            "typo.yaml",
            "model_name_or_path: llama-3.2-1b\nfinetuning_type: lora\ncutoff_length: 1024\n"
            "per_device_train_batchsize: 2\n",
            "cutoff_length (did you mean cutoff_len?); per_device_train_batchsize (did you "
            "mean per_device_train_batch_size?): not keys of LLaMA-Factory 0.9.5",
        ),
        (
            "typo_trl.yaml",
            "model_name_or_path: llama-3.2-1b\ndtype: bfloat16\nmax_lenght: 512\n",
            "max_lenght (did you mean max_length?): not a key of TRL 1.16.0",
        ),
        # LoRA on no module: LLaMA-Factory stops on an empty lora_target
        (
            "empty.yaml",
            "model_name_or_path: llama-3.2-1b\nfinetuning_type: lora\nlora_target:\n",
            "lora_target is empty",
        ),
        # YAML keeps the last, the line editor would change the first
        (
            "twice.yaml",
            "model_name_or_path: llama-3.2-1b\ncutoff_len: 512\nper_device_train_batch_size: 2\n"
            "# the bigger box\nper_device_train_batch_size: 8\n",
            "per_device_train_batch_size is given twice (lines 3 and 5)",
        ),
        # a DeepSpeed section written as a string: a key and its type, no AttributeError
        (
            "ds_type.yml",
            "base_model: llama-3.2-1b\nmicro_batch_size: 2\ndeepspeed:\n  zero_optimization:\n"
            "    stage: 2\n    offload_optimizer: cpu\n",
            "deepspeed zero_optimization.offload_optimizer: 'cpu' is not a section of keys",
        ),
        # a recipe's value below 1 is named by its key, not by the option it becomes
        (
            "zero.yaml",
            "model_name_or_path: llama-3.2-1b\ncutoff_len: 512\nper_device_train_batch_size: 0\n",
            "per_device_train_batch_size: 0 must be at least 1",
        ),
    ],
)
def test_bad_recipes_are_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    p = tmp_path / name
    p.write_text(text)
    out_dir = tmp_path / "out"
    for cmd in (["estimate"], ["plan", "-o", str(out_dir)]):
        code, out, err = run([*cmd, "--recipe", str(p), "--gpus", "1x4090"], capsys)
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith("zeroplan: error: ") and message in err
        assert out == "" and not out_dir.exists()


LF_1B = "model_name_or_path: llama-3.2-1b\ncutoff_len: 512\n"


@pytest.mark.parametrize(
    ("name", "text", "said", "fix"),
    [
        ("lf.yaml", LF_1B + "bf16: true\n", "bf16: true in lf.yaml", "fp16: true in place of"),
        (
            "trl.yaml",
            "model_name_or_path: llama-3.2-1b\nuse_peft: true\ndtype: bfloat16\n",
            "trl.yaml sets no bf16, and TRL 1.16.0 trains in bf16 by default",
            "fp16: true in trl.yaml",
        ),
        (
            "hf.json",
            '{"model_name_or_path": "llama-3.2-1b", "output_dir": "o", "bf16": true}',
            '"bf16": true in hf.json',
            '"fp16": true in place of "bf16": true',
        ),
        (
            "ds.yaml",
            LF_1B + "bf16: true\ndeepspeed: z2.json\n",
            "bf16: true in ds.yaml and bf16.enabled in z2.json",
            "fp16.enabled in place of bf16.enabled in z2.json",
        ),
    ],
)
def test_a_recipes_bf16_on_a_card_without_it_is_refused_in_the_recipes_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, said: str, fix: str
) -> None:
    """On a V100 the recipe's bf16 was refused as "--precision bf16: V100-SXM2-16GB has no
    bf16; use --precision fp16": an option the recipe's user never typed."""
    (tmp_path / "z2.json").write_text(
        '{"bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}'
    )
    recipe = write(tmp_path, name, text)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    launch = ["launch", "--data", str(data), "--dry-run", "-o", str(tmp_path / "run")]
    for cmd in (["estimate"], ["plan"], launch):
        code, out, err = run([*cmd, "--recipe", str(recipe), "--gpus", "1xV100"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"zeroplan: error: {said}: V100-SXM2-16GB has no bf16"), err
        assert fix in err and err.rstrip().endswith("or pass --precision fp16")
    # --precision fp16 plans it; the recipe as written is still refused, in its words
    code, out, err = run(
        ["plan", "--recipe", str(recipe), "--gpus", "1xV100", "--precision", "fp16", "--json"],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out)["recipe"]["as_written"]["error"].startswith(said)


def test_estimate_recipe_json_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["estimate", "--recipe", str(LF_STORY), "--gpus", "7x4090", "--micro-batch", "2", "--json"],
        capsys,
    )
    assert code == 0
    answer = json.loads(out)
    assert answer["setup"]["micro_batch"] == 2  # the flag over the recipe's 4
    assert answer["setup"]["grad_accum"] == 4 and answer["setup"]["zero"] == 3
    assert answer["setup"]["lora_r"] == 8 and answer["setup"]["lora_dropout"] == 0.0
    assert answer["recipe"]["overridden"] == {"micro_batch": "--micro-batch"}
    overridden = next(m for m in answer["recipe"]["mapping"] if m["setting"] == "micro_batch")
    assert overridden == {
        "key": "",
        "setting": "micro_batch",
        "value": 2,
        "source": "--micro-batch (the recipe's: 4)",
    }
    assert answer["recipe"]["trainer"] == "LLaMA-Factory 0.9.5"
    rows = {m["setting"]: m for m in answer["recipe"]["mapping"]}
    assert rows["seq_len"]["key"] == "cutoff_len"


def test_recipe_commands_are_fast_and_import_no_torch() -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from zeroplan.commands.cli import main
        t = time.perf_counter()
        main(["estimate", "--recipe", {str(LF_STORY)!r}, "--gpus", "7x4090", "--json"])
        took = time.perf_counter() - t
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        t = time.perf_counter()
        main(["plan", "--recipe", {str(LF_STORY)!r}, "--gpus", "7x4090", "--json"])
        planned = time.perf_counter() - t
        print("TOOK", took, planned, file=sys.stderr)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    took, planned = map(float, proc.stderr.rsplit("TOOK", 1)[1].split())
    assert took < 0.5, took  # estimate --recipe
    assert planned < 1.0, planned  # plan --recipe for the 7×4090 story


# ----------------------------------------------------------------------------- writing


def test_edit_yaml_keeps_comments_and_order() -> None:
    text = (
        "# head\n"
        "a: 1  # the a's comment\n"
        "plugins:\n"
        "  - x\n"
        "\n"
        "# about b\n"
        "b: 'two # not a comment'\n"
        "c: 3\n"
    )
    new = edit_yaml(text, {"a": 2, "plugins": ["x", "y"], "b": None, "d": True, "c": 3})
    assert new == (
        "# head\n"
        "a: 2  # the a's comment  # zeroplan: was 1\n"
        "plugins:\n"
        "- x\n"
        "- y\n"
        "\n"
        "# about b\n"
        "# b: 'two # not a comment'  # zeroplan: not in the plan\n"
        "c: 3\n"
        "\n"
        "d: true  # zeroplan\n"
    )


def test_plan_writes_the_7x4090_recipe_back(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ds_parser: Any,  # noqa: F811
) -> None:
    out_dir = tmp_path / "planned"
    code, out, _ = run(
        ["plan", "--recipe", str(LF_STORY), "--gpus", "7x4090", "-o", str(out_dir), "--json"],
        capsys,
    )
    assert code == 0
    answer = json.loads(out)
    best = answer["best"]["setup"]
    assert best["method"] == "lora"  # the bf16 base stays (4-bit only under --method auto)
    assert answer["quantized_alternative"] is None
    assert best["micro_batch"] * best["grad_accum"] == 16  # the recipe's global batch per GPU
    assert best["lora_r"] == 8 and best["lora_dropout"] == 0.0
    assert answer["recipe"]["as_written"]["family"] == "lora · ZeRO-3"

    before = LF_STORY.read_text().splitlines()
    after = (out_dir / LF_STORY.name).read_text().splitlines()
    assert len(after) == len(before)  # comments, blank lines and keys all kept
    changed = {a.split(":")[0] for a, b in zip(after, before, strict=True) if a != b}
    assert changed <= {
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "disable_gradient_checkpointing",
        "optim",
        "enable_liger_kernel",
        "deepspeed",
        "# deepspeed",
    }
    assert answer["written"]["recipe_diff"].startswith("---")

    # read back, it is the plan's setup
    planned = dict(read_recipe(out_dir / LF_STORY.name)[0].setup)
    for key in ("method", "micro_batch", "grad_accum", "grad_ckpt", "optim", "fused_loss", "zero"):
        assert planned[key] == best[key], key
    if best["zero"] is not None:
        cfg = json.loads((out_dir / "ds_config.json").read_text())
        filled = _hf_fill(cfg, bf16=True)
        parse(ds_parser, filled, 4)


def test_method_auto_may_take_4bit(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["plan", "--recipe", str(LF_STORY), "--gpus", "7x4090", "--method", "auto", "--json"],
        capsys,
    )
    assert code == 0
    answer = json.loads(out)
    assert answer["request"]["method"] == "auto"
    assert answer["recipe"]["overridden"] == {"method": "--method"}


def _emitted(tmp_path: Path, fmt: str, setup: TrainSetup) -> dict[str, Any]:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    files = emit_files(fmt, "meta-llama/Llama-3.1-8B-Instruct", setup, tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    data: dict[str, Any] = yaml.safe_load(files[f"{fmt}.yaml"])
    return data


SETUPS = [
    TrainSetup(micro_batch=2, grad_accum=4, zero=3, grad_ckpt=True, precision="bf16", lora_r=8),
    TrainSetup(
        method="qlora",
        micro_batch=1,
        grad_accum=8,
        optim="paged_adamw_8bit",
        fused_loss=True,
        precision="bf16",
        lora_targets=("q_proj", "v_proj"),
    ),
    TrainSetup(method="full", micro_batch=1, zero=2, offload="optimizer", precision="bf16"),
    TrainSetup(method="qlora", micro_batch=2, zero=3, grad_ckpt=True, precision="bf16"),
]
IDS = ["lora-z3", "qlora", "full-z2-offload", "qlora-z3"]


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
@pytest.mark.parametrize("fmt", ["llamafactory", "axolotl", "trl"])
def test_emitted_recipes_read_back_as_the_plan(tmp_path: Path, fmt: str, setup: TrainSetup) -> None:
    _emitted(tmp_path, fmt, setup)
    recipe, _ = read_recipe(tmp_path / f"{fmt}.yaml")
    assert recipe.format == fmt
    for key in (
        "method",
        "micro_batch",
        "grad_accum",
        "grad_ckpt",
        "optim",
        "fused_loss",
        "seq_len",
        "zero",
        "offload",
        "precision",
    ):
        assert recipe.setup[key] == getattr(setup, key), key
    if setup.is_lora:
        assert recipe.setup["lora_r"] == setup.lora_r
        assert recipe.setup["lora_targets"] == setup.lora_targets


def _key_set(name: str) -> set[str]:
    lines = (KEYS / name).read_text().splitlines()
    return {line for line in lines if line and not line.startswith("#")}


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_emitted_keys_are_keys_the_trainers_accept(tmp_path: Path, setup: TrainSetup) -> None:
    transformers = pytest.importorskip("transformers")
    ta = {f.name for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments)}
    lf = _emitted(tmp_path / "lf", "llamafactory", setup)
    assert set(lf) <= _key_set("llamafactory-0.9.5.txt") | ta
    ax = _emitted(tmp_path / "ax", "axolotl", setup)
    assert set(ax) <= _key_set("axolotl-0.18.0.txt")


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_trl_parses_the_emitted_trl_recipe(tmp_path: Path, setup: TrainSetup) -> None:
    trl_mod = pytest.importorskip("trl")
    import yaml

    _emitted(tmp_path, "trl", setup)
    data = yaml.safe_load((tmp_path / "trl.yaml").read_text())
    data["use_cpu"] = True  # this machine has no GPU for bf16
    parser = trl_mod.TrlParser(
        (
            trl_mod.ScriptArguments,
            trl_mod.SFTConfig,
            trl_mod.ModelConfig,
            trl_mod.DatasetMixtureConfig,
        )
    )
    _, sft, model, _ = parser.parse_dict(data, allow_extra_keys=False)
    assert sft.per_device_train_batch_size == setup.micro_batch
    assert sft.gradient_accumulation_steps == setup.grad_accum
    assert model.load_in_4bit == (setup.method == "qlora")
    # ZeRO-3 shards 4-bit weights stored as bf16 only
    want = "bfloat16" if setup.method == "qlora" and setup.zero == 3 else None
    assert model.bnb_4bit_quant_storage == want
    assert sft.deepspeed == (str(tmp_path / "ds_config.json") if setup.zero is not None else None)


@pytest.mark.parametrize(
    "setup",
    [s for s in SETUPS if s.zero is not None],
    ids=["lora-z3", "full-z2-offload", "qlora-z3"],
)
def test_emitted_deepspeed_json_is_accepted_by_deepspeed(
    tmp_path: Path,
    setup: TrainSetup,
    ds_parser: Any,  # noqa: F811
) -> None:
    _emitted(tmp_path, "trl", setup)
    cfg = json.loads((tmp_path / "ds_config.json").read_text())
    filled = _hf_fill(cfg, bf16=True)
    parsed = parse(ds_parser, filled, 4)
    assert parsed.zero_optimization_stage == setup.zero


_PARSERS = [p for p in os.environ.get("ZEROPLAN_RECIPE_PARSERS", "").split(os.pathsep) if p]


@pytest.mark.skipif(
    not _PARSERS, reason="set ZEROPLAN_RECIPE_PARSERS to folders of --no-deps installs"
)
@pytest.mark.parametrize("fmt", ["llamafactory", "axolotl"])
def test_their_own_parsers_accept_the_emitted_recipes(tmp_path: Path, fmt: str) -> None:
    """pip install --no-deps --target DIR llamafactory==0.9.5 omegaconf antlr4-python3-runtime
    axolotl==0.18.0; then ZEROPLAN_RECIPE_PARSERS=DIR."""
    _emitted(tmp_path, fmt, SETUPS[0])
    check = {
        "llamafactory": (
            "from llamafactory.hparams.parser import _TRAIN_ARGS, HfArgumentParser\n"
            "d['use_cpu'] = True\n"
            "HfArgumentParser(_TRAIN_ARGS).parse_dict(d, allow_extra_keys=False)\n"
        ),
        "axolotl": (
            "from axolotl.utils.schemas.config import AxolotlInputConfig\n"
            "AxolotlInputConfig.model_validate(d)\n"
        ),
    }[fmt]
    code = (
        "import sys, yaml\n"
        f"sys.path += {_PARSERS!r}\n"
        f"d = yaml.safe_load(open({str(tmp_path / f'{fmt}.yaml')!r}))\n" + check
    )
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_example_recipe_reads(path: Path) -> None:
    recipe, _ = read_recipe(path)
    TrainSetup(**recipe.setup)
    assert not recipe.ignored


def test_plan_edits_for_axolotl_and_json(tmp_path: Path) -> None:
    """The plan's changes through each trainer's own keys: axolotl's fused loss is its
    plugin plus a switch, and its accumulation replaces batch_size; a JSON keeps its keys."""
    from zeroplan.recipes.write import plan_edits, planned_files

    p = write(
        tmp_path,
        "a.yml",
        """
        base_model: meta-llama/Llama-3.2-1B
        adapter: lora
        lora_r: 8
        micro_batch_size: 4
        batch_size: 16
        plugins:
          - some.OtherPlugin  # kept
        """,
    )
    recipe, _ = read_recipe(p)
    plan = TrainSetup(
        **{**recipe.setup, "micro_batch": 2, "grad_accum": 8, "fused_loss": True, "zero": 2}
    )
    edits = plan_edits(recipe, plan, "out/ds_config.json")
    assert edits == {
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 8,
        "batch_size": None,  # commented out: axolotl refuses it beside the accumulation
        "plugins": ["some.OtherPlugin", axolotl.LIGER_PLUGIN],
        "liger_fused_linear_cross_entropy": True,
        "deepspeed": "out/ds_config.json",
    }
    files, _ = planned_files(recipe, plan, tmp_path / "out")
    (tmp_path / "out").mkdir()
    for name, text in files.items():
        (tmp_path / "out" / name).write_text(text)
    back = read_recipe(tmp_path / "out" / "a.yml")[0].setup
    assert (back["micro_batch"], back["grad_accum"], back["fused_loss"], back["zero"]) == (
        2,
        8,
        True,
        2,
    )

    j = tmp_path / "args.json"
    j.write_text(
        json.dumps({"per_device_train_batch_size": 4, "bf16": True, "output_dir": "o"}, indent=2)
        + "\n"
    )
    recipe, _ = read_recipe(j, model="llama-3.2-1b")
    plan = dataclasses.replace(TrainSetup(**recipe.setup), micro_batch=1, grad_accum=4)
    files, diff = planned_files(recipe, plan, tmp_path / "o2")
    data = json.loads(files["args.json"])
    assert data == {
        "per_device_train_batch_size": 1,
        "bf16": True,
        "output_dir": "o",
        "gradient_accumulation_steps": 4,
    }
    assert '-  "per_device_train_batch_size": 4,' in diff.splitlines()
    assert '+  "per_device_train_batch_size": 1,' in diff.splitlines()
    assert '   "bf16": true,' in diff.splitlines()  # unchanged context


GPU_RECIPES = EXAMPLES / "gpu"


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("fmt", ["llamafactory", "axolotl", "trl"])
def test_the_recipes_run_on_the_gpu_are_what_plan_emits(
    tmp_path: Path, fmt: str, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/results/recipes_gpu.md measured each trainer on examples/recipes/gpu/: those
    recipes must describe the very job `plan --emit` writes for it (their own dataset,
    template and step keys aside), so the GPU rows check recipes zeroplan writes."""
    code, _, err = run(
        ["plan", "llama-3.2-3b-instruct", "--gpus", "1xH100", "--method", method,
         "--seq-len", "1024", "--global-batch", "4", "--lora-dropout", "0.05",
         "--emit", fmt, "-o", str(tmp_path)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    (ran,) = [p for p in GPU_RECIPES.iterdir() if p.stem == f"{fmt}_{method}"]
    emitted = dict(read_recipe(tmp_path / f"{fmt}.yaml")[0].setup)
    assert dict(read_recipe(ran)[0].setup) == emitted
    assert emitted["method"] == method and emitted["micro_batch"] == 4


# ----------------------------------------------------------------------------- audit fixes


LORA_AXOLOTL = (
    "base_model: llama-3.2-1b\nadapter: lora\nlora_r: 8\nlora_target_linear: true\n"
    "micro_batch_size: 2\ngradient_accumulation_steps: 4\nbf16: true\n"
)
FULL_RECIPES = {
    "axolotl.yml": "base_model: llama-3.2-1b\nsequence_len: 1024\nmicro_batch_size: 2\n"
    "gradient_accumulation_steps: 4\nbf16: true\n",
    "trl.yaml": "model_name_or_path: llama-3.2-1b\ndtype: bfloat16\nmax_length: 1024\n"
    "per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\n",
    "hf.json": json.dumps(
        {"model_name_or_path": "llama-3.2-1b", "per_device_train_batch_size": 2, "bf16": True}
    ),
}


@pytest.mark.parametrize("name", sorted(FULL_RECIPES))
def test_full_fine_tuning_recipes_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """No adapter, no use_peft: every weight trains and there are no LoRA targets, which
    the job's LoRA options must not trip on (it was a TypeError)."""
    p = tmp_path / name
    p.write_text(FULL_RECIPES[name])
    code, out, err = run(["plan", "--recipe", str(p), "--gpus", "1xH100", "--json"], capsys)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["best"]["setup"]["method"] == "full"
    assert answer["recipe"]["overridden"] == {}
    assert read_recipe(p)[0].setup["lora_targets"] == TrainSetup.lora_targets  # unused


def test_unknown_keys_axolotl_and_json_are_noted(tmp_path: Path) -> None:
    """axolotl ignores a key its schema lacks (pydantic) and plugins bring keys of their
    own; a JSON is for your own script, whose arguments may add fields: both are noted with
    the nearest known key, not refused."""
    p = write(
        tmp_path,
        "ax.yml",
        """
        base_model: llama-3.2-1b
        micro_batchsize: 4
        sequence_length: 4096
        strict: false
        """,
    )
    recipe = read_recipe(p)[0]
    assert (recipe.setup["micro_batch"], recipe.setup["seq_len"]) == (1, 512)  # the defaults
    (note,) = [n for n in recipe.notes if n.startswith("unknown keys")]
    assert "micro_batchsize (did you mean micro_batch_size?)" in note
    assert "sequence_length (did you mean sequence_len?)" in note
    assert "axolotl 0.18.0 ignores" in note and "strict" not in note
    j = tmp_path / "args.json"
    j.write_text(json.dumps({"per_device_train_batchsize": 2, "bf16": True, "my_own": 1}))
    recipe = read_recipe(j, model="llama-3.2-1b")[0]
    assert any("per_device_train_batchsize (did you mean per_device_train_batch_size?)" in n
               for n in recipe.notes)  # fmt: skip


def test_keys_of_older_training_arguments_and_accelerate_are_known(tmp_path: Path) -> None:
    """LLaMA-Factory 0.9.5 runs on transformers 4.55-5.6, so a TrainingArguments key that
    transformers 5 dropped (overwrite_output_dir) is still its key; trl sft hands a key no
    dataclass takes to accelerate launch (num_processes)."""
    lf = write(
        tmp_path,
        "lf.yaml",
        "model_name_or_path: llama-3.2-1b\ncutoff_len: 512\noverwrite_output_dir: true\n",
    )
    assert read_recipe(lf)[0].setup["seq_len"] == 512  # read, not refused
    t = write(
        tmp_path,
        "t.yaml",
        "model_name_or_path: llama-3.2-1b\ndtype: bfloat16\nnum_processes: 2\n"
        "accelerate_config: zero3\nenv:\n  WANDB_MODE: offline\n",
    )
    assert not [n for n in read_recipe(t)[0].notes if n.startswith("unknown")]


def test_shipped_key_lists_cover_the_installed_trl_and_transformers() -> None:
    """The lists the readers ship (zeroplan/recipes/data/keys/) hold every field of the
    installed TRL's and transformers' dataclasses and accelerate launch's options."""
    transformers = pytest.importorskip("transformers")
    trl_mod = pytest.importorskip("trl")
    launch = pytest.importorskip("accelerate.commands.launch")

    def fields(*classes: Any) -> set[str]:
        return {f.name for c in classes for f in dataclasses.fields(c) if f.init}

    ta = _key_set("transformers-training-args.txt")
    assert fields(transformers.Seq2SeqTrainingArguments) <= ta
    sft = (trl_mod.ScriptArguments, trl_mod.SFTConfig, trl_mod.ModelConfig)
    assert fields(*sft, trl_mod.DatasetMixtureConfig) <= ta | _key_set("trl-1.16.0.txt")
    options = launch.launch_command_parser()._actions
    names = {o[2:] for a in options for o in a.option_strings if o.startswith("--")}
    assert names - {"help"} <= _key_set("accelerate-launch.txt")


def test_model_given_beside_the_recipe_overrides_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MODEL over the recipe's model: the mapping and --json say so, and the written recipe
    trains MODEL, as plan.json does; the same model by another name is no override."""
    p = write(tmp_path, "r.yml", LORA_AXOLOTL)
    out_dir = tmp_path / "out"
    args = ["plan", "llama-3.2-3b", "--recipe", str(p), "--gpus", "1xH100", "--json"]
    code, out, err = run([*args, "-o", str(out_dir)], capsys)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["recipe"]["overridden"] == {"model": "MODEL"}
    (row,) = [m for m in answer["recipe"]["mapping"] if m["setting"] == "model"]
    assert row == {
        "key": "",
        "setting": "model",
        "value": "meta-llama/Llama-3.2-3B",
        "source": "MODEL (the recipe's: llama-3.2-1b)",
    }
    written = (out_dir / "r.yml").read_text()
    assert "base_model: meta-llama/Llama-3.2-3B  # zeroplan: was llama-3.2-1b" in written
    assert json.loads((out_dir / "plan.json").read_text())["model"] == "meta-llama/Llama-3.2-3B"
    code, out, _ = run(["plan", "llama-3.2-1b", "--recipe", str(p), "--gpus", "1xH100", "--json"],
                       capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["recipe"]["overridden"] == {}


def test_deepspeed_plan_comments_out_fsdp(tmp_path: Path) -> None:
    """axolotl (check_fsdp_deepspeed) and the HF Trainer refuse fsdp beside deepspeed."""
    from zeroplan.recipes.write import planned_files

    p = write(
        tmp_path,
        "f.yml",
        """
        base_model: llama-3.2-1b
        adapter: lora
        lora_r: 8
        micro_batch_size: 2
        fsdp:
          - full_shard
        fsdp_config:
          fsdp_offload_params: false
        """,
    )
    recipe, _ = read_recipe(p)
    plan = TrainSetup(**{**recipe.setup, "zero": 2})
    files, _ = planned_files(recipe, plan, tmp_path / "out")
    lines = files["f.yml"].splitlines()
    assert "# fsdp:  # zeroplan: not in the plan" in lines
    assert "# fsdp_config:  # zeroplan: not in the plan" in lines
    assert "#   fsdp_offload_params: false" in lines
    import yaml

    data = yaml.safe_load(files["f.yml"])
    assert "fsdp" not in data and "fsdp_config" not in data and data["deepspeed"]


def test_axolotl_checkpointing_false_as_a_string(tmp_path: Path) -> None:
    """axolotl's pydantic reads gradient_checkpointing: "false" as false."""
    p = write(tmp_path, "s.yml", 'base_model: llama-3.2-1b\ngradient_checkpointing: "false"\n')
    assert read_recipe(p)[0].setup["grad_ckpt"] is False


def test_axolotl_attention_switch_set_false_gives_way(tmp_path: Path) -> None:
    """flash_attention: false says nothing of the attention: eager_attention: true below it
    chooses it (it read as transformers' default, sdpa)."""
    p = write(
        tmp_path,
        "a.yml",
        "base_model: llama-3.2-1b\nflash_attention: false\neager_attention: true\n",
    )
    assert read_recipe(p)[0].setup["attn"] == "eager"


def test_axolotl_keys_left_empty_are_unset(tmp_path: Path) -> None:
    """axolotl's schema has them bool | None and float | None: a key left empty is unset
    (lora_dropout None: no dropout), not 'None is not true or false'."""
    p = write(
        tmp_path,
        "n.yml",
        """
        base_model: llama-3.2-1b
        adapter: lora
        lora_r: 8
        load_in_8bit:
        load_in_4bit:
        lora_dropout:
        flash_attention:
        sdp_attention: true
        """,
    )
    s = read_recipe(p)[0].setup
    assert (s["method"], s["lora_dropout"], s["attn"]) == ("lora", 0.0, "sdpa")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
            'zero_optimization.offload_optimizer: \'cpu\' is not a section of keys: write it as offload_optimizer: {"device": "cpu"}',
        ),
        ({"optimizer": "Adam"}, "optimizer: 'Adam' is not a section of keys"),
        ({"zero_optimization": 3}, "zero_optimization: 3 is not a section of keys"),
        ({"bf16": True}, "bf16: True is not a section of keys"),
    ],
)
def test_deepspeed_sections_of_the_wrong_type(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRecipeError, match=re.escape(message)):
        ds.resolve(cfg, 2048, micro_batch=1, grad_accum=1, precision="bf16")


def test_deepspeed_quoted_numbers_read_as_deepspeed_reads_them() -> None:
    """DeepSpeed's pydantic config reads "3" as 3."""
    fields, _, _ = ds.resolve(
        {"zero_optimization": {"stage": "3"}, "train_micro_batch_size_per_gpu": "2"},
        2048,
        micro_batch=2,
        grad_accum=1,
        precision="bf16",
    )
    assert fields["zero"] == 3


def test_plan_refuses_to_write_over_the_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-o at the recipe's own folder would replace the user's recipe with the plan's."""
    p = write(tmp_path, "r.yml", LORA_AXOLOTL)
    before = p.read_text()
    code, out, err = run(["plan", "--recipe", str(p), "--gpus", "1xH100", "-o", str(tmp_path)],
                         capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and out == ""
    assert "r.yml is the recipe being planned" in err and "give -o another folder" in err
    assert p.read_text() == before and not (tmp_path / "plan.json").exists()


def test_old_max_seq_length_is_written_where_it_is(tmp_path: Path) -> None:
    """A TRL recipe from before 0.20 keeps its max_seq_length key: the plan's length goes
    there, not into a max_length beside it (the same for torch_dtype)."""
    from zeroplan.recipes.write import plan_edits

    p = write(
        tmp_path,
        "old.yaml",
        """
        model_name_or_path: llama-3.2-1b
        torch_dtype: bfloat16
        use_peft: true
        max_seq_length: 4096
        per_device_train_batch_size: 1
        """,
    )
    recipe, _ = read_recipe(p)
    plan = TrainSetup(**{**recipe.setup, "seq_len": 2048})
    edits = plan_edits(recipe, plan, "out/ds_config.json")
    assert edits["max_seq_length"] == 2048 and "max_length" not in edits


def test_quoted_numbers_where_the_trainer_reads_them(tmp_path: Path) -> None:
    """trl sft's argparse and axolotl's pydantic turn "2048" into 2048; LLaMA-Factory's
    HfArgumentParser.parse_dict keeps a string, whose quantization_bit: "4" it then stops on."""
    t = write(
        tmp_path,
        "t.yaml",
        'model_name_or_path: llama-3.2-1b\ndtype: bfloat16\nmax_length: "512"\nlora_dropout: "0.1"\n',
    )
    s = read_recipe(t)[0].setup
    assert (s["seq_len"], s["lora_dropout"]) == (512, 0.1)
    lf = write(tmp_path, "lf.yaml", 'model_name_or_path: llama-3.2-1b\nquantization_bit: "4"\n')
    with pytest.raises(
        BadRecipeError, match=r"quantization_bit: '4' is quoted.*write quantization_bit: 4"
    ):
        read_recipe(lf)
