"""Outputs never destroy what merger did not make: sources, the cache, other files; each job its own files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from merger.errors import MergerError
from tests.conftest import RunRecipe, expect_error, run_cli

Models = dict[str, Path]


def blend(path: str, **output: Any) -> dict[str, Any]:
    return {
        "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {"blend": {"path": path, **output}},
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(run_recipe: RunRecipe, data: dict[str, Any]) -> MergerError:
    error = expect_error(lambda: run_recipe(data))
    assert error.where is not None and "outputs.blend.path" in error.where
    return error


@pytest.mark.parametrize("spelling", ["../models/a.safetensors", "sub/../../models/a.safetensors", "ABSOLUTE"])
def test_an_output_never_replaces_a_source(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, spelling: str
) -> None:
    before = digest(models["a"])
    path = str(models["a"]) if spelling == "ABSOLUTE" else spelling
    error = refused(run_recipe, blend(path))
    assert "would replace the source" in error.what and "a.safetensors" in error.what
    assert digest(models["a"]) == before
    assert not (launch_dir / "cache" / "objects").exists()  # refused before anything was computed


def test_an_output_through_a_symlink_to_a_source_is_refused(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    (launch_dir / "out").mkdir()
    (launch_dir / "out" / "link.safetensors").symlink_to(models["b"])
    error = refused(run_recipe, blend("link.safetensors"))
    assert "would replace the source" in error.what


def test_an_output_into_a_source_folder_is_refused(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    from safetensors.torch import save_file

    from tests.conftest import tiny_state_dict

    folder = launch_dir / "hf"
    folder.mkdir()
    save_file(tiny_state_dict(0), folder / "model.safetensors")
    data = blend("../hf/extra.safetensors")
    data["sources"]["a"] = "hf"
    data["sources"]["b"] = "models/base.safetensors"
    error = refused(run_recipe, data)
    assert "would replace the source" in error.what


def test_an_output_inside_the_cache_is_refused(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    error = refused(run_recipe, blend("../cache/objects/ab/planted.safetensors"))
    assert "inside the cache" in error.what
    assert not (launch_dir / "cache" / "objects" / "ab" / "planted.safetensors").exists()


def test_an_unrelated_file_is_not_replaced_without_overwrite(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    theirs = launch_dir / "notes.safetensors"
    theirs.write_bytes(b"the user's own file")
    error = refused(run_recipe, blend("../notes.safetensors"))
    assert "a file merger did not write" in error.what and "overwrite: true" in (error.fix or "")
    assert theirs.read_bytes() == b"the user's own file"
    error = refused(run_recipe, blend("../notes.safetensors", overwrite=True))  # a recipe's word alone: not enough
    assert "allow_overwrite=true" in (error.fix or "") and theirs.read_bytes() == b"the user's own file"
    report = run_recipe({**blend("../notes.safetensors", overwrite=True), "allow_overwrite": True})
    assert Path(report["outputs"]["blend"]["path"]) == theirs
    assert digest(theirs) == report["outputs"]["blend"]["sha256"]


def test_a_file_merger_wrote_may_be_replaced(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    target = launch_dir / "fixed" / "blend.safetensors"
    first = run_recipe(blend(str(target)))
    data = blend(str(target))
    data["nodes"]["blend"]["alpha"] = 0.25
    second = run_recipe(data, output_dir=launch_dir / "out2")
    assert first["outputs"]["blend"]["sha256"] != second["outputs"]["blend"]["sha256"]
    assert digest(target) == second["outputs"]["blend"]["sha256"]


def test_the_json_beside_a_pth_output_follows_the_same_rule(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    (launch_dir / "legacy.json").write_text('{"the": "user\'s config"}')
    error = refused(run_recipe, blend("../legacy.pth"))
    assert "legacy.json" in error.what and "did not write" in error.what
    assert (launch_dir / "legacy.json").read_text() == '{"the": "user\'s config"}'
    assert not (launch_dir / "legacy.pth").exists()


def test_a_directory_at_the_path_is_refused(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    (launch_dir / "out" / "blend.safetensors").mkdir(parents=True)
    assert "is a directory" in refused(run_recipe, blend("blend.safetensors")).what


def test_two_spellings_of_one_file_are_one_file(models: Models, run_recipe: RunRecipe, launch_dir: Path) -> None:
    data = blend(str(launch_dir / "x.safetensors"))
    data["outputs"]["again"] = {"node": "blend", "path": "../x.safetensors"}
    error = expect_error(lambda: run_recipe(data))
    assert "as output 'blend' does" in error.what


@pytest.mark.parametrize("path", ["a\x00b.safetensors", "a\nb.safetensors", "  "])
def test_control_characters_in_an_output_path_are_refused(models: Models, run_recipe: RunRecipe, path: str) -> None:
    error = expect_error(lambda: run_recipe(blend(path)))
    assert "control character" in error.what or "empty" in error.what


def test_the_report_gives_the_sha256_of_the_file_at_its_path(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    report = run_recipe(blend("../elsewhere/x/../blend.safetensors"))
    out = report["outputs"]["blend"]
    assert out["path"] == str(launch_dir / "elsewhere" / "blend.safetensors")  # normalised
    assert digest(Path(out["path"])) == out["sha256"]


# --- sweeps: the command line ---------------------------------------------------------------------


def write_recipe(launch_dir: Path, path: str) -> None:
    (launch_dir / "recipes").mkdir(exist_ok=True)
    (launch_dir / "recipes" / "r.yaml").write_text(
        "# @package _global_\nalpha: 0.5\nsources:\n  a: models/a.safetensors\n  b: models/b.safetensors\n"
        "nodes:\n  blend: {op: lerp, inputs: [a, b], alpha: '${alpha}'}\n"
        f"outputs:\n  blend: {{path: '{path}'}}\n"
    )


def test_a_sweep_whose_jobs_share_an_output_fails_before_the_first_job(launch_dir: Path, models: Models) -> None:
    write_recipe(launch_dir, str(launch_dir / "shared" / "blend.safetensors"))
    done = run_cli(["-m", "recipe=r", "alpha=0,1"], launch_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "in job 0 and in job 1 of the sweep" in done.stderr and "swept variable" in done.stderr
    assert not (launch_dir / "shared").exists() and not (launch_dir / "outputs").exists()


def test_a_relative_path_climbing_out_of_each_job_is_shared_too(launch_dir: Path, models: Models) -> None:
    write_recipe(launch_dir, "../blend.safetensors")
    done = run_cli(["-m", "recipe=r", "alpha=0,1"], launch_dir)
    assert done.returncode == 2 and "of the sweep" in done.stderr


def test_a_sweep_with_the_variable_in_its_path_runs(launch_dir: Path, models: Models) -> None:
    write_recipe(launch_dir, str(launch_dir / "shared" / "blend_${alpha}.safetensors"))
    done = run_cli(["-m", "recipe=r", "alpha=0,1"], launch_dir)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (launch_dir / "shared").iterdir()) == ["blend_0.safetensors", "blend_1.safetensors"]
    assert " shared/blend_0.safetensors " in done.stdout  # the summary names the normalised path


def test_a_sweep_a_recipe_defines_is_checked_before_its_first_job(launch_dir: Path, models: Models) -> None:
    write_recipe(launch_dir, str(launch_dir / "shared" / "blend.safetensors"))
    with open(launch_dir / "recipes" / "r.yaml", "a") as f:
        f.write("hydra:\n  sweeper:\n    params:\n      alpha: 0,1\n")
    done = run_cli(["-m", "recipe=r"], launch_dir)
    assert done.returncode == 2 and "in job 0 and in job 1 of the sweep" in done.stderr, done.stderr
    assert not (launch_dir / "shared").exists() and not (launch_dir / "outputs").exists()


def test_a_huge_sweep_is_refused_without_listing_it(launch_dir: Path, models: Models) -> None:
    import time

    write_recipe(launch_dir, "blend_${alpha}.safetensors")
    with open(launch_dir / "recipes" / "r.yaml", "a") as f:
        f.write("hydra:\n  sweeper:\n    params:\n      alpha: range(0,300000000)\n")
    start = time.perf_counter()
    done = run_cli(["-m", "recipe=r", "alpha=0,1"], launch_dir)
    assert time.perf_counter() - start < 30
    assert done.returncode == 2 and "more than the limit of 10000 (MAX_SWEEP_JOBS)" in done.stderr, done.stderr


def test_a_forged_provenance_does_not_make_a_file_merger_s(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    from safetensors.torch import save_file

    from tests.conftest import tiny_state_dict

    forged = launch_dir / "theirs.safetensors"
    save_file(tiny_state_dict(5), forged, metadata={"merger.key": "anything"})
    before = digest(forged)
    assert "did not write" in refused(run_recipe, blend("../theirs.safetensors")).what
    assert digest(forged) == before


def test_a_forged_side_json_does_not_make_its_pth_merger_s(
    models: Models, run_recipe: RunRecipe, launch_dir: Path
) -> None:
    (launch_dir / "old.json").write_text('{"key": "k", "version": "1"}')  # no content key: not merger's
    error = refused(run_recipe, blend("../old.pth"))
    assert "old.json" in error.what and "did not write" in error.what
    assert (launch_dir / "old.json").read_text() == '{"key": "k", "version": "1"}'


def test_a_pth_output_never_lands_where_python_runs_pth_files(
    models: Models, run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    site = launch_dir / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    error = refused(run_recipe, blend(str(site / "evil.pth")))
    assert "runs the import lines of .pth files there" in error.what and not (site / "evil.pth").exists()
    on_path = launch_dir / "plugins"
    on_path.mkdir()
    monkeypatch.setattr(sys, "path", [*sys.path, str(on_path)])
    assert "a folder Python reads at start-up" in refused(run_recipe, blend("../plugins/evil.pth")).what
    run_recipe(blend(str(site / "fine.safetensors")))  # other formats may go there


def test_every_job_of_a_sweep_claims_its_files(models: Models, launch_dir: Path) -> None:
    """However many jobs a sweep has (the sweeper checks the first ones together), a job that would write a
    file another job of the sweep wrote is refused as it starts, before it computes anything."""
    from merger.cli.api import JobSource, execute
    from merger.engine.output_targets import CLAIMS_FOLDER, SweepJob

    sweep = launch_dir / "sweep"
    shared = launch_dir / "shared.safetensors"

    def job(number: int, alpha: float) -> Any:
        data = {**blend(str(shared)), "progress": False, "cache_dir": str(launch_dir / "cache")}
        data["nodes"]["blend"]["alpha"] = alpha
        return execute(
            data,
            label="r.yaml",
            source=JobSource(None, None),
            overrides=(),
            launch_dir=launch_dir,
            output_dir=sweep / str(number),
            sweep_job=SweepJob(sweep, number),
        )

    first = job(0, 0.25)
    job(0, 0.25)  # the same job again keeps its own claim
    error = expect_error(lambda: job(300, 0.75))
    assert "in job 0 and in job 300 of the sweep" in error.what and "swept variable" in (error.fix or "")
    assert digest(shared) == first.outputs["blend"].sha256
    assert len(list((sweep / CLAIMS_FOLDER).iterdir())) == 1


def test_sweep_distinctness_resolves_links(models: Models, launch_dir: Path) -> None:
    from merger.engine.output_targets import OutputTarget, check_sweep_targets
    from merger.ops import builtin_registry
    from merger.recipe.model import build_recipe

    (launch_dir / "real").mkdir()
    (launch_dir / "link").symlink_to(launch_dir / "real")
    recipe = build_recipe(blend("x.safetensors"), builtin_registry(), file="r.yaml")
    targets = [
        [OutputTarget("blend", launch_dir / folder / "x.safetensors", None, True)] for folder in ("real", "link")
    ]
    error = expect_error(lambda: check_sweep_targets([recipe, recipe], targets))
    assert "in job 0 and in job 1 of the sweep" in error.what
