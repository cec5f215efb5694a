"""Hugging Face folders of PyTorch pickles (`pytorch_model.bin`, sharded with an index) and PEFT
adapter folders as sources: located, read through merger's own unpickler, merged like any source.

The weights are small float tensors written here with torch.save; the merge is checked against
plain torch.lerp. A pickle that would run code is refused, and the code never runs.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.cache.memo import source_identity
from merger.core.tensor_bytes import tensor_from_buffer
from merger.io.sources import TensorSource, locate, open_source
from tests.conftest import RunRecipe, StateDict, expect_error, fine_tune, load

WHERE = "test.yaml, sources.m"
SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")


def _floats(seed: int) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(6, 4, generator=g),
        "layers.0.weight": torch.randn(4, 4, generator=g),
        "layers.0.bias": torch.randn(4, generator=g),
        "head.weight": torch.randn(3, 4, generator=g).t().contiguous().t(),  # a transposed view: strided
    }


def _packed(sd: StateDict) -> StateDict:
    """The same tensors, each contiguous (safetensors stores no strided views)."""
    return {k: v.contiguous() for k, v in sd.items()}


def _single_bin(folder: Path, sd: StateDict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    return folder


def _sharded_bin(folder: Path, sd: StateDict, weight_map: dict[str, str] | None = None) -> dict[str, str]:
    """Two torch.save'd shards and a pytorch_model.bin.index.json over them, as save_pretrained writes."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    parts = {SHARDS[0]: keys[: len(keys) // 2], SHARDS[1]: keys[len(keys) // 2 :]}
    written: dict[str, str] = {}
    for shard, shard_keys in parts.items():
        torch.save({k: sd[k] for k in shard_keys}, folder / shard)
        written.update(dict.fromkeys(shard_keys, shard))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map or written}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return written


def _read_all(source: TensorSource) -> StateDict:
    out = {}
    for key, spec in source.spec().items():
        view = source.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes)))
        out[key] = tensor_from_buffer(bytearray(view), spec.dtype, spec.shape)
    return out


def _opened(folder: Path) -> StateDict:
    source = open_source(locate(folder, None, where=WHERE), where=WHERE)
    try:
        return _read_all(source)
    finally:
        source.close()


def _assert_equal(got: StateDict, expected: StateDict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


class _RunsCode:
    """Unpickling this runs os.system('touch <marker>')."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


# --- locating and reading ---------------------------------------------------------------------------


def test_bin_folders_are_located_with_their_files(tmp_path: Path) -> None:
    sd = _floats(0)
    single = _single_bin(tmp_path / "single", sd)
    location = locate(single, None, where=WHERE)
    assert (location.kind, location.files) == ("folder", (single / "pytorch_model.bin",))
    _assert_equal(_opened(single), sd)

    sharded = tmp_path / "sharded"
    _sharded_bin(sharded, sd)
    location = locate(sharded, None, where=WHERE)
    assert location.kind == "folder"
    assert location.files == (sharded / "pytorch_model.bin.index.json", *(sharded / s for s in SHARDS))
    _assert_equal(_opened(sharded), sd)


def test_lerp_of_bin_folders_matches_torch(launch_dir: Path, run_recipe: RunRecipe) -> None:
    a = _floats(1)
    b = fine_tune(a, 2)
    _single_bin(launch_dir / "models" / "a", a)
    _sharded_bin(launch_dir / "models" / "b", b)
    report = run_recipe(
        {
            "sources": {"a": "models/a", "b": "models/b"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.3}},
            "outputs": {"blend": {"path": "blend.safetensors"}},
        }
    )
    out = load(Path(report["outputs"]["blend"]["path"]))
    assert sorted(out) == sorted(a)
    for key in a:
        torch.testing.assert_close(out[key], torch.lerp(a[key], b[key], 0.3), msg=key)


@pytest.mark.parametrize("present", [4, 3, 2, 1])
def test_folder_form_preference(tmp_path: Path, present: int) -> None:
    """With several forms in one folder: the safetensors index, model.safetensors, the .bin index, the .bin."""
    folder = tmp_path / "m"
    forms = {  # each form holds a different model, so what is read tells which was chosen
        "model.safetensors.index.json": _floats(10),
        "model.safetensors": _floats(11),
        "pytorch_model.bin.index.json": _floats(12),
        "pytorch_model.bin": _floats(13),
    }
    chosen = list(forms)[4 - present]
    folder.mkdir()
    for name, sd in list(forms.items())[4 - present :]:
        if name == "model.safetensors.index.json":
            save_file(_packed(sd), folder / "model-00001-of-00001.safetensors")
            weight_map = dict.fromkeys(sd, "model-00001-of-00001.safetensors")
            (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        elif name == "model.safetensors":
            save_file(_packed(sd), folder / name)
        elif name == "pytorch_model.bin.index.json":
            _sharded_bin(folder, sd)
        else:
            _single_bin(folder, sd)
    location = locate(folder, None, where=WHERE)
    assert location.files[0] == folder / chosen
    _assert_equal(_opened(folder), forms[chosen])


def test_sharded_bin_reads_from_threads_and_closes_every_shard(tmp_path: Path) -> None:
    sd = _floats(3)
    _sharded_bin(tmp_path / "m", sd)
    fds_before = len(os.listdir("/proc/self/fd"))
    source = open_source(locate(tmp_path / "m", None, where=WHERE), where=WHERE)
    results: list[StateDict] = []
    threads = [threading.Thread(target=lambda: results.append(_read_all(source))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for got in results:
        _assert_equal(got, sd)
    source.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["single", "shard"])
def test_bin_that_would_run_code_is_refused(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "m"
    evil = {"w": torch.ones(2), "payload": _RunsCode(marker)}
    if form == "single":
        _single_bin(folder, evil)  # type: ignore[arg-type]
        bad = folder / "pytorch_model.bin"
    else:
        _sharded_bin(folder, _floats(4))
        bad = folder / SHARDS[1]
        torch.save(evil, bad)
    location = locate(folder, None, where=WHERE)  # locating reads no pickle
    error = expect_error(lambda: open_source(location, where=WHERE))
    assert str(bad) in str(error)
    assert "system" in error.what  # the offending global (posix.system)
    assert "never runs pickled code" in error.what
    assert not marker.exists()


@pytest.mark.parametrize(
    ("shard", "problem"),
    [("../outside.bin", "a path that climbs out of the folder with '..'"), ("/etc/passwd", "an absolute path")],
)
def test_bin_index_naming_a_shard_outside_the_folder_is_refused(tmp_path: Path, shard: str, problem: str) -> None:
    sd = _floats(5)
    torch.save(sd, tmp_path / "outside.bin")
    folder = tmp_path / "m"
    _sharded_bin(folder, sd, {**dict.fromkeys(sd, SHARDS[0]), "layers.0.bias": shard})
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    index = folder / "pytorch_model.bin.index.json"
    assert error.what == (
        f"'{index}' is not a valid PyTorch weights index: the shard '{shard}' is {problem};"
        " shards must be files inside the folder"
    )
    assert error.where == WHERE
    assert error.fix is not None
    assert "re-download" in error.fix


def test_bin_index_naming_a_key_its_shard_lacks(tmp_path: Path) -> None:
    sd = _floats(6)
    folder = tmp_path / "m"
    weight_map = _sharded_bin(folder, sd)
    key = next(k for k, s in weight_map.items() if s == SHARDS[0])
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {**weight_map, key: SHARDS[1]}}))
    location = locate(folder, None, where=WHERE)
    error = expect_error(lambda: open_source(location, where=WHERE))
    assert error.what == (
        f"'{folder / 'pytorch_model.bin.index.json'}' maps 1 tensors to shards that lack them (e.g. '{key}')"
    )


def test_bin_index_shard_missing(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _sharded_bin(folder, _floats(7))
    (folder / SHARDS[1]).unlink()
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    assert f"shard '{SHARDS[1]}' named in '{folder / 'pytorch_model.bin.index.json'}' is missing" == error.what


def test_folder_without_weights_lists_every_form(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "adapter_model.safetensors")  # an adapter without its config
    error = expect_error(lambda: locate(folder, None, where=WHERE))
    assert str(folder) in error.what
    assert "adapter_model.safetensors without adapter_config.json" in error.what
    for form in (
        "model.safetensors.index.json",
        "model.safetensors,",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin,",
        "adapter_config.json with adapter_model.safetensors or adapter_model.bin",
    ):
        assert form in error.what
    assert error.fix is not None
    assert "save_pretrained" in error.fix


# --- PEFT adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "adapter_model.bin"])
def test_adapter_folder(tmp_path: Path, weights: str) -> None:
    g = torch.Generator().manual_seed(8)
    sd = {
        "base_model.model.q_proj.lora_A.weight": torch.randn(2, 4, generator=g),
        "base_model.model.q_proj.lora_B.weight": torch.randn(4, 2, generator=g),
    }
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    if weights.endswith(".bin"):
        torch.save(sd, folder / weights)
    else:
        save_file(sd, folder / weights)
    location = locate(folder, None, where=WHERE)
    assert (location.kind, location.files) == ("folder", (config, folder / weights))
    _assert_equal(_opened(folder), sd)
    before = source_identity(location)
    config.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 8}))  # the same weights, rescaled
    assert source_identity(locate(folder, None, where=WHERE)) != before
