"""Shared fixtures: tiny seeded models written to disk, and ways to run merger.

Models are built here (random init with a fixed seed), never downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.cli.job import prepare, run
from merger.core.arrays import NumpyBackend, TorchBackend
from merger.core.specs import TensorSpec
from merger.errors import MergerError
from merger.ops import builtin_registry
from merger.ops.base import InputSpecs, NodeSpec, Op
from merger.report.run_report import RunContext

REPO = Path(__file__).resolve().parents[1]

StateDict = dict[str, torch.Tensor]


def tiny_state_dict(seed: int, *, width: int = 8, dtype: torch.dtype = torch.float32) -> StateDict:
    """A small conv-net-like state dict (with an integer buffer, as BatchNorm has)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv_first.weight": torch.randn(width, 3, 3, 3, generator=g).to(dtype),
        "conv_first.bias": torch.randn(width, generator=g).to(dtype),
        "body.0.weight": torch.randn(width, width, 3, 3, generator=g).to(dtype),
        "body.0.bias": torch.randn(width, generator=g).to(dtype),
        "bn.running_mean": torch.randn(width, generator=g).to(dtype),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "conv_last.weight": torch.randn(3, width, 3, 3, generator=g).to(dtype),
        "conv_last.bias": torch.randn(3, generator=g).to(dtype),
    }


def fine_tune(parent: StateDict, seed: int, scale: float = 0.05) -> StateDict:
    """A 'fine-tuned' relative of `parent`: the parent plus small seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
        for k, v in parent.items()
    }


@pytest.fixture
def launch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory to run merger in (the current directory for the test)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MERGER_CACHE_DIR", raising=False)
    return tmp_path


@pytest.fixture
def models(launch_dir: Path) -> dict[str, Path]:
    """A same-family trio (base, a, b) as safetensors, and b also as a wrapped .pth, under models/."""
    folder = launch_dir / "models"
    folder.mkdir()
    base = tiny_state_dict(0)
    family = {"base": base, "a": fine_tune(base, 1), "b": fine_tune(base, 2)}
    paths = {}
    for name, sd in family.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file(sd, paths[name])
    paths["b_pth"] = folder / "b.pth"
    torch.save({"params_ema": family["b"], "iter": 1000}, paths["b_pth"])
    return paths


class BytesSource:
    """A pipeline `ByteSource` over in-memory tensor bytes (as a file would serve them),
    recording each read; `fail_on` names a key whose read raises."""

    def __init__(self, tensors: dict[str, bytes], fail_on: str | None = None) -> None:
        self.tensors = tensors
        self.fail_on = fail_on
        self.reads: list[tuple[str, int, int]] = []

    @classmethod
    def of(cls, model: StateDict) -> BytesSource:
        from merger.core.tensor_bytes import tensor_memoryview

        return cls({k: bytes(tensor_memoryview(v.contiguous())) for k, v in model.items()})

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        if key == self.fail_on:
            raise OSError(f"disk error reading {key}")
        self.reads.append((key, start, stop))
        view = out[: stop - start]
        view[:] = self.tensors[key][start:stop]
        return view


class Collector:
    """A pipeline `ChunkWriter` that keeps what is written; fails after `fail_after` chunks."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.chunks: list[tuple[str, bytes]] = []
        self.fail_after = fail_after

    def write_chunk(self, key: str, data: memoryview) -> None:
        if self.fail_after is not None and len(self.chunks) >= self.fail_after:
            raise OSError("disk full")
        self.chunks.append((key, bytes(data)))

    def joined(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key, data in self.chunks:
            out[key] = out.get(key, b"") + data
        return out


def read_tensor(reader: Any, key: str) -> torch.Tensor:
    """One whole tensor of a SafetensorsReader, as torch (tests compare what files hold)."""
    from merger.core.tensor_bytes import tensor_from_buffer

    spec = reader.header.tensors[key]
    buffer = bytearray(spec.nbytes)
    reader.read_into(key, 0, spec.nbytes, memoryview(buffer))
    return tensor_from_buffer(buffer, spec.dtype, spec.shape)


def write_tensor(writer: Any, key: str, tensor: torch.Tensor | bytes) -> None:
    """A whole tensor (or its raw bytes) into a SafetensorsWriter, through its one way in: write_chunk."""
    from merger.core.tensor_bytes import tensor_memoryview

    data = tensor if isinstance(tensor, bytes) else tensor_memoryview(tensor.contiguous())
    if not isinstance(tensor, bytes):
        planned, got = writer.specs.get(key), spec_of({key: tensor})[key]
        if planned is not None and planned != got:
            raise RuntimeError(f"tensor {key!r} is {got.describe()}, planned {planned.describe()}")
    writer.write_chunk(key, data)


def spec_of(model: StateDict) -> dict[str, TensorSpec]:
    from merger.core.tensor_bytes import dtype_code

    return {k: TensorSpec(dtype_code(t.dtype), tuple(t.shape)) for k, t in model.items()}


def keyed(op: Op, params: Any, spec: NodeSpec) -> Any:
    """The parameters as the pipeline gets them: schedules resolved key by key, as the planner does."""
    from merger.recipe.schedule import KeyedParams

    return KeyedParams(params, op.resolved_model, list(spec.tensors), "test.yaml, nodes.test")


def pipeline_outputs(
    op: Op, params: Any, models: list[StateDict], backend: Any, names: tuple[str, ...] | None = None
) -> tuple[NodeSpec, StateDict]:
    """(NodeSpec, outputs) of `op` on in-memory models, computed by the real executor pipeline."""
    from merger.core.tensor_bytes import tensor_from_buffer
    from merger.engine.pipeline import Pipeline

    specs = tuple(spec_of(m) for m in models)
    spec = op.spec(InputSpecs(names or tuple(f"m{i}" for i in range(len(models))), specs), params)
    collector = Collector()
    Pipeline(op, keyed(op, params, spec), [BytesSource.of(m) for m in models], specs, backend).run(
        collector, spec, lambda key, nbytes: None
    )
    joined = collector.joined()
    out = {k: tensor_from_buffer(bytearray(joined[k]), t.dtype, t.shape) for k, t in spec.tensors.items()}
    return spec, out


#: the array backends a pipeline can compute on here (torch on the CPU stands in for CUDA)
BACKENDS: dict[str, Callable[[], Any]] = {"numpy": NumpyBackend, "torch": lambda: TorchBackend("cpu")}


def assert_states_close(got: StateDict, expected: StateDict, *, ordered: bool = False, **tol: float) -> None:
    """Same keys (in order, if `ordered`), same dtypes, float tensors close, others equal."""
    assert (list(got) == list(expected)) if ordered else (sorted(got) == sorted(expected))
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        if value.is_floating_point():
            torch.testing.assert_close(got[key], value, **tol, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(got[key], value), key


def load(path: Path) -> StateDict:
    from safetensors.torch import load_file

    return load_file(path)


RunRecipe = Callable[..., dict[str, Any]]


@pytest.fixture
def run_recipe(launch_dir: Path) -> RunRecipe:
    """Run recipe data in-process (no Hydra): returns the run report.

    Output lands in <launch_dir>/out, the cache in <launch_dir>/cache unless the data says otherwise.
    """

    def _run(data: dict[str, Any], *, output_dir: Path | None = None) -> dict[str, Any]:
        data = {"cache_dir": str(launch_dir / "cache"), "progress": False, **data}
        prepared = prepare(data, builtin_registry(), file="test.yaml", launch_dir=launch_dir)
        context = RunContext(
            recipe_name="test",
            recipe_file=None,
            git=None,
            overrides=(),
            launch_dir=launch_dir,
            output_dir=output_dir or launch_dir / "out",
        )
        return run(prepared, context)

    return _run


def expect_error(fn: Callable[[], Any]) -> MergerError:
    with pytest.raises(MergerError) as info:
        fn()
    return info.value


def run_cli(
    args: list[str], cwd: Path, *, command: str = "merger", env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a console script of this environment in a subprocess, as a user would."""
    executable = Path(sys.executable).parent / command
    full_env = {k: v for k, v in os.environ.items() if k != "MERGER_CACHE_DIR"}
    full_env.update(env or {})
    return subprocess.run(
        [str(executable), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_script_json(script: str, cwd: Path, *args: str) -> dict[str, Any]:
    """Run `python -c script *args` in a subprocess (a script that drives merger in its own process and
    prints a JSON object last, with its exit `status`): that object, the run having succeeded."""
    import json

    done = run_cli(["-c", script, *args], cwd, command=Path(sys.executable).name)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == 0, done.stderr
    return result


PROCESS_NAMES = frozenset({"run_cli", "subprocess", "Popen", "Process"})


def _names(code: Any) -> set[str]:
    """Every global or attribute name a code object (and the functions inside it) uses."""
    found = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            found |= _names(const)
    return found


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start processes are `slow` (pytest -m "not slow" leaves them out), found from their code."""
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and _names(function.__code__) & PROCESS_NAMES:
            item.add_marker(pytest.mark.slow)
