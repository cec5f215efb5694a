from pathlib import Path

import torch

from tests.conftest import RunRecipe, load


def test_lerp_end_to_end(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    report = run_recipe(
        {
            "sources": {"a": str(models["a"]), "b": "models/b.pth"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.25}},
            "outputs": {"blend": {}},
        }
    )
    out = load(Path(report["outputs"]["blend"]["path"]))
    a, b = load(models["a"]), load(models["b"])
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(out[key], 0.75 * value + 0.25 * b[key])
