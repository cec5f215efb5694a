"""convert_scale: ESRGAN scale changes by upconv stages and by pixel-unshuffle, checked with spandrel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.conftest import RunRecipe, expect_error, load
from tests.esrgan_models import old_layout, to_layout

spandrel = pytest.importorskip("spandrel")


def convert(run_recipe: RunRecipe, source: Path, **params: object) -> tuple[dict[str, torch.Tensor], dict]:
    report = run_recipe(
        {
            "sources": {"m": str(source)},
            "nodes": {"x": {"op": "convert_scale", "inputs": ["m"], **params}},
            "outputs": {"x": {}},
        }
    )
    return load(Path(report["outputs"]["x"]["path"])), report["nodes"]["x"]["notes"]


def loaded(sd: dict[str, torch.Tensor]) -> object:
    return spandrel.ModelLoader().load_from_state_dict(sd).eval()


@pytest.fixture
def x4(launch_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    sd = old_layout(scale_stages=2, filters=8, blocks=1, growth=32, seed=3)  # spandrel wants 32
    save_file(sd, launch_dir / "x4.safetensors")
    return sd, launch_dir / "x4.safetensors"


def test_upconv_4x_to_8x_adds_a_stage_copied_from_the_last(x4: tuple, run_recipe: RunRecipe) -> None:
    sd, path = x4
    out, notes = convert(run_recipe, path, scale=8)
    assert notes == {"from_scale": 4, "to_scale": 8, "method": "upconv", "stages_added": 1, "stages_dropped": 0}
    assert torch.equal(out["model.9.weight"], sd["model.6.weight"])  # the new stage starts as the nearest one
    assert torch.equal(out["model.11.weight"], sd["model.8.weight"])  # HR conv re-indexed
    assert torch.equal(out["model.13.bias"], sd["model.10.bias"])  # last conv re-indexed
    model = loaded(out)
    assert model.scale == 8
    with torch.no_grad():
        assert model(torch.rand(1, 3, 6, 5)).shape == (1, 3, 48, 40)


def test_upconv_4x_to_2x_drops_a_stage(x4: tuple, run_recipe: RunRecipe) -> None:
    sd, path = x4
    out, notes = convert(run_recipe, path, scale=2)
    assert notes["stages_dropped"] == 1
    assert set(out) == set(sd) - {
        "model.6.weight",
        "model.6.bias",
        "model.8.weight",
        "model.8.bias",
        "model.10.weight",
        "model.10.bias",
    } | {"model.5.weight", "model.5.bias", "model.7.weight", "model.7.bias"}
    assert torch.equal(out["model.5.weight"], sd["model.8.weight"])
    assert loaded(out).scale == 2


def test_upconv_identity_init_and_16x(x4: tuple, run_recipe: RunRecipe) -> None:
    _, path = x4
    out, _ = convert(run_recipe, path, scale=16, init="identity")
    kernel = torch.zeros(8, 8, 3, 3)
    kernel[range(8), range(8), 1, 1] = 1
    assert torch.equal(out["model.9.weight"], kernel) and torch.equal(out["model.12.weight"], kernel)
    assert torch.equal(out["model.12.bias"], torch.zeros(8))
    assert loaded(out).scale == 16


@pytest.mark.parametrize("layout", ["new", "basicsr"])
def test_upconv_keeps_the_layout(launch_dir: Path, run_recipe: RunRecipe, layout: str) -> None:
    save_file(to_layout(old_layout(scale_stages=2, growth=32), layout), launch_dir / "m.safetensors")
    out, _ = convert(run_recipe, launch_dir / "m.safetensors", scale=8)
    assert ("upconv3.weight" if layout == "new" else "conv_up3.weight") in out
    assert loaded(out).scale == 8


@pytest.mark.parametrize(("scale", "factor"), [(2, 2), (1, 4)])
def test_unshuffle_computes_the_source_model_on_a_box_downscaled_input(
    x4: tuple, run_recipe: RunRecipe, scale: int, factor: int
) -> None:
    sd, path = x4
    out, notes = convert(run_recipe, path, scale=scale, method="unshuffle")
    assert notes == {"from_scale": 4, "to_scale": scale, "method": "unshuffle"}
    assert out["model.0.weight"].shape == (8, 3 * factor * factor, 3, 3)
    small, big = loaded(out), loaded(sd)
    assert small.scale == scale
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        converted = small(image)
        reference = big(F.avg_pool2d(image, factor))
    assert converted.shape == (1, 3, 16 * scale, 16 * scale)
    assert (converted - reference).abs().max().item() < 1e-5


def test_convert_scale_errors(launch_dir: Path, models: dict[str, Path], x4: tuple, run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: convert(run_recipe, models["a"], scale=8))
    assert "needs an ESRGAN" in error.what and error.where == "test.yaml, nodes.x"
    error = expect_error(lambda: convert(run_recipe, x4[1], scale=8, method="unshuffle"))
    assert "method unshuffle makes this 4x model into 2x or 1x, not 8x" in error.what


def test_unshuffle_from_a_model_that_already_unshuffles(launch_dir: Path, run_recipe: RunRecipe) -> None:
    """RealESRGAN_x2plus is a 4x body behind pixel-unshuffle 2: made 1x, it unshuffles by 4, exactly."""
    sd = old_layout(scale_stages=2, filters=8, blocks=1, growth=32, shuffle=2, seed=4)
    save_file(sd, launch_dir / "x2plus.safetensors")
    assert loaded(sd).scale == 2
    out, notes = convert(run_recipe, launch_dir / "x2plus.safetensors", scale=1, method="unshuffle")
    assert out["model.0.weight"].shape == (8, 3 * 16, 3, 3) and notes["to_scale"] == 1
    small, big = loaded(out), loaded(sd)
    assert small.scale == 1
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        converted, reference = small(image), big(F.avg_pool2d(image, 2))
    assert converted.shape == (1, 3, 16, 16)
    assert (converted - reference).abs().max().item() < 1e-5


def test_unshuffle_refusals_name_what_is_possible(launch_dir: Path, run_recipe: RunRecipe) -> None:
    x2plus = old_layout(scale_stages=2, filters=8, blocks=1, growth=32, shuffle=2, seed=4)
    save_file(x2plus, launch_dir / "x2plus.safetensors")
    error = expect_error(lambda: convert(run_recipe, launch_dir / "x2plus.safetensors", scale=2, method="unshuffle"))
    assert "makes this 2x model (pixel-unshuffle 2) into 1x, not 2x" in error.what
    assert "scale: 1" in (error.fix or "")
    x1 = old_layout(scale_stages=2, filters=8, blocks=1, growth=32, shuffle=4, seed=4)
    save_file(x1, launch_dir / "x1.safetensors")
    error = expect_error(lambda: convert(run_recipe, launch_dir / "x1.safetensors", scale=1, method="unshuffle"))
    assert "cannot make this 1x model (pixel-unshuffle 4) smaller" in error.what
    assert "0x" not in error.what
