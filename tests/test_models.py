"""ModelSpec against the real transformers models, and how a model id is resolved.

The parameter counts are checked against ``sum(p.numel())`` of the transformers model built
on the meta device from the very same config.json (no weights, no download), component by
component. Resolution tests run offline against an empty HOME / HF cache (``isolated_hf``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import pytest

from zeroplan.errors import (
    BadModelConfigError,
    ModelNotFoundError,
    UnsupportedModelError,
    ZeroplanError,
)
from zeroplan.memory.estimate import CALIBRATED_FAMILIES
from zeroplan.models import catalog_models, load_model, spec_from_config

CATALOG = catalog_models()
CATALOG_ROOT = resources.files("zeroplan") / "catalog"

# A tiny but complete Llama config; every loader test writes a variant of it.
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}
# By hand: embed 512·64 + lm_head 512·64 + 2 layers × (q 64·64 + k 64·32 + v 64·32
# + o 64·64 + 3 MLP 64·128 + 2 norms 64) + final norm 64.
TINY_PARAMS = 2 * 512 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64


# --------------------------------------------------------------------------- the catalog


def test_catalog_is_not_empty_and_has_every_family_we_advertise() -> None:
    types = {spec_from_config(_catalog_json(m)).model_type for m in CATALOG}
    assert len(CATALOG) >= 45
    assert {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "gemma3",
        "phi3",
        "mixtral",
        "qwen3_moe",
    } <= types


ISSUE_13_MODELS = [
    "Qwen/Qwen3-0.6B",
    "Qwen/Qwen3-1.7B",
    "Qwen/Qwen3-4B",
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-14B",
    "Qwen/Qwen3-32B",
    "Qwen/Qwen3-235B-A22B",
    "meta-llama/Llama-3.3-70B-Instruct",
    "google/gemma-3-1b-it",
    "google/gemma-3-4b-it",
    "google/gemma-3-12b-it",
    "google/gemma-3-27b-it",
    "microsoft/phi-4",
    "microsoft/Phi-4-mini-instruct",
    "mistralai/Mistral-Nemo-Instruct-2407",
    "mistralai/Mistral-Small-24B-Instruct-2501",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
]


@pytest.mark.usefixtures("isolated_hf")
@pytest.mark.parametrize("repo", ISSUE_13_MODELS)
def test_issue_13_models_are_in_the_catalog_and_estimate_fast(repo: str) -> None:
    """Each resolves offline from the catalog, and `zeroplan estimate` answers in < 0.5 s."""
    from zeroplan.api import estimate

    assert repo in CATALOG
    # a mixture of experts is estimated for measured targets only (zeroplan.moe): attention
    targets = "q_proj,k_proj,v_proj,o_proj" if load_model(repo).moe else "all-linear"
    start = time.perf_counter()
    est = estimate(
        repo, gpus="8xH100", method="lora", micro_batch=1, seq_len=1024, lora_targets=targets
    )
    assert time.perf_counter() - start < 0.5
    assert est.model["total_params"] > 0
    uncalibrated = est.model["model_type"] not in CALIBRATED_FAMILIES
    assert est.calibrated is not uncalibrated
    if uncalibrated:
        assert any("not yet calibrated" in note for note in est.notes)


def _catalog_json(repo: str) -> dict[str, Any]:
    text = (CATALOG_ROOT / "models" / (repo.replace("/", "--") + ".json")).read_text(
        encoding="utf-8"
    )
    data: dict[str, Any] = json.loads(text)
    return data


def test_param_counts_file_matches_specs() -> None:
    """catalog/param_counts.json (written from transformers) agrees with the spec maths."""
    counts = json.loads((CATALOG_ROOT / "param_counts.json").read_text(encoding="utf-8"))
    counts.pop("_transformers_version", None)
    assert set(counts) == set(CATALOG)
    for repo in CATALOG:
        assert spec_from_config(_catalog_json(repo), name=repo).total_params == counts[repo], repo


@pytest.mark.parametrize(
    ("repo", "expected"),
    [
        # Published sizes (model cards / safetensors index "total_size" / 2 for bf16).
        ("meta-llama/Llama-3.1-8B", 8_030_261_248),
        ("meta-llama/Llama-3.2-1B", 1_235_814_400),
        ("meta-llama/Llama-3.1-70B", 70_553_706_496),
        ("Qwen/Qwen2.5-7B", 7_615_616_512),
        ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704),
        # Model cards state billions rounded to the digits written here.
        ("Qwen/Qwen3-0.6B", "0.6"),
        ("Qwen/Qwen3-1.7B", "1.7"),
        ("Qwen/Qwen3-4B", "4.0"),
        ("Qwen/Qwen3-14B", "14.8"),
        ("Qwen/Qwen3-32B", "32.8"),
        ("Qwen/Qwen3-235B-A22B", "235"),
        ("google/gemma-3-1b-it", "1.0"),
        ("google/gemma-3-4b-it", "4.3"),
        ("google/gemma-3-12b-it", "12.2"),
        ("google/gemma-3-27b-it", "27.4"),
        ("microsoft/phi-4", "14.7"),
        ("microsoft/Phi-4-mini-instruct", "3.8"),
        ("mistralai/Mistral-Nemo-Instruct-2407", "12.2"),
        ("mistralai/Mistral-Small-24B-Instruct-2501", "23.6"),
    ],
)
def test_catalog_totals_match_published_sizes(repo: str, expected: int | str) -> None:
    total = spec_from_config(_catalog_json(repo)).total_params
    if isinstance(expected, int):
        assert total == expected
    else:
        digits = len(expected.partition(".")[2])
        assert f"{total / 1e9:.{digits}f}" == expected


# --------------------------------------------------------------------------- vs transformers


@pytest.fixture(scope="module")
def meta_builder() -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    def build(config: dict[str, Any]) -> Any:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)

    return build


def _decoder(model: Any) -> Any:
    """The text decoder (``model.model``, or its ``language_model`` in a multimodal wrapper)."""
    return getattr(model.model, "language_model", model.model)


def _real_counts(model: Any) -> dict[str, int]:
    """Parameters of a transformers causal LM by zeroplan's components."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    counts = {"embeddings": emb.numel(), "attention": 0, "mlp": 0, "norms": 0}
    counts["lm_head"] = 0 if head is emb else head.numel()
    decoder = _decoder(model)
    counts["vision"] = (
        sum(
            p.numel()
            for n, p in model.model.named_parameters()
            if not n.startswith("language_model.")
        )
        if decoder is not model.model
        else 0
    )
    for name, p in decoder.named_parameters():
        if name.startswith("embed_tokens."):
            continue
        if ".self_attn." in name:  # projections, their biases, q/k norms
            counts["attention"] += p.numel()
        elif ".mlp." in name or ".block_sparse_moe." in name:  # dense MLP or router + experts
            counts["mlp"] += p.numel()
        elif "norm" in name:
            counts["norms"] += p.numel()
        else:
            raise AssertionError(f"parameter {name} belongs to no component zeroplan models")
    return counts


@pytest.mark.usefixtures("isolated_hf")
@pytest.mark.parametrize("repo", CATALOG)
def test_catalog_spec_matches_transformers_model(repo: str, meta_builder: Any) -> None:
    import torch

    spec = load_model(repo)
    assert (spec.name, spec.source) == (repo, "catalog")
    model = meta_builder(spec.config)

    assert spec.total_params == sum(p.numel() for p in model.parameters())
    pc = spec.param_counts()
    real = _real_counts(model)
    assert {
        "embeddings": pc.embeddings,
        "attention": pc.attention,
        "mlp": pc.mlp,
        "norms": pc.norms,
        "lm_head": pc.lm_head,
        "vision": pc.vision,
    } == real
    decoder = _decoder(model)
    assert pc.embeddings == decoder.embed_tokens.weight.numel()
    assert spec.tie_word_embeddings == (model.lm_head.weight is decoder.embed_tokens.weight)
    if spec.tie_word_embeddings:
        assert pc.lm_head == 0
    assert len(decoder.layers) == spec.num_layers

    if spec.moe is None:
        linear_weights = sum(
            m.weight.numel() for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear)
        )
        assert spec.quantizable_params() == linear_weights
        # and exactly the linears zeroplan lists for a layer, by name and shape
        layer0 = {
            name.rsplit(".", 1)[-1]: (m.in_features, m.out_features, m.bias is not None)
            for name, m in decoder.layers[0].named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        listed = {
            lin.name: (lin.in_features, lin.out_features, lin.bias)
            for lin in spec.attention_linears() + spec.dense_mlp_linears()
        }
        assert listed == layer0


# Minimal configs for every family, including the ones the catalog does not ship
# (gemma, gemma3_text) and MoE layouts (decoder_sparse_step, mlp_only_layers).
_BASE = {**TINY, "head_dim": 16}
FAMILY_CONFIGS = {
    "llama": {},
    "llama-tied": {"tie_word_embeddings": True},
    "llama-biases": {"attention_bias": True, "mlp_bias": True},
    "llama-wide-head": {"head_dim": 32},
    "mistral": {"model_type": "mistral"},
    "qwen2": {"model_type": "qwen2"},
    "qwen2-tied": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3"},
    "qwen3-bias": {"model_type": "qwen3", "attention_bias": True},
    "gemma": {"model_type": "gemma"},
    "gemma-untied": {"model_type": "gemma", "tie_word_embeddings": False},
    "gemma2": {"model_type": "gemma2"},
    "gemma3_text": {"model_type": "gemma3_text"},
    "phi3": {"model_type": "phi3", "pad_token_id": 0},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
    },
    "qwen3_moe-sparse-step": {
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 2,
    },
    "qwen3_moe-mlp-only": {
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "mlp_only_layers": [0],
    },
}


@pytest.mark.parametrize("variant", sorted(FAMILY_CONFIGS))
def test_family_spec_matches_transformers_model(variant: str, meta_builder: Any) -> None:
    config = {**_BASE, **FAMILY_CONFIGS[variant]}
    spec = spec_from_config(config, name=variant)
    model = meta_builder(config)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    pc = spec.param_counts()
    assert _real_counts(model) == {
        "embeddings": pc.embeddings,
        "attention": pc.attention,
        "mlp": pc.mlp,
        "norms": pc.norms,
        "lm_head": pc.lm_head,
        "vision": pc.vision,
    }


TINY_SIGLIP = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
    "vision_use_head": False,
}


def test_gemma3_wrapper_counts_text_decoder_and_vision_tower(meta_builder: Any) -> None:
    """AutoModelForCausalLM loads Gemma 3's vision tower too: the spec counts it, exactly."""
    text = {k: v for k, v in _BASE.items() if k != "model_type"}
    config = {"model_type": "gemma3", "text_config": text, "vision_config": TINY_SIGLIP}
    config["mm_tokens_per_image"] = 4
    spec = spec_from_config(config, name="tiny-gemma3")
    model = meta_builder(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert spec.model_type == "gemma3" and spec.vision_params > 0
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    assert spec.param_counts().vision == _real_counts(model)["vision"]
    assert (
        spec.total_params - spec.vision_params
        == spec_from_config({**text, "model_type": "gemma3_text"}).total_params
    )


def test_gemma3_text_defaults_are_transformers_defaults() -> None:
    """Gemma 3's published text_config leaves fields at Gemma3TextConfig's defaults."""
    transformers = pytest.importorskip("transformers")
    from zeroplan.models import GEMMA3_TEXT_DEFAULTS

    defaults = transformers.Gemma3TextConfig().to_dict()
    assert {k: defaults[k] for k in GEMMA3_TEXT_DEFAULTS} == dict(GEMMA3_TEXT_DEFAULTS)


def test_gemma3_estimate_says_what_the_vision_tower_adds() -> None:
    from zeroplan.api import estimate

    est = estimate("gemma-3-4b", gpus="1xH100", method="lora", micro_batch=1, seq_len=512)
    assert any("vision tower" in note for note in est.notes)
    assert est.model["total_params"] == 4_300_079_472  # the checkpoint, tower included


@pytest.mark.parametrize(
    "override",
    [
        # no head_dim: Qwen3Config defaults to 128 and GemmaConfig to 256, not hidden/heads
        {"model_type": "qwen3", "head_dim": None},
        {"model_type": "gemma2", "head_dim": None},
        # MistralAttention / Phi3Attention have no biases whatever attention_bias says
        {"model_type": "mistral", "attention_bias": True},
        {"model_type": "phi3", "pad_token_id": 0, "attention_bias": True},
        # Qwen2Attention always has q/k/v biases
        {"model_type": "qwen2", "attention_bias": False},
    ],
    ids=[
        "qwen3-no-head_dim",
        "gemma2-no-head_dim",
        "mistral-attention_bias",
        "phi3-attention_bias",
        "qwen2-no-bias",
    ],
)
def test_family_field_defaults_match_transformers(
    override: dict[str, Any], meta_builder: Any
) -> None:
    config = {k: v for k, v in {**_BASE, **override}.items() if v is not None}
    assert spec_from_config(config).total_params == sum(
        p.numel() for p in meta_builder(config).parameters()
    )


def test_tiny_param_count_by_hand() -> None:
    assert spec_from_config(TINY).total_params == TINY_PARAMS == 139_584


# --------------------------------------------------------------------------- resolution


@pytest.mark.usefixtures("isolated_hf")
@pytest.mark.parametrize(
    ("query", "repo"),
    [
        ("llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
        ("LLAMA-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("META-LLAMA/llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
        ("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
    ],
)
def test_alias_and_hub_id_resolve_case_insensitively(query: str, repo: str) -> None:
    spec = load_model(query)
    assert spec.name == repo
    assert spec.source == "catalog"
    assert spec.total_params == spec_from_config(_catalog_json(repo)).total_params


@pytest.mark.usefixtures("isolated_hf")
def test_every_alias_resolves_to_its_target() -> None:
    """An alias whose target file is missing is silently dropped by the index: catch typos."""
    aliases = json.loads((CATALOG_ROOT / "aliases.json").read_text(encoding="utf-8"))
    assert aliases
    for alias, repo in aliases.items():
        assert load_model(alias).name == repo, alias


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.usefixtures("isolated_hf")
def test_config_json_path_and_model_folder(tmp_path: Path) -> None:
    config = _write(tmp_path / "my-tiny" / "config.json", TINY)
    by_file = load_model(str(config))
    by_folder = load_model(str(config.parent))
    for spec in (by_file, by_folder):
        assert spec.total_params == TINY_PARAMS
        assert spec.name == "my-tiny"
        assert spec.source == str(config)
    other = _write(tmp_path / "llama-tiny.json", TINY)
    assert load_model(str(other)).name == "llama-tiny"


@pytest.mark.usefixtures("isolated_hf")
def test_folder_without_config_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_model(str(tmp_path / "nope" / "config.json"))


@pytest.mark.usefixtures("isolated_hf")
def test_an_empty_name_is_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Path("") is ".": an empty name was read as the current folder, even a model folder."""
    _write(tmp_path / "config.json", TINY)
    monkeypatch.chdir(tmp_path)
    for blank in ("", "  "):
        with pytest.raises(ModelNotFoundError, match="the model name is empty"):
            load_model(blank)


@pytest.mark.usefixtures("isolated_hf")
@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("llama-3.1-8b-instrct", "llama-3.1-8b-instruct"),
        ("meta-llama/Llama-3.1-8B-Instrct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("qwen2.5-0.5-b", "qwen2.5-0.5b"),
    ],
)
def test_a_misspelled_catalog_name_gets_a_suggestion(typo: str, meant: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model(typo)
    assert f"unknown model '{typo}' (did you mean {meant}?)" in str(info.value)


@pytest.mark.usefixtures("isolated_hf")
def test_a_name_like_no_catalog_model_gets_no_suggestion() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("acme/no-such-model")
    assert "did you mean" not in str(info.value)


def test_hf_cache_layout_is_found(
    isolated_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _write(cache / "models--acme--tiny-llama" / "snapshots" / "abc" / "config.json", TINY)
    spec = load_model("acme/tiny-llama")
    assert (spec.name, spec.source, spec.total_params) == (
        "acme/tiny-llama",
        "hf-cache",
        TINY_PARAMS,
    )


def test_hf_home_cache_and_newest_snapshot(
    isolated_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snaps = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots"
    old = _write(snaps / "old" / "config.json", {**TINY, "num_hidden_layers": 1})
    new = _write(snaps / "new" / "config.json", TINY)

    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    assert load_model("acme/tiny").num_layers == 2


def test_hf_cache_comes_before_catalog(
    isolated_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documented order: a cached config of a catalog model wins (it is the user's own)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _write(tmp_path / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "x" / "config.json", TINY)
    spec = load_model("meta-llama/Llama-3.2-1B")
    assert spec.source == "hf-cache" and spec.total_params == TINY_PARAMS


def test_offline_unknown_id_fails_fast_without_network(
    isolated_hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("HF_HUB_OFFLINE=1 must not open a connection")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="unknown model 'acme/does-not-exist'"):
        load_model("acme/does-not-exist")
    with pytest.raises(ModelNotFoundError):
        load_model("no-such-alias")
    assert time.monotonic() - start < 1.0


# A fake Hub: GET {endpoint}/{repo}/resolve/main/config.json


class _Hub(BaseHTTPRequestHandler):
    auth_headers: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        _Hub.auth_headers.append(self.headers.get("Authorization"))
        if self.path == "/acme/tiny/resolve/main/config.json":
            body = json.dumps(TINY).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/gated/"):
            self.send_response(401)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_hub(isolated_hf: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    _Hub.auth_headers.clear()
    yield endpoint
    server.shutdown()
    server.server_close()


def test_hub_config_when_online(fake_hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    spec = load_model("acme/tiny")
    assert (spec.source, spec.name, spec.total_params) == ("hub", "acme/tiny", TINY_PARAMS)
    assert _Hub.auth_headers[-1] == "Bearer hf_secret"


def test_hub_gated_and_missing(fake_hub: str) -> None:
    with pytest.raises(ModelNotFoundError, match="HF_TOKEN"):
        load_model("gated/model")
    with pytest.raises(ModelNotFoundError, match="unknown model 'acme/missing'"):
        load_model("acme/missing")


def test_hub_unreachable_is_not_found(isolated_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    with pytest.raises(ModelNotFoundError):
        load_model("acme/tiny")


# --------------------------------------------------------------------------- refusals


@pytest.mark.usefixtures("isolated_hf")
def test_bad_json_is_reported_as_such(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", '{"model_type": "llama",')
    with pytest.raises(BadModelConfigError, match="not valid JSON") as info:
        load_model(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(BadModelConfigError, match="JSON object"):
        load_model(str(_write(tmp_path / "list" / "config.json", [1, 2])))


@pytest.mark.parametrize(
    "field",
    ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"],
)
def test_missing_field_is_named(field: str) -> None:
    config = {k: v for k, v in TINY.items() if k != field}
    with pytest.raises(BadModelConfigError, match=f"'{field}'"):
        spec_from_config(config)
    with pytest.raises(BadModelConfigError, match=f"'{field}'"):
        spec_from_config({**TINY, field: 0})


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"model_type": "mixtral"}, "num_local_experts"),
        (
            {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2},
            "moe_intermediate_size",
        ),
    ],
)
def test_missing_moe_field_is_named(override: dict[str, Any], field: str) -> None:
    with pytest.raises(BadModelConfigError, match=f"'{field}'"):
        spec_from_config({**TINY, **override})


def test_inconsistent_heads_are_refused() -> None:
    with pytest.raises(BadModelConfigError, match="num_key_value_heads"):
        spec_from_config({**TINY, "num_key_value_heads": 3})
    with pytest.raises(BadModelConfigError, match="not a multiple"):
        spec_from_config({**TINY, "hidden_size": 66})


def test_zero_kv_heads_is_refused_not_read_as_missing() -> None:
    """0 was read as absent (``or heads``): one KV head per attention head, silently."""
    with pytest.raises(BadModelConfigError, match="num_key_value_heads=0 must be a positive"):
        spec_from_config({**TINY, "num_key_value_heads": 0})
    # absent or null still means multi-head attention: as many KV heads as heads
    assert spec_from_config({**TINY, "num_key_value_heads": None}).num_kv_heads == 4
    without = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    assert spec_from_config(without).num_kv_heads == 4


@pytest.mark.parametrize("model_type", [None, ""])
def test_a_json_without_model_type_is_not_a_model_config(
    model_type: str | None, tmp_path: Path
) -> None:
    """A plan.json, {} or any other JSON: said to be no config.json, not an architecture
    'None' to open an issue about."""
    path = _write(tmp_path / "bad_plan.json", {**TINY, "model_type": model_type})
    with pytest.raises(BadModelConfigError) as info:
        load_model(str(path))
    assert f"{path} has no 'model_type', so it is not a model's config.json" in str(info.value)
    assert "open an issue" not in str(info.value)


@pytest.mark.parametrize("model_type", ["gpt2", "falcon", "bert"])
def test_unknown_model_type_is_unsupported(model_type: str) -> None:
    with pytest.raises(UnsupportedModelError, match="not modelled"):
        spec_from_config({**TINY, "model_type": model_type})


@pytest.mark.parametrize(
    "config",
    [
        {**TINY, "vision_config": {"hidden_size": 32}},
        {**TINY, "model_type": "mllama", "vision_config": {}, "text_config": TINY},
        {**TINY, "model_type": "llava"},
        {**TINY, "model_type": "gemma3"},
        {
            **TINY,
            "model_type": "gemma3",
            "text_config": TINY,
            "vision_config": {**TINY_SIGLIP, "vision_use_head": True},
        },
    ],
    ids=["vision_config", "mllama", "llava", "gemma3", "gemma3-head"],
)
def test_vision_models_are_unsupported(config: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError, match=r"vision-language|pooling head"):
        spec_from_config(config)


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8"])
def test_prequantized_checkpoints_are_unsupported(method: str) -> None:
    with pytest.raises(UnsupportedModelError, match=method):
        spec_from_config({**TINY, "quantization_config": {"quant_method": method, "bits": 4}})


def test_bitsandbytes_quantization_config_is_accepted() -> None:
    spec = spec_from_config(
        {**TINY, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    )
    assert spec.total_params == TINY_PARAMS


@pytest.mark.usefixtures("isolated_hf")
def test_errors_are_zeroplan_errors_with_one_line(tmp_path: Path) -> None:
    for call in (
        lambda: load_model("acme/nothing"),
        lambda: load_model(str(_write(tmp_path / "a" / "config.json", "nope"))),
        lambda: spec_from_config({**TINY, "model_type": "gpt2"}),
    ):
        with pytest.raises(ZeroplanError) as info:
            call()
        assert "\n" not in str(info.value)
