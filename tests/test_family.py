"""The family check: merger.engine.family.compare and the executor's warning on merges of unrelated models.

Fine-tunes of one parent have weight tensors with cosine similarity near 1;
independently initialised models near 0. 1-D tensors (LayerNorm weights of
ones, identical in any two models) are not counted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.engine.family import FAMILY_THRESHOLD, compare
from tests.conftest import BytesSource, RunRecipe, fine_tune, spec_of, tiny_state_dict

StateDict = dict[str, torch.Tensor]
WEIGHT_TENSORS = 3  # tiny_state_dict's tensors of two or more dimensions


def _compare(*models: StateDict, names: tuple[str, ...] | None = None) -> Any:
    names = names or tuple(f"m{i}" for i in range(len(models)))
    return compare([BytesSource.of(m) for m in models], [spec_of(m) for m in models], names)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    return float(a64 @ b64 / (a64.norm() * b64.norm()))


# --- compare ----------------------------------------------------------------------------------------


def test_related_models_score_near_one() -> None:
    parent = tiny_state_dict(0)
    (sim,) = _compare(parent, fine_tune(parent, 1), names=("parent", "child"))
    assert sim.name == "child"
    assert sim.tensors == WEIGHT_TENSORS
    assert sim.median > 0.9
    assert sim.related
    assert "same family" in sim.describe("parent")


def test_unrelated_models_score_near_zero() -> None:
    first, other = tiny_state_dict(0), tiny_state_dict(1)
    (sim,) = _compare(first, other, names=("x", "y"))
    assert sim.tensors == WEIGHT_TENSORS
    assert abs(sim.median) < 0.2
    assert not sim.related
    assert sim.median < FAMILY_THRESHOLD
    # the median of the per-tensor cosines, computed here in plain torch
    cosines = sorted(_cosine(first[k], other[k]) for k in first if first[k].dim() >= 2)
    assert sim.median == pytest.approx(cosines[1], abs=1e-9)
    assert sim.minimum == pytest.approx(cosines[0], abs=1e-9)
    assert "UNRELATED" in sim.describe("x")


def test_each_model_is_compared_with_the_first() -> None:
    parent = tiny_state_dict(0)
    sims = _compare(
        parent, fine_tune(parent, 1), tiny_state_dict(5), fine_tune(parent, 2), names=("p", "c1", "u", "c2")
    )
    assert [s.name for s in sims] == ["c1", "u", "c2"]
    assert [s.related for s in sims] == [True, False, True]


def test_one_dimensional_weights_are_not_counted() -> None:
    """Unrelated matrices with many identical LayerNorm-like 1-D weights of ones: still unrelated."""
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    ones = {f"layers.{i}.norm.weight": torch.ones(16) for i in range(6)}
    x = {"w1": torch.randn(16, 16, generator=g1), "w2": torch.randn(8, 16, generator=g1), **ones}
    y = {"w1": torch.randn(16, 16, generator=g2), "w2": torch.randn(8, 16, generator=g2), **ones}
    (sim,) = _compare(x, y)
    assert sim.tensors == 2
    assert abs(sim.median) < 0.2
    assert not sim.related
    assert {key for key, _ in sim.lowest} == {"w1", "w2"}


def test_large_tensors_are_sampled_and_still_judged() -> None:
    g = torch.Generator().manual_seed(3)
    parent = {"big": torch.randn(200, 150, generator=g)}  # 30000 elements: more than one sample's worth
    (related,) = _compare(parent, fine_tune(parent, 4, scale=0.1))
    (stranger,) = _compare(parent, {"big": torch.randn(200, 150, generator=g)})
    assert related.tensors == stranger.tensors == 1
    assert related.median > 0.9
    assert abs(stranger.median) < 0.2


# --- the warning on a merge -------------------------------------------------------------------------


@pytest.fixture
def zoo(launch_dir: Path) -> dict[str, StateDict]:
    parent = tiny_state_dict(0)
    models = {"parent": parent, "child": fine_tune(parent, 1), "sibling": fine_tune(parent, 2)}
    models["stranger"] = tiny_state_dict(1)
    for name, sd in models.items():
        save_file(sd, launch_dir / f"{name}.safetensors")
    return models


SOURCES = {name: f"{name}.safetensors" for name in ("parent", "child", "sibling", "stranger")}


def _family_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "merger" and "unrelated" in r.getMessage()]


def test_unrelated_lerp_warns_once(
    zoo: dict[str, StateDict], run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="merger")
    report = run_recipe(
        {
            "sources": SOURCES,
            "nodes": {"blend": {"op": "lerp", "inputs": ["child", "stranger"], "alpha": 0.5}},
            "outputs": {"blend": {}},
        }
    )
    records = _family_warnings(caplog)
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    (sim,) = _compare(zoo["child"], zoo["stranger"])
    message = record.getMessage()
    assert "node 'blend'" in message
    assert "input 'stranger' looks unrelated to 'child'" in message
    assert f"median cosine {sim.median:.3f}" in message
    assert f"over {WEIGHT_TENSORS} weight tensors" in message
    family = report["nodes"]["blend"]["notes"]["family"]
    assert family == {"stranger": pytest.approx(sim.median, abs=1e-4)}
    assert abs(family["stranger"]) < 0.2


def test_related_lerp_does_not_warn(
    zoo: dict[str, StateDict], run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="merger")
    report = run_recipe(
        {
            "sources": SOURCES,
            "nodes": {"blend": {"op": "lerp", "inputs": ["child", "sibling"], "alpha": 0.5}},
            "outputs": {"blend": {}},
        }
    )
    assert _family_warnings(caplog) == []
    family = report["nodes"]["blend"]["notes"]["family"]
    assert list(family) == ["sibling"]
    assert family["sibling"] > 0.9


def test_task_vector_merge_compares_with_the_base(
    zoo: dict[str, StateDict], run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="merger")
    report = run_recipe(
        {
            "sources": SOURCES,
            "nodes": {"ta": {"op": "task_arithmetic", "base": "parent", "inputs": ["child", "stranger", "sibling"]}},
            "outputs": {"ta": {}},
        }
    )
    records = _family_warnings(caplog)
    assert len(records) == 1
    assert "input 'stranger' looks unrelated to 'parent'" in records[0].getMessage()
    family = report["nodes"]["ta"]["notes"]["family"]
    assert sorted(family) == ["child", "sibling", "stranger"]
    assert family["child"] > 0.9
    assert family["sibling"] > 0.9
    assert abs(family["stranger"]) < 0.2


def test_select_is_not_family_checked(
    zoo: dict[str, StateDict], run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    """Passthrough of keys from unrelated models is legitimate: no warning, no family note."""
    caplog.set_level(logging.WARNING, logger="merger")
    report = run_recipe(
        {
            "sources": SOURCES,
            "nodes": {
                "s": {"op": "select", "inputs": ["child", "stranger"], "take": [{"input": "stranger", "match": "body"}]}
            },
            "outputs": {"s": {}},
        }
    )
    assert _family_warnings(caplog) == []
    assert "family" not in report["nodes"]["s"].get("notes", {})


def test_the_check_reads_samples_not_whole_tensors() -> None:
    """Bounded by its samples whatever the tensors' sizes: at most max_elements elements per tensor."""
    g = torch.Generator().manual_seed(5)
    big = {"big.weight": torch.randn(1000, 1000, generator=g), "other.weight": torch.randn(300, 300, generator=g)}
    models = [big, fine_tune(big, 6)]
    sources = [BytesSource.of(m) for m in models]
    (sim,) = compare(sources, [spec_of(m) for m in models], ("a", "b"), max_elements=16384)
    assert sim.tensors == 2 and sim.related
    for source in sources:
        for key in big:
            assert sum(stop - start for k, start, stop in source.reads if k == key) <= 16384 * 4
