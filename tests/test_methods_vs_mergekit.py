"""The merge methods against mergekit 0.1.5 on the same tiny Llama models (equal within 1e-5).

mergekit is run in-process through its Python API; the models are built with
transformers from a tiny config with random init. Skipped when mergekit is
not installed (`pip install -e ".[dev]"` installs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from merger.core.tensor_bytes import tensor_from_buffer
from merger.io.sources import locate, open_source
from tests.conftest import RunRecipe

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
transformers = pytest.importorskip("transformers")

FINE_TUNES = ("ft1", "ft2", "ft3")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama base and three fine-tunes of it (base + small noise), as HF folders."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    base = transformers.LlamaForCausalLM(config).to(torch.float32)
    base.save_pretrained(root / "base", safe_serialization=True)
    for i, name in enumerate(FINE_TUNES):
        model = transformers.LlamaForCausalLM(config).to(torch.float32)
        g = torch.Generator().manual_seed(100 + i)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
        model.load_state_dict(state)
        model.save_pretrained(root / name, safe_serialization=True)
    return root


def read_model(path: Path) -> dict[str, torch.Tensor]:
    source = open_source(locate(path, None, where=str(path)), where=str(path))
    out = {}
    for key, spec in source.spec().items():
        data = bytearray(source.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes))))
        out[key] = tensor_from_buffer(data, spec.dtype, spec.shape)
    source.close()
    return out


def run_mergekit(family: Path, out: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    merge_config = mergekit_config.MergeConfiguration.model_validate(config)
    options = mergekit_merge.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    mergekit_merge.run_merge(merge_config, str(out), options=options)
    return read_model(out)


def run_ours(run_recipe: RunRecipe, family: Path, node: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    report = run_recipe(
        {
            "sources": {name: str(family / name) for name in ("base", *FINE_TUNES)},
            "nodes": {"merged": node},
            "outputs": {"merged": {}},
        },
        output_dir=out,
    )
    return read_model(Path(report["outputs"]["merged"]["path"]))


def assert_equal_within(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tol: float = 1e-5) -> float:
    assert set(ours) == set(theirs)
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst <= tol, worst
    return worst


def models(entries: list[tuple[str, dict[str, Any]]], family: Path) -> list[dict[str, Any]]:
    return [{"model": str(family / name), "parameters": params} for name, params in entries]


CASES = {
    "linear": (
        {"merge_method": "linear", "dtype": "float32", "models": [("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.3})]},
        {"op": "weighted_sum", "inputs": ["ft1", "ft2"], "weights": [0.7, 0.3], "normalize": True},
    ),
    "slerp": (
        {
            "merge_method": "slerp",
            "dtype": "float32",
            "base_model": "ft1",
            "models": [("ft1", {}), ("ft2", {})],
            "parameters": {"t": 0.3},
        },
        {"op": "slerp", "inputs": ["ft1", "ft2"], "t": 0.3},
    ),
    "task_arithmetic": (
        {
            "merge_method": "task_arithmetic",
            "dtype": "float32",
            "base_model": "base",
            "models": [("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.3}), ("ft3", {"weight": 0.8})],
            "parameters": {"lambda": 0.9},
        },
        {"op": "task_arithmetic", "base": "base", "inputs": list(FINE_TUNES), "weights": [0.5, 0.3, 0.8], "scale": 0.9},
    ),
    "ties": (
        {
            "merge_method": "ties",
            "dtype": "float32",
            "base_model": "base",
            "models": [
                ("ft1", {"weight": 1.0, "density": 0.5}),
                ("ft2", {"weight": 0.6, "density": 0.3}),
                ("ft3", {"weight": 0.8, "density": 0.7}),
            ],
        },
        {
            "op": "ties",
            "base": "base",
            "inputs": list(FINE_TUNES),
            "weights": [1.0, 0.6, 0.8],
            "density": [0.5, 0.3, 0.7],
        },
    ),
    "ties_unnormalized": (
        {
            "merge_method": "ties",
            "dtype": "float32",
            "base_model": "base",
            "models": [("ft1", {"weight": 0.4, "density": 0.6}), ("ft2", {"weight": 0.4, "density": 0.6})],
            "parameters": {"normalize": False},
        },
        {"op": "ties", "base": "base", "inputs": ["ft1", "ft2"], "weights": 0.4, "density": 0.6, "normalize": False},
    ),
    "dare_ties_density_1": (
        {
            "merge_method": "dare_ties",
            "dtype": "float32",
            "base_model": "base",
            "models": [("ft1", {"weight": 0.5, "density": 1.0}), ("ft2", {"weight": 0.5, "density": 1.0})],
        },
        {"op": "dare_ties", "base": "base", "inputs": ["ft1", "ft2"], "weights": 0.5, "density": 1.0},
    ),
    "dare_linear_density_1": (
        {
            "merge_method": "dare_linear",
            "dtype": "float32",
            "base_model": "base",
            "models": [("ft1", {"weight": 0.5, "density": 1.0}), ("ft2", {"weight": 0.7, "density": 1.0})],
        },
        {"op": "dare_linear", "base": "base", "inputs": ["ft1", "ft2"], "weights": [0.5, 0.7], "density": 1.0},
    ),
    "model_stock": (
        {
            "merge_method": "model_stock",
            "dtype": "float32",
            "base_model": "base",
            "models": [("ft1", {}), ("ft2", {}), ("ft3", {})],
        },
        {"op": "model_stock", "base": "base", "inputs": list(FINE_TUNES)},
    ),
    "model_stock_filter_wise": (
        {
            "merge_method": "model_stock",
            "dtype": "float32",
            "base_model": "base",
            "models": [("ft1", {}), ("ft2", {})],
            "parameters": {"filter_wise": True},
        },
        {"op": "model_stock", "base": "base", "inputs": ["ft1", "ft2"], "filter_wise": True},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equal_to_mergekit(case: str, family: Path, run_recipe: RunRecipe, launch_dir: Path) -> None:
    config, node = CASES[case]
    config = dict(config)
    config["models"] = models(config["models"], family)
    if "base_model" in config:
        config["base_model"] = str(family / config["base_model"])
    theirs = run_mergekit(family, launch_dir / "mergekit_out", yaml.safe_load(yaml.safe_dump(config)))
    ours = run_ours(run_recipe, family, node, launch_dir / "ours")
    assert_equal_within(ours, theirs)
