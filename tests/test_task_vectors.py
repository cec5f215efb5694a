"""merger.ops.task_vectors: task_arithmetic, ties, dare_linear, dare_ties against plain torch.

The golden computations below are written from the papers' formulas (as the
module docstring states them), in float32, independently of merger's code.
Runs go end to end through `run_recipe` (`base: base`, `inputs: [a, b]`) and
directly through the real `merger.engine.pipeline.Pipeline` on both array backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.ops.base import Op
from merger.ops.task_vectors import (
    DareLinear,
    DareParams,
    DareTies,
    DareTiesParams,
    TaskArithmetic,
    TaskArithmeticParams,
    Ties,
    TiesParams,
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
TOL = {"rtol": 1e-5, "atol": 1e-6}
INT_KEY = "bn.num_batches_tracked"
SOURCES = {"base": "models/base.safetensors", "a": "models/a.safetensors", "b": "models/b.safetensors"}


@pytest.fixture(params=sorted(BACKENDS))
def xp(request: pytest.FixtureRequest) -> Any:
    return BACKENDS[request.param]()


def run_pipeline(op: Op, params: Any, models: list[StateDict], backend: Any) -> StateDict:
    """The outputs of `op` computed by the real executor pipeline (input 0 is the base)."""
    return pipeline_outputs(op, params, models, backend, ("base", *(f"m{i}" for i in range(1, len(models)))))[1]


# --- the golden computations (plain torch, float32) ------------------------------------------------


def g_task_arithmetic(
    base: torch.Tensor, fts: list[torch.Tensor], weights: list[float], scale: float = 1.0, normalize: bool = False
) -> torch.Tensor:
    mixed = torch.zeros_like(base)
    for w, ft in zip(weights, fts, strict=True):
        mixed = mixed + w * (ft - base)
    if normalize:
        mixed = mixed / sum(weights)
    return base + scale * mixed


def g_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * n) entries of largest magnitude (at least one, as mergekit: a positive
    density never empties a tensor)."""
    if density >= 1.0:
        return delta.clone()
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros(())).reshape(delta.shape)


def g_elect(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    normalize: bool,
    consensus: str,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES sign election over the (already trimmed/dropped) unweighted deltas."""
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    if consensus == "sum":
        votes = torch.stack(weighted).sum(dim=0)
    else:
        votes = torch.stack([torch.sign(d) for d in weighted]).sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for w, d in zip(weights, weighted, strict=True):
        agrees = (torch.sign(d) == elected) & (d != 0)
        mixed = mixed + torch.where(agrees, d, torch.zeros(()))
        divisor = divisor + torch.where(agrees, torch.tensor(w), torch.zeros(()))
    if normalize:
        mixed = mixed / torch.where(divisor == 0, torch.ones(()), divisor)
    return base + scale * mixed


def g_ties(
    base: torch.Tensor,
    fts: list[torch.Tensor],
    weights: list[float],
    density: float,
    *,
    normalize: bool = True,
    consensus: str = "sum",
    scale: float = 1.0,
) -> torch.Tensor:
    deltas = [g_trim(ft - base, density) for ft in fts]
    return g_elect(base, deltas, weights, normalize=normalize, consensus=consensus, scale=scale)


def golden_state(models: dict[str, StateDict], fn: Any) -> StateDict:
    base, fts = models["base"], [models["a"], models["b"]]
    out: StateDict = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        out[key] = fn(value, [ft[key] for ft in fts])
    return out


def _family() -> dict[str, StateDict]:
    base = tiny_state_dict(0)
    return {"base": base, "a": fine_tune(base, 1), "b": fine_tune(base, 2)}


def _run(run_recipe: RunRecipe, node: dict[str, Any], **settings: Any) -> tuple[StateDict, dict[str, Any]]:
    report = run_recipe(
        {"sources": SOURCES, "nodes": {"m": {"inputs": ["a", "b"], "base": "base", **node}}, "outputs": {"m": {}}}
        | settings
    )
    return load(Path(report["outputs"]["m"]["path"])), report


# --- task_arithmetic --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "scale", "normalize"),
    [(1.0, 1.0, False), (0.7, 1.0, False), ([0.3, 1.2], 1.0, False), ([0.3, 1.2], 0.5, False), ([1.0, 3.0], 2.0, True)],
)
def test_task_arithmetic_end_to_end(
    models: dict[str, Path], run_recipe: RunRecipe, weights: Any, scale: float, normalize: bool
) -> None:
    out, report = _run(
        run_recipe, {"op": "task_arithmetic", "weights": weights, "scale": scale, "normalize": normalize}
    )
    per = weights if isinstance(weights, list) else [weights, weights]
    sds = {n: load(models[n]) for n in ("base", "a", "b")}
    expected = golden_state(sds, lambda base, fts: g_task_arithmetic(base, fts, per, scale, normalize))
    assert_states_close(out, expected, **TOL)
    assert report["nodes"]["m"]["op"] == "task_arithmetic"
    assert report["nodes"]["m"]["notes"]["merged"] == 7
    assert report["nodes"]["m"]["notes"]["copied"] == 1


def test_task_arithmetic_scalar_weight_equals_repeated_list(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    scalar, _ = _run(run_recipe, {"op": "task_arithmetic", "weights": 0.4})
    listed, _ = _run(run_recipe, {"op": "task_arithmetic", "weights": [0.4, 0.4]})
    for key in scalar:
        assert torch.equal(scalar[key], listed[key]), key


def test_task_arithmetic_direct(xp: Any) -> None:
    fam = _family()
    params = TaskArithmeticParams(base="base", weights=[0.25, 0.9], scale=1.5)
    out = run_pipeline(TaskArithmetic(), params, [fam["base"], fam["a"], fam["b"]], xp)
    assert_states_close(
        out, golden_state(fam, lambda base, fts: g_task_arithmetic(base, fts, [0.25, 0.9], 1.5)), rtol=1e-5, atol=1e-6
    )


# --- ties -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "weights", "normalize", "consensus"),
    [
        (0.5, 1.0, True, "sum"),
        (0.3, [0.6, 1.4], True, "sum"),
        (0.7, [0.6, 1.4], False, "sum"),
        (0.5, [1.0, 2.0], True, "count"),
        (1.0, 1.0, True, "sum"),
    ],
)
def test_ties_end_to_end(
    models: dict[str, Path], run_recipe: RunRecipe, density: float, weights: Any, normalize: bool, consensus: str
) -> None:
    out, report = _run(
        run_recipe,
        {"op": "ties", "density": density, "weights": weights, "normalize": normalize, "consensus": consensus},
    )
    per = weights if isinstance(weights, list) else [weights, weights]
    sds = {n: load(models[n]) for n in ("base", "a", "b")}
    expected = golden_state(
        sds, lambda base, fts: g_ties(base, fts, per, density, normalize=normalize, consensus=consensus)
    )
    assert_states_close(out, expected, **TOL)
    assert report["nodes"]["m"]["op"] == "ties"


def test_ties_direct(xp: Any) -> None:
    fam = _family()
    params = TiesParams(base="base", density=0.4, weights=[0.5, 1.5], scale=0.8)
    out = run_pipeline(Ties(), params, [fam["base"], fam["a"], fam["b"]], xp)
    assert_states_close(
        out, golden_state(fam, lambda base, fts: g_ties(base, fts, [0.5, 1.5], 0.4, scale=0.8)), rtol=1e-5, atol=1e-6
    )


def test_ties_hand_computed_election(xp: Any) -> None:
    """A 1x8 case worked by hand: trimming, sign election, agreeing-only mean, 0 where none agree."""
    base = {"w": torch.zeros(1, 8)}
    a = {"w": torch.tensor([[3.0, -1.0, 2.0, 0.0, -4.0, 0.5, 0.0, 0.0]])}
    b = {"w": torch.tensor([[-1.0, -2.0, 1.0, 0.0, 5.0, 0.1, 0.0, 0.0]])}
    params = TiesParams(base="base", density=0.25)  # int(0.25 * 8) = 2 kept per model
    out = run_pipeline(Ties(), params, [base, a, b], xp)["w"]
    # trimmed: a -> [3, 0, 0, 0, -4, 0, 0, 0]; b -> [0, -2, 0, 0, 5, 0, 0, 0]
    # sum -> [3, -2, 0, 0, 1, 0, 0, 0]: elected [+, -, +, +, +, +, +, +]
    # agreeing: col0 a (3), col1 b (-2), col4 b (5, a's -4 disagrees); none elsewhere -> 0 / 1
    assert out.tolist() == [[3.0, -2.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]]
    # weights scale the deltas before the vote; normalize divides by the agreeing models' weights
    weighted = run_pipeline(Ties(), params.model_copy(update={"weights": [2.0, 0.25]}), [base, a, b], xp)["w"]
    # weighted: a -> [6, 0, 0, 0, -8, ...], b -> [0, -0.5, 0, 0, 1.25, ...]; sum col4 = -6.75: a's -8 wins
    assert weighted.tolist() == [[3.0, -2.0, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0]]
    plain = params.model_copy(update={"weights": [2.0, 0.25], "normalize": False})
    assert run_pipeline(Ties(), plain, [base, a, b], xp)["w"].tolist() == [[6.0, -0.5, 0, 0, -8.0, 0, 0, 0]]


def test_ties_small_tensor_keeps_at_least_one(xp: Any) -> None:
    """int(0.3 * 3) = 0, but a positive density keeps the largest delta (mergekit's rule)."""
    base = {"w": torch.zeros(3)}
    a = {"w": torch.tensor([0.5, -2.0, 1.0])}
    out = run_pipeline(Ties(), TiesParams(base="base", density=0.3), [base, a], xp)["w"]
    assert out.tolist() == [0.0, -2.0, 0.0]
    zero = run_pipeline(Ties(), TiesParams(base="base", density=0.0), [base, a], xp)["w"]
    assert zero.tolist() == [0.0, 0.0, 0.0]


def test_ties_sum_and_count_consensus_differ(xp: Any) -> None:
    """One big negative delta against two small positive ones: sum elects -, count elects +."""
    base = {"w": torch.zeros(1, 2)}
    models = [base, {"w": torch.tensor([[-10.0, 1.0]])}, {"w": torch.tensor([[1.0, 1.0]])}]
    models.append({"w": torch.tensor([[2.0, 1.0]])})
    by_sum = run_pipeline(Ties(), TiesParams(base="base"), models, xp)["w"]
    by_count = run_pipeline(Ties(), TiesParams(base="base", consensus="count"), models, xp)["w"]
    assert by_sum.tolist() == [[-10.0, 1.0]]  # only the -10 agrees with the elected -
    assert by_count.tolist() == [[1.5, 1.0]]  # (1 + 2) / 2
    unnormalized = run_pipeline(Ties(), TiesParams(base="base", normalize=False), models, xp)["w"]
    assert unnormalized.tolist() == [[-10.0, 3.0]]


def test_ties_zero_sum_elects_plus(xp: Any) -> None:
    base = {"w": torch.zeros(1, 1)}
    models = [base, {"w": torch.tensor([[2.0]])}, {"w": torch.tensor([[-2.0]])}]
    out = run_pipeline(Ties(), TiesParams(base="base"), models, xp)["w"]
    assert out.tolist() == [[2.0]]


# --- dare -------------------------------------------------------------------------------------------


def _big_family(launch_dir: Path | None = None) -> dict[str, StateDict]:
    g = torch.Generator().manual_seed(42)
    base = {"big.weight": torch.randn(100, 100, generator=g), "small.bias": torch.randn(7, generator=g)}
    fam = {"base": base, "a": fine_tune(base, 5, scale=0.5), "b": fine_tune(base, 6, scale=0.5)}
    if launch_dir is not None:
        (launch_dir / "models").mkdir(exist_ok=True)
        for name, sd in fam.items():
            save_file(sd, launch_dir / "models" / f"{name}.safetensors")
    return fam


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_linear_keeps_density_and_rescales_exactly(xp: Any, density: float) -> None:
    fam = _big_family()
    base, a = fam["base"]["big.weight"], fam["a"]["big.weight"]
    params = DareParams(base="base", density=density, seed=3)
    out = run_pipeline(DareLinear(), params, [fam["base"], fam["a"]], xp)["big.weight"]
    delta = a - base
    kept = out != base
    fraction = kept.float().mean().item()
    assert fraction == pytest.approx(density, abs=0.03)
    # kept entries are base + delta / density, exactly; the others are the base, exactly
    expected = base + torch.where(kept, delta / density, torch.zeros(()))
    assert torch.equal(out, expected)


def test_dare_rescale_none_and_l1(xp: Any) -> None:
    fam = _big_family()
    base, a = fam["base"]["big.weight"], fam["a"]["big.weight"]
    delta = a - base
    models = [fam["base"], fam["a"]]
    plain = run_pipeline(DareLinear(), DareParams(base="base", density=0.4, seed=1, rescale="none"), models, xp)
    out = plain["big.weight"]
    kept = out != base
    assert kept.float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert torch.equal(out, base + torch.where(kept, delta, torch.zeros(())))
    l1 = run_pipeline(DareLinear(), DareParams(base="base", density=0.4, seed=1, rescale="l1"), models, xp)
    got = l1["big.weight"] - base
    # the same entries are kept (same seed); their L1 norm is the full delta's
    assert torch.equal(got != 0, kept)
    assert got.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)
    ratio = delta.abs().sum() / torch.where(kept, delta, torch.zeros(())).abs().sum()
    torch.testing.assert_close(got, torch.where(kept, delta * ratio, torch.zeros(())), rtol=1e-4, atol=1e-5)


def test_dare_ties_matches_election_over_dropped_deltas(xp: Any) -> None:
    fam = _big_family()
    base_sd = fam["base"]
    base = base_sd["big.weight"]
    weights: list[Any] = [0.8, 1.3]
    out = run_pipeline(
        DareTies(), DareTiesParams(base="base", density=0.5, weights=weights, seed=9), [base_sd, fam["a"], fam["b"]], xp
    )["big.weight"]
    # each model's draw depends on (seed, key, its place among the inputs): read the masks from dare_linear
    # runs where the other place holds a copy of the base (a zero delta)
    only_a = run_pipeline(DareLinear(), DareParams(base="base", density=0.5, seed=9), [base_sd, fam["a"], base_sd], xp)
    only_b = run_pipeline(DareLinear(), DareParams(base="base", density=0.5, seed=9), [base_sd, base_sd, fam["b"]], xp)
    dropped = []
    for name, alone in (("a", only_a), ("b", only_b)):
        kept = alone["big.weight"] != base
        assert kept.float().mean().item() == pytest.approx(0.5, abs=0.03)
        dropped.append(torch.where(kept, (fam[name]["big.weight"] - base) / 0.5, torch.zeros(())))
    assert not torch.equal(dropped[0] != 0, dropped[1] != 0)  # the two models draw differently
    expected = g_elect(base, dropped, weights, normalize=False, consensus="sum")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dare_same_seed_same_output_other_seed_differs(launch_dir: Path, run_recipe: RunRecipe) -> None:
    _big_family(launch_dir)
    node = {"op": "dare_linear", "inputs": ["a", "b"], "base": "base", "density": 0.5}
    report = run_recipe(
        {
            "sources": SOURCES,
            "seed": 1,
            "nodes": {
                "one": node,
                "twin": dict(node),
                "seeded2": {**node, "seed": 2},
                "dt1": {**node, "op": "dare_ties"},
                "dt2": {**node, "op": "dare_ties", "seed": 2},
            },
            "outputs": {n: {} for n in ("one", "twin", "seeded2", "dt1", "dt2")},
        }
    )
    out = {n: load(Path(report["outputs"][n]["path"]))["big.weight"] for n in report["outputs"]}
    assert torch.equal(out["one"], out["twin"])
    assert not torch.equal(out["one"], out["seeded2"])
    assert not torch.equal(out["dt1"], out["dt2"])
    # the node's seed is part of its key; the twin shares the first node's key
    assert report["nodes"]["one"]["key"] == report["nodes"]["twin"]["key"]
    assert report["nodes"]["one"]["key"] != report["nodes"]["seeded2"]["key"]
    # a rerun of the same recipe gives the same bytes
    again = run_recipe(
        {
            "sources": SOURCES,
            "seed": 1,
            "cache_dir": str(launch_dir / "cache2"),
            "nodes": {"one": node},
            "outputs": {"one": {"path": "again.safetensors"}},
        }
    )
    assert torch.equal(load(Path(again["outputs"]["one"]["path"]))["big.weight"], out["one"])


def test_node_seed_overrides_recipe_seed(launch_dir: Path, run_recipe: RunRecipe) -> None:
    _big_family(launch_dir)
    node = {"op": "dare_linear", "inputs": ["a", "b"], "base": "base", "density": 0.5}

    def run(recipe_seed: int, node_seed: int | None, cache: str) -> torch.Tensor:
        extra = {} if node_seed is None else {"seed": node_seed}
        report = run_recipe(
            {
                "sources": SOURCES,
                "seed": recipe_seed,
                "cache_dir": str(launch_dir / cache),
                "nodes": {"d": {**node, **extra}},
                "outputs": {"d": {"path": f"{cache}.safetensors"}},
            }
        )
        return load(Path(report["outputs"]["d"]["path"]))["big.weight"]

    node7_recipe1 = run(1, 7, "c1")
    recipe7 = run(7, None, "c2")
    node7_recipe99 = run(99, 7, "c3")
    recipe1 = run(1, None, "c4")
    assert torch.equal(node7_recipe1, recipe7)
    assert torch.equal(node7_recipe99, recipe7)
    assert not torch.equal(recipe1, recipe7)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_weights_list_of_wrong_length(models: dict[str, Path], run_recipe: RunRecipe, op: str) -> None:
    error = expect_error(lambda: _run(run_recipe, {"op": op, "weights": [0.5, 0.3, 0.2]}))
    assert "weights has 3 values for 2 models" in error.what
    assert error.where is not None
    assert "nodes.m" in error.where
    assert error.fix is not None
    assert "one per input" in error.fix
    assert not (Path.cwd() / "out" / "m.safetensors").exists()


@pytest.mark.parametrize("op", ["ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [1.5, [0.5, -0.1]])
def test_density_out_of_range(models: dict[str, Path], run_recipe: RunRecipe, op: str, density: Any) -> None:
    error = expect_error(lambda: _run(run_recipe, {"op": op, "density": density}))
    bad = 1.5 if density == 1.5 else -0.1
    assert f"density {bad} is not between 0 and 1" in error.what
    assert error.where is not None
    assert "nodes.m" in error.where


def test_density_list_of_wrong_length(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: _run(run_recipe, {"op": "ties", "density": [0.5]}))
    assert "density has 1 values for 2 models" in error.what


@pytest.mark.parametrize("op", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_base_missing(models: dict[str, Path], run_recipe: RunRecipe, op: str) -> None:
    error = expect_error(
        lambda: run_recipe({"sources": SOURCES, "nodes": {"m": {"op": op, "inputs": ["a", "b"]}}, "outputs": {"m": {}}})
    )
    assert "needs 'base'" in error.what
    assert error.where is not None
    assert "nodes.m" in error.where


def test_base_unknown_source_suggests(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: _run(run_recipe, {"op": "ties", "base": "bsae"}))
    assert "'bsae'" in error.what
    assert "neither a source nor a node" in error.what
    assert error.where is not None
    assert "nodes.m.base" in error.where
    assert error.fix is not None
    assert "did you mean 'base'?" in error.fix


def test_base_is_input_zero_of_the_plan(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    """`base:` is read first whatever its place in the recipe; with weights 0 the result is the base."""
    out, _ = _run(run_recipe, {"op": "task_arithmetic", "weights": 0.0})
    base = load(models["base"])
    for key, value in base.items():
        assert torch.equal(out[key], value), key


# --- keys that are not merged -----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_non_float_and_excluded_keys_come_from_base(launch_dir: Path, run_recipe: RunRecipe, op: str) -> None:
    fam = _family()
    (launch_dir / "models").mkdir()
    for i, (name, sd) in enumerate(fam.items()):
        sd[INT_KEY] = torch.tensor(100 + i, dtype=torch.int64)  # distinct per model: base has 100
        save_file(sd, launch_dir / "models" / f"{name}.safetensors")
    extra = {"density": 0.5} if op != "task_arithmetic" else {}
    out, report = _run(run_recipe, {"op": op, "exclude": "conv_last", "weights": 2.0, **extra})
    base = fam["base"]
    assert out[INT_KEY].item() == 100
    assert out[INT_KEY].dtype == torch.int64
    for key in ("conv_last.weight", "conv_last.bias"):
        assert torch.equal(out[key], base[key]), key
    assert not torch.equal(out["conv_first.weight"], base["conv_first.weight"])
    keys = report["nodes"]["m"]["notes"]
    assert keys["merged"] == 5
    assert keys["filtered"] == 2
    assert sorted(keys["copied_keys"]) == sorted([INT_KEY, "conv_last.weight", "conv_last.bias"])
    if op == "task_arithmetic":
        expected = g_task_arithmetic(
            base["body.0.weight"], [fam["a"]["body.0.weight"], fam["b"]["body.0.weight"]], [2, 2]
        )
        torch.testing.assert_close(out["body.0.weight"], expected)
