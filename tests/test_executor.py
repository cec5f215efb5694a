"""The executor, cache, placement and provenance, through `run_recipe` (prepare + run in-process)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

import merger
import merger.engine.placement
from merger.cli.job import prepare
from merger.engine.pipeline import COMPUTE_WORKERS
from merger.io.safetensors_file import SafetensorsReader, SafetensorsWriter
from merger.io.safetensors_header import read_header
from merger.ops import builtin_registry
from merger.ops.linear import Lerp
from merger.report.run_report import REPORT_NAME
from tests.conftest import RunRecipe, expect_error, load, tiny_state_dict

Models = dict[str, Path]


def lerp_recipe(
    alpha: Any = 0.25, *, a: str = "models/a.safetensors", b: str = "models/b.safetensors", **top: Any
) -> dict[str, Any]:
    return {
        "sources": {"a": a, "b": b},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": alpha}},
        "outputs": {"blend": {}},
        **top,
    }


def chain_recipe(alpha: float) -> dict[str, Any]:
    """average(a, b) -> lerp(avg, base)."""
    return {
        "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors", "base": "models/base.safetensors"},
        "nodes": {
            "avg": {"op": "average", "inputs": ["a", "b"]},
            "mix": {"op": "lerp", "inputs": ["avg", "base"], "alpha": alpha},
        },
        "outputs": {"mix": {}},
    }


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {name: node["status"] for name, node in report["nodes"].items()}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def cache_entries(cache: Path) -> list[Path]:
    return [p for p in files_under(cache / "objects") if p.suffix == ".safetensors"]


def expected_lerp(models: Models, alpha: float) -> dict[str, torch.Tensor]:
    a, b = load(models["a"]), load(models["b"])
    return {k: (1 - alpha) * v + alpha * b[k] if v.is_floating_point() else v for k, v in a.items()}


def assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        torch.testing.assert_close(actual[key], value, msg=key)


# --- compute, then cache --------------------------------------------------------------------------


def test_first_run_computes_second_is_cached_with_identical_output(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    first = run_recipe(lerp_recipe(0.25))
    out = launch_dir / "out" / "blend.safetensors"
    assert first["outputs"]["blend"]["path"] == str(out)
    assert statuses(first) == {"blend": "computed"}
    first_bytes = out.read_bytes()
    assert_state_close(load(out), expected_lerp(models, 0.25))

    second = run_recipe(lerp_recipe(0.25))
    assert statuses(second) == {"blend": "cached"}
    assert second["nodes"]["blend"]["key"] == first["nodes"]["blend"]["key"]
    assert out.read_bytes() == first_bytes
    assert second["outputs"]["blend"]["sha256"] == first["outputs"]["blend"]["sha256"] == sha256_of(out)
    assert len(cache_entries(launch_dir / "cache")) == 1


def test_full_cache_hit_reads_no_tensor_data(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = chain_recipe(0.5)
    data["outputs"].update({"half": {"node": "mix", "dtype": "float16"}, "pt": {"node": "avg", "path": "pt.pth"}})
    first = run_recipe(data)

    def no_reads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a full cache hit read tensor data: {args[1:2]}")

    monkeypatch.setattr(SafetensorsReader, "read_into", no_reads)  # every tensor read goes through it
    monkeypatch.setattr(torch, "load", no_reads)
    monkeypatch.setattr(
        merger.engine.placement, "_make_artifact", no_reads
    )  # dtype/format artifacts come from the cache
    again = run_recipe(data)
    assert statuses(again) == {"avg": "cached", "mix": "cached"}
    assert again["device"] is None  # nothing was computed, so no device was needed
    for name in ("mix", "half", "pt"):
        assert again["outputs"][name]["sha256"] == first["outputs"][name]["sha256"]


def test_cache_entry_deleted_by_hand_is_recomputed(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    """Deleting an entry's file (its small .json index record left behind) must not break the next run."""
    first = run_recipe(lerp_recipe(0.5))
    key = first["nodes"]["blend"]["key"]
    entry = launch_dir / "cache" / "objects" / key[:2] / f"{key}.safetensors"
    assert entry.with_name(entry.name + ".json").is_file()
    entry.unlink()

    again = run_recipe(lerp_recipe(0.5))
    assert again["nodes"]["blend"]["key"] == key
    assert again["outputs"]["blend"]["sha256"] == first["outputs"]["blend"]["sha256"]
    assert entry.is_file()


def test_changing_alpha_recomputes_only_the_changed_node(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    first = run_recipe(chain_recipe(0.3))
    assert statuses(first) == {"avg": "computed", "mix": "computed"}

    second = run_recipe(chain_recipe(0.7))
    assert statuses(second) == {"avg": "cached", "mix": "computed"}
    assert second["nodes"]["avg"]["key"] == first["nodes"]["avg"]["key"]
    assert second["nodes"]["mix"]["key"] != first["nodes"]["mix"]["key"]
    assert len(cache_entries(launch_dir / "cache")) == 3

    a, b, base = (load(models[n]) for n in ("a", "b", "base"))
    out = load(launch_dir / "out" / "mix.safetensors")
    for key, value in base.items():
        if value.is_floating_point():
            torch.testing.assert_close(out[key], 0.3 * (a[key] + b[key]) / 2 + 0.7 * value)
        else:
            assert torch.equal(out[key], a[key])  # non-float tensors come from the first input


def test_same_content_at_a_new_path_hits_the_cache_once_memoised(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    first = run_recipe(lerp_recipe(0.5))
    cache = launch_dir / "cache"
    entries = cache_entries(cache)

    copy = launch_dir / "models" / "copy_of_a.safetensors"
    shutil.copyfile(models["a"], copy)  # a new path with a fresh mtime: unknown to the memo
    rehashed = run_recipe(lerp_recipe(0.5, a="models/copy_of_a.safetensors"))
    assert rehashed["sources"]["a"]["path"] == str(copy)
    assert rehashed["sources"]["a"]["key"] == first["sources"]["a"]["key"]
    assert rehashed["nodes"]["blend"]["key"] == first["nodes"]["blend"]["key"]
    assert rehashed["outputs"]["blend"]["sha256"] == first["outputs"]["blend"]["sha256"]
    assert cache_entries(cache) == entries  # no second entry for the same content

    memoised = run_recipe(lerp_recipe(0.5, a="models/copy_of_a.safetensors"))
    assert statuses(memoised) == {"blend": "cached"}
    assert memoised["nodes"]["blend"]["key"] == first["nodes"]["blend"]["key"]


def test_touched_source_is_rehashed_to_the_same_key(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    first = run_recipe(lerp_recipe(0.5))
    stat = models["b"].stat()
    os.utime(models["b"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    touched = run_recipe(lerp_recipe(0.5))
    assert touched["sources"]["b"]["key"] == first["sources"]["b"]["key"]
    assert touched["nodes"]["blend"]["key"] == first["nodes"]["blend"]["key"]
    assert touched["outputs"]["blend"]["sha256"] == first["outputs"]["blend"]["sha256"]
    assert statuses(run_recipe(lerp_recipe(0.5))) == {"blend": "cached"}


def test_pth_and_safetensors_with_the_same_tensors_share_the_node_key(models: Models, run_recipe: RunRecipe) -> None:
    """models/b.pth wraps b's tensors in params_ema: the content hash ignores the file format."""
    from_safetensors = run_recipe(lerp_recipe(0.5))
    from_pth = run_recipe(lerp_recipe(0.5, b="models/b.pth"))
    assert from_pth["sources"]["b"]["key"] == from_safetensors["sources"]["b"]["key"]
    assert from_pth["nodes"]["blend"]["key"] == from_safetensors["nodes"]["blend"]["key"]
    assert statuses(run_recipe(lerp_recipe(0.5, b="models/b.pth"))) == {"blend": "cached"}


# --- node keys ------------------------------------------------------------------------------------


def test_node_keys_are_stable_and_follow_the_params(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    def key(data: dict[str, Any], cache: str = "cache") -> str:
        return str(run_recipe({**data, "cache_dir": str(launch_dir / cache)})["nodes"]["blend"]["key"])

    base = key(lerp_recipe(0.5))
    assert len(base) == 64
    assert set(base) <= set("0123456789abcdef")  # a hex digest
    assert key(lerp_recipe(0.5)) == base  # again, from the cache
    assert key(lerp_recipe(0.5), cache="fresh_cache") == base  # no memo, no cache: same key
    assert key(lerp_recipe(0.5, seed=123)) == base  # lerp is not random: the recipe seed is not in its key
    assert key(lerp_recipe(0.6)) != base
    intersection = lerp_recipe(0.5)
    intersection["nodes"]["blend"]["keys"] = "intersection"
    assert key(intersection) != base
    swapped = lerp_recipe(0.5, a="models/b.safetensors", b="models/a.safetensors")
    assert key(swapped) != base  # the inputs' order is part of the key


def test_int_and_float_alpha_give_one_key(models: Models, run_recipe: RunRecipe) -> None:
    as_int = run_recipe(lerp_recipe(1))
    as_float = run_recipe(lerp_recipe(1.0))
    assert as_float["nodes"]["blend"]["key"] == as_int["nodes"]["blend"]["key"]
    assert statuses(as_float) == {"blend": "cached"}


def test_identical_nodes_under_two_names_share_one_entry(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    data = lerp_recipe(0.5)
    data["nodes"]["twin"] = dict(data["nodes"]["blend"])
    data["outputs"]["twin"] = {}
    report = run_recipe(data)
    assert report["nodes"]["twin"]["key"] == report["nodes"]["blend"]["key"]
    assert statuses(report) == {"blend": "computed", "twin": "cached"}
    assert len(cache_entries(launch_dir / "cache")) == 1


# --- the report -----------------------------------------------------------------------------------


def test_report_contents(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    report = run_recipe(chain_recipe(0.5))
    out_dir = launch_dir / "out"

    assert set(report["sources"]) == {"a", "b", "base"}
    for name in ("a", "b", "base"):
        source = report["sources"][name]
        assert source["path"] == str(launch_dir / "models" / f"{name}.safetensors")
        assert isinstance(source["key"], str)
        assert len(source["key"]) == 64
    assert len({s["key"] for s in report["sources"].values()}) == 3

    assert list(report["nodes"]) == ["avg", "mix"]
    for name, op in (("avg", "average"), ("mix", "lerp")):
        node = report["nodes"][name]
        assert node["op"] == op
        assert len(node["key"]) == 64
        assert node["status"] == "computed"
        assert isinstance(node["seconds"], float)
        assert node["seconds"] >= 0
        entry = launch_dir / "cache" / "objects" / node["key"][:2] / f"{node['key']}.safetensors"
        assert node["bytes"] == entry.stat().st_size

    output = report["outputs"]["mix"]
    path = Path(output["path"])
    assert path == out_dir / "mix.safetensors"
    assert output["node"] == "mix"
    assert output["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert output["bytes"] == path.stat().st_size
    assert output["dtype"] == "keep"

    on_disk = json.loads((out_dir / REPORT_NAME).read_text())
    assert on_disk == json.loads(json.dumps(report))


# --- outputs --------------------------------------------------------------------------------------


def test_output_is_a_hard_link_of_the_cache_entry(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    report = run_recipe(lerp_recipe(0.5))
    key = report["nodes"]["blend"]["key"]
    entry = launch_dir / "cache" / "objects" / key[:2] / f"{key}.safetensors"
    out = Path(report["outputs"]["blend"]["path"])
    assert report["outputs"]["blend"]["placed"] == "linked"
    assert os.stat(out).st_ino == os.stat(entry).st_ino
    assert os.stat(out).st_nlink >= 2


def test_float16_output_casts_floats_and_keeps_ints(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    data = lerp_recipe(0.5)
    data["outputs"] = {"full": {"node": "blend"}, "half": {"node": "blend", "dtype": "float16"}}
    report = run_recipe(data)
    half_path = launch_dir / "out" / "half.safetensors"
    assert report["outputs"]["half"]["dtype"] == "float16"
    assert report["outputs"]["half"]["sha256"] == sha256_of(half_path)

    header = read_header(half_path)
    assert header.tensors["bn.num_batches_tracked"].dtype == "I64"
    assert {k: s.dtype for k, s in header.tensors.items() if k != "bn.num_batches_tracked"} == {
        k: "F16" for k in header.tensors if k != "bn.num_batches_tracked"
    }
    assert header.metadata["merger.key"] == report["nodes"]["blend"]["key"]
    assert header.metadata["merger.dtype"] == "float16"

    full, half = load(launch_dir / "out" / "full.safetensors"), load(half_path)
    assert torch.equal(half["bn.num_batches_tracked"], full["bn.num_batches_tracked"])
    for key, value in full.items():
        if value.is_floating_point():
            assert half[key].dtype == torch.float16
            torch.testing.assert_close(half[key], value.to(torch.float16))


def test_pth_output_is_a_bare_state_dict_with_json_provenance(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    data = lerp_recipe(0.5)
    data["outputs"] = {"st": {"node": "blend"}, "pt": {"node": "blend", "path": "pt.pth"}}
    report = run_recipe(data)
    pth = launch_dir / "out" / "pt.pth"
    assert report["outputs"]["pt"]["path"] == str(pth)
    assert report["outputs"]["pt"]["sha256"] == sha256_of(pth)

    state = torch.load(pth, weights_only=True)
    assert type(state) is dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert_state_close(state, load(launch_dir / "out" / "st.safetensors"))

    sidecar = json.loads(pth.with_suffix(".json").read_text())
    assert sidecar["key"] == report["nodes"]["blend"]["key"]
    assert set(sidecar["sources"]) == {"a", "b"}
    for name in ("a", "b"):
        assert sidecar["sources"][name]["hash"] == report["sources"][name]["key"]
        assert sidecar["sources"][name]["path"] == str(models[name].resolve())


def test_safetensors_output_carries_provenance_metadata(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    report = run_recipe(chain_recipe(0.4))
    metadata = read_header(launch_dir / "out" / "mix.safetensors").metadata

    assert metadata["merger.key"] == report["nodes"]["mix"]["key"]
    assert metadata["merger.version"] == merger.__version__

    recipe = yaml.safe_load(metadata["merger.recipe"])
    assert recipe["nodes"]["mix"]["op"] == "lerp"
    assert recipe["nodes"]["mix"]["alpha"] == 0.4
    assert recipe["nodes"]["mix"]["inputs"] == ["avg", "base"]
    assert recipe["nodes"]["avg"]["op"] == "average"  # the whole subgraph that made it
    assert recipe["nodes"]["avg"]["inputs"] == ["a", "b"]
    assert set(recipe["sources"]) == {"a", "b", "base"}

    sources = json.loads(metadata["merger.sources"])
    assert set(sources) == {"a", "b", "base"}
    for name in ("a", "b", "base"):
        assert sources[name]["hash"] == report["sources"][name]["key"]  # not a placeholder
        assert Path(sources[name]["path"]).is_absolute()
        assert sources[name]["path"] == str(models[name].resolve())


def test_upstream_entry_metadata_covers_only_its_own_subgraph(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    data = chain_recipe(0.4)
    data["outputs"]["avg"] = {}
    report = run_recipe(data)
    metadata = read_header(launch_dir / "out" / "avg.safetensors").metadata
    assert metadata["merger.key"] == report["nodes"]["avg"]["key"]
    assert set(yaml.safe_load(metadata["merger.recipe"])["nodes"]) == {"avg"}
    assert set(json.loads(metadata["merger.sources"])) == {"a", "b"}


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["combine", "writer"])
def test_interrupted_computation_leaves_nothing_behind(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    calls = {"n": 0}

    class Interrupted(RuntimeError):
        pass

    if where == "combine":
        original_combine = Lerp.combine

        def combine(self: Lerp, values: list[Any], params: Any, xp: Any) -> Any:
            calls["n"] += 1
            if calls["n"] > 1:
                raise Interrupted("interrupted mid-node")
            return original_combine(self, values, params, xp)

        monkeypatch.setattr(Lerp, "combine", combine)
        monkeypatch.setattr("merger.core.fused.FUSED", None)  # the array maths, not the fused loop
        monkeypatch.setattr("merger.engine.pieces.RUN_TENSORS", 1)  # a computation per tensor
    else:
        original_write = SafetensorsWriter._write  # where a tensor's chunk and a run of small ones go

        def write(self: SafetensorsWriter, data: memoryview) -> None:
            if self.bytes_written or self._pending:  # past the header
                calls["n"] += 1
                if calls["n"] > 1:
                    raise Interrupted("interrupted mid-node")
            original_write(self, data)

        monkeypatch.setattr(SafetensorsWriter, "_write", write)

    with pytest.raises(Interrupted):
        run_recipe(lerp_recipe(0.5))
    # the node stops at the failing piece; pieces already handed to the other compute thread finish
    assert 2 <= calls["n"] <= (1 + COMPUTE_WORKERS if where == "combine" else 2)
    cache = launch_dir / "cache"
    assert files_under(cache / "objects") == []
    assert files_under(cache / "tmp") == []
    assert not (launch_dir / "out" / "blend.safetensors").exists()
    assert not (launch_dir / "out" / REPORT_NAME).exists()

    monkeypatch.undo()
    report = run_recipe(lerp_recipe(0.5))
    assert statuses(report) == {"blend": "computed"}
    assert_state_close(load(launch_dir / "out" / "blend.safetensors"), expected_lerp(models, 0.5))
    assert files_under(cache / "tmp") == []


def _prepare(data: dict[str, Any], launch_dir: Path) -> Any:
    data = {"cache_dir": str(launch_dir / "cache"), "progress": False, **data}
    return prepare(data, builtin_registry(), file="test.yaml", launch_dir=launch_dir)


def test_shape_mismatch_fails_in_prepare_before_any_tensor_is_read(
    models: Models, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_file(tiny_state_dict(3, width=4), launch_dir / "models" / "narrow.safetensors")

    def no_reads(self: SafetensorsReader, key: str, *args: Any) -> Any:
        raise AssertionError(f"prepare read tensor {key!r}")

    monkeypatch.setattr(SafetensorsReader, "read_into", no_reads)  # every tensor read goes through it
    monkeypatch.setattr("os.preadv", lambda *args: pytest.fail("prepare read tensor data"))
    error = expect_error(lambda: _prepare(lerp_recipe(0.5, b="models/narrow.safetensors"), launch_dir))
    assert error.where is not None
    assert "nodes.blend" in error.where
    assert "test.yaml" in error.where
    assert "'conv_first.weight' is [8, 3, 3, 3] in 'a' but [4, 3, 3, 3] in 'b'" in error.what
    assert error.fix is not None
    assert "keys: intersection" in error.fix
    assert files_under(launch_dir / "cache" / "objects") == []


def test_wrong_number_of_inputs_fails_in_prepare(models: Models, launch_dir: Path) -> None:
    data = lerp_recipe(0.5)
    data["sources"]["c"] = "models/base.safetensors"
    data["nodes"]["blend"]["inputs"] = ["a", "b", "c"]
    error = expect_error(lambda: _prepare(data, launch_dir))
    assert error.what == "op 'lerp' takes exactly 2 inputs, node 'blend' gives 3"
    assert error.where == "test.yaml, nodes.blend"


def test_missing_source_fails_in_prepare_naming_the_source(models: Models, launch_dir: Path) -> None:
    error = expect_error(lambda: _prepare(lerp_recipe(0.5, b="models/missing.safetensors"), launch_dir))
    assert "model file not found" in error.what
    assert "missing.safetensors" in error.what
    assert error.where == "test.yaml, sources.b"
    assert error.fix is not None
    assert "path" in error.fix


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_alpha_is_a_user_error(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, alpha: float
) -> None:
    """`alpha: .nan` in YAML must give a MergerError naming the parameter, not a traceback."""
    error = expect_error(lambda: run_recipe(lerp_recipe(alpha)))
    assert "alpha" in error.render()
    assert not (launch_dir / "out" / "blend.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_user_error(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    error = expect_error(lambda: run_recipe(lerp_recipe(0.5, device="cuda")))
    assert "CUDA" in error.what
    assert "cuda" in error.what
    assert error.fix is not None
    assert error.fix.startswith("use device=auto or device=cpu")
    assert not (launch_dir / "out" / "blend.safetensors").exists()
    assert files_under(launch_dir / "cache" / "objects") == []


def test_device_cpu_runs(models: Models, run_recipe: RunRecipe) -> None:
    report = run_recipe(lerp_recipe(0.5, device="cpu"))
    assert report["device"] == "cpu (numpy)"
    assert statuses(report) == {"blend": "computed"}
