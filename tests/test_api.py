"""merger.run, the Python API: a recipe file or a mapping, typed results, errors as MergerError."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merger
from merger.errors import MergerError

Models = dict[str, Path]

RECIPE = """# @package _global_
alpha: 0.5
sources:
  a: models/a.safetensors
  b: models/b.safetensors
nodes:
  blend: {op: lerp, inputs: [a, b], alpha: "${alpha}"}
outputs:
  blend: {path: "blend_${alpha}.safetensors", dtype: float32}
"""


def mapping(alpha: float = 0.5) -> dict[str, object]:
    return {
        "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": alpha}},
        "outputs": {"blend": {"dtype": "float32"}},
    }


def expected(models: Models, alpha: float) -> dict[str, torch.Tensor]:
    """Plain torch's lerp of the float tensors (integer ones, such as a step counter, are not blended)."""
    a, b = load_file(models["a"]), load_file(models["b"])
    return {k: torch.lerp(a[k].float(), b[k].float(), alpha) for k in a if a[k].is_floating_point()}


def assert_close(path: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_file(path)
    assert {k for k, v in got.items() if v.is_floating_point()} == want.keys() and len(got) > len(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6)


def test_a_recipe_file_with_overrides(models: Models, launch_dir: Path) -> None:
    file = launch_dir / "recipes" / "blend.yaml"
    file.parent.mkdir()
    file.write_text(RECIPE)
    result = merger.run(file, overrides=["alpha=0.25"], output_dir="run1", cache_dir=launch_dir / "c")
    assert isinstance(result, merger.RunResult)
    node = result.nodes["blend"]
    assert (node.op, node.status, len(node.key)) == ("lerp", "computed", 64) and node.seconds >= 0
    out = result.outputs["blend"]
    assert out.path == launch_dir / "run1" / "blend_0.25.safetensors"
    assert out.sha256 == hashlib.sha256(out.path.read_bytes()).hexdigest() and out.dtype == "float32"
    assert result.report_path == launch_dir / "run1" / "merge_report.json" and result.report_path.is_file()
    assert result.report["overrides"] == ["alpha=0.25"]
    assert_close(out.path, expected(models, 0.25))
    again = merger.run(str(file), overrides=["alpha=0.25"], output_dir="run2", cache_dir=launch_dir / "c")
    assert again.nodes["blend"].status == "cached" and again.outputs["blend"].sha256 == out.sha256


def test_a_mapping_is_the_callers_own(models: Models, launch_dir: Path) -> None:
    result = merger.run(mapping(0.75), output_dir=launch_dir / "m", cache_dir=launch_dir / "c")
    assert_close(result.outputs["blend"].path, expected(models, 0.75))
    swept = merger.run(mapping(), overrides=["nodes.blend.alpha=0.1"], output_dir="m2", cache_dir=launch_dir / "c")
    assert_close(swept.outputs["blend"].path, expected(models, 0.1))


@pytest.mark.parametrize(
    ("recipe", "overrides", "phrase", "where"),
    [
        ("MAPPING_BAD_OP", [], "unknown op", "nodes.blend.op"),
        ("MAPPING", ["nodes.blend.alpha=abc"], "valid number", "nodes.blend.alpha"),
        ("missing.yaml", [], "recipe file not found", None),
        ("FILE", ["alpah=0.3"], "'alpah'", None),
    ],
)
def test_errors_raise_merger_error(
    models: Models, launch_dir: Path, recipe: str, overrides: list[str], phrase: str, where: str | None
) -> None:
    data: object
    if recipe == "MAPPING_BAD_OP":
        data = mapping()
        data["nodes"]["blend"]["op"] = "lerpp"  # type: ignore[index]
    elif recipe == "MAPPING":
        data = mapping()
    elif recipe == "FILE":
        (launch_dir / "r.yaml").write_text(RECIPE)
        data = launch_dir / "r.yaml"
    else:
        data = launch_dir / recipe
    with pytest.raises(MergerError) as info:
        merger.run(data, overrides=overrides, output_dir="out", cache_dir=launch_dir / "c")  # type: ignore[arg-type]
    assert phrase in info.value.what + (info.value.fix or "")
    if where:
        assert where in (info.value.where or "")
    assert not (launch_dir / "out").exists()


def test_a_recipe_in_a_folder_with_quotes_commas_and_brackets(models: Models, launch_dir: Path) -> None:
    folder = launch_dir / "it's, [odd]=dir\\x"
    folder.mkdir()
    (folder / "blend.yaml").write_text(RECIPE.replace("models/", str(launch_dir / "models") + "/"))
    result = merger.run(folder / "blend.yaml", output_dir="out", cache_dir=launch_dir / "c")
    assert_close(result.outputs["blend"].path, expected(models, 0.5))


@pytest.mark.parametrize("name", ["a,b.yaml", "x=y.yaml", "blend.yml", "${x}/r.yaml"])
def test_a_recipe_name_hydra_would_read_otherwise_is_refused(launch_dir: Path, name: str) -> None:
    file = launch_dir / name
    file.parent.mkdir(exist_ok=True)
    file.write_text(RECIPE)
    with pytest.raises(MergerError) as info:
        merger.run(file, output_dir="out")
    assert "NAME.yaml" in info.value.what


def test_a_recipe_file_follows_the_file_rules(models: Models, launch_dir: Path) -> None:
    (launch_dir / "r.yaml").write_text(RECIPE + "hydra:\n  run:\n    dir: /tmp/elsewhere\n")
    with pytest.raises(MergerError) as info:
        merger.run(launch_dir / "r.yaml", output_dir="out")
    assert "a recipe may not set Hydra's 'hydra.run.dir'" in info.value.what


@pytest.mark.parametrize("stopped", [1, 2], ids=["a node's entry", "an output's float16 variant"])
def test_a_stop_just_before_a_commit_leaves_no_temporary_file(
    models: Models, launch_dir: Path, monkeypatch: pytest.MonkeyPatch, stopped: int
) -> None:
    """Ctrl-C (or SIGTERM, raised the same way) between a finished file and its commit: the file is
    removed, as a stop anywhere else removes it; the next run computes and serves the entries."""
    from merger.cache.store import Cache

    commit, calls = Cache.commit, []

    def interrupted(self: Cache, *args: object, **kwargs: object) -> object:
        calls.append(args[0])
        if len(calls) == stopped:
            raise KeyboardInterrupt
        return commit(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Cache, "commit", interrupted)
    data = mapping()
    data["outputs"] = {"blend": {"path": "half.safetensors", "dtype": "float16"}}
    with pytest.raises(KeyboardInterrupt):
        merger.run(data, output_dir="out", cache_dir=launch_dir / "c")
    assert len(calls) == stopped
    assert list((launch_dir / "c" / "tmp").glob("*")) == []
    monkeypatch.setattr(Cache, "commit", commit)
    result = merger.run(data, output_dir="out2", cache_dir=launch_dir / "c")
    assert (launch_dir / "out2" / "half.safetensors").exists() and result.outputs
