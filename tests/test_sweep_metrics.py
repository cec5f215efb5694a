"""A sweep of the demo measures every job: sweep_report.json rows with metrics and the objective,
the best job, best.yaml (which `merger recipe=<path>` runs again from the cache), report.html."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

QUIET = ["preview=false", "sanity=off", "progress=false", "cache_dir=cache"]


def test_a_sweep_measures_each_job_and_writes_the_best_recipe(tmp_path: Path) -> None:
    swept = run_cli(["-m", "alpha=0,0.5,1", "hydra.sweep.dir=sweep", *QUIET], tmp_path)
    assert swept.returncode == 0, swept.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep_report.json").read_text())
    assert summary["objective"] == [{"metric": "psnr", "output": "blend", "direction": "maximize"}]
    assert summary["swept"] == {"alpha": [0, 0.5, 1]}
    rows = summary["jobs"]
    assert [row["values"] for row in rows] == [{"alpha": 0}, {"alpha": 0.5}, {"alpha": 1}]
    for row in rows:
        job = json.loads((tmp_path / "sweep" / row["job"] / "merge_report.json").read_text())
        assert row["metrics"]["blend"] == {
            m: job["metrics"]["blend"][m] for m in ("psnr", "ssim", "sharpness", "psnr_rgb")
        }
        assert row["objective"] == job["metrics"]["blend"]["psnr"]
        assert row["provenance"]["command"].startswith("merger ")
    psnr = [row["objective"] for row in rows]
    sharp = [row["metrics"]["blend"]["sharpness"] for row in rows]
    assert psnr[0] > psnr[1] > psnr[2] and sharp[0] < sharp[1] < sharp[2]  # the DNI trade-off
    assert summary["best"] == "0" and summary["pareto"] == []
    assert "best job 0 (alpha=0)" in swept.stdout
    best = tmp_path / "sweep" / "best.yaml"
    text = best.read_text()
    assert text.startswith("# @package _global_\n") and "alpha: 0\n" in text and "cache_dir" not in text
    assert (tmp_path / "sweep" / "report.html").is_file()

    again = run_cli([f"recipe={best}", "cache_dir=cache"], tmp_path)
    assert again.returncode == 0, again.stderr
    out_dir = Path(next(line for line in again.stdout.splitlines() if "-> " in line).split("-> ")[1].split(" (")[0])
    report = json.loads((tmp_path / out_dir / "merge_report.json").read_text())
    first = json.loads((tmp_path / "sweep" / "0" / "merge_report.json").read_text())
    assert report["nodes"]["blend"]["status"] == "cached"
    assert report["metrics"]["blend"]["cached"] is True
    assert report["outputs"]["blend"]["sha256"] == first["outputs"]["blend"]["sha256"]
    assert report["recipe"]["file"] == str(best)
    assert (tmp_path / out_dir / "report.html").is_file()


def test_two_objectives_give_a_pareto_front(tmp_path: Path) -> None:
    swept = run_cli(["-m", "alpha=0,0.5,1", "objective=[psnr,sharpness]", "hydra.sweep.dir=sweep", *QUIET], tmp_path)
    assert swept.returncode == 0, swept.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep_report.json").read_text())
    assert [o["metric"] for o in summary["objective"]] == ["psnr", "sharpness"]
    assert summary["pareto"] == ["0", "1", "2"]  # each trades PSNR for sharpness: none dominates another
    assert summary["best"] == "0"  # the front's best by the first objective
    assert [len(row["objective"]) for row in summary["jobs"]] == [2, 2, 2]
