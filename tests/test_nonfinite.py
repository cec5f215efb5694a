"""Non-finite values in inputs and outputs: counted per tensor, warned about, recorded, or an error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.core.nonfinite import count_nonfinite, describe
from merger.core.tensor_bytes import dtype_code, tensor_memoryview
from tests.conftest import RunRecipe, expect_error, fine_tune, tiny_state_dict


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_counts_match_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5000, generator=g)
    values[torch.randint(0, 5000, (40,), generator=g)] = float("nan")
    values[torch.randint(0, 5000, (30,), generator=g)] = float("inf")
    values[torch.randint(0, 5000, (20,), generator=g)] = -float("inf")
    stored = values.to(dtype)
    expected = int((~torch.isfinite(stored.float())).sum())
    assert expected > 0
    assert count_nonfinite(tensor_memoryview(stored), dtype_code(dtype)) == expected


def test_finite_and_integer_data_count_zero() -> None:
    assert count_nonfinite(tensor_memoryview(torch.full((100,), 3e38)), "F32") == 0  # a sum past f32 range is fine
    assert count_nonfinite(tensor_memoryview(torch.full((10,), -1, dtype=torch.int64)), "I64") == 0
    assert count_nonfinite(memoryview(b""), "F32") == 0


def test_describe_names_the_first_tensors() -> None:
    text = describe({"a.weight": 10, "b.bias": 2, "c": 1, "d": 1})
    assert text.startswith("14 non-finite values (NaN or inf) in 4 tensors (first: a.weight 10, b.bias 2, c 1, ...")


def write_models(launch_dir: Path, poison: dict[str, Any] | None = None) -> None:
    folder = launch_dir / "models"
    folder.mkdir(exist_ok=True)
    base = tiny_state_dict(0)
    a, b = fine_tune(base, 1), fine_tune(base, 2)
    for key, value in (poison or {}).items():
        a[key] = a[key].clone()
        a[key].view(-1)[: value[0]] = value[1]
    save_file(a, folder / "a.safetensors")
    save_file(b, folder / "b.safetensors")


def lerp(**top: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}
    node.update(top.pop("node", {}))
    return {
        "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
        "nodes": {"blend": node},
        "outputs": {"blend": top.pop("output", {})},
        **top,
    }


def test_nan_in_an_input_is_warned_and_recorded(
    launch_dir: Path, run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    write_models(launch_dir, {"body.0.weight": (3, float("nan"))})
    with caplog.at_level(logging.WARNING, logger="merger"):
        report = run_recipe(lerp())
    found = report["nodes"]["blend"]["nonfinite"]
    assert found == {"inputs": {"a": {"body.0.weight": 3}}, "output": {"body.0.weight": 3}}
    text = caplog.text
    assert "node 'blend': its input 'a' holds 3 non-finite values" in text and "body.0.weight 3" in text
    assert any("node 'blend': its output holds 3" in w for w in report["warnings"])
    again = run_recipe(lerp())  # a cache hit warns again, from the entry's record
    assert again["nodes"]["blend"]["status"] == "cached"
    assert again["nodes"]["blend"]["nonfinite"] == found


@pytest.mark.parametrize("where", ["node", "run"])
def test_nonfinite_error_names_the_tensor_and_keeps_nothing(
    launch_dir: Path, run_recipe: RunRecipe, where: str
) -> None:
    write_models(launch_dir, {"conv_last.weight": (1, float("inf"))})
    data = lerp(node={"nonfinite": "error"}) if where == "node" else lerp(nonfinite="error")
    error = expect_error(lambda: run_recipe(data))
    assert "tensor 'conv_last.weight' holds 1 non-finite values" in error.what
    assert error.where is not None and "nodes.blend" in error.where
    assert not list((launch_dir / "cache").glob("objects/*/*.safetensors"))
    assert not (launch_dir / "out").exists() or not list((launch_dir / "out").iterdir())
    tmp = launch_dir / "cache" / "tmp"  # absent when the hashing pass failed before the node made one
    assert not tmp.exists() or not list(tmp.iterdir())


def test_a_cached_entry_with_nan_fails_a_node_that_now_says_error(launch_dir: Path, run_recipe: RunRecipe) -> None:
    write_models(launch_dir, {"conv_first.bias": (2, float("nan"))})
    run_recipe(lerp())
    error = expect_error(lambda: run_recipe(lerp(nonfinite="error")))
    assert "conv_first.bias" in error.what


def test_float16_overflow_is_reported(launch_dir: Path, run_recipe: RunRecipe) -> None:
    write_models(launch_dir, {"body.0.bias": (4, 1e6)})  # finite in float32, past float16's 65504
    report = run_recipe(lerp(output={"dtype": "float16"}))
    assert "nonfinite" not in report["nodes"]["blend"]
    assert report["outputs"]["blend"]["overflow"] == {"body.0.bias": 4}
    assert any("the cast to float16 made 4 non-finite values" in w for w in report["warnings"])
    error = expect_error(lambda: run_recipe(lerp(output={"dtype": "float16"}, nonfinite="error")))
    assert "body.0.bias" in error.what and "float16" in error.what


def test_nonfinite_setting_is_checked(launch_dir: Path, run_recipe: RunRecipe) -> None:
    write_models(launch_dir)
    error = expect_error(lambda: run_recipe(lerp(node={"nonfinite": "ignore"})))
    assert "nonfinite must be warn or error" in error.what
