"""merger.io.sources: locating model files and folders, opening them, package paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import merger
from merger.core.specs import TensorSpec
from merger.core.tensor_bytes import tensor_from_buffer
from merger.io.sources import locate, open_source, resolve_path
from tests.conftest import expect_error, spec_of, tiny_state_dict

WHERE = "test.yaml, sources.m"


def _sharded_folder(folder: Path, sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """A Hugging Face-style sharded folder: two shards and an index over them."""
    folder.mkdir()
    keys = list(sd)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    weight_map: dict[str, str] = {}
    for name, shard_keys in shards.items():
        save_file({k: sd[k] for k in shard_keys}, folder / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def _tensor(source: Any, key: str, spec: TensorSpec) -> torch.Tensor:
    data = bytearray(spec.nbytes)
    view = source.read_into(key, 0, spec.nbytes, memoryview(data))
    return tensor_from_buffer(bytearray(view), spec.dtype, spec.shape)


def _read_all(location_path: Path, key: str | None = None) -> tuple[dict[str, TensorSpec], dict[str, torch.Tensor]]:
    location = locate(location_path, key, where=WHERE)
    source = open_source(location, where=WHERE)
    try:
        spec = dict(source.spec())
        return spec, {k: _tensor(source, k, spec[k]) for k in spec}
    finally:
        source.close()


# --- locate -----------------------------------------------------------------------------------------


def test_locate_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "nope.pth"
    error = expect_error(lambda: locate(missing, None, where=WHERE))
    assert str(missing) in error.what
    assert "not found" in error.what
    assert error.where == WHERE
    assert error.fix is not None
    assert "relative" in error.fix
    assert "directory you ran merger in" in error.fix


def test_locate_single_safetensors_file(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    location = locate(path, None, where=WHERE)
    assert location.kind == "safetensors"
    assert location.files == (path,)
    spec, tensors = _read_all(path)
    assert spec == spec_of(sd)
    for key, value in sd.items():
        assert torch.equal(tensors[key], value)


def test_locate_uppercase_suffix(tmp_path: Path) -> None:
    path = tmp_path / "M.SAFETENSORS"
    save_file({"w": torch.ones(2)}, path)
    assert locate(path, None, where=WHERE).kind == "safetensors"


def test_locate_folder_with_model_safetensors(tmp_path: Path) -> None:
    sd = tiny_state_dict(1)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    location = locate(folder, None, where=WHERE)
    assert location.kind == "folder"
    assert location.files == (folder / "model.safetensors",)
    spec, tensors = _read_all(folder)
    assert spec == spec_of(sd)
    for key, value in sd.items():
        assert torch.equal(tensors[key], value)


def test_locate_sharded_folder(tmp_path: Path) -> None:
    sd = tiny_state_dict(2)
    folder = tmp_path / "sharded"
    weight_map = _sharded_folder(folder, sd)
    location = locate(folder, None, where=WHERE)
    assert location.kind == "folder"
    assert location.files[0] == folder / "model.safetensors.index.json"
    assert set(location.files[1:]) == {folder / name for name in set(weight_map.values())}
    spec, tensors = _read_all(folder)
    assert spec == spec_of(sd)
    assert set(spec) == set(sd)
    for key, value in sd.items():
        assert tensors[key].dtype == value.dtype
        assert torch.equal(tensors[key], value), key


def test_sharded_folder_ignores_keys_not_in_weight_map(tmp_path: Path) -> None:
    sd = tiny_state_dict(3)
    folder = tmp_path / "sharded"
    weight_map = _sharded_folder(folder, sd)
    # a stray tensor in a shard that the index does not name is not part of the model
    first_shard = sorted(set(weight_map.values()))[0]
    shard_sd = {k: v for k, v in sd.items() if weight_map[k] == first_shard}
    save_file({**shard_sd, "stray": torch.ones(1)}, folder / first_shard)
    spec, _ = _read_all(folder)
    assert set(spec) == set(sd)


def test_sharded_folder_shard_missing(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    _sharded_folder(folder, tiny_state_dict(4))
    (folder / "model-00002-of-00002.safetensors").unlink()
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    assert "model-00002-of-00002.safetensors" in error.what
    assert "missing" in error.what
    assert error.where == WHERE


def test_sharded_folder_index_maps_key_to_wrong_shard(tmp_path: Path) -> None:
    sd = tiny_state_dict(5)
    folder = tmp_path / "sharded"
    weight_map = _sharded_folder(folder, sd)
    key = next(iter(sd))
    other = next(s for s in set(weight_map.values()) if s != weight_map[key])
    weight_map[key] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    location = locate(folder, None, where=WHERE)
    error = expect_error(lambda: open_source(location, where=WHERE))
    assert key in error.what
    assert "1 tensors" in error.what


@pytest.mark.parametrize(
    "content",
    [json.dumps({"metadata": {}}), json.dumps({"weight_map": ["a", "b"]}), "not json", json.dumps([1, 2])],
)
def test_sharded_folder_index_without_weight_map(tmp_path: Path, content: str) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(content)
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    assert "model.safetensors.index.json" in error.what
    assert "weight_map" in error.what


def test_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "pytorch_model.txt").write_text("x")
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    assert str(folder) in error.what
    assert "model.safetensors" in error.what


def test_key_on_safetensors_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, path)
    error = expect_error(lambda: locate(path, "params_ema", where=WHERE))
    assert "key: params_ema" in error.what
    assert str(path) in error.what
    assert error.fix is not None
    assert "remove key:" in error.fix


def test_key_on_folder_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "model.safetensors")
    error = expect_error(lambda: locate(folder, "model", where=WHERE))
    assert "key: model" in error.what


def test_unknown_suffix_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\0" * 16)
    error = expect_error(lambda: locate(path, None, where=WHERE))
    assert str(path) in error.what
    assert "not a model format" in error.what
    assert error.fix is not None
    assert ".safetensors" in error.fix
    assert ".pth" in error.fix


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".bin"])
def test_pth_suffixes_keep_key_and_load(tmp_path: Path, suffix: str) -> None:
    sd = tiny_state_dict(6)
    path = tmp_path / f"m{suffix}"
    torch.save({"generator": sd, "iter": 3}, path)
    location = locate(path, "generator", where=WHERE)
    assert location.kind == "pth"
    assert location.key == "generator"
    assert location.files == (path,)
    spec, tensors = _read_all(path, "generator")
    assert spec == spec_of(sd)
    for key, value in sd.items():
        assert torch.equal(tensors[key], value)


# --- resolve_path -----------------------------------------------------------------------------------


def test_resolve_path_relative_to_launch_dir(tmp_path: Path) -> None:
    assert resolve_path("models/a.pth", tmp_path, where=WHERE) == tmp_path / "models" / "a.pth"


def test_resolve_path_absolute_is_kept(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "a.pth"
    assert resolve_path(str(absolute), tmp_path / "launch", where=WHERE) == absolute


def test_resolve_path_package_scheme(tmp_path: Path) -> None:
    path = resolve_path("pkg://merger/conf/config.yaml", tmp_path, where=WHERE)
    package_root = Path(merger.__file__).resolve().parent
    assert path.resolve() == package_root / "conf" / "config.yaml"
    assert path.is_file()
    assert tmp_path not in path.parents


def test_resolve_path_unknown_package(tmp_path: Path) -> None:
    error = expect_error(lambda: resolve_path("pkg://not_a_package/x", tmp_path, where=WHERE))
    assert "not_a_package" in error.what
    assert "not installed" in error.what
    assert error.where == WHERE
    assert error.fix is not None
    assert "pkg://" in error.fix
