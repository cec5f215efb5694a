"""merger.ops.linear (on merger.ops.elementwise): golden checks against plain torch.

Each op is called directly, with a fake `TensorInputs`, and end to end through a
recipe run on the `models` fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.core.specs import TensorSpec
from merger.errors import MergerError
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
from tests.conftest import (
    BACKENDS,
    RunRecipe,
    assert_states_close,
    expect_error,
    fine_tune,
    load,
    pipeline_outputs,
    tiny_state_dict,
)

StateDict = dict[str, torch.Tensor]
INT_KEY = "bn.num_batches_tracked"


CURRENT: dict[str, Any] = {}


@pytest.fixture(autouse=True, params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Any:
    """Every direct op test runs on the numpy backend and on the torch one (as on CUDA)."""
    CURRENT["backend"] = BACKENDS[request.param]()
    return CURRENT["backend"]


def run_pipeline(op: Op, params: Any, models: list[StateDict], names: tuple[str, ...] | None = None) -> Any:
    """(NodeSpec, outputs) of `op` computed by the real executor pipeline on the current backend."""
    return pipeline_outputs(op, params, models, CURRENT["backend"], names)


def _family(n: int, *, dtype: torch.dtype = torch.float32) -> list[StateDict]:
    base = tiny_state_dict(100, dtype=dtype)
    models = [fine_tune(base, 200 + i, scale=0.3) for i in range(n)]
    for i, m in enumerate(models):  # distinct integer buffers: the output must take the first one's
        m[INT_KEY] = torch.tensor(7 + 10 * i, dtype=torch.int64)
    return models


def _apply(op: Op, params: Any, models: list[StateDict]) -> StateDict:
    """Run `op` over every key of the aligned models; checks the inputs are left untouched."""
    snapshot = [{k: v.clone() for k, v in m.items()} for m in models]
    spec, out = run_pipeline(op, params, models)
    for before, after in zip(snapshot, models, strict=True):
        for key, value in before.items():
            assert torch.equal(after[key], value), f"input tensor {key!r} was modified in place"
    for key, tensor_spec in spec.tensors.items():
        assert tuple(out[key].shape) == tensor_spec.shape, key
    return out


def _golden(models: list[StateDict], fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> StateDict:
    """The independent computation: float32 (or float64) maths, cast back to the first input's dtype."""
    out: StateDict = {}
    for key, first in models[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        work = torch.float64 if any(m[key].dtype == torch.float64 for m in models) else torch.float32
        out[key] = fn([m[key].to(work) for m in models]).to(first.dtype)
    return out


# --- lerp -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.3, 0.5, 1.0, 1.5, -0.5])
def test_lerp_direct(alpha: float) -> None:
    models = _family(2)
    out = _apply(Lerp(), LerpParams(alpha=alpha), models)
    expected = _golden(models, lambda v: (1 - alpha) * v[0] + alpha * v[1])
    assert_states_close(out, expected, ordered=True)
    assert out[INT_KEY].item() == 7


def test_lerp_endpoints_are_exact() -> None:
    a, b = _family(2)
    at0 = _apply(Lerp(), LerpParams(alpha=0.0), [a, b])
    at1 = _apply(Lerp(), LerpParams(alpha=1.0), [a, b])
    for key in a:
        assert torch.equal(at0[key], a[key]), key
        if a[key].is_floating_point():
            assert torch.equal(at1[key], b[key]), key


def test_lerp_check_warns_only_outside_unit_interval() -> None:
    op = Lerp()
    warnings = op.check(LerpParams(alpha=1.5), 2)
    assert len(warnings) == 1
    assert "outside [0, 1]" in warnings[0]
    assert "1.5" in warnings[0]
    assert op.check(LerpParams(alpha=-0.1), 2) != []
    assert op.check(LerpParams(alpha=0.3), 2) == []
    assert op.check(LerpParams(alpha=0.0), 2) == []
    assert op.check(LerpParams(alpha=1.0), 2) == []


@pytest.mark.parametrize("alpha", [0, 0.3, 1, 1.5])
def test_lerp_end_to_end(models: dict[str, Path], run_recipe: RunRecipe, alpha: float) -> None:
    report = run_recipe(
        {
            "sources": {"a": "models/a.safetensors", "b": {"path": "models/b.pth"}},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": alpha}},
            "outputs": {"blend": {"path": "blend.safetensors"}},
        }
    )
    out = load(Path(report["outputs"]["blend"]["path"]))
    a, b = load(models["a"]), load(models["b"])
    expected = _golden([a, b], lambda v: (1 - alpha) * v[0] + alpha * v[1])
    assert_states_close(dict(sorted(out.items())), dict(sorted(expected.items())), ordered=True)
    if alpha == 0:
        for key in a:
            assert torch.equal(out[key], a[key])
    outside = [w for w in report["warnings"] if "outside [0, 1]" in w]
    assert len(outside) == (1 if alpha == 1.5 else 0)
    assert report["nodes"]["blend"]["op"] == "lerp"
    assert report["nodes"]["blend"]["notes"]["merged"] == 7
    assert report["nodes"]["blend"]["notes"]["copied"] == 1


# --- weighted_sum -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [1.0, -2.0, 3.5], [2.0]])
def test_weighted_sum_direct(weights: list[float]) -> None:
    models = _family(len(weights))
    out = _apply(WeightedSum(), WeightedSumParams(weights=weights), models)
    expected = _golden(models, lambda v: sum((w * x for w, x in zip(weights, v, strict=True)), torch.zeros(())))
    assert_states_close(out, expected, ordered=True)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
def test_weighted_sum_normalize_direct(weights: list[float]) -> None:
    models = _family(3)
    total = sum(weights)
    out = _apply(WeightedSum(), WeightedSumParams(weights=weights, normalize=True), models)
    expected = _golden(models, lambda v: sum((w * x for w, x in zip(weights, v, strict=True)), torch.zeros(())) / total)
    assert_states_close(out, expected, ordered=True)


def test_weighted_sum_wrong_number_of_weights() -> None:
    error = expect_error(lambda: WeightedSum().check(WeightedSumParams(weights=[0.5, 0.5]), 3))
    assert "2 values" in error.what
    assert "3 inputs" in error.what
    assert error.fix is not None
    assert "one weight per input" in error.fix


def test_weighted_sum_normalize_zero_sum() -> None:
    op = WeightedSum()
    error = expect_error(lambda: op.check(WeightedSumParams(weights=[1.0, -1.0], normalize=True), 2))
    assert "sum to 0" in error.what
    # without normalize, the same weights are fine
    assert op.check(WeightedSumParams(weights=[1.0, -1.0]), 2) == []


def test_weighted_sum_non_finite_weights_in_check() -> None:
    params = WeightedSumParams.model_construct(weights=[1.0, float("nan")], normalize=False, keys="strict")
    error = expect_error(lambda: WeightedSum().check(params, 2))
    assert "finite" in error.what


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weighted_sum_non_finite_weights_end_to_end(models: dict[str, Path], run_recipe: RunRecipe, bad: float) -> None:
    error = expect_error(
        lambda: run_recipe(
            {
                "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
                "nodes": {"ws": {"op": "weighted_sum", "inputs": ["a", "b"], "weights": [1.0, bad]}},
                "outputs": {"ws": {}},
            }
        )
    )
    assert error.where is not None
    assert "nodes.ws" in error.where
    assert "weights" in error.where
    assert "finite" in error.what


def test_weighted_sum_end_to_end(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    weights = [0.5, 1.5, -1.0]
    report = run_recipe(
        {
            "sources": {"base": "models/base.safetensors", "a": "models/a.safetensors", "b": "models/b.safetensors"},
            "nodes": {
                "plain": {"op": "weighted_sum", "inputs": ["a", "b", "base"], "weights": weights},
                "norm": {"op": "weighted_sum", "inputs": ["a", "b", "base"], "weights": [1, 2, 1], "normalize": True},
            },
            "outputs": {"plain": {}, "norm": {}},
        }
    )
    sds = [load(models[n]) for n in ("a", "b", "base")]
    plain = load(Path(report["outputs"]["plain"]["path"]))
    norm = load(Path(report["outputs"]["norm"]["path"]))
    expected_plain = _golden(sds, lambda v: 0.5 * v[0] + 1.5 * v[1] - 1.0 * v[2])
    expected_norm = _golden(sds, lambda v: (v[0] + 2 * v[1] + v[2]) / 4)
    for key in sds[0]:
        torch.testing.assert_close(plain[key], expected_plain[key])
        torch.testing.assert_close(norm[key], expected_norm[key])


def test_weighted_sum_end_to_end_wrong_weight_count(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(
        lambda: run_recipe(
            {
                "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
                "nodes": {"ws": {"op": "weighted_sum", "inputs": ["a", "b"], "weights": [1.0, 2.0, 3.0]}},
                "outputs": {"ws": {}},
            }
        )
    )
    assert "3 values" in error.what
    assert "2 inputs" in error.what
    assert error.where is not None
    assert "nodes.ws" in error.where
    assert not (Path.cwd() / "out" / "ws.safetensors").exists()


def test_weighted_sum_end_to_end_normalize_zero_sum(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(
        lambda: run_recipe(
            {
                "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
                "nodes": {
                    "ws": {"op": "weighted_sum", "inputs": ["a", "b"], "weights": [0.5, -0.5], "normalize": True}
                },
                "outputs": {"ws": {}},
            }
        )
    )
    assert "sum to 0" in error.what


# --- average ----------------------------------------------------------------------------------------


def test_average_direct_three_inputs() -> None:
    models = _family(3)
    out = _apply(Average(), MergeParams(), models)
    expected = _golden(models, lambda v: torch.stack(v).mean(dim=0))
    assert_states_close(out, expected, ordered=True)
    assert out[INT_KEY].item() == 7


def test_average_direct_single_input_is_identity() -> None:
    (m,) = _family(1)
    out = _apply(Average(), MergeParams(), [m])
    for key, value in m.items():
        assert torch.equal(out[key], value)


def test_average_end_to_end_list_and_glob(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    report = run_recipe(
        {
            "sources": {
                "base": "models/base.safetensors",
                "a": "models/a.safetensors",
                "b": "models/b.safetensors",
                "zoo": {"glob": "models/*.safetensors"},
            },
            "nodes": {
                "listed": {"op": "average", "inputs": ["base", "a", "b"]},
                "globbed": {"op": "average", "inputs": ["zoo"]},
            },
            "outputs": {"listed": {}, "globbed": {}},
        }
    )
    sds = [load(models[n]) for n in ("base", "a", "b")]
    expected = _golden(sds, lambda v: torch.stack(v).mean(dim=0))
    listed = load(Path(report["outputs"]["listed"]["path"]))
    globbed = load(Path(report["outputs"]["globbed"]["path"]))
    for key, value in expected.items():
        torch.testing.assert_close(listed[key], value)
        torch.testing.assert_close(globbed[key], value)
        assert listed[key].dtype == value.dtype
    assert set(report["sources"]) >= {"zoo[0]", "zoo[1]", "zoo[2]"}


# --- add_difference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("multiplier", [1.0, 0.5, -2.0, 0.0])
def test_add_difference_direct(multiplier: float) -> None:
    models = _family(3)
    out = _apply(AddDifference(), AddDifferenceParams(multiplier=multiplier), models)
    expected = _golden(models, lambda v: v[0] + multiplier * (v[1] - v[2]))
    assert_states_close(out, expected, ordered=True)


def test_add_difference_default_multiplier_is_one() -> None:
    assert AddDifferenceParams().multiplier == 1.0


def test_add_difference_end_to_end(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    report = run_recipe(
        {
            "sources": {"base": "models/base.safetensors", "a": "models/a.safetensors", "b": "models/b.safetensors"},
            "nodes": {"graft": {"op": "add_difference", "inputs": ["a", "b", "base"], "multiplier": 0.7}},
            "outputs": {"graft": {}},
        }
    )
    a, b, base = (load(models[n]) for n in ("a", "b", "base"))
    out = load(Path(report["outputs"]["graft"]["path"]))
    expected = _golden([a, b, base], lambda v: v[0] + 0.7 * (v[1] - v[2]))
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value)


# --- dtypes -----------------------------------------------------------------------------------------


LINEAR_CASES: list[tuple[Op, Any, int, Callable[[list[torch.Tensor]], torch.Tensor]]] = [
    (Lerp(), LerpParams(alpha=0.3), 2, lambda v: 0.7 * v[0] + 0.3 * v[1]),
    (WeightedSum(), WeightedSumParams(weights=[0.2, 0.5, 0.3]), 3, lambda v: 0.2 * v[0] + 0.5 * v[1] + 0.3 * v[2]),
    (Average(), MergeParams(), 3, lambda v: (v[0] + v[1] + v[2]) / 3),
    (AddDifference(), AddDifferenceParams(multiplier=0.5), 3, lambda v: v[0] + 0.5 * (v[1] - v[2])),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(LINEAR_CASES)), ids=[c[0].name for c in LINEAR_CASES])
def test_half_inputs_computed_in_float32(dtype: torch.dtype, case: int) -> None:
    op, params, n, fn = LINEAR_CASES[case]
    models = _family(n, dtype=dtype)
    out = _apply(op, params, models)
    expected = _golden(models, fn)  # float32 maths, cast back
    # at most one unit in the last place of the storage dtype away from the float32 result
    eps = torch.finfo(dtype).eps
    for key, value in expected.items():
        assert out[key].dtype == models[0][key].dtype, key
        if value.is_floating_point():
            torch.testing.assert_close(out[key].float(), value.float(), rtol=eps, atol=1e-6)
        else:
            assert torch.equal(out[key], value)


def test_float16_average_does_not_overflow() -> None:
    # 60000 + 60000 overflows float16 (max 65504); in float32 the mean is exactly 60000
    big = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    out = _apply(Average(), MergeParams(), [big, {"w": big["w"].clone()}])
    assert out["w"].dtype == torch.float16
    assert torch.isfinite(out["w"]).all()
    assert torch.equal(out["w"], big["w"])


def test_bfloat16_weighted_sum_keeps_small_terms() -> None:
    # in bfloat16, 256 + 1 rounds to 256, so 256 + 1 - 256 would be 0; in float32 it is 1
    models = [
        {"w": torch.full((3,), 256.0, dtype=torch.bfloat16)},
        {"w": torch.full((3,), 1.0, dtype=torch.bfloat16)},
        {"w": torch.full((3,), 256.0, dtype=torch.bfloat16)},
    ]
    out = _apply(WeightedSum(), WeightedSumParams(weights=[1.0, 1.0, -1.0]), models)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.ones(3, dtype=torch.bfloat16))


def test_bfloat16_add_difference_keeps_small_difference() -> None:
    a = {"w": torch.full((2,), 1.0, dtype=torch.bfloat16)}
    b = {"w": torch.full((2,), 256.0, dtype=torch.bfloat16)}
    c = {"w": torch.full((2,), 254.0, dtype=torch.bfloat16)}
    out = _apply(AddDifference(), AddDifferenceParams(multiplier=1.0), [a, b, c])
    assert torch.equal(out["w"], torch.full((2,), 3.0, dtype=torch.bfloat16))


def test_output_dtype_is_first_inputs_dtype() -> None:
    a = tiny_state_dict(1, dtype=torch.float16)
    b = tiny_state_dict(2, dtype=torch.float32)
    out = _apply(Lerp(), LerpParams(alpha=0.5), [a, b])
    expected = _golden([a, b], lambda v: 0.5 * v[0] + 0.5 * v[1])
    assert_states_close(out, expected, rtol=1e-3, atol=1e-3, ordered=True)
    assert out["conv_first.weight"].dtype == torch.float16
    out2 = _apply(Lerp(), LerpParams(alpha=0.5), [b, a])
    assert out2["conv_first.weight"].dtype == torch.float32
    torch.testing.assert_close(
        out2["conv_first.weight"], 0.5 * b["conv_first.weight"] + 0.5 * a["conv_first.weight"].float()
    )


def test_float64_input_computed_in_float64() -> None:
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    b = {"w": torch.tensor([1.0 + 1e-12, 2.0], dtype=torch.float64)}
    out = _apply(Lerp(), LerpParams(alpha=0.5), [a, b])
    assert out["w"].dtype == torch.float64
    assert out["w"][0].item() == pytest.approx(1.0 + 0.5e-12, abs=1e-15)


def test_integer_tensor_copied_from_first_input() -> None:
    models = _family(3)
    assert [m[INT_KEY].item() for m in models] == [7, 17, 27]
    for op, params, n, _ in LINEAR_CASES:
        out = _apply(op, params, models[:n])
        assert out[INT_KEY].dtype == torch.int64, op.name
        assert out[INT_KEY].item() == 7, op.name


def test_integer_tensor_copied_end_to_end(launch_dir: Path, run_recipe: RunRecipe) -> None:
    base = tiny_state_dict(0)
    a, b = fine_tune(base, 1), fine_tune(base, 2)
    a[INT_KEY] = torch.tensor(11, dtype=torch.int64)
    b[INT_KEY] = torch.tensor(99, dtype=torch.int64)
    save_file(a, launch_dir / "a.safetensors")
    save_file(b, launch_dir / "b.safetensors")
    report = run_recipe(
        {
            "sources": {"a": "a.safetensors", "b": "b.safetensors"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.9}},
            "outputs": {"blend": {}},
        }
    )
    out = load(Path(report["outputs"]["blend"]["path"]))
    assert out[INT_KEY].dtype == torch.int64
    assert out[INT_KEY].item() == 11
    assert report["nodes"]["blend"]["notes"]["copied_keys"] == [INT_KEY]


def test_half_precision_end_to_end(launch_dir: Path, run_recipe: RunRecipe) -> None:
    a = tiny_state_dict(3, dtype=torch.bfloat16)
    b = fine_tune(a, 4, scale=0.5)
    save_file(a, launch_dir / "a.safetensors")
    save_file(b, launch_dir / "b.safetensors")
    report = run_recipe(
        {
            "sources": {"a": "a.safetensors", "b": "b.safetensors"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.35}},
            "outputs": {"blend": {}},
        }
    )
    out = load(Path(report["outputs"]["blend"]["path"]))
    expected = _golden([a, b], lambda v: 0.65 * v[0] + 0.35 * v[1])
    eps = torch.finfo(torch.bfloat16).eps
    for key, value in expected.items():
        assert out[key].dtype == value.dtype, key
        torch.testing.assert_close(out[key].float(), value.float(), rtol=eps, atol=1e-6)


# --- key policies -----------------------------------------------------------------------------------


def _specs(**shapes: tuple[int, ...]) -> dict[str, TensorSpec]:
    return {k.replace("__", "."): TensorSpec("F32", s) for k, s in shapes.items()}


def test_strict_mismatch_lists_differences_with_both_shapes() -> None:
    first = _specs(w=(4, 3), b=(4,), only_first=(2,))
    second = _specs(w=(4, 5), b=(4,), only_second=(3,))
    error = expect_error(lambda: Lerp().spec(InputSpecs(("psnr", "gan"), (first, second)), LerpParams(alpha=0.5)))
    assert "3 differences" in error.what
    assert "'w' is [4, 3] in 'psnr' but [4, 5] in 'gan'" in error.what
    assert "'only_first'" in error.what
    assert "'only_second'" in error.what
    assert error.fix is not None
    assert "keys: intersection" in error.fix


def test_strict_mismatch_lists_at_most_ten() -> None:
    first = {f"layer{i:02d}.weight": TensorSpec("F32", (i + 1, 2)) for i in range(13)}
    second = {f"layer{i:02d}.weight": TensorSpec("F32", (i + 1, 3)) for i in range(13)}
    error = expect_error(lambda: Average().spec(InputSpecs(("x", "y"), (first, second)), MergeParams()))
    assert "13 differences" in error.what
    listed = [line for line in error.what.splitlines() if "layer" in line]
    assert len(listed) == 10
    assert "[1, 2] in 'x' but [1, 3] in 'y'" in listed[0]
    assert "and 3 more" in error.what
    assert "layer12" not in error.what


def test_strict_mismatch_exactly_ten_has_no_more_line() -> None:
    first = {f"k{i}": TensorSpec("F32", (1,)) for i in range(10)}
    second = {f"k{i}": TensorSpec("F32", (2,)) for i in range(10)}
    error = expect_error(lambda: Average().spec(InputSpecs(("x", "y"), (first, second)), MergeParams()))
    assert "10 differences" in error.what
    assert "more" not in error.what


def test_strict_mismatch_end_to_end(launch_dir: Path, run_recipe: RunRecipe) -> None:
    a = tiny_state_dict(0)
    b = tiny_state_dict(1, width=4)
    save_file(a, launch_dir / "a.safetensors")
    save_file(b, launch_dir / "b.safetensors")
    error = expect_error(
        lambda: run_recipe(
            {
                "sources": {"a": "a.safetensors", "b": "b.safetensors"},
                "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
                "outputs": {"blend": {}},
            }
        )
    )
    assert "'conv_first.weight' is [8, 3, 3, 3] in 'a' but [4, 3, 3, 3] in 'b'" in error.what
    assert error.where is not None
    assert "nodes.blend" in error.where


def _intersection_pair() -> tuple[StateDict, StateDict]:
    a = fine_tune(tiny_state_dict(0), 1)
    c = fine_tune(tiny_state_dict(0), 3)
    c["conv_last.bias"] = torch.zeros(5)  # another shape
    del c["body.0.bias"]  # missing from the second input
    c["extra.weight"] = torch.ones(2)  # only in the second input
    return a, c


def test_intersection_direct() -> None:
    a, c = _intersection_pair()
    snapshot = {k: v.clone() for k, v in c.items()}
    params = LerpParams(alpha=0.25, keys="intersection")
    spec, out = run_pipeline(Lerp(), params, [a, c], ("a", "c"))
    assert list(spec.tensors) == list(a)
    assert spec.notes["merged"] == 5
    assert spec.notes["copied"] == 3
    assert sorted(spec.notes["copied_keys"]) == sorted(["body.0.bias", "conv_last.bias", INT_KEY])
    for key in spec.tensors:
        got = out[key]
        if key in spec.notes["copied_keys"]:
            assert torch.equal(got, a[key]), key
        else:
            torch.testing.assert_close(got, 0.75 * a[key] + 0.25 * c[key])
    assert all(torch.equal(c[k], v) for k, v in snapshot.items())


def test_intersection_end_to_end(launch_dir: Path, run_recipe: RunRecipe) -> None:
    a, c = _intersection_pair()
    save_file(a, launch_dir / "a.safetensors")
    save_file(c, launch_dir / "c.safetensors")
    report = run_recipe(
        {
            "sources": {"a": "a.safetensors", "c": "c.safetensors"},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "c"], "alpha": 0.6, "keys": "intersection"}},
            "outputs": {"blend": {}},
        }
    )
    keys = report["nodes"]["blend"]["notes"]
    assert keys["merged"] == 5
    assert keys["copied"] == 3
    out = load(Path(report["outputs"]["blend"]["path"]))
    assert set(out) == set(a)
    for key in ("body.0.bias", "conv_last.bias", INT_KEY):
        assert torch.equal(out[key], a[key]), key
    for key in ("conv_first.weight", "conv_first.bias", "body.0.weight", "bn.running_mean", "conv_last.weight"):
        torch.testing.assert_close(out[key], 0.4 * a[key] + 0.6 * c[key])


def test_unknown_key_policy_rejected(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(
        lambda: run_recipe(
            {
                "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
                "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5, "keys": "union"}},
                "outputs": {"blend": {}},
            }
        )
    )
    assert "union" in error.what
    assert isinstance(error, MergerError)
