"""Merging ESRGAN models across key layouts, and writing an output in another layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merger.archs import esrgan
from tests.conftest import RunRecipe, expect_error, load, spec_of
from tests.esrgan_models import old_layout, to_layout


@pytest.fixture
def pair(launch_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two 4x models of one family: `a` in the old layout, `b` saved in the basicsr layout."""
    a = old_layout(seed=1)
    b = {k: v + 0.01 * torch.randn_like(v) for k, v in a.items()}
    save_file(a, launch_dir / "a_old.safetensors")
    save_file(to_layout(b, "basicsr"), launch_dir / "b_basicsr.safetensors")
    return a, b


def blend(**output: object) -> dict[str, object]:
    return {
        "sources": {"a": "a_old.safetensors", "b": "b_basicsr.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.25}},
        "outputs": {"blend": output},
    }


def test_inputs_in_another_layout_are_merged_in_the_first_ones(pair: tuple, run_recipe: RunRecipe) -> None:
    a, b = pair
    report = run_recipe(blend())
    assert report["nodes"]["blend"]["notes"]["adapted"] == {"b": "esrgan-layout:old"}
    assert report["nodes"]["blend"]["notes"]["merged"] == len(a)
    out = load(Path(report["outputs"]["blend"]["path"]))
    assert out.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(out[key], 0.75 * a[key] + 0.25 * b[key])


@pytest.mark.parametrize("layout", ["new", "basicsr", "old"])
def test_output_layout(pair: tuple, run_recipe: RunRecipe, layout: str) -> None:
    a, b = pair
    report = run_recipe(blend(layout=layout, path=f"blend_{layout}.safetensors"))
    out = load(Path(report["outputs"]["blend"]["path"]))
    expected = to_layout({k: 0.75 * a[k] + 0.25 * b[k] for k in a}, layout)
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value)
    found = esrgan.detect(spec_of(out))
    assert found is not None and (found.layout, found.scale) == (layout, 4)


def test_output_layout_as_pth_with_float16(pair: tuple, run_recipe: RunRecipe) -> None:
    report = run_recipe(blend(layout="new", dtype="float16", path="blend.pth"))
    state = torch.load(report["outputs"]["blend"]["path"], weights_only=True)
    assert "upconv1.weight" in state and "HRconv.bias" in state
    assert all(v.dtype == torch.float16 for v in state.values())


def test_output_layout_needs_an_esrgan(launch_dir: Path, models: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(
        lambda: run_recipe(
            {
                "sources": {"a": str(models["a"]), "b": str(models["b"])},
                "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
                "outputs": {"blend": {"layout": "basicsr"}},
            }
        )
    )
    assert "asks for ESRGAN layout 'basicsr'" in error.what and "not an ESRGAN model" in error.what
    assert error.where == "test.yaml, outputs.blend.layout"
