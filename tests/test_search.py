"""Searches (Hydra's Optuna sweeper): the objective a job returns, merger's sweeper refusing a search,
the pre-flight at the bounds of the search space, seeded repeatable searches, several objectives,
a search kept in a recipe, and trials in parallel."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from merger.cli.search_check import (
    MAX_SEARCH_JOBS,
    SEARCH_ERROR,
    bound_jobs,
    check_directions,
    search_in_basic_sweep,
)
from tests.conftest import REPO, expect_error, run_cli

QUICK = ["preview=false", "sanity=off", "family=off"]
OPTUNA = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"]

# the demo pair spliced: p is a probability, so p=interval(0,2) has a bad high bound
SPLICE = """# @package _global_
p: 0.5
sources:
  psnr: pkg://merger/demo/psnr.safetensors
  sharp: pkg://merger/demo/sharp.safetensors
nodes:
  mix: {op: splice, inputs: [psnr, sharp], p: "${p}"}
outputs:
  mix: {path: "mix_${p}.safetensors"}
evaluate: {images: sample, degrade: box, metrics: [psnr]}
objective: psnr
"""


def _parsed(*lines: str) -> list[Any]:
    return list(OverridesParser.create().parse_overrides(list(lines)))


# -- merger's sweeper: a grid, which refuses a search --------------------------------------------


def test_a_plain_sweep_is_not_a_search() -> None:
    assert search_in_basic_sweep({"alpha": "0,0.5"}, {}, ["seed=1,2"], ["hydra.sweeper.max_batch_size=2"]) is False


@pytest.mark.parametrize(
    ("params", "settings", "arguments", "hydra_overrides"),
    [
        (None, {}, ["alpha=interval(0,1)"], []),  # an interval on the command line
        (None, {"n_trials": 4}, ["alpha=0,1"], ["hydra.sweeper.n_trials=4"]),  # n_trials on the command line
        ({"alpha": "interval(0,1)"}, {}, [], []),  # the recipe's search, and no sweep of the user's own
        (None, {"n_trials": 12, "direction": "maximize"}, ["seed=3"], []),  # the same (seed=3 is one value)
    ],
)
def test_merger_s_sweeper_refuses_a_search(
    params: dict[str, str] | None, settings: dict[str, Any], arguments: list[str], hydra_overrides: list[str]
) -> None:
    error = expect_error(lambda: search_in_basic_sweep(params, settings, arguments, hydra_overrides))
    assert error.what == SEARCH_ERROR
    assert "merger -m hydra/sweeper=optuna" in (error.fix or "") and ".[search]" in (error.fix or "")


def test_a_sweep_of_a_recipe_that_keeps_a_search_sweeps_the_command_line_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = {"a0": "interval(0,1)", "a1": "interval(0,1)"}
    assert search_in_basic_sweep(params, {"n_trials": 12}, ["a0=0,0.5"], []) is True
    assert "runs the command line's values" in capsys.readouterr().err


def test_the_sweeper_error_is_one_block_before_any_job(launch_dir: Path) -> None:
    done = run_cli(["-m", "alpha=interval(0,1)", *QUICK], launch_dir)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("merger: error:") == 1 and SEARCH_ERROR in done.stderr
    assert not (launch_dir / "outputs" / "multirun").exists()


# -- the pre-flight of a search -------------------------------------------------------------------


def test_the_bounds_of_each_dimension_together_and_each_choice() -> None:
    dims = _parsed("a=interval(0,1)", "b=range(0,10,3)", "c=choice(x,y,z)", "+d=tag(log,interval(0.001,1))")
    jobs = bound_jobs(dims, optuna=True)
    assert jobs[0] == ["a=0.0", "b=0", "c=x", "+d=0.001"]  # every low bound together
    assert jobs[1] == ["a=1.0", "b=9", "c=z", "+d=1.0"]  # every high bound together (range: its last value)
    assert jobs[2:] == [
        ["a=0.0", "b=0", "c=y", "+d=0.001"],
        ["a=0.0", "b=0", "c=z", "+d=0.001"],
    ]  # each choice, others low
    assert bound_jobs(_parsed("b=range(0,9,3)"), optuna=True)[1] == ["b=9"]  # Optuna's range includes its stop
    assert bound_jobs(_parsed("b=range(0,9,3)"), optuna=False)[1] == ["b=6"]  # Hydra's does not
    assert bound_jobs(_parsed("f=range(0.0,1.0,0.25)"), optuna=True)[1] == ["f=1.0"]
    many = bound_jobs(_parsed("c=range(0,500)", f"d=choice({','.join(map(str, range(100)))})"), optuna=True)
    assert len(many) > MAX_SEARCH_JOBS  # the pre-flight checks the first MAX_SEARCH_JOBS


@pytest.mark.parametrize(
    ("line", "said"), [("a=interval(1,0)", "not an interval"), ("a=tag(log,interval(0,1))", "above 0")]
)
def test_an_empty_or_impossible_dimension_is_an_error(line: str, said: str) -> None:
    error = expect_error(lambda: bound_jobs(_parsed(line), optuna=True))
    assert said in error.what


def _objective(metric: str, direction: str, output: str | None = None) -> Any:
    return SimpleNamespace(metric=metric, direction=direction, output=output)


def test_the_sweeper_s_directions_must_be_the_objectives_own() -> None:
    from hydra_plugins.hydra_optuna_sweeper.config import Direction

    psnr, sharp = _objective("psnr", "maximize"), _objective("sharpness", "maximize")
    check_directions([psnr], "maximize", "demo.yaml")
    check_directions([psnr, sharp], ["maximize", "maximize"], "demo.yaml")
    error = expect_error(lambda: check_directions([psnr], Direction.minimize, "demo.yaml"))
    assert "should maximize psnr, but it would minimize it" in error.what and "default" in error.what
    assert error.fix == "hydra.sweeper.direction=maximize"
    error = expect_error(lambda: check_directions([psnr, sharp], "maximize", "demo.yaml"))
    assert "2 objectives (psnr, sharpness) but 1 directions" in error.what
    assert error.fix == "hydra.sweeper.direction=[maximize,maximize]"
    error = expect_error(lambda: check_directions([], "maximize", "demo.yaml"))
    assert error.what == "a search needs an objective: add `objective: METRIC` and an `evaluate` block"


def test_a_bad_bound_fails_before_any_trial(launch_dir: Path) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "spliced.yaml").write_text(SPLICE)
    done = run_cli([*OPTUNA, "recipe=spliced", "p=interval(0,2)", "hydra.sweeper.n_trials=2", *QUICK], launch_dir)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("merger: error:") == 1 and "p=2.0 is not a probability" in done.stderr
    assert "the search at p=2.0" in done.stderr and "Traceback" not in done.stderr
    assert not (launch_dir / "outputs").exists()


def test_a_search_that_minimizes_psnr_is_an_error(launch_dir: Path) -> None:
    done = run_cli(
        ["-m", "hydra/sweeper=optuna", "alpha=interval(0,1)", "hydra.sweeper.direction=minimize", *QUICK], launch_dir
    )
    assert done.returncode == 2, done.stderr
    assert "should maximize psnr, but it would minimize it" in done.stderr
    assert "hydra.sweeper.direction=maximize" in done.stderr and not (launch_dir / "outputs").exists()


# -- searches, end to end -------------------------------------------------------------------------


def _sweeps(launch_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (launch_dir / "outputs" / "multirun").glob("*/*/optimization_results.yaml"))


def _trials(sweep: Path) -> list[list[str]]:
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return [yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) for job in jobs]


def test_a_seeded_search_finds_a_value_and_is_repeatable(launch_dir: Path) -> None:
    args = [*OPTUNA, "alpha=interval(0,1)", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=7", *QUICK]
    for _ in range(2):
        done = run_cli(args, launch_dir)
        assert done.returncode == 0, done.stderr
    first, second = _sweeps(launch_dir)
    assert len(_trials(first)) == 4 and _trials(first) == _trials(second)
    result = yaml.safe_load((first / "optimization_results.yaml").read_text())
    assert 0 <= result["best_params"]["alpha"] <= 1 and math.isfinite(result["best_value"])
    assert result == yaml.safe_load((second / "optimization_results.yaml").read_text())


def test_a_search_of_two_objectives(launch_dir: Path) -> None:
    args = ["-m", "hydra/sweeper=optuna", "alpha=interval(0,1)", "objective=[psnr,sharpness]"]
    args += ["hydra.sweeper.direction=[maximize,maximize]", "hydra.sweeper.n_trials=2", *QUICK]
    done = run_cli(args, launch_dir)
    assert done.returncode == 0, done.stderr
    (sweep,) = _sweeps(launch_dir)
    solutions = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    assert solutions and all(len(s["values"]) == 2 for s in solutions)


def test_the_demo_search_recipe_with_trials_in_parallel(launch_dir: Path) -> None:
    args = ["-m", f"recipe={REPO / 'recipes' / 'demo_search.yaml'}", "hydra/sweeper=optuna"]
    args += ["hydra.sweeper.n_trials=3", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2", *QUICK]
    done = run_cli(args, launch_dir)
    assert done.returncode == 0, done.stderr
    assert "is launching 2 jobs" in done.stdout  # a batch of two trials, to joblib's processes
    (sweep,) = _sweeps(launch_dir)
    trials = _trials(sweep)
    assert len(trials) == 3 and all(any(o.startswith("a3=") for o in t) for t in trials)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert sorted(result["best_params"]) == ["a0", "a1", "a2", "a3"]
    assert all(0 <= v <= 1 for v in result["best_params"].values())
    # the first two trials ran at once: each started before the other ended
    started = [os.stat(sweep / str(i) / ".hydra" / "config.yaml").st_mtime for i in (0, 1)]
    ended = [os.stat(sweep / str(i) / "merge_report.json").st_mtime for i in (0, 1)]
    assert started[0] < ended[1] and started[1] < ended[0]


def test_a_search_without_the_optuna_sweeper_says_what_to_install(
    launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from merger.cli.search_check import preflight_search

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "optuna" in name else real(name, *a))
    error = expect_error(lambda: preflight_search(["hydra/sweeper=optuna", "alpha=interval(0,1)"], launch_dir))
    assert "not installed" in error.what and ".[search]" in (error.fix or "")


def test_a_plain_sweep_of_a_recipe_that_keeps_a_search(launch_dir: Path) -> None:
    args = ["-m", f"recipe={REPO / 'recipes' / 'demo_search.yaml'}", "a0=0,1", *QUICK]
    done = run_cli(args, launch_dir)
    assert done.returncode == 0, done.stderr
    assert "this sweep runs the command line's values" in done.stderr
    (report,) = (launch_dir / "outputs" / "multirun").glob("*/*/sweep_report.json")
    assert len(list(report.parent.glob("[0-9]*/merge_report.json"))) == 2


def test_a_recipe_s_direction_alone_is_no_search() -> None:
    """A recipe may say how a search of it goes (direction, seed); a grid sweep of it ignores that."""
    settings = {"direction": "maximize", "sampler": {"seed": 1}}
    assert search_in_basic_sweep({"alpha": "0,1"}, settings, ["seed=1,2"], []) is False
    error = expect_error(
        lambda: search_in_basic_sweep(None, settings, ["seed=1,2"], ["hydra.sweeper.direction=maximize"])
    )
    assert error.what == SEARCH_ERROR  # on the command line, with merger's sweeper: a search meant for Optuna's
