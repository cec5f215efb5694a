"""Every recipe in recipes/ runs from the command line on tiny models placed where it expects them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import REPO, fine_tune, load, run_cli, tiny_state_dict
from tests.esrgan_models import old_layout

EXAMPLES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def esrgan(stages: int, seed: int) -> dict[str, torch.Tensor]:
    return old_layout(scale_stages=stages, filters=8, blocks=1, growth=32, seed=seed)  # spandrel wants gc 32


def dni_pair(models: Path) -> None:
    psnr = esrgan(2, 1)
    torch.save({"params_ema": psnr}, models / "RRDB_PSNR_x4.pth")
    torch.save(fine_tune(psnr, 2, scale=0.01), models / "RRDB_ESRGAN_x4.pth")


def cross_scale(models: Path) -> None:
    x4 = esrgan(2, 3)
    x2 = esrgan(1, 3)
    torch.save(x2, models / "ESRGAN_x2.pth")
    torch.save(x4, models / "ESRGAN_x4.pth")


def zoo(models: Path) -> None:
    (models / "zoo").mkdir()
    base = tiny_state_dict(0)
    for i in range(3):
        torch.save(fine_tune(base, i), models / "zoo" / f"m{i}.pth")


def named(*names: str) -> Callable[[Path], None]:
    def write(models: Path) -> None:
        base = tiny_state_dict(0)
        for i, name in enumerate(names):
            save_file(fine_tune(base, i), models / f"{name}.safetensors")

    return write


MODELS: dict[str, Callable[[Path], None]] = {
    "add_difference": named("target", "tuned", "base"),
    "esrgan_cross_scale": cross_scale,
    "esrgan_dni": dni_pair,
    "esrgan_splice": dni_pair,
    "esrgan_x2": dni_pair,
    "esrgan_x8": dni_pair,
    "folder_average": zoo,
    "weighted_blend": named("parent", "ft1", "ft2", "ft3"),
}


def test_every_example_has_models_here() -> None:
    assert set(EXAMPLES) == set(MODELS)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_recipe_runs(launch_dir: Path, name: str) -> None:
    (launch_dir / "models").mkdir()
    MODELS[name](launch_dir / "models")
    shutil.copytree(REPO / "recipes", launch_dir / "recipes")
    done = run_cli([f"recipe={name}"], launch_dir)
    assert done.returncode == 0, done.stderr
    (report_path,) = launch_dir.glob("outputs/*/*/merge_report.json")
    report = json.loads(report_path.read_text())
    assert all(node["status"] == "computed" for node in report["nodes"].values())
    for output in report["outputs"].values():
        assert Path(output["path"]).is_file()
    if name.startswith("esrgan_x") or name == "esrgan_cross_scale":
        spandrel = pytest.importorskip("spandrel")
        expected = {"esrgan_x8": {8}, "esrgan_x2": {2}, "esrgan_cross_scale": {2}}[name]
        scales = {
            spandrel.ModelLoader().load_from_state_dict(load(Path(o["path"]))).scale for o in report["outputs"].values()
        }
        assert scales == expected
