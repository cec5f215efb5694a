"""Previews of every kind of image model spandrel loads (merger.report.preview): the sample's size at
every scale, grey images for 1-channel models, once per node, preview_crop, a folder of images,
tiling equal to the untiled result, the pre-flight errors, a model that fails while it runs, and the
end of a sweep that makes no contact sheet.

Tiny models are built with spandrel's own classes (seeded random init plus a perturbed fine-tune),
once per module, as tests/test_image_archs.py builds them.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from merger.cli.sweep_callback import SweepReportCallback
from merger.core import limits
from merger.core.limits import MAX_PREVIEW_IMAGES
from merger.report import preview, preview_images, preview_tensors
from tests.conftest import RunRecipe, expect_error, fine_tune

pytest.importorskip("spandrel")


class Tiny(NamedTuple):
    """A tiny model: how to build it (spandrel's class), its scale and its input channels."""

    build: Callable[[], torch.nn.Module]
    scale: int
    channels: int


def _tiny() -> dict[str, Tiny]:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    swin = {"img_size": 16, "embed_dim": 12, "window_size": 4, "upsampler": "pixelshuffle", "mlp_ratio": 2}
    return {
        "Compact": Tiny(lambda: Compact(num_feat=8, num_conv=4, upscale=4), 4, 3),
        "Compact_grey": Tiny(lambda: Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=4, upscale=2), 2, 1),
        "SPAN": Tiny(lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4), 4, 3),
        "SwinIR": Tiny(lambda: SwinIR(**swin, upscale=2, depths=[2], num_heads=[2]), 2, 3),
        "ESRGAN_2x": Tiny(lambda: ESRGAN(num_filters=8, num_blocks=1, scale=2), 2, 3),
        "ESRGAN_4x": Tiny(lambda: ESRGAN(num_filters=8, num_blocks=1, scale=4), 4, 3),
    }


TINY = _tiny()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per model: (a, b), a seeded init and a perturbed fine-tune of it."""
    folder = tmp_path_factory.mktemp("preview_zoo")
    paths = {}
    for i, (name, tiny) in enumerate(TINY.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(i)
            a = {k: v.detach().clone().contiguous() for k, v in tiny.build().state_dict().items()}
        paths[name] = (folder / f"{name}_a.safetensors", folder / f"{name}_b.safetensors")
        save_file(a, paths[name][0])
        save_file(fine_tune(a, 500 + i), paths[name][1])
    return paths


def blend(*names: str, zoo: dict[str, tuple[Path, Path]], **settings: Any) -> dict[str, Any]:
    """A recipe: for each model, a lerp of its two files (node = the model's name), one output each."""
    return {
        **settings,
        "sources": {f"{n}_{s}": str(zoo[n][i]) for n in names for i, s in enumerate("ab")},
        "nodes": {n: {"op": "lerp", "inputs": [f"{n}_a", f"{n}_b"], "alpha": 0.5} for n in names},
        "outputs": {n: {} for n in names},
    }


def photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name", TINY)
def test_every_architecture_previews_at_the_samples_size(
    name: str, zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe
) -> None:
    tiny = TINY[name]
    photo(launch_dir / "photo.png", (20, 16))
    report = run_recipe(blend(name, zoo=zoo, preview=["sample", "photo.png"]))
    rows = {Path(row["png"]).name: row for row in report["previews"]}
    assert set(rows) == {f"{name}__sample.png", f"{name}__photo.png"}
    sample, own = rows[f"{name}__sample.png"], rows[f"{name}__photo.png"]
    assert (sample["scale"], sample["downscale"], sample["channels"]) == (tiny.scale, tiny.scale, tiny.channels)
    with Image.open(sample["png"]) as upscaled:  # 256 / scale in, 256 out, at every scale
        assert upscaled.size == (256, 256) == tuple(sample["size"])
        assert upscaled.mode == ("L" if tiny.channels == 1 else "RGB")
    with Image.open(own["png"]) as upscaled:  # a listed image is not downscaled
        assert upscaled.size == (20 * tiny.scale, 16 * tiny.scale)
    assert own["downscale"] == 1 and sample["tiles"] == 1 and sample["device"] == "cpu"
    assert "preview_notes" not in report


def test_the_sample_is_cropped_to_a_multiple_of_the_scale() -> None:
    sample = preview_images.PreviewImage(preview_images.SAMPLE_IMAGE, sample=True, size=(256, 256))
    assert [sample.input_size(s) for s in (1, 2, 3, 4, 16)] == [(256, 256), (128, 128), (85, 85), (64, 64), (16, 16)]
    tensor = preview_tensors.model_input(sample.path, None, 3, 1)
    assert tuple(tensor.shape) == (1, 1, 85, 85)
    cropped = preview_tensors.model_input(sample.path, (10, 20, 50, 40), 4, 3)
    assert tuple(cropped.shape) == (1, 3, 10, 12)


def test_previews_are_made_once_per_node(
    zoo: dict[str, tuple[Path, Path]], run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Path] = []
    real = preview.load_model
    monkeypatch.setattr(preview, "load_model", lambda path: loads.append(path) or real(path))
    recipe = blend("Compact", zoo=zoo, preview="sample")
    recipe["outputs"] = {
        "half": {"node": "Compact", "path": "c16.safetensors", "dtype": "float16"},
        "full": {"node": "Compact", "path": "c32.safetensors"},
        "esrgan_style": {"node": "Compact", "path": "c.pth", "wrap": "params"},
    }
    report = run_recipe(recipe)
    assert len(loads) == 1 and loads[0].name == "c16.safetensors"  # the node's first .safetensors output
    assert [(row["output"], row["node"]) for row in report["previews"]] == [
        ("half", "Compact"),
        ("full", "Compact"),
        ("esrgan_style", "Compact"),
    ]
    assert {Path(row["png"]).name for row in report["previews"]} == {"Compact__sample.png"}
    assert sorted(p.name for p in Path(report["previews"][0]["png"]).parent.glob("*.png")) == ["Compact__sample.png"]


def test_preview_crop_upscales_only_the_region(
    zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe
) -> None:
    from spandrel import ModelLoader

    photo(launch_dir / "photo.png", (40, 30))
    report = run_recipe(blend("Compact", zoo=zoo, preview=["photo.png", "sample"], preview_crop=[6, 4, 16, 12]))
    rows = {Path(row["png"]).name: row for row in report["previews"]}
    own, sample = rows["Compact__photo.png"], rows["Compact__sample.png"]
    assert own["crop"] == [6, 4, 16, 12] and tuple(own["size"]) == (64, 48)
    assert tuple(sample["size"]) == (16, 12)  # the sample's region, 4x4 box-downscaled to 4x3, upscaled 4x
    model = ModelLoader().load_from_file(report["outputs"]["Compact"]["path"]).eval()
    with Image.open(launch_dir / "photo.png") as opened:
        region = np.asarray(opened.convert("RGB").crop((6, 4, 22, 16)), dtype=np.float32) / 255.0
    with torch.no_grad():
        direct = model(torch.from_numpy(region).permute(2, 0, 1).unsqueeze(0))
    expected = (direct.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    with Image.open(own["png"]) as made:
        assert np.array_equal(np.asarray(made), expected)


def test_a_folder_means_its_images_sorted(
    zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe
) -> None:
    shots = launch_dir / "shots"
    (shots / "sub").mkdir(parents=True)
    photo(shots / "b.png", (10, 8))
    photo(shots / "a.jpg", (12, 8))
    photo(shots / "sub" / "c.png", (8, 8))
    (shots / "notes.txt").write_text("not an image")
    photo(launch_dir / "a.png", (8, 8))  # the same stem as the folder's a.jpg
    report = run_recipe(blend("ESRGAN_2x", zoo=zoo, preview=["shots", "a.png"]))
    assert [Path(row["image"]).name for row in report["previews"]] == ["a.jpg", "b.png", "a.png"]
    assert [Path(row["png"]).name for row in report["previews"]] == [
        "ESRGAN_2x__a.png",
        "ESRGAN_2x__b.png",
        "ESRGAN_2x__a_2.png",
    ]
    for extra in range(MAX_PREVIEW_IMAGES):
        photo(shots / f"more_{extra:02}.png", (8, 8))
    error = expect_error(lambda: run_recipe(blend("ESRGAN_2x", zoo=zoo, preview="shots")))
    assert f"more than the {MAX_PREVIEW_IMAGES} a run previews" in error.what
    assert error.where == "test.yaml, preview"


@pytest.mark.parametrize(("tile", "overlap"), [(64, 32), (256, 32), (100, 40)])
def test_tiles_stitch_to_the_untiled_result_for_a_convolutional_model(
    zoo: dict[str, tuple[Path, Path]], tile: int, overlap: int
) -> None:
    """Compact with 4 body convolutions sees 6 pixels around each pixel (conv_first, 4 convs, conv_last,
    then pixel shuffle): under half the overlap, so every output pixel of a tile, up to the middle of
    each overlap, is what the whole image gives; checked over the whole 300x280 output, float32."""
    from spandrel import ModelLoader

    model = ModelLoader().load_from_file(zoo["Compact"][0]).eval()
    image = torch.rand(1, 3, 280, 300, generator=torch.Generator().manual_seed(0))
    whole, one = preview_tensors.upscale(model, image, tile=None)
    tiled, tiles = preview_tensors.upscale(model, image, tile=tile, overlap=overlap)
    assert one == 1 and tiles == len(preview_tensors.tile_starts(280, tile, overlap)) * len(
        preview_tensors.tile_starts(300, tile, overlap)
    )
    assert tiles > 1 and tiled.shape == whole.shape == (1, 3, 1120, 1200)
    assert float((tiled - whole).abs().max()) < 1e-4


def test_tile_starts_cover_the_side_whole() -> None:
    assert preview_tensors.tile_starts(256, 256, 32) == [0]
    assert preview_tensors.tile_starts(300, 256, 32) == [0, 44]
    assert preview_tensors.tile_starts(600, 256, 32) == [0, 224, 344]


def test_a_large_image_is_previewed_in_tiles(
    zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo(launch_dir / "large.png", (300, 270))
    tiled = run_recipe(blend("Compact", zoo=zoo, preview="large.png"), output_dir=launch_dir / "tiled")
    (row,) = tiled["previews"]
    assert row["tiles"] == 4 and tuple(row["size"]) == (1200, 1080)
    monkeypatch.setattr(preview_tensors, "TILE_SIDE", 10_000)
    whole = run_recipe(blend("Compact", zoo=zoo, preview="large.png"), output_dir=launch_dir / "whole")
    assert whole["previews"][0]["tiles"] == 1
    with Image.open(row["png"]) as a, Image.open(whole["previews"][0]["png"]) as b:
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert difference.max() <= 1  # equal but for a rare rounding of a value within 1e-4 of a half level


def test_preflight_names_an_image_that_cannot_be_read(
    zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe
) -> None:
    (launch_dir / "garbage.png").write_bytes(b"this is no image at all")
    error = expect_error(lambda: run_recipe(blend("Compact", zoo=zoo, preview="garbage.png")))
    assert "garbage.png' is not an image Pillow can read" in error.what and error.where == "test.yaml, preview"
    whole = photo(launch_dir / "whole.png", (64, 64)).read_bytes()
    (launch_dir / "truncated.png").write_bytes(whole[: len(whole) // 2])
    error = expect_error(lambda: run_recipe(blend("Compact", zoo=zoo, preview="truncated.png")))
    assert "truncated.png' is not an image Pillow can read" in error.what and error.where == "test.yaml, preview"
    assert not (launch_dir / "out").exists()  # nothing ran


def test_preflight_names_an_image_too_small_for_the_model(
    zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe
) -> None:
    photo(launch_dir / "tiny.png", (12, 40))
    error = expect_error(lambda: run_recipe(blend("SwinIR", zoo=zoo, preview="tiny.png")))
    assert "'" + str(launch_dir / "tiny.png") + "' is 12x40 pixels, smaller than the 16 pixels a side" in error.what
    assert "node 'SwinIR' (SwinIR, 2x)" in error.what and error.where == "test.yaml, preview"
    error = expect_error(lambda: run_recipe(blend("SwinIR", zoo=zoo, preview="sample", preview_crop=[0, 0, 24, 64])))
    assert "eval.png' (preview_crop [0, 0, 24, 64], box-downscaled by 2) is 12x32 pixels" in error.what
    assert "at least 32 pixels a side" in error.fix
    assert run_recipe(blend("SwinIR", zoo=zoo, preview="sample", preview_crop=[0, 0, 32, 64]))["previews"]


def test_preflight_checks_preview_crop_and_the_output_size(
    zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo(launch_dir / "photo.png", (30, 30))
    error = expect_error(
        lambda: run_recipe(blend("Compact", zoo=zoo, preview="photo.png", preview_crop=[20, 0, 20, 8]))
    )
    assert "reaches beyond preview image" in error.what and "30x30" in error.what
    assert error.where == "test.yaml, preview_crop"
    for wrong in ([1, 2, 3], [0, 0, 0, 4], [-1, 0, 4, 4]):
        error = expect_error(lambda w=wrong: run_recipe(blend("Compact", zoo=zoo, preview="photo.png", preview_crop=w)))
        assert error.where == "test.yaml, preview_crop", wrong
    monkeypatch.setattr(limits, "MAX_PREVIEW_OUTPUT_PIXELS", 100 * 100)
    error = expect_error(lambda: run_recipe(blend("Compact", zoo=zoo, preview="photo.png")))
    assert "would be 120x120 pixels once node 'Compact' upscales it 4x" in error.what and "preview_crop" in error.fix


def test_a_model_that_fails_while_running_is_reported_and_the_others_get_theirs(
    zoo: dict[str, tuple[Path, Path]], run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = preview_tensors.upscale

    def out_of_memory(model: Any, image: Any, **kw: Any) -> Any:
        if model.architecture.id == "SPAN":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore lines")
        return real(model, image, **kw)

    monkeypatch.setattr(preview_tensors, "upscale", out_of_memory)
    report = run_recipe(blend("Compact", "SPAN", "ESRGAN_4x", zoo=zoo, preview="sample"))
    assert [row["output"] for row in report["previews"]] == ["Compact", "ESRGAN_4x"]
    (note,) = report["preview_notes"]
    assert (note["output"], note["status"], note["why"]) == ("SPAN", "failed", "failed")
    assert note["note"] == "failed on cpu: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert any("preview of output 'SPAN'" in w and "out of memory" in w for w in report["warnings"])


def test_a_model_spandrel_does_not_know_or_load_is_skipped_with_a_note(
    zoo: dict[str, tuple[Path, Path]],
    models: dict[str, Path],
    run_recipe: RunRecipe,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="merger")
    recipe = blend("Compact", zoo=zoo, preview="sample")
    recipe["sources"].update(a=str(models["a"]), b=str(models["b"]))  # an unknown architecture
    recipe["nodes"]["other"] = {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}
    recipe["outputs"]["other"] = {}
    report = run_recipe(recipe)
    assert [row["output"] for row in report["previews"]] == ["Compact"]
    (note,) = report["preview_notes"]
    assert (note["output"], note["status"], note["why"]) == ("other", "skipped", "unknown")
    assert note["note"] == "skipped: not a model spandrel knows (spandrel detects no architecture in its keys)"
    assert "preview: output 'other' skipped: not a model spandrel knows" in caplog.text
    assert "Traceback" not in caplog.text

    def broken(path: Path) -> Any:
        raise ValueError("truncated file")

    monkeypatch.setattr(preview, "load_model", broken)
    report = run_recipe(blend("Compact", zoo=zoo, preview="sample"), output_dir=Path("again"))
    assert "previews" not in report
    assert report["preview_notes"][0]["note"] == (
        "skipped: not a model spandrel knows (spandrel cannot load it: ValueError: truncated file)"
    )


def _sweep(sweep: Path, run_recipe: RunRecipe, recipes: list[dict[str, Any]]) -> dict[str, Any]:
    """Jobs run into sweep/<n>, then the end of the sweep (Hydra's callback) on them."""
    for n, recipe in enumerate(recipes):
        run_recipe(recipe, output_dir=sweep / str(n))
    SweepReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    result: dict[str, Any] = json.loads((sweep / "sweep_report.json").read_text())
    return result


def test_the_end_of_a_sweep_says_why_there_is_no_contact_sheet(
    models: dict[str, Path], launch_dir: Path, run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="merger")
    recipe = {
        "sources": {"a": str(models["a"]), "b": str(models["b"])},
        "nodes": {"x": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"x": {}},
    }
    report = _sweep(launch_dir / "unknown", run_recipe, [{**recipe, "preview": "sample"}] * 2)
    assert "contact_sheets" not in report
    assert report["no_contact_sheet"] == "no output is an image model spandrel knows"
    assert "merger: no contact sheet: no output is an image model spandrel knows" in caplog.messages
    report = _sweep(launch_dir / "off", run_recipe, [recipe])
    assert report["no_contact_sheet"].startswith("previews are off")


def test_a_sweep_of_two_image_models_makes_a_sheet_per_node(
    zoo: dict[str, tuple[Path, Path]], launch_dir: Path, run_recipe: RunRecipe
) -> None:
    recipe = blend("Compact", "ESRGAN_2x", zoo=zoo, preview="sample")
    recipe["outputs"]["Compact_again"] = {"node": "Compact", "path": "again.pth"}
    report = _sweep(launch_dir / "sweep", run_recipe, [recipe, recipe])
    names = [Path(p).name for p in report["contact_sheets"]]
    assert names == ["contact_sheet_Compact__sample.png", "contact_sheet_ESRGAN_2x__sample.png"]
    with Image.open(report["contact_sheets"][0]) as sheet:  # the input and two jobs' tiles (not one per output)
        assert 3 * 256 < sheet.size[0] < 4 * 256 and 256 < sheet.size[1] < 2 * 256
