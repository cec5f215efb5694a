"""Image models of every kind spandrel knows (merger.archs.image_models): detection from the spec,
merger-inspect's line, a lerp equal to plain torch that spandrel loads back, and the pre-flight
error when two models of one architecture differ in size, or are of two architectures.

Tiny models of ten architectures are built with spandrel's own classes (seeded random init, plus a
perturbed "fine-tune" and a sibling with one hyper-parameter changed), once per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import save_file

from merger.archs import align_layouts, detect, image_model
from merger.archs.image_models import MAX_IMAGE_MODEL_BYTES, prefilter
from merger.cli.inspect import main as inspect_main
from merger.core.specs import TensorSpec
from merger.io.safetensors_file import SafetensorsReader
from merger.io.safetensors_header import read_header
from tests.conftest import REPO, RunRecipe, expect_error, fine_tune, load, run_cli

pytest.importorskip("spandrel")

StateDict = dict[str, torch.Tensor]


class Arch(NamedTuple):
    """One architecture's tiny model: spandrel's class for it (and the model class spandrel names), its
    hyper-parameters, those a sibling of another size changes (named as spandrel names them), its scale."""

    cls: str
    base: dict[str, Any]
    changed: dict[str, Any]
    scale: int


def _classes() -> dict[str, Any]:
    """spandrel's model class of each architecture of ARCHS (in its order)."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.DAT import DAT
    from spandrel.architectures.DRCT import DRCT
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.HAT import HAT
    from spandrel.architectures.OmniSR import OmniSR
    from spandrel.architectures.PLKSR import RealPLKSR
    from spandrel.architectures.SAFMN import SAFMN
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    found = (ESRGAN, Compact, SPAN, SwinIR, HAT, DAT, RealPLKSR, OmniSR, SAFMN, DRCT)
    return dict(zip(ARCHS, found, strict=True))  # spandrel's id -> its class


SWIN = {"img_size": 16, "embed_dim": 12, "window_size": 4, "upscale": 2, "upsampler": "pixelshuffle", "mlp_ratio": 2}
DAT_BASE = {"img_size": 16, "embed_dim": 12, "upscale": 2, "upsampler": "pixelshuffle", "expansion_factor": 2}
ARCHS = {
    "ESRGAN": Arch("RRDBNet", {"num_filters": 8, "num_blocks": 2, "scale": 4}, {"num_blocks": 1}, 4),
    "Compact": Arch("SRVGGNetCompact", {"num_feat": 8, "num_conv": 4, "upscale": 4}, {"num_conv": 2}, 4),
    "SPAN": Arch(
        "SPAN", {"num_in_ch": 3, "num_out_ch": 3, "feature_channels": 8, "upscale": 4}, {"feature_channels": 16}, 4
    ),
    "SwinIR": Arch("SwinIR", {**SWIN, "depths": [2], "num_heads": [2]}, {"depths": [2, 2], "num_heads": [2, 2]}, 2),
    "HAT": Arch(
        "HAT",
        {**SWIN, "depths": [2], "num_heads": [2], "num_feat": 8, "compress_ratio": 3, "squeeze_factor": 6},
        {"depths": [2, 2], "num_heads": [2, 2]},
        2,
    ),
    # the sibling has the same shapes: spandrel reads the split from tensor values
    "DAT": Arch("DAT", {**DAT_BASE, "depth": [2], "num_heads": [2], "split_size": [2, 4]}, {"split_size": [4, 2]}, 2),
    "PLKSR": Arch("RealPLKSR", {"dim": 8, "n_blocks": 2, "upscaling_factor": 2, "kernel_size": 5}, {"n_blocks": 3}, 2),
    "OmniSR": Arch(
        "OmniSR", {"num_feat": 8, "block_num": 1, "up_scale": 2, "window_size": 4, "res_num": 1}, {"block_num": 2}, 2
    ),
    "SAFMN": Arch("SAFMN", {"dim": 8, "n_blocks": 2, "ffn_scale": 2.0, "upscaling_factor": 2}, {"n_blocks": 3}, 2),
    "DRCT": Arch("DRCT", {**SWIN, "depths": [2], "num_heads": [2], "gc": 4}, {"embed_dim": 24}, 2),
}
#: the architectures whose sizes spandrel reads from tensor values (so pre-flight reads them, bounded)
VALUE_ARCHS = {"DAT"}


def _state(model: torch.nn.Module) -> StateDict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per architecture: `a` (seeded init), `b` (a perturbed fine-tune of a), `other` (another size)."""
    folder = tmp_path_factory.mktemp("zoo")
    classes = _classes()
    paths: dict[str, dict[str, Path]] = {}
    for i, (arch, (_, base, changed, _)) in enumerate(ARCHS.items()):
        build = classes[arch]
        with warnings.catch_warnings():  # torch's, on spandrel's model code
            warnings.simplefilter("ignore")
            torch.manual_seed(i)
            a = _state(build(**base))
            torch.manual_seed(100 + i)
            other = _state(build(**{**base, **changed}))
        files = {"a": a, "b": fine_tune(a, 1000 + i), "other": other}
        paths[arch] = {}
        for name, sd in files.items():
            paths[arch][name] = folder / f"{arch}_{name}.safetensors"
            save_file(sd, paths[arch][name])
    return paths


def _spec(path: Path) -> dict[str, TensorSpec]:
    return dict(read_header(path).tensors)


def _reader(path: Path) -> Any:
    return SafetensorsReader(read_header(path)).read_into


@pytest.mark.parametrize("arch", ARCHS)
def test_detection_names_the_architecture_scale_and_sizes(zoo: dict[str, dict[str, Path]], arch: str) -> None:
    cls, base, changed, scale = ARCHS[arch]
    path = zoo[arch]["a"]
    found = image_model(_spec(path), read=_reader(path), identity=str(path))
    assert found is not None
    assert (found.arch, found.model_class, found.scale) == (arch, cls, scale)
    assert (found.in_channels, found.out_channels) == (3, 3)
    assert found.resolved
    for name in changed:  # the hyper-parameter the sibling changes is among those read, as plain values
        assert name in found.hyperparameters
        assert found.hyperparameters[name] == json.loads(json.dumps(base.get(name, found.hyperparameters[name])))
    json.dumps(found.hyperparameters)  # plain JSON values
    again = image_model(_spec(path), read=_reader(path), identity=str(path))
    assert again == found


def test_without_values_the_value_architectures_are_named_but_not_sized(zoo: dict[str, dict[str, Path]]) -> None:
    found = detect(_spec(zoo["DAT"]["a"]))  # no reader: nothing is read
    assert found.model is not None and found.needs_values
    assert (found.model.arch, found.model.resolved, found.model.scale) == ("DAT", False, None)


def test_what_is_not_an_image_model_says_why() -> None:
    llm = {f"model.layers.{i}.mlp.up_proj.weight": TensorSpec("BF16", (64, 32)) for i in range(4)}
    assert detect(llm).model is None and "no 4-D float tensor" in detect(llm).why
    conv = {"conv_first.weight": TensorSpec("F32", (8, 3, 3, 3)), "conv_last.weight": TensorSpec("F32", (3, 8, 3, 3))}
    assert detect(conv).model is None and "spandrel detects no architecture" in detect(conv).why
    big = {"x.weight": TensorSpec("F32", (1 << 14, 1 << 14, 2, 1)), "y.weight": TensorSpec("F32", (1, 1, 1, 1))}
    assert big["x.weight"].nbytes > MAX_IMAGE_MODEL_BYTES and prefilter(big) is not None


def test_a_wrapping_prefix_is_stripped_and_aligned(zoo: dict[str, dict[str, Path]]) -> None:
    spec = _spec(zoo["Compact"]["a"])
    wrapped = {f"module.{k}": t for k, t in spec.items()}
    found = image_model(wrapped)
    assert found is not None and found.arch == "Compact"
    adaptation = align_layouts([spec, wrapped])[1]
    assert adaptation is not None and adaptation.tag == "prefix:module.->-"
    assert adaptation.rename["module.body.0.weight"] == "body.0.weight"


def test_merger_inspect_names_each_image_model(
    zoo: dict[str, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    inspect_main([str(zoo[a]["a"]) for a in ARCHS] + ["--keys", "0"])
    lines = capsys.readouterr().out.splitlines()
    image_lines = [line for line in lines if line.startswith("  image model: ")]
    assert len(image_lines) == len(ARCHS)
    for line, (arch, (_, _, _, scale)) in zip(image_lines, ARCHS.items(), strict=True):
        assert f"{arch}" in line and f": {scale}x, 3->3 channels" in line, line
    compact = next(line for line in image_lines if "Compact" in line)
    assert compact == (
        "  image model: SRVGGNetCompact (Compact, RealESRGAN Compact): 4x, 3->3 channels, num_feat 8, num_conv 4,"
        " act_type prelu"
    )


def test_merger_inspect_command_line(zoo: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    llm = tmp_path / "llm.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(16, 8)}, llm)
    done = run_cli(
        [str(zoo["Compact"]["a"]), str(zoo["Compact"]["other"]), str(llm)], tmp_path, command="merger-inspect"
    )
    assert done.returncode == 0, done.stderr
    assert "  image model: SRVGGNetCompact (Compact, RealESRGAN Compact): 4x, 3->3 channels" in done.stdout
    assert "; not an image model spandrel knows" in done.stdout
    assert (
        "  'Compact_a.safetensors' is Compact (SRVGGNetCompact) with num_conv 4,"
        " 'Compact_other.safetensors' is Compact (SRVGGNetCompact) with num_conv 2"
    ) in done.stdout
    assert "Warning" not in done.stdout + done.stderr


def _lerp(a: Path, b: Path, alpha: float = 0.3, **params: Any) -> dict[str, Any]:
    return {
        "sources": {"a": str(a), "b": str(b)},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": alpha, **params}},
        "outputs": {"blend": {"path": "blend.safetensors"}},
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_lerp_is_plain_torch_and_spandrel_loads_it(
    zoo: dict[str, dict[str, Path]], arch: str, run_recipe: RunRecipe
) -> None:
    from spandrel import ModelLoader

    report = run_recipe(_lerp(zoo[arch]["a"], zoo[arch]["b"], 0.3))
    out, a, b = load(Path(report["outputs"]["blend"]["path"])), load(zoo[arch]["a"]), load(zoo[arch]["b"])
    assert sorted(out) == sorted(a)
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(out[key], 0.7 * value + 0.3 * b[key], msg=key)
        else:
            assert torch.equal(out[key], value), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = ModelLoader().load_from_file(report["outputs"]["blend"]["path"])
    assert (loaded.architecture.id, loaded.scale) == (arch, ARCHS[arch][3])


@pytest.mark.parametrize("arch", ARCHS)
def test_other_sizes_fail_in_preflight_naming_both(
    zoo: dict[str, dict[str, Path]], arch: str, run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if arch not in VALUE_ARCHS:  # nothing is read: the error comes from the specs alone
        monkeypatch.setattr(SafetensorsReader, "read_into", lambda *a: pytest.fail("pre-flight read a tensor"))
    error = expect_error(lambda: run_recipe(_lerp(zoo[arch]["a"], zoo[arch]["other"])))
    assert error.what.startswith("the inputs are not one image model: 'a' is "), error.what
    for name in ARCHS[arch][2]:
        first, other = error.what.split(", 'b' is ")
        assert f" {name} " in first and f" {name} " in other, error.what
    assert error.fix is not None and "intersection" not in error.fix
    assert error.where is not None and "nodes.blend" in error.where
    assert [p for p in (launch_dir / "cache" / "objects").rglob("*") if p.is_file()] == []  # no cache object


def test_compact_words_and_other_architectures(zoo: dict[str, dict[str, Path]], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: run_recipe(_lerp(zoo["Compact"]["a"], zoo["Compact"]["other"])))
    assert "'a' is Compact (SRVGGNetCompact) with num_conv 4, 'b' is Compact (SRVGGNetCompact) with num_conv 2" in (
        error.what
    )
    for keys in ("strict", "intersection"):  # following the old advice wrote a copy of 'a': now an error either way
        data = _lerp(zoo["ESRGAN"]["a"], zoo["SPAN"]["a"], keys=keys)
        error = expect_error(lambda d=data: run_recipe(d))  # type: ignore[misc]
        assert "'a' is ESRGAN (RRDBNet), 'b' is SPAN: different architectures" in error.what
        assert error.fix is not None and "intersection" not in error.fix


def _esrgan(scale: int, filters: int = 8) -> StateDict:
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(scale)
    return _state(ESRGAN(num_filters=filters, num_blocks=2, scale=scale))


def test_esrgan_scales_get_convert_scale_and_intersection_merges_the_trunk(
    launch_dir: Path, run_recipe: RunRecipe
) -> None:
    save_file(_esrgan(4), launch_dir / "x4.safetensors")
    save_file(_esrgan(2), launch_dir / "x2.safetensors")
    error = expect_error(lambda: run_recipe(_lerp(launch_dir / "x4.safetensors", launch_dir / "x2.safetensors")))
    assert "'a' is ESRGAN (RRDBNet) with scale 4x, 'b' is ESRGAN (RRDBNet) with scale 2x" in error.what
    assert error.fix is not None and "convert_scale" in error.fix and "scale: 4" in error.fix
    report = run_recipe(_lerp(launch_dir / "x4.safetensors", launch_dir / "x2.safetensors", keys="intersection"))
    assert report["nodes"]["blend"]["notes"]["not_shared"] > 0


def test_intersection_that_merges_little_of_an_image_model_fails(launch_dir: Path, run_recipe: RunRecipe) -> None:
    from spandrel.architectures.Compact import Compact

    for scale in (4, 1):  # one conv in the body: most parameters are in the 4x model's last conv
        torch.manual_seed(scale)
        save_file(_state(Compact(num_feat=8, num_conv=1, upscale=scale)), launch_dir / f"c{scale}.safetensors")
    data = _lerp(launch_dir / "c4.safetensors", launch_dir / "c1.safetensors", keys="intersection")
    error = expect_error(lambda: run_recipe(data))
    assert "the node leaves" in error.what and "parameters of 'a'" in error.what and "unmerged" in error.what
    error = expect_error(lambda: run_recipe(_lerp(launch_dir / "c4.safetensors", launch_dir / "c1.safetensors")))
    assert error.fix is not None and "intersection" not in error.fix  # it would merge too little


def test_a_merge_of_no_shared_key_fails(launch_dir: Path, run_recipe: RunRecipe) -> None:
    save_file({"a.weight": torch.ones(2, 2)}, launch_dir / "p.safetensors")
    save_file({"b.weight": torch.ones(2, 2)}, launch_dir / "q.safetensors")
    data = _lerp(launch_dir / "p.safetensors", launch_dir / "q.safetensors", keys="intersection")
    error = expect_error(lambda: run_recipe(data))
    assert "the node merges no key" in error.what and "a copy of 'a'" in error.what


LLM_SCRIPT = """
import sys
import merger
merger.run({{"sources": {{"a": "{a}", "b": "{b}"}},
            "nodes": {{"m": {{"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}}}},
            "outputs": {{"m": {{"path": "m.safetensors"}}}}}}, output_dir="{out}", cache_dir="{cache}")
print(sorted(m for m in sys.modules if m.split(".")[0] == "spandrel"))
"""


def test_planning_a_language_model_never_imports_spandrel(tmp_path: Path) -> None:
    names = [f"model.layers.{i // 10}.{n}.weight" for i, n in enumerate(["self_attn.q_proj", "mlp.up_proj"] * 150)]
    for i, name in enumerate(names):
        names[i] = name.replace(".weight", f".{i}.weight")
    for tag in ("a", "b"):
        save_file({n: torch.full((4, 4), float(i)) for i, n in enumerate(names)}, tmp_path / f"{tag}.safetensors")
    script = LLM_SCRIPT.format(
        a=tmp_path / "a.safetensors", b=tmp_path / "b.safetensors", out=tmp_path / "out", cache=tmp_path / "cache"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_anchor_table_is_spandrels() -> None:
    """The keys merger looks for before it imports spandrel are those the installed spandrel's detection needs."""
    import importlib.metadata

    from merger.archs import spandrel_keys

    if importlib.metadata.version("spandrel") != spandrel_keys.SPANDREL_VERSION:
        pytest.skip("another spandrel: the table is not used (regenerate: python -m merger.archs.spandrel_keys)")
    assert spandrel_keys.derive() == spandrel_keys.ANCHORS


def test_without_spandrel_esrgan_is_known_and_the_plan_says_so_once(
    zoo: dict[str, dict[str, Path]], run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    from merger.archs import image_models

    monkeypatch.setattr(image_models, "spandrel_available", lambda: False)
    esrgan = image_model(_spec(zoo["ESRGAN"]["a"]))
    assert esrgan is not None and (esrgan.arch, esrgan.by, esrgan.scale) == ("ESRGAN", "merger", 4)
    assert detect(_spec(zoo["Compact"]["a"])).why == image_models.SPANDREL_MISSING
    a, b = str(zoo["Compact"]["a"]), str(zoo["Compact"]["b"])
    report = run_recipe(
        {
            "sources": {"a": a, "b": b},
            "nodes": {
                "x": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5},
                "y": {"op": "lerp", "inputs": ["b", "a"], "alpha": 0.5},
            },
            "outputs": {"x": {"path": "x.safetensors"}, "y": {"path": "y.safetensors"}},
        }
    )
    said = [w for w in report["warnings"] if "spandrel is not installed" in w]
    assert len(said) == 1, report["warnings"]


#: this tiny DAT (embed_dim 12) has a channel-interaction conv of 12 // 16 = 0 filters: it loads, but
#: cannot run (its preview fails, as the report says); a larger one perturbed as the others are would
#: change the rpe_biases buffers spandrel reads DAT's split size from
RUNNABLE = [arch for arch in ARCHS if arch != "DAT"]
#: measured with every image metric (the others with sharpness alone, which needs no reference: cheaper)
MEASURED = ("ESRGAN", "Compact", "SwinIR", "PLKSR")


@pytest.mark.parametrize("arch", RUNNABLE)
def test_each_architecture_previews_at_the_samples_size_and_is_measured(
    zoo: dict[str, dict[str, Path]], arch: str, run_recipe: RunRecipe
) -> None:
    from PIL import Image

    metrics = ["psnr", "ssim", "sharpness", "psnr_rgb"] if arch in MEASURED else ["sharpness"]
    evaluate = {"images": "sample", "degrade": "bicubic", "metrics": metrics}
    report = run_recipe({**_lerp(zoo[arch]["a"], zoo[arch]["b"], 0.3), "preview": "sample", "evaluate": evaluate})
    assert "previews" in report, [n["note"] for n in report.get("preview_notes", [])]
    (row,) = report["previews"]
    with Image.open(row["png"]) as png:
        assert png.size == (256, 256), row  # the sample cropped to the scale, box-downscaled, upscaled back
    assert not report.get("preview_notes")
    figures = report["metrics"]["blend"]
    assert all(isinstance(figures[m], float) for m in metrics), figures  # a random model: any value, measured
    assert figures["scale"] == ARCHS[arch].scale == figures["border"]


def test_inspect_compares_each_model_with_the_first_on_their_own_shared_keys(
    zoo: dict[str, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A third model of another architecture never shrinks what a pair is compared on."""
    from merger.cli.inspect import main

    pair = [str(zoo["ESRGAN"]["a"]), str(zoo["ESRGAN"]["b"])]
    for files in (pair, [*pair, str(zoo["Compact"]["a"])]):
        main(files)
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith(Path(pair[1]).name))
        assert "over" in line and "no weight tensor in common" not in line, line
        if files is pair:
            first = line
    assert line == first
