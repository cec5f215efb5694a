"""A first run hashes its sources before it computes (when they fit in memory): the entry's header is
final before its data, so its sha256 is computed as it is written, and an entry another path of the same
bytes made is found without computing."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

import merger.engine.executor as executor_module
import merger.io.safetensors_file as safetensors_file
from merger.engine.memory import available_bytes
from tests.conftest import RunRecipe

Models = dict[str, Path]


def lerp(a: str = "models/a.safetensors", b: str = "models/b.safetensors") -> dict[str, Any]:
    return {
        "sources": {"a": a, "b": b},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.25}},
        "outputs": {"blend": {}},
    }


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each SafetensorsWriter made had a final header, and the count of second reads for a sha256."""
    made: list[bool] = []
    original_init = safetensors_file.SafetensorsWriter.__init__

    def init(self: Any, path: Path, specs: Any, metadata: Any, *, final_header: bool = True) -> None:
        made.append(final_header)
        original_init(self, path, specs, metadata, final_header=final_header)

    monkeypatch.setattr(safetensors_file.SafetensorsWriter, "__init__", init)
    return made


def entry_of(report: dict[str, Any]) -> tuple[str, str]:
    return report["nodes"]["blend"]["key"], report["outputs"]["blend"]["sha256"]


def test_first_run_writes_a_final_header_and_the_same_entry_as_hashing_after(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, writers: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    reread: list[Path] = []
    original_sha = safetensors_file.file_sha256
    monkeypatch.setattr(safetensors_file, "file_sha256", lambda path, *a: reread.append(path) or original_sha(path))
    first = run_recipe(lerp())
    assert first["nodes"]["blend"]["status"] == "computed"
    assert writers == [True] and reread == []  # hashed as written, never read again
    output = launch_dir / "out" / "blend.safetensors"
    assert hashlib.sha256(output.read_bytes()).hexdigest() == entry_of(first)[1]

    shutil.rmtree(launch_dir / "cache")  # again with memory too small for the hashing pass: the old way
    monkeypatch.setattr(executor_module, "available_bytes", lambda: 0)
    second = run_recipe(lerp())
    assert writers == [True, False] and len(reread) == 1
    assert entry_of(second) == entry_of(first)


def test_the_same_bytes_at_another_path_are_found_once_hashed(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, writers: list[bool]
) -> None:
    first = run_recipe(lerp())
    moved = launch_dir / "elsewhere"
    moved.mkdir()
    for name in ("a", "b"):
        shutil.copy(models[name], moved / f"{name}.safetensors")
    again = run_recipe(lerp("elsewhere/a.safetensors", "elsewhere/b.safetensors"))
    assert again["nodes"]["blend"]["status"] == "cached" and writers == [True]
    assert entry_of(again) == entry_of(first)
    third = run_recipe(lerp("elsewhere/a.safetensors", "elsewhere/b.safetensors"))  # hashes memoised now
    assert third["nodes"]["blend"]["status"] == "cached"


def test_meminfo_is_read_in_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import merger.engine.memory as memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    assert available_bytes() == 2048 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert available_bytes() is None
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "absent")
    assert available_bytes() is None
