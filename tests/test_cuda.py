"""The CUDA path (torch backend on a GPU) gives the CPU path's results. Skipped without a GPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from merger.core.arrays import NumpyBackend, TorchBackend, select_backend
from merger.core.specs import TensorSpec
from merger.engine.pieces import PIECE_BYTES
from merger.engine.pipeline import Pipeline
from merger.ops.base import InputSpecs, Op
from merger.ops.elementwise import MergeParams
from merger.ops.linear import (
    AddDifference,
    AddDifferenceParams,
    Average,
    Lerp,
    LerpParams,
    WeightedSum,
    WeightedSumParams,
)
from merger.ops.model_stock import ModelStock, ModelStockParams
from merger.ops.slerp import Slerp, SlerpParams
from merger.ops.task_vectors import DareTies, DareTiesParams, TaskArithmetic, TaskArithmeticParams, Ties, TiesParams
from tests.conftest import BytesSource, Collector, keyed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(n: int, dtype: str) -> tuple[list[BytesSource], tuple[dict[str, TensorSpec], ...]]:
    rng = np.random.default_rng(0)
    shapes = {"big": (PIECE_BYTES // 4 + 17,), "matrix": (64, 33), "scalar": ()}
    xp = NumpyBackend()
    sources, specs = [], []
    for _ in range(n):
        tensors = {k: bytes(xp.store(rng.standard_normal(s, dtype=np.float32), dtype)) for k, s in shapes.items()}
        sources.append(BytesSource(tensors))
        specs.append({k: TensorSpec(dtype, s) for k, s in shapes.items()})
    return sources, tuple(specs)


def cpu_and_cuda(op: Op, params: Any, n: int, dtype: str) -> tuple[Any, dict[str, dict[str, bytes]]]:
    """The node spec, and the bytes the pipeline writes on numpy and on CUDA."""
    sources, specs = make_inputs(n, dtype)
    spec = op.spec(InputSpecs(tuple(f"m{i}" for i in range(n)), specs), params)
    results = {}
    for name, backend in (("cpu", NumpyBackend()), ("cuda", TorchBackend("cuda"))):
        collector = Collector()
        Pipeline(op, keyed(op, params, spec), list(sources), specs, backend).run(
            collector, spec, lambda key, nbytes: None
        )
        results[name] = collector.joined()
    return spec, results


CASES: list[tuple[Op, Any, int]] = [
    (Lerp(), LerpParams(alpha=0.3), 2),
    (WeightedSum(), WeightedSumParams(weights=[0.5, 0.3, 0.2], normalize=True), 3),
    (Average(), MergeParams(), 4),
    (AddDifference(), AddDifferenceParams(multiplier=0.7), 3),
]


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize(("op", "params", "n"), CASES, ids=[c[0].name for c in CASES])
def test_cuda_equals_cpu(op: Op, params: Any, n: int, dtype: str) -> None:
    spec, results = cpu_and_cuda(op, params, n, dtype)
    xp = NumpyBackend()
    for key, tensor in spec.tensors.items():
        cpu = xp.load(results["cpu"][key], tensor.dtype, tensor.shape).astype(np.float64)
        gpu = xp.load(results["cuda"][key], tensor.dtype, tensor.shape).astype(np.float64)
        scale = np.maximum(np.abs(cpu), 1e-30)
        assert float(np.max(np.abs(cpu - gpu) / scale, initial=0.0)) <= 1e-6, key


WHOLE_TENSOR_CASES: list[tuple[Op, Any, int]] = [
    (Slerp(), SlerpParams(t=0.3), 2),
    (TaskArithmetic(), TaskArithmeticParams(base="m0", weights=[0.6, 0.4]), 3),
    (Ties(), TiesParams(base="m0", weights=[1.0, 0.5], density=0.4), 3),
    (DareTies(), DareTiesParams(base="m0", weights=0.5, density=0.5, seed=3), 3),
    (ModelStock(), ModelStockParams(base="m0"), 4),
]


@pytest.mark.parametrize(("op", "params", "n"), WHOLE_TENSOR_CASES, ids=[c[0].name for c in WHOLE_TENSOR_CASES])
def test_cuda_equals_cpu_for_whole_tensor_methods(op: Op, params: Any, n: int) -> None:
    """Methods with reductions (norms, dot products, top-k): equal within 1e-6 of each tensor's scale."""
    spec, results = cpu_and_cuda(op, params, n, "F32")
    xp = NumpyBackend()
    for key, tensor in spec.tensors.items():
        cpu = xp.load(results["cpu"][key], tensor.dtype, tensor.shape).astype(np.float64)
        gpu = xp.load(results["cuda"][key], tensor.dtype, tensor.shape).astype(np.float64)
        scale = max(float(np.max(np.abs(cpu), initial=0.0)), 1e-30)
        assert float(np.max(np.abs(cpu - gpu), initial=0.0)) <= 1e-6 * scale, key


def test_auto_device_picks_cuda() -> None:
    backend = select_backend("auto", {"F32"})
    assert backend.name == "torch" and backend.device == "cuda"
