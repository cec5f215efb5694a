"""merger.ops.select: key rules (`take`) and stacked, renumbered layer ranges (`slices`).

Every output tensor is checked to be the exact bytes of the input tensor it
should come from (by model and layer), and the report's `keys.keys_from` counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import RunRecipe, expect_error, load

StateDict = dict[str, torch.Tensor]
LAYER_KEYS = ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.mlp.up_proj.weight")
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def blocks_model(seed: int, layers: int = 4) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    sd = {EMBED: torch.randn(10, 4, generator=g)}
    for i in range(layers):
        for pattern in LAYER_KEYS:
            sd[pattern.format(i=i)] = torch.randn(4, 4, generator=g)
    sd[NORM] = torch.randn(4, generator=g)
    return sd


@pytest.fixture
def blocks(launch_dir: Path) -> dict[str, StateDict]:
    models = {"a": blocks_model(1), "b": blocks_model(2)}
    models["c"] = {k: v for k, v in blocks_model(3).items() if k != NORM}  # c has no norm
    for name, sd in models.items():
        save_file(sd, launch_dir / f"{name}.safetensors")
    return models


SOURCES = {name: f"{name}.safetensors" for name in ("a", "b", "c")}


def _select(run_recipe: RunRecipe, inputs: list[str], **params: Any) -> tuple[StateDict, dict[str, Any]]:
    report = run_recipe(
        {"sources": SOURCES, "nodes": {"s": {"op": "select", "inputs": inputs, **params}}, "outputs": {"s": {}}}
    )
    return load(Path(report["outputs"]["s"]["path"])), report


# --- take -------------------------------------------------------------------------------------------


def test_take_first_matching_rule_picks_the_input(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    take = [{"input": "b", "match": r"layers\.[12]\."}, {"input": "c", "match": "mlp"}]
    out, report = _select(run_recipe, ["a", "b", "c"], take=take)
    a, b, c = blocks["a"], blocks["b"], blocks["c"]
    assert sorted(out) == sorted(a)
    for i in range(4):
        attn, mlp = (p.format(i=i) for p in LAYER_KEYS)
        if i in (1, 2):  # rule 1 wins for layer 1 and 2's mlp too
            assert torch.equal(out[attn], b[attn])
            assert torch.equal(out[mlp], b[mlp])
        else:
            assert torch.equal(out[attn], a[attn])
            assert torch.equal(out[mlp], c[mlp])
    assert torch.equal(out[EMBED], a[EMBED])
    assert torch.equal(out[NORM], a[NORM])
    assert report["nodes"]["s"]["notes"]["keys_from"] == {"a": 4, "b": 4, "c": 2}


def test_take_rules_are_unanchored(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    out, report = _select(run_recipe, ["a", "b"], take=[{"input": "b", "match": "embed"}])
    assert torch.equal(out[EMBED], blocks["b"][EMBED])
    assert torch.equal(out[NORM], blocks["a"][NORM])
    assert report["nodes"]["s"]["notes"]["keys_from"] == {"a": 9, "b": 1}


def test_take_picking_a_key_the_input_lacks(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: _select(run_recipe, ["a", "c"], take=[{"input": "c", "match": "norm"}]))
    assert "a take rule picks 'model.norm.weight' from 'c', which has no such key" in error.what
    assert error.where is not None
    assert "nodes.s" in error.where
    assert not (Path.cwd() / "out" / "s.safetensors").exists()


def test_take_naming_an_input_not_in_the_node(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: _select(run_recipe, ["a", "b"], take=[{"input": "c", "match": "mlp"}]))
    assert "'c' is not one of this node's inputs (a, b)" in error.what


# --- slices -----------------------------------------------------------------------------------------


def _assert_layer(out: StateDict, new: int, model: StateDict, old: int) -> None:
    for pattern in LAYER_KEYS:
        assert torch.equal(out[pattern.format(i=new)], model[pattern.format(i=old)]), (pattern, new, old)


def test_slices_stack_and_renumber(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    slices = [{"input": "a", "layers": [0, 3]}, {"input": "b", "layers": [1, 4]}]
    out, report = _select(run_recipe, ["a", "b"], slices=slices)
    a, b = blocks["a"], blocks["b"]
    expected_keys = {EMBED, NORM} | {p.format(i=i) for i in range(6) for p in LAYER_KEYS}
    assert set(out) == expected_keys
    for new, (model, old) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        _assert_layer(out, new, model, old)
    assert torch.equal(out[EMBED], a[EMBED])
    assert torch.equal(out[NORM], a[NORM])
    assert report["nodes"]["s"]["notes"]["keys_from"] == {"a": 8, "b": 6}


def test_slices_non_layer_keys_from_first_input(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    """The first slice is b's, but the keys outside layers come from the node's first input, a."""
    slices = [{"input": "b", "layers": [2, 4]}, {"input": "a", "layers": [0, 1]}]
    out, report = _select(run_recipe, ["a", "b"], slices=slices)
    a, b = blocks["a"], blocks["b"]
    assert len(out) == 2 + 3 * len(LAYER_KEYS)
    for new, (model, old) in enumerate([(b, 2), (b, 3), (a, 0)]):
        _assert_layer(out, new, model, old)
    assert torch.equal(out[EMBED], a[EMBED])
    assert torch.equal(out[NORM], a[NORM])
    assert report["nodes"]["s"]["notes"]["keys_from"] == {"a": 4, "b": 4}


def test_slices_layer_used_twice(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    slices = [{"input": "a", "layers": [0, 2]}, {"input": "a", "layers": [1, 3]}]
    out, report = _select(run_recipe, ["a"], slices=slices)
    a = blocks["a"]
    assert set(out) == {EMBED, NORM} | {p.format(i=i) for i in range(4) for p in LAYER_KEYS}
    for new, old in enumerate([0, 1, 1, 2]):
        _assert_layer(out, new, a, old)
    assert report["nodes"]["s"]["notes"]["keys_from"] == {"a": 10}


def test_slices_with_a_custom_layer_regex(launch_dir: Path, run_recipe: RunRecipe) -> None:
    g = torch.Generator().manual_seed(9)
    x = {f"encoder.block{i}.w": torch.randn(3, generator=g) for i in range(3)} | {"head.w": torch.randn(2, generator=g)}
    save_file(x, launch_dir / "x.safetensors")
    report = run_recipe(
        {
            "sources": {"x": "x.safetensors"},
            "nodes": {
                "s": {
                    "op": "select",
                    "inputs": ["x"],
                    "layers": r"block(\d+)\.",
                    "slices": [{"input": "x", "layers": [2, 3]}, {"input": "x", "layers": [0, 2]}],
                }
            },
            "outputs": {"s": {}},
        }
    )
    out = load(Path(report["outputs"]["s"]["path"]))
    assert sorted(out) == ["encoder.block0.w", "encoder.block1.w", "encoder.block2.w", "head.w"]
    assert torch.equal(out["encoder.block0.w"], x["encoder.block2.w"])
    assert torch.equal(out["encoder.block1.w"], x["encoder.block0.w"])
    assert torch.equal(out["encoder.block2.w"], x["encoder.block1.w"])
    assert torch.equal(out["head.w"], x["head.w"])


def test_slices_when_first_input_has_no_layers(launch_dir: Path, run_recipe: RunRecipe) -> None:
    """The stacked layers must not vanish when the first input (the donor of the other keys) has none."""
    a = blocks_model(1)
    head = {"lm_head.weight": torch.ones(3, 4)}
    save_file(a, launch_dir / "a.safetensors")
    save_file(head, launch_dir / "head.safetensors")
    report = run_recipe(
        {
            "sources": {"head": "head.safetensors", "a": "a.safetensors"},
            "nodes": {"s": {"op": "select", "inputs": ["head", "a"], "slices": [{"input": "a", "layers": [1, 3]}]}},
            "outputs": {"s": {}},
        }
    )
    out = load(Path(report["outputs"]["s"]["path"]))
    assert set(out) == {"lm_head.weight"} | {p.format(i=i) for i in range(2) for p in LAYER_KEYS}
    for new, old in enumerate([1, 2]):
        _assert_layer(out, new, a, old)
    assert report["nodes"]["s"]["notes"]["keys_from"] == {"head": 1, "a": 4}


def test_slice_asking_for_missing_layers(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    slices = [{"input": "a", "layers": [0, 2]}, {"input": "b", "layers": [2, 6]}]
    error = expect_error(lambda: _select(run_recipe, ["a", "b"], slices=slices))
    assert "slice [2, 6) of 'b' asks for layers it lacks (e.g. [4, 5])" in error.what
    assert error.fix is not None
    assert "'b' has layers 0..3" in error.fix
    assert error.where is not None
    assert "nodes.s" in error.where


def test_empty_slice(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: _select(run_recipe, ["a"], slices=[{"input": "a", "layers": [3, 3]}]))
    assert "slice [3, 3) is empty" in error.what


@pytest.mark.parametrize("both", [False, True], ids=["neither", "both"])
def test_take_xor_slices(blocks: dict[str, StateDict], run_recipe: RunRecipe, both: bool) -> None:
    params = {"take": [{"input": "b", "match": "mlp"}], "slices": [{"input": "a", "layers": [0, 2]}]} if both else {}
    error = expect_error(lambda: _select(run_recipe, ["a", "b"], **params))
    assert "select takes either take: (key rules) or slices: (layer ranges)" in error.what
    assert error.where is not None
    assert "nodes.s" in error.where


def test_select_copies_bytes_unchanged_in_any_dtype(launch_dir: Path, run_recipe: RunRecipe) -> None:
    half = {k: v.to(torch.float16) for k, v in blocks_model(4).items()}
    half["model.count"] = torch.tensor([3, 4], dtype=torch.int64)
    other = {k: v.to(torch.float16) for k, v in blocks_model(5).items()} | {"model.count": torch.tensor([9, 9])}
    save_file(half, launch_dir / "h.safetensors")
    save_file(other, launch_dir / "o.safetensors")
    report = run_recipe(
        {
            "sources": {"h": "h.safetensors", "o": "o.safetensors"},
            "nodes": {"s": {"op": "select", "inputs": ["h", "o"], "take": [{"input": "o", "match": "q_proj"}]}},
            "outputs": {"s": {}},
        }
    )
    out = load(Path(report["outputs"]["s"]["path"]))
    for key, value in half.items():
        source = other if "q_proj" in key else half
        assert out[key].dtype == value.dtype, key
        assert torch.equal(out[key], source[key]), key


def test_a_slice_far_past_the_last_layer_is_refused_at_once() -> None:
    import time

    from merger.core.specs import TensorSpec
    from merger.errors import MergerError
    from merger.ops.base import InputSpecs
    from merger.ops.select import Select, SelectParams

    spec = {f"model.layers.{i}.w": TensorSpec("F32", (2,)) for i in range(2)}
    params = SelectParams.model_validate({"slices": [{"input": "a", "layers": [0, 10**12]}]})
    start = time.perf_counter()
    with pytest.raises(MergerError, match=r"asks for layers it lacks \(e.g. \[2, 3, 4\]\)"):
        Select().spec(InputSpecs(("a",), (spec,)), params)
    assert time.perf_counter() - start < 1
