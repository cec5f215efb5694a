"""Chains round once: a node that feeds other nodes is cached at the maths precision (float32, or
float64 where an input is), and only outputs are cast to their dtype.

The chain add_difference -> lerp -> weighted_sum of float16 (and bfloat16) models is checked against
a float64 reference computed here with plain torch: the output must be the correctly rounded
reference for all but a few elements (<= 0.1%). Rounding every node to float16 in between, as merger
did before, leaves about a fifth of them off (measured by the same count on the code before; the
emulation below gives the very same figures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merger.cache.store import Cache
from merger.cli.job import prepare
from merger.core.tensor_bytes import tensor_from_buffer
from merger.ops import builtin_registry
from tests.conftest import BACKENDS, BytesSource, Collector, RunRecipe, fine_tune, keyed, load, spec_of, tiny_state_dict

StateDict = dict[str, torch.Tensor]
NAMES = ("base", "a", "b", "c", "d")
ALPHA = 0.3
WEIGHTS = (0.6, 0.4)
#: at most this fraction of the output's elements may differ from the correctly rounded result
MAX_MISMATCH = 0.001


def _family(launch_dir: Path, dtype: torch.dtype) -> dict[str, StateDict]:
    """A base and four fine-tunes of it (width 48: about 23,000 float elements), saved under models/."""
    base = tiny_state_dict(11, width=48, dtype=torch.float32)
    family = {"base": base, **{name: fine_tune(base, 20 + i, scale=0.3) for i, name in enumerate(NAMES[1:])}}
    family = {
        name: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()} for name, sd in family.items()
    }
    (launch_dir / "models").mkdir(exist_ok=True)
    for name, sd in family.items():
        save_file(sd, launch_dir / "models" / f"{name}.safetensors")
    return family


def _chain(outputs: dict[str, Any], **mix: Any) -> dict[str, Any]:
    return {
        "sources": {name: f"models/{name}.safetensors" for name in NAMES},
        "nodes": {
            "diff": {"op": "add_difference", "inputs": ["a", "b", "base"]},
            "blend": {"op": "lerp", "inputs": ["diff", "c"], "alpha": ALPHA},
            "mix": {"op": "weighted_sum", "inputs": ["blend", "d"], "weights": list(WEIGHTS), **mix},
        },
        "outputs": outputs,
    }


def _steps(family: dict[str, StateDict], key: str, dtype: torch.dtype, rounded: torch.dtype | None) -> torch.Tensor:
    """The chain for one tensor computed in `dtype`, each node's result rounded to `rounded` (None: not)."""

    def node(value: torch.Tensor) -> torch.Tensor:
        return value.to(rounded).to(dtype) if rounded is not None else value

    a, b, base, c, d = (family[name][key].to(dtype) for name in ("a", "b", "base", "c", "d"))
    diff = node(a + (b - base))
    blend = node(diff * (1 - ALPHA) + c * ALPHA)
    return blend * WEIGHTS[0] + d * WEIGHTS[1]


def _mismatch(got: StateDict, family: dict[str, StateDict], dtype: torch.dtype) -> float:
    """The fraction of float elements of `got` that are not the float64 reference rounded to `dtype`."""
    wrong = total = 0
    for key, value in got.items():
        if not value.is_floating_point():
            continue
        assert value.dtype == dtype, key
        expected = _steps(family, key, torch.float64, None).to(dtype)
        wrong += int((value != expected).sum())
        total += value.numel()
    return wrong / total


def _old_way(family: dict[str, StateDict], dtype: torch.dtype) -> StateDict:
    """What merger wrote before: float32 maths, every node's entry rounded to the models' dtype."""
    keys = [k for k, v in family["a"].items() if v.is_floating_point()]
    return {k: _steps(family, k, torch.float32, dtype).to(dtype) for k in keys}


def _entry_dtypes(launch_dir: Path, key: str) -> dict[str, torch.dtype]:
    entry = Cache(launch_dir / "cache").lookup(key)
    assert entry is not None
    with safe_open(entry.path, "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_chain_of_three_nodes_rounds_once(launch_dir: Path, run_recipe: RunRecipe, dtype: torch.dtype) -> None:
    family = _family(launch_dir, dtype)
    report = run_recipe(_chain({"mix": {}}))
    out = load(Path(report["outputs"]["mix"]["path"]))
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    now = _mismatch(out, family, dtype)
    before = _mismatch(_old_way(family, dtype), family, dtype)
    # measured (23,475 float elements): float16 0.077% now (18), 21.9% rounding in between; bfloat16
    # 0.089% (21) and 22.3%. What is left is float32 maths: alpha 0.3 and the weights are no float32
    # numbers, and float64 maths with their float32 values is off as often (23).
    assert now <= MAX_MISMATCH, f"{now:.4%} of the elements are not the correctly rounded result"
    assert before > 0.03, f"rounding in between left only {before:.4%} off"


def test_a_node_that_is_an_output_and_an_input_keeps_its_dtype_but_feeds_float32(
    launch_dir: Path, run_recipe: RunRecipe
) -> None:
    family = _family(launch_dir, torch.float16)
    outputs = {"blend": {}, "blend32": {"node": "blend", "dtype": "float32"}, "mix": {}}
    report = run_recipe(_chain(outputs))
    blend = load(Path(report["outputs"]["blend"]["path"]))
    blend32 = load(Path(report["outputs"]["blend32"]["path"]))
    for key, value in family["a"].items():
        if value.is_floating_point():
            exact = (family["a"][key].float() + (family["b"][key].float() - family["base"][key].float())) * (
                1 - ALPHA
            ) + family["c"][key].float() * ALPHA
            assert blend[key].dtype == torch.float16, key  # dtype: keep is the op's dtype, float16
            assert torch.equal(blend[key], blend32[key].half()), key  # one rounding, from the float32 entry
            torch.testing.assert_close(blend32[key], exact, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(blend[key], value) and torch.equal(blend32[key], value), key
    # the entries of the nodes that feed others are float32 (integers as they are); the last one's float16
    for name in ("diff", "blend"):
        entry = _entry_dtypes(launch_dir, report["nodes"][name]["key"])
        assert entry["bn.num_batches_tracked"] == torch.int64
        assert {d for k, d in entry.items() if k != "bn.num_batches_tracked"} == {torch.float32}, name
    assert set(_entry_dtypes(launch_dir, report["nodes"]["mix"]["key"]).values()) == {torch.float16, torch.int64}
    assert _mismatch(load(Path(report["outputs"]["mix"]["path"])), family, torch.float16) <= MAX_MISMATCH

    again = run_recipe(_chain(outputs))
    assert {n["status"] for n in again["nodes"].values()} == {"cached"}
    assert {name: o["sha256"] for name, o in again["outputs"].items()} == {
        name: o["sha256"] for name, o in report["outputs"].items()
    }


def test_keys_copied_from_a_float32_intermediate_are_cast_once(launch_dir: Path, run_recipe: RunRecipe) -> None:
    """A key the consumer copies (not merged) from a float32 entry is cast to the consumer's dtype."""
    _family(launch_dir, torch.float16)
    report = run_recipe(_chain({"blend": {}, "mix": {}}, exclude="conv_last"))
    blend = load(Path(report["outputs"]["blend"]["path"]))
    mix = load(Path(report["outputs"]["mix"]["path"]))
    assert report["nodes"]["mix"]["notes"]["copied"] == 3  # conv_last.weight, conv_last.bias, num_batches_tracked
    for key in ("conv_last.weight", "conv_last.bias", "bn.num_batches_tracked"):
        assert mix[key].dtype == blend[key].dtype and torch.equal(mix[key], blend[key]), key


def test_a_node_referenced_as_base_is_kept_at_float32(launch_dir: Path, run_recipe: RunRecipe) -> None:
    _family(launch_dir, torch.float16)
    recipe = {
        "sources": {name: f"models/{name}.safetensors" for name in NAMES},
        "nodes": {
            "root": {"op": "average", "inputs": ["base", "a"]},
            "tv": {"op": "task_arithmetic", "base": "root", "inputs": ["b", "c"], "weights": [0.5, 0.5]},
        },
        "outputs": {"tv": {}},
    }
    report = run_recipe(recipe)
    assert _entry_dtypes(launch_dir, report["nodes"]["root"]["key"])["body.0.weight"] == torch.float32
    assert load(Path(report["outputs"]["tv"]["path"]))["body.0.weight"].dtype == torch.float16


#: the keys merger gave these output-only nodes before chains kept float32 (they must not change)
OUTPUT_ONLY_KEYS = {
    "diff": "da94ce7cbc3be2c0798b5d71317460dedd8fa259b9d8f91ebe1bd505665349a7",
    "blend": "bdcc8487bbc4fa15aa0a8be913d44b1f3be57b54a2d43547b79f62c4f2480dcb",
}


def test_output_only_nodes_keep_their_keys_and_dtypes(launch_dir: Path, run_recipe: RunRecipe) -> None:
    _family(launch_dir, torch.float16)
    recipe = {
        "sources": {name: f"models/{name}.safetensors" for name in NAMES},
        "nodes": {
            "diff": {"op": "add_difference", "inputs": ["a", "b", "base"]},
            "blend": {"op": "lerp", "inputs": ["a", "c"], "alpha": ALPHA},
        },
        "outputs": {"diff": {}, "blend": {"dtype": "float32"}},
    }
    plan = prepare(
        {"cache_dir": str(launch_dir / "cache"), "progress": False, **recipe},
        builtin_registry(),
        file="test.yaml",
        launch_dir=launch_dir,
    ).plan
    assert all(node.content.precision is None for node in plan.nodes.values())
    report = run_recipe(recipe)
    assert {name: node["key"] for name, node in report["nodes"].items()} == OUTPUT_ONLY_KEYS
    for name in ("diff", "blend"):
        assert set(_entry_dtypes(launch_dir, report["nodes"][name]["key"]).values()) == {torch.float16, torch.int64}
    # dtype: keep of an output-only node is its entry itself
    entry = Cache(launch_dir / "cache").lookup(report["nodes"]["diff"]["key"])
    assert entry is not None and report["outputs"]["diff"]["sha256"] == entry.sha256


def test_a_float64_chain_stays_float64_with_its_keys(launch_dir: Path, run_recipe: RunRecipe) -> None:
    family = _family(launch_dir, torch.float64)
    report = run_recipe(_chain({"mix": {}}))
    assert _entry_dtypes(launch_dir, report["nodes"]["blend"]["key"])["body.0.weight"] == torch.float64
    out = load(Path(report["outputs"]["mix"]["path"]))
    for key, value in out.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, _steps(family, key, torch.float64, None), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_the_pipeline_casts_a_copy_from_a_wider_input(backend: str) -> None:
    """A key copied (not merged) from an input kept at float32 into a float16 tensor: cast, on each backend."""
    from merger.engine.pipeline import Pipeline
    from merger.ops.base import InputSpecs
    from merger.ops.linear import Lerp, LerpParams

    g = torch.Generator().manual_seed(3)
    wide = {"w": torch.randn(5000, generator=g), "skip": torch.randn(3000, generator=g)}  # a float32 entry
    narrow = {k: torch.randn(v.shape, generator=g).half() for k, v in wide.items()}
    op, params = Lerp(), LerpParams(alpha=0.25, exclude="skip")
    planned = op.spec(
        InputSpecs(("up", "src"), (spec_of({k: v.half() for k, v in wide.items()}), spec_of(narrow))), params
    )
    stored = (spec_of(wide), spec_of(narrow))
    collector = Collector()
    Pipeline(
        op, keyed(op, params, planned), [BytesSource.of(wide), BytesSource.of(narrow)], stored, BACKENDS[backend]()
    ).run(collector, planned, lambda key, nbytes: None)
    joined = collector.joined()
    out = {k: tensor_from_buffer(bytearray(joined[k]), t.dtype, t.shape) for k, t in planned.tensors.items()}
    assert torch.equal(out["skip"], wide["skip"].half())
    assert torch.equal(out["w"], (wide["w"] * 0.75 + narrow["w"].float() * 0.25).half())
