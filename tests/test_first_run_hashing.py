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
import merger.engine.pipeline as pipeline_module
import merger.engine.source_hashing as source_hashing
import merger.io.safetensors_file as safetensors_file
from merger.core.specs import TensorSpec
from merger.engine.memory import available_bytes
from tests.conftest import RunRecipe, expect_error, tiny_state_dict

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
    monkeypatch.setattr(source_hashing, "available_bytes", lambda: 0)
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
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "no-cgroup")
    assert available_bytes() == 2048 * 1024
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("3000000\n")
    (cgroup / "memory.current").write_text("2000000\n")
    monkeypatch.setattr(memory, "CGROUP", cgroup)
    assert available_bytes() == 1_000_000  # a container's limit leaves less than the machine's
    (cgroup / "memory.max").write_text("max\n")
    assert available_bytes() == 2048 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert available_bytes() is None
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "absent")
    assert available_bytes() is None


def test_a_source_rewritten_while_the_node_reads_it_fails_the_node_and_caches_nothing(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_run = pipeline_module.Pipeline.run

    def run_then_rewrite(self: Any, *args: Any) -> None:
        original_run(self, *args)
        source = launch_dir / "models" / "b.safetensors"
        source.write_bytes(source.read_bytes())  # the same bytes, rewritten in place: a new mtime

    monkeypatch.setattr(pipeline_module.Pipeline, "run", run_then_rewrite)
    error = expect_error(lambda: run_recipe(lerp()))
    assert "source 'b' changed while node 'blend' read it" in error.what and "sources.b" in str(error.where)
    assert not list((launch_dir / "cache").glob("objects/*/*.safetensors"))
    assert not (launch_dir / "out" / "blend.safetensors").exists()
    monkeypatch.undo()
    assert run_recipe(lerp())["nodes"]["blend"]["status"] == "computed"


def test_unrelated_inputs_fail_before_the_hashing_pass(
    run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    save_file(tiny_state_dict(0), launch_dir / "a.safetensors")
    save_file(tiny_state_dict(1), launch_dir / "b.safetensors")
    passes: list[int] = []
    monkeypatch.setattr(executor_module, "hash_sources", lambda handles, watch: passes.append(len(handles)))
    recipe = {**lerp("a.safetensors", "b.safetensors"), "family": "error"}
    error = expect_error(lambda: run_recipe(recipe))
    assert "looks unrelated" in error.what and passes == []


def test_a_non_finite_input_fails_in_the_hashing_pass_under_nonfinite_error(
    run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file

    state = tiny_state_dict(0)
    broken = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in broken.items() if v.is_floating_point() and v.numel() > 2)
    broken[key].view(-1)[1] = torch.nan
    save_file(state, launch_dir / "a.safetensors")
    save_file(broken, launch_dir / "b.safetensors")
    monkeypatch.setattr(pipeline_module.Pipeline, "run", lambda *a: pytest.fail("the merge ran"))
    error = expect_error(lambda: run_recipe({**lerp("a.safetensors", "b.safetensors"), "nonfinite": "error"}))
    assert f"node 'blend': its input 'b': tensor '{key}' holds 1 non-finite values" in error.what


class SlowSource:
    """A SourceHandle's reading surface: many small chunks, the first read of `fail` raising."""

    def __init__(self, name: str, fail: bool) -> None:
        self.name, self.fail, self.reads = name, fail, 0
        self.content_hash: str | None = None

    def spec(self) -> dict[str, TensorSpec]:
        return {"w": TensorSpec("F32", (64 * 100,))}

    def sizes(self) -> dict[str, int]:
        return {"w": 4 * 64 * 100}

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        self.reads += 1
        if self.fail:
            raise KeyboardInterrupt
        return out[: stop - start]

    def finish_hash(self) -> str:
        self.content_hash = "done"
        return self.content_hash


def test_an_interrupt_stops_every_hashing_thread_within_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_hashing, "HASH_CHUNK_BYTES", 64)  # the tensor is not small ...
    monkeypatch.setattr(source_hashing, "HASH_READ_BYTES", 64)  # ... and read in 400 chunks
    interrupted, other = SlowSource("a", fail=True), SlowSource("b", fail=False)
    original = other.read_into

    def slow(*args: Any) -> memoryview:
        import time

        time.sleep(0.001)
        return original(*args)

    other.read_into = slow  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        source_hashing.hash_sources({0: interrupted, 1: other}, None)  # type: ignore[dict-item]
    assert other.reads < 400 and other.content_hash is None


class _Sized:
    """What hashing_threads asks of a source: its tensors' sizes."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self._sizes = sizes

    def sizes(self) -> dict[str, int]:
        return self._sizes


def test_small_tensors_hash_on_one_thread_and_large_ones_on_two() -> None:
    small = source_hashing.SMALL_TENSOR_BYTES
    many_small = {f"k{i}": 4 for i in range(1000)}
    few_large = {f"k{i}": 4 * small for i in range(10)}
    threads = source_hashing.hashing_threads
    assert threads({0: _Sized(many_small), 1: _Sized(many_small)}) == 1  # type: ignore[dict-item]
    assert threads({0: _Sized(few_large), 1: _Sized(few_large)}) == 2  # type: ignore[dict-item]
    assert threads({0: _Sized(few_large)}) == 1  # type: ignore[dict-item]
    mixed = {**many_small, "big": 2000 * small}  # a large embedding among small norms: the bytes decide
    assert threads({0: _Sized(mixed), 1: _Sized(mixed)}) == 2  # type: ignore[dict-item]
    assert threads({0: _Sized({}), 1: _Sized({})}) == 1  # type: ignore[dict-item]
