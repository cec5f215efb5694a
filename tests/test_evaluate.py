"""`evaluate` and `objective`: each output's metrics, checked against an independent computation
(spandrel + scikit-image, transformers), cached, and every bad input an error in pre-flight."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from merger.errors import MergerError
from tests.conftest import REPO, RunRecipe, expect_error

DEMO = REPO / "merger" / "demo"


def demo_recipe(**evaluate: Any) -> dict[str, Any]:
    return {
        "sources": {"psnr": str(DEMO / "psnr.safetensors"), "sharp": str(DEMO / "sharp.safetensors")},
        "nodes": {"blend": {"op": "lerp", "inputs": ["psnr", "sharp"], "alpha": 0.3}},
        "outputs": {"blend": {"path": "blend.safetensors"}},
        "sanity": "off",
        "evaluate": {"images": "crops", "degrade": "box", "metrics": ["psnr", "ssim", "sharpness", "psnr_rgb"]}
        | evaluate,
        "objective": "psnr",
    }


@pytest.fixture
def crops(launch_dir: Path) -> Path:
    """Two 64x64 crops of the sample image (and a third, smaller one left out), as PNGs under crops/."""
    folder = launch_dir / "crops"
    folder.mkdir()
    with Image.open(DEMO / "eval.png") as image:
        rgb = image.convert("RGB")
        rgb.crop((0, 0, 66, 64)).save(folder / "a.png")  # 66 wide: cropped to a multiple of the scale... 66 is one
        rgb.crop((100, 90, 164, 155)).save(folder / "b.png")  # 65 high: cropped to 64
    return folder


def independent(model_file: Path, reference: Path, *, degrade: str, border: int) -> dict[str, float]:
    """The metrics as a reader of BasicSR would compute them, with spandrel and scikit-image."""
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from spandrel import ModelLoader

    model = ModelLoader().load_from_file(model_file).eval()
    scale = model.scale
    hr = np.asarray(Image.open(reference).convert("RGB"))
    hr = hr[: hr.shape[0] - hr.shape[0] % scale, : hr.shape[1] - hr.shape[1] % scale]
    hr_t = torch.from_numpy(hr.astype(np.float64)).permute(2, 0, 1).unsqueeze(0)
    if degrade == "box":
        lr = F.avg_pool2d(hr_t, scale).round().clamp(0, 255).to(torch.uint8)
    else:
        small = Image.fromarray(hr).resize((hr.shape[1] // scale, hr.shape[0] // scale), Image.Resampling.BICUBIC)
        lr = torch.from_numpy(np.asarray(small)).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        out = model(lr.float() / 255)
    sr = (out.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    crop = (slice(border, -border or None), slice(border, -border or None))
    y_sr, y_hr = rgb2ycbcr(sr)[..., 0][crop], rgb2ycbcr(hr)[..., 0][crop]
    grey = (sr.astype(np.float64) @ [0.299, 0.587, 0.114])[crop]
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return {
        "psnr": peak_signal_noise_ratio(y_hr, y_sr, data_range=255),
        "ssim": structural_similarity(
            y_hr, y_sr, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        ),
        "psnr_rgb": peak_signal_noise_ratio(hr[crop], sr[crop], data_range=255),
        "sharpness": float(np.var(laplacian, ddof=1)),
    }


@pytest.mark.parametrize("degrade", ["box", "bicubic"])
def test_image_metrics_equal_an_independent_computation(
    crops: Path, run_recipe: RunRecipe, launch_dir: Path, degrade: str
) -> None:
    report = run_recipe(demo_recipe(degrade=degrade))
    got = report["metrics"]["blend"]
    model_file = launch_dir / "out" / "blend.safetensors"
    per_image = {name: independent(model_file, crops / f"{name}.png", degrade=degrade, border=2) for name in "ab"}
    for metric in ("psnr", "ssim", "psnr_rgb", "sharpness"):
        for name in "ab":
            assert got["per_image"][name][metric] == pytest.approx(per_image[name][metric], rel=1e-6, abs=1e-9)
        mean = (per_image["a"][metric] + per_image["b"][metric]) / 2
        assert got[metric] == pytest.approx(mean, rel=1e-6)
    assert got["border"] == 2 and got["scale"] == 2 and got["cached"] is False
    assert report["objective"] == [
        {"metric": "psnr", "output": "blend", "direction": "maximize", "value": pytest.approx(got["psnr"])}
    ]


@pytest.mark.slow  # several runs end to end
def test_metrics_are_cached_by_output_and_data(crops: Path, run_recipe: RunRecipe, launch_dir: Path) -> None:
    first = run_recipe(demo_recipe())["metrics"]["blend"]
    again = run_recipe(demo_recipe(), output_dir=launch_dir / "out2")["metrics"]["blend"]
    assert again["cached"] is True and again["seconds"] == 0.0
    assert {k: again[k] for k in ("psnr", "ssim", "per_image")} == {k: first[k] for k in ("psnr", "ssim", "per_image")}
    other = demo_recipe()
    other["nodes"]["blend"]["alpha"] = 0.9  # another output: measured again
    changed = run_recipe(other, output_dir=launch_dir / "out3")["metrics"]["blend"]
    assert changed["cached"] is False and changed["psnr"] != first["psnr"]
    with Image.open(crops / "a.png") as image:  # other data: measured again
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(crops / "a.png")
    flipped = run_recipe(demo_recipe(), output_dir=launch_dir / "out4")["metrics"]["blend"]
    assert flipped["cached"] is False and flipped["per_image"]["a"] != first["per_image"]["a"]
    assert flipped["per_image"]["b"] == first["per_image"]["b"]
    bordered = run_recipe(demo_recipe(border=0), output_dir=launch_dir / "out5")["metrics"]["blend"]
    assert bordered["cached"] is False and bordered["border"] == 0


@pytest.mark.slow  # several runs end to end
def test_pairs_are_matched_by_name(crops: Path, run_recipe: RunRecipe, launch_dir: Path) -> None:
    lr = launch_dir / "lr"
    lr.mkdir()
    for name in "ab":
        with Image.open(crops / f"{name}.png") as image:
            width, height = image.size[0] // 2, image.size[1] // 2
            cropped = image.crop((0, 0, width * 2, height * 2))  # to a multiple of the scale, as degrade does
            cropped.resize((width, height), Image.Resampling.BICUBIC).save(lr / f"{name}x2.png")  # DIV2K's names
    evaluate = {"images": None, "pairs": {"lr": "lr", "hr": "crops"}}
    report = run_recipe(demo_recipe(**evaluate))
    by_pairs = report["metrics"]["blend"]
    by_degrade = run_recipe(demo_recipe(degrade="bicubic"), output_dir=launch_dir / "o2")["metrics"]["blend"]
    assert by_pairs["per_image"] == by_degrade["per_image"]  # the same inputs, made here or given
    (lr / "ax2.png").rename(lr / "c.png")
    error = expect_error(lambda: run_recipe(demo_recipe(**evaluate), output_dir=launch_dir / "o3"))
    assert "pairs do not match" in error.what and "c.png (lr)" in error.what and "a.png (hr)" in error.what
    assert error.location.place == "evaluate.pairs"


def test_a_metric_that_fails_is_recorded_and_the_job_goes_on(
    crops: Path, run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    import merger.report.evaluate as evaluate

    def out_of_memory(*args: object) -> dict[str, Any]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(evaluate, "measure_image_model", out_of_memory)
    report = run_recipe(demo_recipe())
    failed = report["metrics"]["blend"]["failed"]
    assert set(failed) == {"psnr", "ssim", "sharpness", "psnr_rgb"}
    assert failed["psnr"].startswith("OutOfMemoryError: CUDA out of memory")
    assert report["objective"][0]["value"] is None
    assert (launch_dir / "out" / "blend.safetensors").is_file() and (launch_dir / "out" / "merge_report.json").is_file()
    assert any("psnr, ssim, sharpness, psnr_rgb failed" in w for w in report["warnings"])
    monkeypatch.undo()  # a failure is not kept: the next run measures
    assert run_recipe(demo_recipe(), output_dir=launch_dir / "o2")["metrics"]["blend"]["cached"] is False


@pytest.mark.slow  # several runs end to end
def test_the_objective_goes_back_to_hydra(crops: Path, launch_dir: Path) -> None:
    from merger.cli.api import RunResult

    result = __import__("merger").run(demo_recipe(), output_dir=launch_dir / "o", cache_dir=launch_dir / "c")
    assert isinstance(result, RunResult)
    assert result.objective == pytest.approx(result.metrics["blend"]["psnr"])
    two = demo_recipe() | {"objective": ["psnr", {"metric": "sharpness", "output": "blend"}]}
    result = __import__("merger").run(two, output_dir=launch_dir / "o2", cache_dir=launch_dir / "c")
    assert isinstance(result.objective, list)
    assert result.objective == pytest.approx([result.metrics["blend"]["psnr"], result.metrics["blend"]["sharpness"]])


def test_outputs_that_are_not_image_models_are_skipped(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    data = {
        "sources": {"a": str(models["a"]), "b": str(models["b"])},
        "nodes": {"m": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"m": {}},
        "evaluate": {"images": "sample", "metrics": ["psnr"]},
    }
    report = run_recipe(data)
    assert report["metrics"] == {"m": {"skipped": "not an image model"}}
    assert any("no output is an image model" in w for w in report["warnings"])
    error = expect_error(lambda: run_recipe(data | {"objective": "psnr"}))
    assert "no output of the recipe has it" in error.what and error.location.place == "objective"


def bad(run_recipe: RunRecipe, **changes: Any) -> MergerError:
    data = demo_recipe()
    for key, value in changes.items():
        if key == "evaluate":
            data["evaluate"] = data["evaluate"] | value
        else:
            data[key] = value
    return expect_error(lambda: run_recipe(data))


def test_bad_evaluate_blocks_are_errors_before_the_run(crops: Path, run_recipe: RunRecipe, launch_dir: Path) -> None:
    error = bad(run_recipe, evaluate={"metrics": ["psnr", "sharpnes"]})
    assert error.what == "unknown metric 'sharpnes'" and "did you mean 'sharpness'?" in (error.fix or "")
    assert error.location.place == "evaluate.metrics.1"
    error = bad(run_recipe, objective="ssim_rgb")
    assert "unknown metric 'ssim_rgb'" in error.what and "did you mean 'ssim'" in (error.fix or "")
    error = bad(run_recipe, objective="perplexity")
    assert "not among the metrics evaluate computes" in error.what and error.location.place == "objective"
    error = bad(run_recipe, evaluate={"images": "missing/*.png"})
    assert "match no file" in error.what and error.location.place == "evaluate.images"
    error = bad(run_recipe, evaluate={"images": "nope.png"})
    assert "evaluation image not found" in error.what
    Image.new("RGB", (8, 8)).save(launch_dir / "tiny.png")
    error = bad(run_recipe, evaluate={"images": "tiny.png"})
    assert "too small" in error.what and "SSIM" in error.what
    (launch_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    error = bad(run_recipe, evaluate={"images": "broken.png"})
    assert "not an image Pillow can read" in error.what
    error = bad(run_recipe, evaluate={"pairs": {"lr": "crops", "hr": "crops"}})
    assert "both images and pairs" in error.what
    error = bad(run_recipe, evaluate={"images": None, "pairs": {"lr": "crops", "hr": "crops"}})
    assert "the reference is 66x64 pixels, not its 66x64 input times output 'blend''s scale 2" in error.what
    error = bad(run_recipe, evaluate={"metrics": ["perplexity"], "images": None})
    assert "names no text" in error.what
    error = bad(run_recipe, evaluate={"outputs": ["blnd"]})
    assert "did you mean 'blend'" in (error.fix or "")
    error = bad(run_recipe, evaluate={"degrade": "nearest"})
    assert error.location.place == "evaluate.degrade"
    error = bad(run_recipe, objective={"metric": "psnr", "output": "other"})
    assert "which the recipe does not have" in error.what
    data = demo_recipe()
    del data["evaluate"]
    error = expect_error(lambda: run_recipe(data))
    assert "objective but no evaluate block" in error.what


def test_bad_text_files_are_errors_before_the_run(run_recipe: RunRecipe, launch_dir: Path) -> None:
    text = {"images": None, "metrics": ["perplexity"], "text": "text.txt"}
    (launch_dir / "text.txt").write_bytes(b"  \n")
    assert "is empty" in bad(run_recipe, evaluate=text, objective=None).what
    (launch_dir / "text.txt").write_bytes("caf\u00e9".encode("latin-1"))
    error = bad(run_recipe, evaluate=text, objective=None)
    assert "is not UTF-8 (byte 3)" in error.what and error.location.place == "evaluate.text"
    (launch_dir / "text.txt").unlink()
    assert "cannot be read" in bad(run_recipe, evaluate=text, objective=None).what


@pytest.mark.slow  # several runs end to end
def test_the_perplexity_of_a_merged_language_model(launch_dir: Path, run_recipe: RunRecipe) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from tests.test_folder_outputs import llama_config, save_llama  # the tiny Llama and its tokenizer

    torch.manual_seed(0)
    parent = LlamaForCausalLM(llama_config()).state_dict()
    for name, seed in (("a", 1), ("b", 2)):
        save_llama(launch_dir / name, seed, parent)
    rng = np.random.default_rng(0)
    words = " ".join(f"w{i}" for i in rng.integers(0, 100, 200))
    (launch_dir / "held_out.txt").write_text(words)
    data = {
        "sources": {"a": "a", "b": "b"},
        "nodes": {"m": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"m": {"path": "merged"}, "flat": {"node": "m", "path": "flat.safetensors"}},
        "evaluate": {"metrics": ["perplexity"], "text": "held_out.txt", "max_tokens": 64},
        "objective": "perplexity",
    }
    report = run_recipe(data)
    got = report["metrics"]["m"]
    assert report["metrics"]["flat"] == {"skipped": "not a causal language model folder"}
    folder = launch_dir / "out" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(words, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    assert got["tokens"] == 64 and got["window"] == 64 and got["predicted"] == 63
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert report["objective"][0]["direction"] == "minimize"
    assert report["objective"][0]["output"] == "m"


def test_the_summary_prints_the_metrics(crops: Path, run_recipe: RunRecipe) -> None:
    from merger.report.run_report import summary

    report = run_recipe(demo_recipe())
    lines = summary(report).splitlines()
    line = next(line for line in lines if line.strip().startswith("metrics"))
    figures = report["metrics"]["blend"]
    assert f"psnr {figures['psnr']:.3f} dB" in line and f"ssim {figures['ssim']:.4f}" in line
    assert "over 2 images" in line
    assert any(line.strip().startswith("objective blend.psnr = ") for line in lines)


@pytest.mark.slow  # several runs end to end
def test_a_copied_cache_record_for_another_key_is_not_served(
    crops: Path, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    run_recipe(demo_recipe())
    records = sorted((launch_dir / "cache" / "metrics").glob("*/*.json"))
    assert len(records) == 1
    other = demo_recipe()
    other["nodes"]["blend"]["alpha"] = 0.8
    run_recipe(other, output_dir=launch_dir / "o2")
    (second,) = set((launch_dir / "cache" / "metrics").glob("*/*.json")) - set(records)
    shutil.copy(records[0], second)  # a record under another key's name
    again = run_recipe(other, output_dir=launch_dir / "o3")["metrics"]["blend"]
    assert again["cached"] is False


def test_wide_images_are_refused_and_a_model_that_gives_nan_fails(
    crops: Path, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(launch_dir / "g16.png")
    error = bad(run_recipe, evaluate={"images": "g16.png"})
    assert "(16-bit or floating point)" in error.what and "convert the image to 8 bits" in (error.fix or "")
    data = demo_recipe()
    data["nodes"]["blend"]["alpha"] = 1e30  # the float16 output overflows
    report = run_recipe(data | {"nonfinite": "warn"})
    assert "NaN or infinite values" in report["metrics"]["blend"]["failed"]["psnr"]
    assert report["objective"][0]["value"] is None


@pytest.mark.slow  # several runs end to end
def test_a_record_that_is_not_what_merger_writes_is_measured_again(
    crops: Path, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    import json

    first = run_recipe(demo_recipe())["metrics"]["blend"]
    (record,) = (launch_dir / "cache" / "metrics").glob("*/*.json")
    for change in ({"psnr": 1e6}, {"failed": 5}, {"per_image": {}}, {"ssim": "0.9"}):
        data = json.loads(record.read_text())
        data["metrics"].update(change)
        record.write_text(json.dumps(data))
        again = run_recipe(demo_recipe(), output_dir=launch_dir / "again")["metrics"]["blend"]
        assert again["cached"] is False and again["psnr"] == first["psnr"], change


def test_a_reference_name_held_twice_is_an_error(crops: Path, run_recipe: RunRecipe, launch_dir: Path) -> None:
    shutil.copytree(crops, launch_dir / "lr")
    with Image.open(crops / "a.png") as image:
        image.convert("RGB").save(crops / "a.jpg")
    error = bad(run_recipe, evaluate={"images": None, "pairs": {"lr": "lr", "hr": "crops"}})
    assert "pairs.hr holds 'a.jpg' and 'a.png'" in error.what or "pairs.hr holds 'a.png' and 'a.jpg'" in error.what


def test_an_output_may_not_take_the_place_of_report_html_s_files(run_recipe: RunRecipe) -> None:
    data = demo_recipe()
    del data["evaluate"], data["objective"]
    data["outputs"] = {"blend": {"path": "report_files"}}
    error = expect_error(lambda: run_recipe(data))
    assert "which merger's own run files already writes" in error.what
