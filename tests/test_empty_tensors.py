"""Tensors with a zero-length dimension go through every merge op, on every backend."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from merger.ops import builtin_registry
from tests.conftest import BACKENDS, pipeline_outputs

CASES: dict[str, dict[str, Any]] = {
    "lerp": {"alpha": 0.5},
    "weighted_sum": {"weights": [1.0, 2.0, 3.0]},
    "average": {},
    "add_difference": {},
    "slerp": {"t": 0.3},
    "task_arithmetic": {"base": "m0"},
    "ties": {"base": "m0", "density": 0.5},
    "dare_linear": {"base": "m0", "density": 0.5, "seed": 1},
    "dare_ties": {"base": "m0", "density": 0.5, "seed": 1},
    "model_stock": {"base": "m0"},
    "splice": {"p": 0.5, "seed": 1},
}
TWO_INPUTS = {"lerp", "slerp", "splice"}


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 4, generator=g),
        "rows": torch.zeros(0, 4),
        "cols": torch.zeros(4, 0),
        "flat": torch.zeros(0),
        "half": torch.zeros(3, 0, dtype=torch.float16),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_zero_length_dimensions(name: str, backend: str) -> None:
    op = builtin_registry().get(name)
    params = op.params_model.model_validate(CASES[name])
    models = [model(i) for i in range(2 if name in TWO_INPUTS else 3)]
    _, out = pipeline_outputs(op, params, models, BACKENDS[backend]())
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in models[0].items()}
    assert out["half"].dtype == torch.float16
    assert torch.isfinite(out["w"]).all()
