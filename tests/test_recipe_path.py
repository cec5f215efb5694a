"""`recipe=path/to/file.yaml`: a recipe file given by its path, for a run and a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merger.cli.recipe_path import default_searchpath, is_recipe_path, recipe_file, rewrite_recipe_args
from merger.cli.recipe_source import BUILTIN_DIR
from tests.conftest import expect_error, run_cli

# a copy of a recipe elsewhere, whose defaults list names a built-in recipe
BEST = """# @package _global_
defaults:
  - demo
  - _self_
alpha: 0.25
description: a tuned demo
"""


@pytest.fixture
def best(launch_dir: Path) -> Path:
    folder = launch_dir / "tuned"
    folder.mkdir()
    path = folder / "best.yaml"
    path.write_text(BEST)
    return path


def test_a_path_is_a_file_and_a_name_is_a_name() -> None:
    assert is_recipe_path("a/b") and is_recipe_path("best.yaml") and is_recipe_path("/abs/x.yaml")
    assert not is_recipe_path("esrgan_dni") and not is_recipe_path("demo")


def test_a_path_becomes_its_stem_and_its_folder_first_on_the_search_path(launch_dir: Path, best: Path) -> None:
    args = rewrite_recipe_args(["recipe=tuned/best.yaml", "alpha=0.3", "-m"], launch_dir)
    assert args[:3] == ["recipe=best", "alpha=0.3", "-m"]
    folder = str(best.parent.resolve())
    assert (
        args[3]
        == f"hydra.searchpath=['merger-recipes://{folder}','merger-recipes://recipes','merger-recipes://builtin']"
    )
    assert default_searchpath() == ("merger-recipes://recipes", "merger-recipes://builtin")
    assert rewrite_recipe_args(["recipe=demo", "alpha=1"], launch_dir) == ["recipe=demo", "alpha=1"]


def test_a_sweep_over_files_sweeps_their_stems(launch_dir: Path, best: Path) -> None:
    other = launch_dir / "other.yaml"
    other.write_text(BEST)
    args = rewrite_recipe_args([f"recipe={best},other.yaml,demo"], launch_dir)
    assert args[0] == "recipe=best,other,demo"
    assert (
        f"merger-recipes://{best.parent.resolve()}" in args[1] and f"merger-recipes://{launch_dir.resolve()}" in args[1]
    )
    (launch_dir / "best.yaml").write_text(BEST)
    error = expect_error(lambda: rewrite_recipe_args(["recipe=best.yaml,tuned/best.yaml"], launch_dir))
    assert "two recipes called 'best'" in error.what


def test_a_missing_or_misnamed_file_is_an_error(launch_dir: Path) -> None:
    error = expect_error(lambda: rewrite_recipe_args(["recipe=nope/x.yaml"], launch_dir))
    assert error.what == "recipe file not found: 'nope/x.yaml'"
    (launch_dir / "my recipe.yaml").write_text(BEST)
    error = expect_error(lambda: rewrite_recipe_args(["recipe=my recipe.yaml"], launch_dir))
    assert "its name must be NAME.yaml" in error.what


def test_the_job_finds_its_file_along_its_search_path(launch_dir: Path, best: Path) -> None:
    searchpath = [f"merger-recipes://{best.parent}", "merger-recipes://recipes", "merger-recipes://builtin"]
    assert recipe_file(searchpath, "best", launch_dir) == best
    assert recipe_file(searchpath, "demo", launch_dir) == BUILTIN_DIR / "demo.yaml"
    assert recipe_file(None, "demo", launch_dir) == BUILTIN_DIR / "demo.yaml"
    assert recipe_file(searchpath, "nothing", launch_dir) is None


def _reports(root: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("**/merge_report.json"))]


def test_run_a_recipe_file_by_its_path(launch_dir: Path, best: Path) -> None:
    done = run_cli(["recipe=tuned/best.yaml", "alpha=0.3", "preview=false", "sanity=off"], launch_dir)
    assert done.returncode == 0, done.stderr
    (report,) = _reports(launch_dir / "outputs")
    recipe = report["recipe"]
    assert isinstance(recipe, dict)
    assert recipe["name"] == "best" and Path(str(recipe["file"])) == best.resolve()
    assert recipe["description"] == "a tuned demo"  # its own value, over the built-in demo it includes
    assert any("alpha0.3" in str(out["path"]) for out in report["outputs"].values())  # type: ignore[attr-defined]


def test_sweep_a_recipe_file_by_its_absolute_path(launch_dir: Path, best: Path) -> None:
    done = run_cli(["-m", f"recipe={best}", "alpha=0,1", "preview=false", "sanity=off"], launch_dir)
    assert done.returncode == 0, done.stderr
    reports = _reports(launch_dir / "outputs" / "multirun")
    assert len(reports) == 2
    assert all(Path(str(r["recipe"]["file"])) == best.resolve() for r in reports)  # type: ignore[index]


def test_a_missing_recipe_file_is_one_block(launch_dir: Path) -> None:
    done = run_cli(["recipe=nope/best.yaml", "alpha=0.3"], launch_dir)
    assert done.returncode == 2
    assert done.stderr.count("merger: error:") == 1 and "recipe file not found: 'nope/best.yaml'" in done.stderr
    assert "Traceback" not in done.stderr and not (launch_dir / "outputs").exists()


def test_a_sweep_over_files_runs_each_file_it_names(launch_dir: Path) -> None:
    """One search path finds every stem: a same-named file in an earlier folder would run instead."""
    for folder, name in (("d1", "x"), ("d1", "y"), ("d2", "y"), ("d1", "demo")):
        (launch_dir / folder).mkdir(exist_ok=True)
        (launch_dir / folder / f"{name}.yaml").write_text("# @package _global_\n")
    error = expect_error(lambda: rewrite_recipe_args(["-m", "recipe=d1/x.yaml,d2/y.yaml"], launch_dir))
    assert "would run" in error.what and "d1/y.yaml" in error.what and "'d2/y.yaml'" in error.what
    error = expect_error(lambda: rewrite_recipe_args(["-m", "recipe=d1/x.yaml,demo"], launch_dir))
    assert "d1/demo.yaml" in error.what and "for 'demo'" in error.what
    assert rewrite_recipe_args(["-m", "recipe=d2/y.yaml,d1/x.yaml"], launch_dir)[1].startswith("recipe=y,x")
