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


def tiny_llm(seed: int) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict: 4 layers of attention and MLP, embeddings, norms."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(32, 16, generator=g), "model.norm.weight": torch.ones(16)}
    for i in range(4):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
            sd[f"model.layers.{i}.{name}.weight"] = torch.randn(16, 16, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(16)
    sd["lm_head.weight"] = torch.randn(32, 16, generator=g)
    return sd


def llm_family(*names: str) -> Callable[[Path], None]:
    """Hugging Face-style folders: `base`, and the other names as fine-tunes of it."""

    def write(models: Path) -> None:
        base = tiny_llm(0)
        for i, name in enumerate(names):
            (models / name).mkdir()
            save_file(base if name == "base" else fine_tune(base, i + 1), models / name / "model.safetensors")

    return write


def named(*names: str) -> Callable[[Path], None]:
    def write(models: Path) -> None:
        base = tiny_state_dict(0)
        for i, name in enumerate(names):
            save_file(fine_tune(base, i), models / f"{name}.safetensors")

    return write


MODELS: dict[str, Callable[[Path], None]] = {
    "add_difference": named("target", "tuned", "base"),
    "dare": llm_family("base", "math", "code"),
    "model_stock": llm_family("base", "run1", "run2", "run3"),
    "passthrough": llm_family("chat", "code"),
    "per_layer": llm_family("chat", "code"),
    "slerp": llm_family("chat", "code"),
    "task_arithmetic": llm_family("base", "math", "code"),
    "ties": llm_family("base", "math", "code", "chat"),
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
    if name == "passthrough":
        (output,) = report["outputs"].values()
        layers = {k.split(".")[2] for k in load(Path(output["path"])) if k.startswith("model.layers.")}
        assert layers == {"0", "1", "2", "3", "4", "5"}
    if name.startswith("esrgan_x") or name == "esrgan_cross_scale":
        spandrel = pytest.importorskip("spandrel")
        expected = {"esrgan_x8": {8}, "esrgan_x2": {2}, "esrgan_cross_scale": {2}}[name]
        scales = {
            spandrel.ModelLoader().load_from_state_dict(load(Path(o["path"]))).scale for o in report["outputs"].values()
        }
        assert scales == expected
