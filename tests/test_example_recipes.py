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


def compact_pair(models: Path) -> None:
    """realesr-general-x4v3 and its wdn twin: SRVGGNetCompact, tiny, wrapped in `params` as published."""
    from spandrel.architectures.Compact import Compact as SRVGGNetCompact

    torch.manual_seed(5)
    x4v3 = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=4, upscale=4, act_type="prelu")
    wdn = fine_tune(x4v3.state_dict(), 6, scale=0.01)
    torch.save({"params": x4v3.state_dict()}, models / "realesr-general-x4v3.pth")
    torch.save({"params": wdn}, models / "realesr-general-wdn-x4v3.pth")


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
    "demo_search": lambda models: None,  # the built-in demo pair (pkg://merger/demo/...)
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
    "realesr_denoise": compact_pair,
    "esrgan_splice": dni_pair,
    "esrgan_x2": dni_pair,
    "esrgan_x8": dni_pair,
    "folder_average": zoo,
    "weighted_blend": named("parent", "ft1", "ft2", "ft3"),
}


def test_every_example_has_models_here() -> None:
    assert set(EXAMPLES) == set(MODELS)


State = dict[str, torch.Tensor]


def model(models: Path, name: str) -> State:
    """A model as its recipe names it: a folder (model.safetensors), a .safetensors file, or a .pth."""
    path = models / name
    if path.is_dir():
        return load(path / "model.safetensors")
    if (models / f"{name}.safetensors").is_file():
        return load(models / f"{name}.safetensors")
    loaded = torch.load(models / name, weights_only=True)
    return dict(loaded.get("params_ema", loaded))


def output(path: Path) -> State:
    """An output as its users load it: safetensors, or a .pth (inside `params` when wrapped so)."""
    if path.suffix != ".pth":
        return load(path)
    loaded = torch.load(path, weights_only=True)
    return dict(loaded["params"]) if set(loaded) == {"params"} else dict(loaded)


def weights(sd: State) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2]


def close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=1e-4)


def plain_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    dot = torch.clamp((a / a.norm()).flatten() @ (b / b.norm()).flatten(), -1, 1)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.arccos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def plain_ties(base: torch.Tensor, tuned: list[torch.Tensor], w: list[float], density: float) -> torch.Tensor:
    trimmed = []
    for m, weight in zip(tuned, w, strict=True):
        delta = (m - base).flatten()
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[delta.abs().topk(max(1, int(density * delta.numel()))).indices] = True
        trimmed.append(torch.where(keep, delta, 0.0) * weight)
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [(d * sign > 0) for d in trimmed]
    mixed = sum(torch.where(a, d, 0.0) for a, d in zip(agree, trimmed, strict=True))
    divisor = sum(a.float() * weight for a, weight in zip(agree, w, strict=True))
    return base + (mixed / torch.where(divisor == 0, 1.0, divisor)).reshape(base.shape)


def plain_model_stock(base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
    deltas = [(m - base).flatten() for m in tuned]
    pairs = [(i, j) for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    cos = sum(torch.dot(deltas[i], deltas[j]) / (deltas[i].norm() * deltas[j].norm()) for i, j in pairs) / len(pairs)
    n = len(tuned)
    t = n * cos / (1 + (n - 1) * cos)
    return t * sum(tuned) / n + (1 - t) * base


def check(name: str, models: Path, out: dict[str, State]) -> None:
    """Each example's result against an independent computation in plain torch (or a property of it)."""
    (first,) = out.values() if len(out) == 1 else (None,)
    if name == "add_difference":
        target, tuned, base = (model(models, n) for n in ("target", "tuned", "base"))
        for k in weights(target):
            close(first[k], target[k] + (tuned[k] - base[k]))
    elif name == "esrgan_dni":
        psnr, gan = model(models, "RRDB_PSNR_x4.pth"), model(models, "RRDB_ESRGAN_x4.pth")
        assert all(v.dtype == torch.float16 for v in first.values())
        for k in weights(psnr):
            close(first[k], 0.2 * psnr[k] + 0.8 * gan[k], atol=2e-3)
    elif name == "realesr_denoise":
        x4v3 = torch.load(models / "realesr-general-x4v3.pth", weights_only=True)["params"]
        wdn = torch.load(models / "realesr-general-wdn-x4v3.pth", weights_only=True)["params"]
        for k in weights(x4v3):
            close(first[k], 0.5 * x4v3[k] + 0.5 * wdn[k])  # Real-ESRGAN: s * x4v3 + (1 - s) * wdn
    elif name == "esrgan_splice":
        psnr, gan = model(models, "RRDB_PSNR_x4.pth"), model(models, "RRDB_ESRGAN_x4.pth")
        from_gan = 0
        for k in weights(psnr):
            rows_psnr = (first[k] == psnr[k]).flatten(1).all(1)
            rows_gan = (first[k] == gan[k]).flatten(1).all(1)
            assert bool((rows_psnr | rows_gan).all()), k  # every filter whole from one input
            from_gan += int(rows_gan.sum())
        assert from_gan > 0
    elif name in ("esrgan_x2", "esrgan_x8"):
        x4 = model(models, "RRDB_ESRGAN_x4.pth")
        trunk = [k for k in x4 if k.startswith("model.1.sub.")]
        for o in out.values():
            assert any(k in o for k in trunk) or any(k.startswith("body.") for k in o)
            for k in trunk:
                if k in o:
                    assert torch.equal(o[k], x4[k]), k  # the trunk is carried over as it is
    elif name == "esrgan_cross_scale":
        x2 = model(models, "ESRGAN_x2.pth")
        x4 = model(models, "ESRGAN_x4.pth")
        for k in (k for k in weights(x2) if k.startswith("model.1.sub.")):
            close(first[k], 0.5 * x2[k] + 0.5 * x4[k])
    elif name == "folder_average":
        zoo = [model(models / "zoo", f"m{i}.pth") for i in range(3)]
        for k in weights(zoo[0]):
            close(first[k], sum(z[k] for z in zoo) / 3)
    elif name == "weighted_blend":
        parent, ft = model(models, "parent"), [model(models, f"ft{i}") for i in (1, 2, 3)]
        for k in weights(parent):
            soup = (2 * ft[0][k] + ft[1][k] + ft[2][k]) / 4
            close(first[k], 0.5 * parent[k] + 0.5 * soup)
    elif name == "task_arithmetic":
        base, math_, code = (model(models, n) for n in ("base", "math", "code"))
        for k in weights(base):
            close(first[k], base[k] + 0.6 * (math_[k] - base[k]) + 0.4 * (code[k] - base[k]))
    elif name == "ties":
        base, tuned = model(models, "base"), [model(models, n) for n in ("math", "code", "chat")]
        for k in weights(base):
            close(first[k], plain_ties(base[k], [t[k] for t in tuned], [1.0, 0.8, 0.5], 0.5))
    elif name == "dare":
        base, math_, code = (model(models, n) for n in ("base", "math", "code"))
        for k in weights(base):
            changed = float((first[k] != base[k]).float().mean())
            assert 0.3 < changed < 0.75, (k, changed)  # drops at densities 0.3 and 0.5, not all kept
    elif name == "model_stock":
        base, runs = model(models, "base"), [model(models, f"run{i}") for i in (1, 2, 3)]
        for k in weights(base):
            close(first[k], plain_model_stock(base[k], [r[k] for r in runs]), atol=1e-4)
    elif name == "passthrough":
        chat, code = model(models, "chat"), model(models, "code")
        for new, (source, layer) in enumerate([(chat, 0), (chat, 1), (chat, 2), (code, 1), (code, 2), (code, 3)]):
            key = f"model.layers.{new}.mlp.up_proj.weight"
            assert torch.equal(first[key], source[f"model.layers.{layer}.mlp.up_proj.weight"]), key
    elif name == "per_layer":
        chat, code = model(models, "chat"), model(models, "code")
        assert torch.equal(first["model.embed_tokens.weight"], chat["model.embed_tokens.weight"])  # excluded
        for layer in range(4):
            key = f"model.layers.{layer}.self_attn.q_proj.weight"
            close(first[key], torch.lerp(chat[key], code[key], layer / 3))
        close(first["lm_head.weight"], torch.lerp(chat["lm_head.weight"], code["lm_head.weight"], 0.5))
    elif name == "slerp":
        chat, code = model(models, "chat"), model(models, "code")
        for k in weights(chat):
            t = 0.3 if "self_attn" in k else 0.7 if "mlp" in k else 0.5
            close(first[k], plain_slerp(chat[k], code[k], t), atol=2e-2)  # a bfloat16 output
    elif name == "demo_search":  # the built-in demo pair, every stage at the recipe's 0.5 (a0..a3)
        psnr, sharp = (load(REPO / "merger" / "demo" / f"{m}.safetensors") for m in ("psnr", "sharp"))
        for k in psnr:
            close(first[k], (psnr[k].float() + sharp[k].float()) / 2, atol=1e-3)
    else:
        pytest.fail(f"no independent check for example '{name}'")


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
    outputs = {n: output(Path(o["path"])) for n, o in report["outputs"].items()}
    check(name, launch_dir / "models", outputs)
    if name == "realesr_denoise":  # as Real-ESRGAN's RealESRGANer loads it: `params`, an SRVGGNetCompact 4x
        spandrel = pytest.importorskip("spandrel")
        (path,) = (Path(o["path"]) for o in report["outputs"].values())
        assert list(torch.load(path, weights_only=True)) == ["params"]
        loaded = spandrel.ModelLoader().load_from_state_dict(outputs["denoise"])
        assert (loaded.architecture.id, loaded.scale) == ("Compact", 4)
    if name.startswith("esrgan_x") or name == "esrgan_cross_scale":
        spandrel = pytest.importorskip("spandrel")
        expected = {"esrgan_x8": {8}, "esrgan_x2": {2}, "esrgan_cross_scale": {2}}[name]
        scales = {spandrel.ModelLoader().load_from_state_dict(o).scale for o in outputs.values()}
        assert scales == expected
