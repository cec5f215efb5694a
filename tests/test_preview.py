"""Previews of image-model outputs, and the contact sheet of a sweep (every architecture:
tests/test_previews_all_archs.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

from merger.report import preview
from merger.report.contact_sheet import no_contact_sheet
from tests.conftest import RunRecipe, expect_error, run_cli
from tests.esrgan_models import old_layout

DEMO = Path(__file__).resolve().parents[1] / "merger" / "demo"


def sr_recipe(**settings: object) -> dict[str, object]:
    return {
        **settings,
        "sources": {"psnr": str(DEMO / "psnr.safetensors"), "sharp": str(DEMO / "sharp.safetensors")},
        "nodes": {"blend": {"op": "lerp", "inputs": ["psnr", "sharp"], "alpha": 0.5}},
        "outputs": {"blend": {}},
    }


def test_preview_of_listed_images(launch_dir: Path, run_recipe: RunRecipe) -> None:
    Image.new("RGB", (20, 12), (200, 100, 50)).save(launch_dir / "photo.png")
    report = run_recipe(sr_recipe(preview=["photo.png", "sample"]))
    pngs = {Path(row["png"]).name: Path(row["png"]) for row in report["previews"]}
    assert set(pngs) == {"blend__photo.png", "blend__sample.png"}
    with Image.open(pngs["blend__photo.png"]) as upscaled:
        assert upscaled.size == (40, 24)  # the demo models are 2x
    with Image.open(pngs["blend__sample.png"]) as upscaled:
        assert upscaled.size == (256, 256)  # the 256 px sample, box-downscaled by 2, then upscaled 2x


def test_preview_skips_models_that_are_not_image_models(
    models: dict[str, Path], run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="merger")
    report = run_recipe(
        {
            "preview": "sample",
            "sources": {"a": str(models["a"]), "b": str(models["b"])},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
            "outputs": {"blend": {}},
        }
    )
    assert "previews" not in report
    note = "skipped: not a model spandrel knows (spandrel detects no architecture in its keys)"
    assert report["preview_notes"] == [
        {"output": "blend", "node": "blend", "status": "skipped", "why": "unknown", "note": note}
    ]
    lines = [r.getMessage() for r in caplog.records if "preview" in r.getMessage()]
    assert lines == [f"preview: output 'blend' {note}"]


def test_without_spandrel_previews_are_skipped_with_a_note(
    run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preview, "spandrel_available", lambda: False)
    report = run_recipe(sr_recipe(preview="sample"))
    assert "previews" not in report
    assert report["preview_notes"][0]["note"] == "skipped: spandrel is not installed (pip install 'merger[sr]')"
    assert no_contact_sheet([{"preview_notes": report["preview_notes"]}]) == (
        "spandrel is not installed (pip install 'merger[sr]')"
    )


def test_missing_preview_image_fails_before_running(launch_dir: Path, run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: run_recipe(sr_recipe(preview=["nope.png"])))
    assert "preview image not found" in error.what and error.where == "test.yaml, preview"


def test_a_run_without_image_models_never_imports_spandrel(launch_dir: Path, models: dict[str, Path]) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from merger.cli.job import prepare, run\nfrom merger.ops import builtin_registry\n"
        "from merger.report.run_report import RunContext\n"
        f"data = {{'preview': 'sample', 'progress': False, 'cache_dir': 'cache',"
        f" 'sources': {{'a': {str(models['a'])!r}, 'b': {str(models['b'])!r}}},"
        " 'nodes': {'x': {'op': 'average', 'inputs': ['a', 'b']}}, 'outputs': {'x': {}}}\n"
        "p = prepare(data, builtin_registry(), file='t', launch_dir=Path.cwd())\n"
        "run(p, RunContext(None, None, None, (), Path.cwd(), Path('out')))\n"
        "print('spandrel' in sys.modules, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=launch_dir, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_sweep_writes_a_contact_sheet(launch_dir: Path) -> None:
    done = run_cli(["-m", "alpha=0,1", "hydra.sweep.dir=sweep"], launch_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads((launch_dir / "sweep" / "sweep_report.json").read_text())
    assert report["contact_sheets"] == [str(launch_dir / "sweep" / "contact_sheet.png")]
    with Image.open(launch_dir / "sweep" / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 3 * 256 and sheet.size[1] > 256  # the input and two tiles side by side
    assert all(Path(row["previews"][0]["png"]).is_file() for row in report["jobs"])


def test_esrgan_output_detected_for_preview(launch_dir: Path, run_recipe: RunRecipe) -> None:
    save_file(old_layout(scale_stages=2, growth=32), launch_dir / "x4.safetensors")
    report = run_recipe(
        {
            "preview": "sample",
            "sources": {"m": "x4.safetensors"},
            "nodes": {"x": {"op": "average", "inputs": ["m"]}},
            "outputs": {"x": {}},
        }
    )
    with Image.open(report["previews"][0]["png"]) as upscaled:
        assert upscaled.size == (256, 256)  # the sample box-downscaled by 4, then upscaled 4x
