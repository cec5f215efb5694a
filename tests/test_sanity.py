"""The sanity check of merged image models (merger.report.sanity), the `sanity:` and `family:` switches,
every warning of a job in its report, and the jobs that warned at the end of a sweep.

A "broken" merge: the lerp of a tiny ESRGAN with its negation at alpha 0.5 has all-zero weights, so
its output is 0 everywhere (ESRGAN has no skip from the input to the output): constant and black.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from merger.report import sanity as sanity_module
from merger.report.sanity import CONSTANT_STD, GREY_SIDE, SAMPLE_SIDE, check
from tests.conftest import RunRecipe, expect_error, fine_tune, run_cli, tiny_state_dict
from tests.esrgan_models import old_layout

StateDict = dict[str, torch.Tensor]
BROKEN_SAYS = "the inputs may not share a parent"


def tiny_esrgan(seed: int = 1) -> StateDict:
    return old_layout(scale_stages=2, filters=8, blocks=1, growth=32, seed=seed)  # spandrel wants growth 32


@pytest.fixture
def esrgans(launch_dir: Path) -> dict[str, Path]:
    """A tiny 4x ESRGAN, a fine-tune of it, its negation, one with a NaN, and one spandrel cannot load."""
    a = tiny_esrgan()
    with_nan = {k: v.clone() for k, v in a.items()}
    with_nan["model.0.bias"][0] = float("nan")
    models = {
        "a": a,
        "b": fine_tune(a, 2, scale=0.01),
        "neg": {k: -v for k, v in a.items()},
        "nan": with_nan,
        "g4": old_layout(scale_stages=2, growth=4),  # ESRGAN by its keys, but spandrel builds growth 32
        "g4b": fine_tune(old_layout(scale_stages=2, growth=4), 3, scale=0.01),
    }
    (launch_dir / "models").mkdir()
    paths = {}
    for name, sd in models.items():
        paths[name] = launch_dir / "models" / f"{name}.safetensors"
        save_file(sd, paths[name])
    return paths


def recipe(nodes: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {
        **settings,
        "sources": {name: f"models/{name}.safetensors" for name in ("a", "b", "neg", "nan", "g4", "g4b")},
        "nodes": nodes,
        "outputs": {name: {} for name in nodes},
    }


GOOD = {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}
BROKEN = {"op": "lerp", "inputs": ["a", "neg"], "alpha": 0.5}


def sanity_warnings(report: dict[str, Any]) -> list[str]:
    return [w for w in report["warnings"] if "the merged model's output" in w]


# --- warn (the default) -----------------------------------------------------------------------------


def test_a_good_blend_passes(esrgans: dict[str, Path], run_recipe: RunRecipe) -> None:
    report = run_recipe(recipe({"blend": GOOD}))
    sanity = report["nodes"]["blend"]["sanity"]
    assert sanity["status"] == "ok" and sanity["device"] == "cpu"
    assert sanity["model"] == "ESRGAN 4x, 3 -> 3 channels"
    grey, sample = sanity["images"]["grey"], sanity["images"]["sample"]
    assert (grey["size"], grey["output"]) == ([GREY_SIDE] * 2, [4 * GREY_SIDE] * 2)
    assert (sample["size"], sample["output"]) == ([SAMPLE_SIDE] * 2, [4 * SAMPLE_SIDE] * 2)  # 256 px / 4
    assert sample["std"] > CONSTANT_STD and sample["nonfinite"] == 0 and sample["found"] == []
    assert report["warnings"] == []
    assert "warning" not in sanity


def test_a_broken_merge_warns_in_the_summary_and_the_report(
    esrgans: dict[str, Path], run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="merger")
    report = run_recipe(recipe({"blend": GOOD, "broken": BROKEN}))
    sanity = report["nodes"]["broken"]["sanity"]
    assert sanity["status"] == "warned"
    assert sanity["images"]["sample"]["found"] == ["constant", "black"]
    assert sanity["images"]["sample"]["max"] == 0.0 and sanity["images"]["sample"]["std"] == 0.0
    assert sanity["images"]["grey"]["found"] == ["black"]  # a flat input rightly gives a flat output
    expected = (
        "node 'broken': the merged model's output is black on a flat grey (0.5) image (max 0);"
        " constant and black on the sample (std 0, max 0): the inputs may not share a parent"
        " (their weights cancel out), or the model may be broken"
    )
    assert sanity["warning"] == expected
    assert sanity_warnings(report) == [expected]  # once per node, in the top-level warnings
    assert report["nodes"]["blend"]["sanity"]["status"] == "ok"
    assert Path(report["outputs"]["broken"]["path"]).is_file()  # a warning: the output is placed
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == expected]
    assert len(warned) == 1
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merger: recipe")]
    assert "sanity: " + expected.removeprefix("node 'broken': ") in summary
    assert "sanity: ok (grey -> mean" in summary
    assert f"warning {expected}" in summary


def test_non_finite_output_says_the_model_may_be_broken(esrgans: dict[str, Path], run_recipe: RunRecipe) -> None:
    report = run_recipe(recipe({"blend": {"op": "lerp", "inputs": ["a", "nan"], "alpha": 0.5}}))
    sanity = report["nodes"]["blend"]["sanity"]
    assert sanity["status"] == "warned"
    assert "not finite" in sanity["images"]["sample"]["found"]
    assert sanity["images"]["sample"]["nonfinite"] > 0
    assert "the model may be broken (NaN or inf" in sanity["warning"]
    # the non-finite weight is said too, by the non-finite check: both are in the report's warnings
    assert any("its output holds" in w for w in report["warnings"])
    assert sanity["warning"] in report["warnings"]


def test_the_check_runs_on_a_cache_hit_and_is_not_part_of_the_key(
    esrgans: dict[str, Path], run_recipe: RunRecipe
) -> None:
    first = run_recipe(recipe({"broken": BROKEN}))
    again = run_recipe(recipe({"broken": {**BROKEN, "sanity": "off"}}, sanity="error"), output_dir=Path("out2"))
    assert again["nodes"]["broken"]["status"] == "cached"
    assert again["nodes"]["broken"]["key"] == first["nodes"]["broken"]["key"]
    assert "sanity" not in again["nodes"]["broken"] and sanity_warnings(again) == []
    third = run_recipe(recipe({"broken": BROKEN}), output_dir=Path("out3"))
    assert third["nodes"]["broken"]["status"] == "cached"
    assert third["nodes"]["broken"]["sanity"]["warning"] == first["nodes"]["broken"]["sanity"]["warning"]


@pytest.mark.parametrize("off", ["off", False])  # YAML 1.1 reads `sanity: off` as false
def test_sanity_off_skips_the_check(esrgans: dict[str, Path], run_recipe: RunRecipe, off: object) -> None:
    report = run_recipe(recipe({"broken": BROKEN}, sanity=off))
    assert "sanity" not in report["nodes"]["broken"]
    assert sanity_warnings(report) == []
    node_off = run_recipe(recipe({"broken": {**BROKEN, "sanity": off}}), output_dir=Path("out2"))
    assert "sanity" not in node_off["nodes"]["broken"]


def test_only_merge_nodes_are_checked_unless_a_node_asks(esrgans: dict[str, Path], run_recipe: RunRecipe) -> None:
    nodes = {
        "blend": GOOD,
        "x2": {"op": "convert_scale", "inputs": ["blend"], "scale": 2},
        "x1": {"op": "convert_scale", "inputs": ["blend"], "scale": 1, "method": "unshuffle", "sanity": "warn"},
    }
    report = run_recipe(recipe(nodes))
    assert "sanity" not in report["nodes"]["x2"]
    assert report["nodes"]["x1"]["sanity"]["status"] == "ok"
    assert report["nodes"]["x1"]["sanity"]["model"] == "ESRGAN 1x, 3 -> 3 channels"


def test_a_model_spandrel_cannot_load_is_skipped_with_a_note(
    esrgans: dict[str, Path], run_recipe: RunRecipe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="merger")
    report = run_recipe(recipe({"blend": {"op": "lerp", "inputs": ["g4", "g4b"], "alpha": 0.5}}, sanity="error"))
    sanity = report["nodes"]["blend"]["sanity"]
    assert sanity["status"] == "skipped"
    assert sanity["note"] == "not a model spandrel loads (Error(s) in loading state_dict for RRDBNet)"
    assert report["warnings"] == []
    assert any("sanity: node 'blend' skipped, not a model spandrel loads" in r.getMessage() for r in caplog.records)


def test_a_model_that_fails_while_running_is_reported_and_the_run_goes_on(
    esrgans: dict[str, Path], run_recipe: RunRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr(sanity_module, "_measure", out_of_memory)
    report = run_recipe(recipe({"blend": GOOD}, sanity="error"))  # not the model's verdict: never the error
    sanity = report["nodes"]["blend"]["sanity"]
    assert sanity["status"] == "failed"
    assert sanity["note"] == "CUDA out of memory. Tried to allocate 20.00 GiB"
    assert sanity["warning"] == (
        "node 'blend': the sanity check could not run the merged model on cpu"
        " (CUDA out of memory. Tried to allocate 20.00 GiB): it may be broken"
    )
    assert report["warnings"] == [sanity["warning"]]
    assert Path(report["outputs"]["blend"]["path"]).is_file()


def test_a_non_image_merge_has_no_sanity_entry(models: dict[str, Path], run_recipe: RunRecipe) -> None:
    """(That such a run never imports spandrel or torch: tests/test_preview.py.)"""
    report = run_recipe(
        {
            "sources": {"a": str(models["a"]), "b": str(models["b"])},
            "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
            "outputs": {"blend": {}},
        }
    )
    assert "sanity" not in report["nodes"]["blend"]


def test_sanity_error_in_process_names_the_node(esrgans: dict[str, Path], run_recipe: RunRecipe) -> None:
    error = expect_error(lambda: run_recipe(recipe({"broken": {**BROKEN, "sanity": "error"}})))
    assert error.where == "test.yaml, nodes.broken"
    assert error.what.startswith("the merged model's output is black on a flat grey (0.5) image (max 0);")
    assert error.what.endswith("(sanity: error)")
    assert error.fix is not None and "sanity: warn on the node" in error.fix
    assert not (Path("out") / "broken.safetensors").exists()


def test_bad_sanity_values_are_refused(esrgans: dict[str, Path], run_recipe: RunRecipe) -> None:
    node = expect_error(lambda: run_recipe(recipe({"broken": {**BROKEN, "sanity": "loud"}})))
    assert (
        node.what == "sanity must be warn, error or off, got 'loud'" and node.where == "test.yaml, nodes.broken.sanity"
    )
    run = expect_error(lambda: run_recipe(recipe({"broken": BROKEN}, sanity="fatal")))
    assert "'warn', 'error' or 'off'" in run.what and run.where == "test.yaml, sanity"


# --- the command line: exit 2, nothing placed --------------------------------------------------------

BROKEN_RECIPE = """# @package _global_
sources:
  a: models/a.safetensors
  neg: models/neg.safetensors
nodes:
  broken: {op: lerp, inputs: [a, neg], alpha: 0.5%s}
outputs:
  broken: {path: broken.safetensors}
"""


@pytest.mark.parametrize(("node_setting", "args"), [("", ["sanity=error"]), (", sanity: error", [])])
def test_sanity_error_exits_2_with_nothing_placed(
    esrgans: dict[str, Path], launch_dir: Path, node_setting: str, args: list[str]
) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "x.yaml").write_text(BROKEN_RECIPE % node_setting)
    done = run_cli(["recipe=x", "progress=false", *args], launch_dir)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "merger: error: the merged model's output is black" in done.stderr
    assert "constant and black on the sample (std 0, max 0)" in done.stderr
    assert "where: " in done.stderr and "nodes.broken" in done.stderr
    assert ("sanity: warn on the node" if node_setting else "sanity=warn") in done.stderr
    assert list((launch_dir / "outputs").glob("*/*/broken.safetensors")) == []
    assert list((launch_dir / "outputs").glob("*/*/merge_report.json")) == []


# --- the family check's switch ----------------------------------------------------------------------


@pytest.fixture
def strangers(launch_dir: Path) -> dict[str, str]:
    """Two unrelated (independently initialised) models, as tests/test_family.py has them."""
    save_file(tiny_state_dict(0), launch_dir / "one.safetensors")
    save_file(tiny_state_dict(1), launch_dir / "other.safetensors")
    return {"one": "one.safetensors", "other": "other.safetensors"}


def family_recipe(sources: dict[str, str], node: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    return {
        **settings,
        "sources": sources,
        "nodes": {"blend": {"op": "lerp", "inputs": ["one", "other"], "alpha": 0.5, **(node or {})}},
        "outputs": {"blend": {}},
    }


def family_warnings(report: dict[str, Any]) -> list[str]:
    return [w for w in report["warnings"] if "looks unrelated" in w]


def test_the_family_warning_is_in_the_report_also_on_a_cache_hit(
    strangers: dict[str, str], run_recipe: RunRecipe
) -> None:
    first = run_recipe(family_recipe(strangers))
    (warning,) = family_warnings(first)
    assert warning.startswith("node 'blend': input 'other' looks unrelated to 'one' (median cosine")
    again = run_recipe(family_recipe(strangers), output_dir=Path("out2"))
    assert again["nodes"]["blend"]["status"] == "cached"
    assert family_warnings(again) == [warning]
    assert again["nodes"]["blend"]["notes"]["family"] == first["nodes"]["blend"]["notes"]["family"]


@pytest.mark.parametrize("where", ["run", "node"])
def test_family_error_makes_the_warning_fatal(strangers: dict[str, str], run_recipe: RunRecipe, where: str) -> None:
    data = family_recipe(strangers, family="error") if where == "run" else family_recipe(strangers, {"family": "error"})
    error = expect_error(lambda: run_recipe(data))
    assert error.what.startswith("input 'other' looks unrelated to 'one' (median cosine")
    assert error.where == "test.yaml, nodes.blend"
    assert error.fix is not None and "family: warn" in error.fix
    assert not (Path("out") / "blend.safetensors").exists()
    assert list(Path("cache").glob("objects/*/*.safetensors")) == []  # it failed before computing


@pytest.mark.parametrize("computed_under", ["warn", "off"])  # off: the entry has no figures, compared on the hit
def test_family_error_on_a_cache_hit(strangers: dict[str, str], run_recipe: RunRecipe, computed_under: str) -> None:
    run_recipe(family_recipe(strangers, family=computed_under))
    error = expect_error(lambda: run_recipe(family_recipe(strangers, family="error"), output_dir=Path("out2")))
    assert error.what.startswith("input 'other' looks unrelated to 'one'")
    assert not (Path("out2") / "blend.safetensors").exists()


@pytest.mark.parametrize("off", ["off", False])
def test_family_off_skips_the_check(strangers: dict[str, str], run_recipe: RunRecipe, off: object) -> None:
    report = run_recipe(family_recipe(strangers, {"family": off}, family="error"))
    assert family_warnings(report) == []
    assert "family" not in report["nodes"]["blend"].get("notes", {})


def test_family_on_an_op_without_a_family_check_is_refused(strangers: dict[str, str], run_recipe: RunRecipe) -> None:
    data = family_recipe(strangers)
    data["nodes"]["blend"] = {"op": "select", "inputs": ["one", "other"], "take": [], "family": "error"}
    error = expect_error(lambda: run_recipe(data))
    assert error.where == "test.yaml, nodes.blend.family" and "op 'select' has no family check" in error.what


# --- every warning of a job in its report -----------------------------------------------------------


def test_every_kind_of_warning_lands_in_the_report(esrgans: dict[str, Path], run_recipe: RunRecipe) -> None:
    nodes = {
        "broken": BROKEN,  # the family check's and the sanity check's
        "far": {"op": "lerp", "inputs": ["a", "b"], "alpha": 1.5},  # the plan's
        "nanblend": {"op": "lerp", "inputs": ["a", "nan"], "alpha": 0.5},  # non-finite values
    }
    report = run_recipe(recipe(nodes))
    said = report["warnings"]
    assert len(said) == len(set(said))
    assert any(w.startswith("node 'far':") and "outside [0, 1]" in w for w in said)
    assert any(w.startswith("node 'broken': input 'neg' looks unrelated to 'a'") for w in said)
    assert any(w.startswith("node 'broken': the merged model's output is") for w in said)
    assert any(w.startswith("node 'nanblend': its input 'nan' holds") for w in said)
    assert any(w.startswith("node 'nanblend': the merged model's output is") for w in said)


# --- a sweep lists the jobs that warned ---------------------------------------------------------------

SWEEP_RECIPE = """# @package _global_
alpha: 0.5
sources:
  a: models/a.safetensors
  neg: models/neg.safetensors
nodes:
  blend: {op: lerp, inputs: [a, neg], alpha: "${alpha}", family: off}
outputs:
  blend: {path: "blend_${alpha}.safetensors"}
"""


def test_a_sweep_lists_the_jobs_that_warned(esrgans: dict[str, Path], launch_dir: Path) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "x.yaml").write_text(SWEEP_RECIPE)
    done = run_cli(["-m", "recipe=x", "progress=false", "alpha=0,0.5", "hydra.sweep.dir=sweep"], launch_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads((launch_dir / "sweep" / "sweep_report.json").read_text())
    assert report["warned"] == ["1"]
    rows = {row["job"]: row for row in report["jobs"]}
    assert rows["0"]["warnings"] == []
    (warning,) = rows["1"]["warnings"]
    assert warning.startswith("node 'blend': the merged model's output is black")
    said = done.stdout + done.stderr  # the launching process logs through Hydra's logging
    assert "merger: job 1 warned (of 2; every warning is in sweep_report.json):" in said
    assert f"  job 1 ({' '.join(rows['1']['overrides'])}): {warning}" in said
    assert "alpha=0.5" in rows["1"]["overrides"]
    assert "sanity: ok (grey -> mean" in done.stdout  # job 0's summary


# --- cost -------------------------------------------------------------------------------------------


def test_the_check_is_cheap(esrgans: dict[str, Path]) -> None:
    check("warm", esrgans["a"])  # spandrel's and torch's imports, once
    found = check("a", esrgans["a"])
    assert found.status == "ok"
    assert found.seconds < 5.0  # about 0.2 s for this tiny 4x ESRGAN on two loaded CPU cores


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_check_runs_on_the_runs_cuda_device(esrgans: dict[str, Path], run_recipe: RunRecipe) -> None:
    report = run_recipe(recipe({"blend": GOOD, "broken": BROKEN}, device="cuda"))
    assert report["nodes"]["blend"]["sanity"]["device"] == "cuda"
    assert report["nodes"]["blend"]["sanity"]["status"] == "ok"
    assert report["nodes"]["broken"]["sanity"]["status"] == "warned"
