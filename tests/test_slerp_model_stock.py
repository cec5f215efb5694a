"""merger.ops.slerp and merger.ops.model_stock against plain torch (float32).

slerp (Shoemake 1985): per tensor, cos = <A/|A|, B/|B|>, theta = acos(cos),
result = sin((1-t) theta)/sin(theta) A + sin(t theta)/sin(theta) B; lerp where
|cos| > dot_threshold. model_stock (Jang et al. 2024): t = N cos / (1 + (N-1) cos)
with cos the mean pairwise cosine of the offsets from the base; result =
t * mean(models) + (1 - t) * base.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.ops.base import Op
from merger.ops.model_stock import ModelStock, ModelStockParams
from merger.ops.slerp import Slerp, SlerpParams
from tests.conftest import BACKENDS, RunRecipe, assert_states_close, fine_tune, load, pipeline_outputs, tiny_state_dict

StateDict = dict[str, torch.Tensor]
TOL = {"rtol": 1e-5, "atol": 1e-6}
INT_KEY = "bn.num_batches_tracked"


@pytest.fixture(params=sorted(BACKENDS))
def xp(request: pytest.FixtureRequest) -> Any:
    return BACKENDS[request.param]()


def run_pipeline(op: Op, params: Any, models: list[StateDict], backend: Any) -> StateDict:
    """The outputs of `op` computed by the real executor pipeline."""
    return pipeline_outputs(op, params, models, backend, tuple(f"m{i}" for i in range(len(models))))[1]


def _per_key(models: list[StateDict], fn: Any) -> StateDict:
    out: StateDict = {}
    for key, first in models[0].items():
        out[key] = fn(*(m[key] for m in models)) if first.is_floating_point() else first.clone()
    return out


# --- slerp ------------------------------------------------------------------------------------------


def g_slerp(a: torch.Tensor, b: torch.Tensor, t: float, threshold: float = 0.9995) -> torch.Tensor:
    ua = a / a.norm()
    ub = b / b.norm()
    cos = float((ua * ub).sum().clamp(-1.0, 1.0))
    if abs(cos) > threshold:
        return a * (1.0 - t) + b * t
    theta = math.acos(cos)
    return a * (math.sin((1.0 - t) * theta) / math.sin(theta)) + b * (math.sin(t * theta) / math.sin(theta))


def _pair() -> tuple[StateDict, StateDict]:
    base = tiny_state_dict(10)
    return fine_tune(base, 11, scale=0.8), fine_tune(base, 12, scale=0.8)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.9])
def test_slerp_direct(xp: Any, t: float) -> None:
    a, b = _pair()
    out = run_pipeline(Slerp(), SlerpParams(t=t), [a, b], xp)
    assert_states_close(out, _per_key([a, b], lambda x, y: g_slerp(x, y, t)), **TOL)


def test_slerp_is_not_lerp_for_angled_tensors(xp: Any) -> None:
    """Two orthogonal unit vectors: at t = 0.5 slerp stays on the circle, lerp cuts the chord."""
    a = {"w": torch.tensor([[1.0, 0.0]])}
    b = {"w": torch.tensor([[0.0, 1.0]])}
    out = run_pipeline(Slerp(), SlerpParams(t=0.5), [a, b], xp)["w"]
    half = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([[half, half]]))
    third = run_pipeline(Slerp(), SlerpParams(t=1 / 3), [a, b], xp)["w"]
    torch.testing.assert_close(third, torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]))


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints(xp: Any, t: float) -> None:
    a, b = _pair()
    out = run_pipeline(Slerp(), SlerpParams(t=t), [a, b], xp)
    target = a if t == 0.0 else b
    for key, value in target.items():
        if value.is_floating_point():
            torch.testing.assert_close(out[key], value, rtol=0, atol=1e-6)
    assert torch.equal(out[INT_KEY], a[INT_KEY])


def test_slerp_nearly_parallel_falls_back_to_lerp_exactly(xp: Any) -> None:
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(16, 16, generator=g), "v": torch.randn(50, generator=g)}
    b = {k: 1.0001 * v for k, v in a.items()}
    for t in (0.3, 0.75):
        out = run_pipeline(Slerp(), SlerpParams(t=t), [a, b], xp)
        for key in a:
            assert torch.equal(out[key], a[key] * (1.0 - t) + b[key] * t), key


def test_slerp_opposite_tensors_fall_back_to_lerp(xp: Any) -> None:
    a = {"w": torch.tensor([1.0, 2.0, -3.0])}
    b = {"w": -2.0 * a["w"]}
    out = run_pipeline(Slerp(), SlerpParams(t=0.25), [a, b], xp)["w"]
    assert torch.equal(out, a["w"] * 0.75 + b["w"] * 0.25)


def test_slerp_end_to_end(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    report = run_recipe(
        {
            "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
            "nodes": {"s": {"op": "slerp", "inputs": ["a", "b"], "t": 0.4}},
            "outputs": {"s": {}},
        }
    )
    out = load(Path(report["outputs"]["s"]["path"]))
    a, b = load(models["a"]), load(models["b"])
    assert_states_close(out, _per_key([a, b], lambda x, y: g_slerp(x, y, 0.4)), **TOL)
    assert report["nodes"]["s"]["op"] == "slerp"
    assert report["nodes"]["s"]["notes"]["merged"] == 7


# --- model_stock ------------------------------------------------------------------------------------


def g_stock_rows(base: torch.Tensor, fts: list[torch.Tensor], clamp: bool = False) -> torch.Tensor:
    """Model Stock over rows: `base` and `fts` are 2-D, one ratio per row."""
    offsets = [ft - base for ft in fts]
    pairs = list(combinations(range(len(fts)), 2))
    cos = torch.zeros(base.shape[0])
    for i, j in pairs:
        cos = cos + torch.nn.functional.cosine_similarity(offsets[i], offsets[j], dim=1, eps=1e-12)
    cos = cos / len(pairs)
    n = len(fts)
    t = n * cos / (1 + (n - 1) * cos)
    if clamp:
        t = t.clamp(0.0, 1.0)
    mean = torch.stack(fts).mean(dim=0)
    return t[:, None] * mean + (1 - t[:, None]) * base


def g_model_stock(base: torch.Tensor, *fts: torch.Tensor, filter_wise: bool = False, clamp: bool = False) -> Any:
    shape = base.shape
    rows = (-1, shape[-1]) if filter_wise and base.dim() > 1 else (1, -1)  # vectors along the last axis
    return g_stock_rows(base.reshape(rows), [ft.reshape(rows) for ft in fts], clamp).reshape(shape)


def _stock_family(n: int) -> list[StateDict]:
    base = tiny_state_dict(20)
    return [base, *(fine_tune(base, 30 + i, scale=0.3) for i in range(n))]


@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_direct(xp: Any, n: int) -> None:
    models = _stock_family(n)
    out = run_pipeline(ModelStock(), ModelStockParams(base="m0"), models, xp)
    assert_states_close(out, _per_key(models, g_model_stock), **TOL)


def test_model_stock_ratio_by_hand(xp: Any) -> None:
    """Offsets [1, 0] and [1, 1]: cos = 1/sqrt(2), t = 2 cos / (1 + cos)."""
    base = {"w": torch.tensor([[1.0, 2.0]])}
    models = [base, {"w": torch.tensor([[2.0, 2.0]])}, {"w": torch.tensor([[2.0, 3.0]])}]
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    mean = torch.tensor([[2.0, 2.5]])
    out = run_pipeline(ModelStock(), ModelStockParams(base="m0"), models, xp)["w"]
    torch.testing.assert_close(out, t * mean + (1 - t) * base["w"])


def test_model_stock_filter_wise_per_row(xp: Any) -> None:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 10, generator=g), "conv": torch.randn(4, 3, 3, 3, generator=g)}
    base["bias"] = torch.randn(10, generator=g)
    models = [base, fine_tune(base, 40, scale=0.5), fine_tune(base, 41, scale=0.5), fine_tune(base, 42, scale=0.5)]
    out = run_pipeline(ModelStock(), ModelStockParams(base="m0", filter_wise=True), models, xp)
    expected = _per_key(models, lambda *v: g_model_stock(*v, filter_wise=True))
    assert_states_close(out, expected, **TOL)
    # per row, not per tensor: the whole-tensor ratio gives another result
    whole = _per_key(models, g_model_stock)
    assert not torch.allclose(out["w"], whole["w"], rtol=1e-4, atol=1e-4)
    # each row of w on its own is the same as a 1-row model_stock of that row
    for row in range(6):
        alone = [{"w": m["w"][row : row + 1].clone()} for m in models]
        got = run_pipeline(ModelStock(), ModelStockParams(base="m0"), alone, xp)["w"]
        torch.testing.assert_close(out["w"][row : row + 1], got)
    # 1-D tensors are one vector either way
    torch.testing.assert_close(out["bias"], whole["bias"])


def test_model_stock_clamp_keeps_t_in_unit_interval(xp: Any) -> None:
    """Offsets [1, 0] and [-1, 1]: cos = -1/sqrt(2), so t = 2 cos / (1 + cos) is about -4.83."""
    base = {"w": torch.tensor([[1.0, 1.0]])}
    models = [base, {"w": torch.tensor([[2.0, 1.0]])}, {"w": torch.tensor([[0.0, 2.0]])}]
    cos = -1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert t < -4.8
    mean = torch.tensor([[1.0, 1.5]])
    free = run_pipeline(ModelStock(), ModelStockParams(base="m0"), models, xp)["w"]
    torch.testing.assert_close(free, t * mean + (1 - t) * base["w"])
    clamped = run_pipeline(ModelStock(), ModelStockParams(base="m0", clamp=True), models, xp)["w"]
    assert torch.equal(clamped, base["w"])  # t clamped to 0: the base


def test_model_stock_clamp_per_row(xp: Any) -> None:
    """filter_wise + clamp: a row with negative cosine becomes the base, a row with positive one is untouched."""
    base = {"w": torch.zeros(2, 2)}
    a = {"w": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    b = {"w": torch.tensor([[-1.0, 1.0], [1.0, 1.0]])}
    params = ModelStockParams(base="m0", filter_wise=True, clamp=True)
    out = run_pipeline(ModelStock(), params, [base, a, b], xp)["w"]
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert out[0].tolist() == [0.0, 0.0]
    torch.testing.assert_close(out[1], t * torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_end_to_end(models: dict[str, Path], launch_dir: Path, run_recipe: RunRecipe, n: int) -> None:
    base = load(models["base"])
    save_file(fine_tune(base, 77), launch_dir / "models" / "c.safetensors")
    names = ["a", "b", "c"][:n]
    report = run_recipe(
        {
            "sources": {name: f"models/{name}.safetensors" for name in ("base", "a", "b", "c")},
            "nodes": {"ms": {"op": "model_stock", "base": "base", "inputs": names}},
            "outputs": {"ms": {}},
        }
    )
    out = load(Path(report["outputs"]["ms"]["path"]))
    sds = [base, *(load(launch_dir / "models" / f"{name}.safetensors") for name in names)]
    assert_states_close(out, _per_key(sds, g_model_stock), **TOL)
    assert report["nodes"]["ms"]["op"] == "model_stock"
    assert report["nodes"]["ms"]["notes"]["merged"] == 7
