"""The fused linear loop (merger.core.fused, merger/core/_fused.c) against each linear op's numpy
`combine`, byte for byte: every input and output dtype, mixed inputs, NaN, infinities, subnormals,
signed zeros, float16 overflow, lengths around the loop's 8-wide steps and 1024-element blocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from merger.core import fused
from merger.core.arrays import NumpyBackend, f32_to_bf16
from merger.core.fused import LinearForm
from merger.core.nonfinite import count_nonfinite
from merger.ops.linear import (
    AddDifference,
    AddDifferenceParams,
    Average,
    Lerp,
    LerpParams,
    WeightedSum,
    WeightedSumParams,
)
from merger.ops.params import OpParams

pytestmark = pytest.mark.skipif(fused.FUSED is None, reason="the fused loop was not built (no C compiler)")

SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -3e-39, 6e-8, 65504.0, 7e4, -1e5], np.float32)


def raw(values: np.ndarray, code: str) -> bytes:
    if code == "F16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).tobytes()
    if code == "BF16":
        return f32_to_bf16(values).tobytes()
    return values.astype(np.float32).tobytes()


def inputs(seed: int, n: int, codes: tuple[str, ...]) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for code in codes:
        values = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 300.0], n)).astype(np.float32)
        if n:
            where = rng.integers(0, n, max(1, n // 50))
            values[where] = rng.choice(SPECIALS, where.size)
        out.append((raw(values, code), code))
    return out


def numpy_combine(op: Any, params: OpParams, data: list[tuple[bytes, str]], out_code: str, n: int) -> bytes:
    xp = NumpyBackend()
    values = [xp.load(d, code, (n,)) for d, code in data]
    with np.errstate(all="ignore"):
        return bytes(xp.store(op.combine(values, params, xp), out_code))


def fused_combine(op: Any, params: OpParams, data: list[tuple[bytes, str]], out_code: str, n: int) -> bytes:
    form = op.linear_form(params, len(data))
    assert isinstance(form, LinearForm)
    got = NumpyBackend().combine_linear(data, form, out_code, n, nonfinite=True)
    assert got is not None
    out, counts = got
    assert counts == [count_nonfinite(raw, code) for raw, code in data]  # counted in the same pass
    return bytes(out)


CASES = [
    (Lerp(), LerpParams(alpha=0.3), 2),
    (Lerp(), LerpParams(alpha=1.7), 2),
    (WeightedSum(), WeightedSumParams(weights=[0.1, 1 / 3, -2.5]), 3),
    (WeightedSum(), WeightedSumParams(weights=[0.25, 0.7, 1e-8, 3.0], normalize=True), 4),
    (WeightedSum(), WeightedSumParams(weights=[1.0]), 1),
    (Average(), Average.params_model(), 1),
    (Average(), Average.params_model(), 5),
    (AddDifference(), AddDifferenceParams(multiplier=0.6), 3),
    (AddDifference(), AddDifferenceParams(multiplier=-1.3), 3),
]


@pytest.mark.parametrize(("op", "params", "arity"), CASES, ids=lambda c: getattr(c, "name", None) or str(c)[:24])
@pytest.mark.parametrize("out_code", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("in_codes", ["F16", "BF16", "F32", "mixed"])
def test_the_fused_loop_gives_combine_bytes(
    op: Any, params: OpParams, arity: int, out_code: str, in_codes: str
) -> None:
    codes = tuple(("F16", "BF16", "F32")[i % 3] for i in range(arity)) if in_codes == "mixed" else (in_codes,) * arity
    for n in (0, 1, 7, 8, 9, 1023, 1024, 1025, 5000):
        data = inputs(n + arity, n, codes)
        assert fused_combine(op, params, data, out_code, n) == numpy_combine(op, params, data, out_code, n), n


def test_it_declines_what_it_cannot_run() -> None:
    form = Lerp().linear_form(LerpParams(alpha=0.5), 2)
    xp = NumpyBackend()
    assert xp.combine_linear([(bytes(8), "F64"), (bytes(8), "F64")], form, "F64", 1) is None
    assert xp.combine_linear([(bytes(2), "F16"), (bytes(2), "F16")], form, "F8_E4M3", 1) is None


def test_it_checks_its_buffers() -> None:
    assert fused.FUSED is not None
    with pytest.raises(ValueError, match="as many elements"):
        fused.FUSED.linear([bytes(4), bytes(6)], "hh", 0, [0.5, 0.5], None, bytearray(4), "h")
    with pytest.raises(ValueError, match="one weight an input"):
        fused.FUSED.linear([bytes(4), bytes(4)], "hh", 0, [0.5], None, bytearray(4), "h")
    with pytest.raises(ValueError, match="bad inputs"):
        fused.FUSED.linear([bytes(4), bytes(4)], "hh", 1, [0.5], None, bytearray(4), "h")
    with pytest.raises(TypeError):
        fused.FUSED.linear([bytes(4), bytes(4)], "hh", 0, [0.5, 0.5], None, bytes(4), "h")  # read-only output


def test_without_the_loop_the_pipeline_computes_with_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "FUSED", None)
    form = Lerp().linear_form(LerpParams(alpha=0.5), 2)
    assert NumpyBackend().combine_linear([(bytes(2), "F16"), (bytes(2), "F16")], form, "F16", 1) is None


def test_more_inputs_than_the_loop_takes_are_averaged_by_numpy() -> None:
    assert fused.FUSED is not None
    n = fused.MAX_INPUTS + 1
    data = inputs(7, 100, ("F16",) * n)
    op, params = Average(), Average.params_model()
    form = op.linear_form(params, n)
    assert NumpyBackend().combine_linear(data, form, "F16", 100) is None
    with pytest.raises(ValueError, match="bad inputs"):  # what the loop itself says (never asked)
        fused.FUSED.linear([d for d, _ in data], "h" * n, 0, [1.0] * n, float(n), bytearray(200), "h")
    few = data[: fused.MAX_INPUTS]
    assert fused_combine(op, params, few, "F16", 100) == numpy_combine(op, params, few, "F16", 100)


def test_an_average_of_65_models_runs_end_to_end(launch_dir: Any, run_recipe: Any) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    folder = launch_dir / "many"
    folder.mkdir()
    models = []
    for i in range(65):
        model = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(i)).half(), "b": torch.full((2,), i)}
        save_file(model, folder / f"m{i:02d}.safetensors")
        models.append(model)
    run_recipe(
        {
            "sources": {"all": {"glob": "many/*.safetensors"}},
            "nodes": {"mean": {"op": "average", "inputs": ["all"]}},
            "outputs": {"mean": {"path": "mean.safetensors"}},
        }
    )
    got = load_file(launch_dir / "out" / "mean.safetensors")
    want = sum(m["w"].float() for m in models[1:]) + models[0]["w"].float()  # numpy's order: copy, then +=
    assert torch.equal(got["w"], (want / 65).half()) and torch.equal(got["b"], models[0]["b"])
