"""splice: keys or filters drawn at random from the inputs, seeded and reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import RunRecipe, expect_error, load


def splice(
    run_recipe: RunRecipe, models: dict[str, Path], *names: str, recipe_seed: int = 0, **params: object
) -> tuple:
    report = run_recipe(
        {
            "seed": recipe_seed,
            "sources": {n: str(models[n]) for n in names},
            "nodes": {"s": {"op": "splice", "inputs": list(names), **params}},
            "outputs": {"s": {}},
        },
        output_dir=Path(f"out_{recipe_seed}_{'_'.join(f'{k}{v}' for k, v in params.items())}"),
    )
    return load(Path(report["outputs"]["s"]["path"])), report["nodes"]["s"]


def source_of(value: torch.Tensor, candidates: dict[str, torch.Tensor]) -> str:
    (name,) = [n for n, c in candidates.items() if torch.equal(value, c)]
    return name


def test_tensor_granularity_takes_each_key_whole(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    out, node = splice(run_recipe, models, "a", "b", p=0.5)
    a, b = load(models["a"]), load(models["b"])
    float_keys = [k for k in a if a[k].is_floating_point()]
    picks = {k: source_of(out[k], {"a": a[k], "b": b[k]}) for k in float_keys}
    assert set(picks.values()) == {"a", "b"}  # with 7 float keys and p=0.5, both appear for seed 0
    fractions = node["notes"]["fractions"]
    assert set(fractions) == {"a", "b"} and abs(sum(fractions.values()) - 1) < 1e-3
    total = sum(a[k].numel() for k in a)
    assert fractions["b"] == pytest.approx(sum(a[k].numel() for k in float_keys if picks[k] == "b") / total, abs=1e-4)


def test_same_seed_same_model_other_seed_other_model(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    first, _ = splice(run_recipe, models, "a", "b", "base", probabilities=[0.4, 0.3, 0.3])
    again, node = splice(run_recipe, models, "a", "b", "base", probabilities=[0.4, 0.3, 0.3])
    assert node["status"] == "cached"
    other, other_node = splice(run_recipe, models, "a", "b", "base", recipe_seed=7, probabilities=[0.4, 0.3, 0.3])
    assert other_node["status"] == "computed"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_node_seed_overrides_the_recipe_seed(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    with_node_seed, _ = splice(run_recipe, models, "a", "b", recipe_seed=99, p=0.5, seed=3)
    recipe_seed_3, node = splice(run_recipe, models, "a", "b", recipe_seed=3, p=0.5)
    assert node["status"] == "cached"  # the same seed in force: the same content key
    assert all(torch.equal(with_node_seed[k], recipe_seed_3[k]) for k in with_node_seed)


def test_filter_granularity_draws_weight_and_bias_rows_together(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    out, _ = splice(run_recipe, models, "a", "b", p=0.5, granularity="filter")
    a, b = load(models["a"]), load(models["b"])
    rows_w = [
        source_of(out["body.0.weight"][r], {"a": a["body.0.weight"][r], "b": b["body.0.weight"][r]}) for r in range(8)
    ]
    rows_b = [
        source_of(out["body.0.bias"][r : r + 1], {"a": a["body.0.bias"][r : r + 1], "b": b["body.0.bias"][r : r + 1]})
        for r in range(8)
    ]
    assert rows_w == rows_b
    assert set(rows_w) == {"a", "b"}
    assert torch.equal(out["bn.num_batches_tracked"], a["bn.num_batches_tracked"])


def test_two_identical_nodes_give_identical_results(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    node = {"op": "splice", "inputs": ["a", "b"], "p": 0.3, "granularity": "filter"}
    report = run_recipe(
        {
            "sources": {"a": str(models["a"]), "b": str(models["b"])},
            "nodes": {"one": node, "two": dict(node)},
            "outputs": {"one": {}, "two": {}},
        }
    )
    assert report["nodes"]["one"]["key"] == report["nodes"]["two"]["key"]
    assert report["outputs"]["one"]["sha256"] == report["outputs"]["two"]["sha256"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"p": 0.5, "probabilities": [0.5, 0.5]}, "not both"),
        ({"probabilities": [0.5, 0.6]}, "summing to 1"),
        ({"p": 1.5}, "not a probability"),
    ],
)
def test_bad_probabilities(models: dict[str, Path], run_recipe: RunRecipe, params: dict, message: str) -> None:
    error = expect_error(lambda: splice(run_recipe, models, "a", "b", **params))
    assert message in error.what and error.where == "test.yaml, nodes.s"
