"""Per-layer values (merger.recipe.schedule) and include / exclude / rest on merge nodes.

Runs recipes on a small model with named blocks (Llama-like keys, four layers)
and checks each output tensor against plain torch with the value the schedule
should give that key, and the report's counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import RunRecipe, expect_error, load

StateDict = dict[str, torch.Tensor]
LAYERS = range(4)
MLP = "model.layers.{i}.mlp.up_proj.weight"
ATTN = "model.layers.{i}.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
GRADIENT = {"blocks": r"layers\.(\d+)\.", "values": [0.0, 1.0], "default": 0.5}


def blocks_model(seed: int) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    sd = {EMBED: torch.randn(10, 4, generator=g)}
    for i in LAYERS:
        sd[ATTN.format(i=i)] = torch.randn(4, 4, generator=g)
        sd[MLP.format(i=i)] = torch.randn(6, 4, generator=g)
    sd[NORM] = torch.randn(4, generator=g)
    return sd


@pytest.fixture
def blocks(launch_dir: Path) -> dict[str, StateDict]:
    models = {"a": blocks_model(1), "b": blocks_model(2), "c": blocks_model(3)}
    for name, sd in models.items():
        save_file(sd, launch_dir / f"{name}.safetensors")
    return models


SOURCES = {name: f"{name}.safetensors" for name in ("a", "b", "c")}


def _lerp(run_recipe: RunRecipe, **params: Any) -> tuple[StateDict, dict[str, Any]]:
    report = run_recipe(
        {"sources": SOURCES, "nodes": {"m": {"op": "lerp", "inputs": ["a", "b"], **params}}, "outputs": {"m": {}}}
    )
    return load(Path(report["outputs"]["m"]["path"])), report


def _about(key: str) -> Callable[[str], str]:
    return lambda message: f"{key}: {message}"


def _check_lerp(out: StateDict, blocks: dict[str, StateDict], alpha_of: dict[str, float]) -> None:
    a, b = blocks["a"], blocks["b"]
    assert sorted(out) == sorted(a)
    for key, alpha in alpha_of.items():
        torch.testing.assert_close(out[key], (1 - alpha) * a[key] + alpha * b[key], msg=_about(key))


# --- rule lists -------------------------------------------------------------------------------------


def test_rules_first_match_wins(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    alpha = {"default": 0.5, "rules": [{"match": "mlp", "value": 0.2}, {"match": r"layers\.0\.", "value": 0.9}]}
    out, report = _lerp(run_recipe, alpha=alpha)
    expected = {EMBED: 0.5, NORM: 0.5}
    for i in LAYERS:
        expected[MLP.format(i=i)] = 0.2  # layer 0's mlp too: "mlp" is the first rule
        expected[ATTN.format(i=i)] = 0.9 if i == 0 else 0.5
    _check_lerp(out, blocks, expected)
    assert report["nodes"]["m"]["notes"]["schedules"] == {
        "alpha": {"rule 1 (mlp)": 4, r"rule 2 (layers\.0\.)": 1, "default": 5}
    }


def test_rules_are_unanchored_searches(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    """`up_proj` is found in the middle of a key; `^up_proj` finds nothing."""
    alpha = {"default": 0.0, "rules": [{"match": "^up_proj", "value": 0.7}, {"match": "up_proj", "value": 1.0}]}
    out, report = _lerp(run_recipe, alpha=alpha)
    expected = {key: (1.0 if "up_proj" in key else 0.0) for key in blocks["a"]}
    _check_lerp(out, blocks, expected)
    assert report["nodes"]["m"]["notes"]["schedules"]["alpha"] == {"rule 2 (up_proj)": 4, "default": 6}


# --- block gradients --------------------------------------------------------------------------------


def test_gradient_two_values(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    out, report = _lerp(run_recipe, alpha=GRADIENT)
    expected = {EMBED: 0.5, NORM: 0.5}
    for i in LAYERS:
        expected[MLP.format(i=i)] = expected[ATTN.format(i=i)] = i / 3
    _check_lerp(out, blocks, expected)
    # layer 0 is exactly A, layer 3 exactly B
    assert torch.equal(out[MLP.format(i=0)], blocks["a"][MLP.format(i=0)])
    assert torch.equal(out[ATTN.format(i=3)], blocks["b"][ATTN.format(i=3)])
    assert report["nodes"]["m"]["notes"]["schedules"] == {
        "alpha": {"block 0": 2, "block 1": 2, "block 2": 2, "block 3": 2, "default": 2}
    }


def test_gradient_three_values(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    # values spread at positions 0, 1/2, 1; layers sit at 0, 1/3, 2/3, 1
    out, _ = _lerp(run_recipe, alpha={**GRADIENT, "values": [0.0, 1.0, 0.4], "default": 0.25})
    by_layer = [0.0, 2 / 3, 1.0 - 0.6 / 3, 0.4]
    expected = {EMBED: 0.25, NORM: 0.25}
    for i in LAYERS:
        expected[MLP.format(i=i)] = expected[ATTN.format(i=i)] = by_layer[i]
    _check_lerp(out, blocks, expected)


def test_gradient_without_default_when_keys_match_no_block(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    gradient = {k: v for k, v in GRADIENT.items() if k != "default"}
    error = expect_error(lambda: _lerp(run_recipe, alpha=gradient))
    assert "2 keys match no block" in error.what
    assert "has no default" in error.what
    assert error.fix is not None
    assert "add default" in error.fix
    assert error.where is not None
    assert "nodes.m.alpha" in error.where
    assert not (Path.cwd() / "out" / "m.safetensors").exists()


def test_gradient_without_default_when_every_key_matches(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    gradient = {k: v for k, v in GRADIENT.items() if k != "default"}
    out, _ = _lerp(run_recipe, alpha=gradient, include="layers", rest="drop")
    expected = {}
    for i in LAYERS:
        expected[MLP.format(i=i)] = expected[ATTN.format(i=i)] = i / 3
    assert sorted(out) == sorted(expected)
    for key, alpha in expected.items():
        torch.testing.assert_close(out[key], (1 - alpha) * blocks["a"][key] + alpha * blocks["b"][key])


@pytest.mark.parametrize(
    ("alpha", "pattern"),
    [
        ({"default": 0.5, "rules": [{"match": "mlp(", "value": 0.2}]}, "mlp("),
        ({"blocks": r"layers\.(\d+", "values": [0.0, 1.0], "default": 0.5}, r"layers\.(\d+"),
    ],
    ids=["rules", "gradient"],
)
def test_bad_regex_names_the_parameter(
    blocks: dict[str, StateDict], run_recipe: RunRecipe, alpha: dict[str, Any], pattern: str
) -> None:
    error = expect_error(lambda: _lerp(run_recipe, alpha=alpha))
    assert f"'{pattern}' is not a valid regular expression" in error.what
    assert error.where is not None
    assert "nodes.m.alpha" in error.where


# --- a schedule inside a per-model list --------------------------------------------------------------


def test_schedule_inside_a_weights_list(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    second = {"default": 0.1, "rules": [{"match": "mlp", "value": 0.7}, {"match": "norm", "value": -1.0}]}
    report = run_recipe(
        {
            "sources": SOURCES,
            "nodes": {"ws": {"op": "weighted_sum", "inputs": ["a", "b", "c"], "weights": [0.5, second, 0.25]}},
            "outputs": {"ws": {}},
        }
    )
    out = load(Path(report["outputs"]["ws"]["path"]))
    a, b, c = blocks["a"], blocks["b"], blocks["c"]
    for key in a:
        w = 0.7 if "mlp" in key else -1.0 if "norm" in key else 0.1
        torch.testing.assert_close(out[key], 0.5 * a[key] + w * b[key] + 0.25 * c[key])
    assert report["nodes"]["ws"]["notes"]["schedules"] == {
        "weights[1]": {"rule 1 (mlp)": 4, "rule 2 (norm)": 1, "default": 5}
    }


def test_schedule_inside_weights_list_of_task_arithmetic(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    report = run_recipe(
        {
            "sources": SOURCES,
            "nodes": {
                "ta": {
                    "op": "task_arithmetic",
                    "base": "a",
                    "inputs": ["b", "c"],
                    "weights": [GRADIENT, 1.0],
                }
            },
            "outputs": {"ta": {}},
        }
    )
    out = load(Path(report["outputs"]["ta"]["path"]))
    a, b, c = blocks["a"], blocks["b"], blocks["c"]
    for key in a:
        found = re.search(r"layers\.(\d+)\.", key)
        w = int(found.group(1)) / 3 if found else 0.5
        torch.testing.assert_close(out[key], a[key] + w * (b[key] - a[key]) + (c[key] - a[key]))
    assert report["nodes"]["ta"]["notes"]["schedules"]["weights[0]"]["default"] == 2


# --- include / exclude / rest -----------------------------------------------------------------------


def test_include_with_rest_copy(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    out, report = _lerp(run_recipe, alpha=0.5, include="mlp")
    a, b = blocks["a"], blocks["b"]
    assert sorted(out) == sorted(a)
    for key in a:
        if "mlp" in key:
            torch.testing.assert_close(out[key], 0.5 * a[key] + 0.5 * b[key])
        else:
            assert torch.equal(out[key], a[key]), key
    keys = report["nodes"]["m"]["notes"]
    assert keys["merged"] == 4
    assert keys["filtered"] == 6
    assert keys["copied"] == 6
    assert "dropped" not in keys


def test_exclude_with_rest_drop(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    out, report = _lerp(run_recipe, alpha=0.25, exclude=r"self_attn|embed", rest="drop")
    a, b = blocks["a"], blocks["b"]
    kept = [MLP.format(i=i) for i in LAYERS] + [NORM]
    assert sorted(out) == sorted(kept)
    for key in kept:
        torch.testing.assert_close(out[key], 0.75 * a[key] + 0.25 * b[key])
    keys = report["nodes"]["m"]["notes"]
    assert keys["merged"] == 5
    assert keys["dropped"] == 5
    assert keys["copied"] == 0
    assert "filtered" not in keys


def test_include_and_exclude_together(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    out, report = _lerp(run_recipe, alpha=1.0, include=r"layers\.", exclude=r"layers\.[23]\.")
    a, b = blocks["a"], blocks["b"]
    for key in a:
        merged = re.search(r"layers\.[01]\.", key) is not None
        assert torch.equal(out[key], b[key] if merged else a[key]), key
    assert report["nodes"]["m"]["notes"]["merged"] == 4
    assert report["nodes"]["m"]["notes"]["filtered"] == 6


def test_bad_include_regex(blocks: dict[str, StateDict], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: _lerp(run_recipe, alpha=0.5, include="mlp["))
    assert "include 'mlp[' is not a valid regular expression" in error.what
    assert error.where is not None
    assert "nodes.m" in error.where


def test_strict_keys_ignore_excluded_keys(
    launch_dir: Path, blocks: dict[str, StateDict], run_recipe: RunRecipe
) -> None:
    other = dict(blocks["b"])
    other[NORM] = torch.ones(5)  # another shape
    other["model.extra.weight"] = torch.ones(2)  # only in this input
    save_file(other, launch_dir / "odd.safetensors")
    sources = {"a": "a.safetensors", "odd": "odd.safetensors"}

    def lerp(**params: Any) -> dict[str, Any]:
        return run_recipe(
            {
                "sources": sources,
                "nodes": {"m": {"op": "lerp", "inputs": ["a", "odd"], "alpha": 0.5, **params}},
                "outputs": {"m": {}},
            }
        )

    error = expect_error(lambda: lerp())
    assert "2 differences" in error.what
    report = lerp(exclude=r"norm|extra")
    out = load(Path(report["outputs"]["m"]["path"]))
    a = blocks["a"]
    assert sorted(out) == sorted(a)
    assert torch.equal(out[NORM], a[NORM])
    torch.testing.assert_close(out[EMBED], 0.5 * a[EMBED] + 0.5 * other[EMBED])
    assert report["nodes"]["m"]["notes"]["filtered"] == 1
