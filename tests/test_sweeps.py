"""Sweeps through Hydra's launchers, in a subprocess, on tiny models: the shared node is computed once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.conftest import fine_tune, load, run_cli, tiny_state_dict

SWEEP = """# @package _global_
alpha: 0.5
sources:
  m1: models/m1.safetensors
  m2: models/m2.safetensors
  m3: models/m3.safetensors
  m4: models/m4.safetensors
nodes:
  avg: {op: average, inputs: [m1, m2, m3]}
  blend: {op: lerp, inputs: [avg, m4], alpha: "${alpha}"}
outputs:
  blend: {path: "blend_${alpha}.safetensors"}
"""
ALPHAS = ("0", "0.25", "0.5", "0.75", "1")


@pytest.fixture
def sweep_project(launch_dir: Path) -> Path:
    (launch_dir / "models").mkdir()
    base = tiny_state_dict(0)
    for i in range(1, 5):
        save_file(fine_tune(base, i), launch_dir / "models" / f"m{i}.safetensors")
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "sweep.yaml").write_text(SWEEP)
    return launch_dir


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_sweep_computes_the_shared_node_once(sweep_project: Path, launcher: str) -> None:
    done = run_cli(["-m", "recipe=sweep", f"hydra/launcher={launcher}", f"alpha={','.join(ALPHAS)}"], sweep_project)
    assert done.returncode == 0, done.stderr
    (report_path,) = (sweep_project / "outputs" / "multirun").glob("*/*/sweep_report.json")
    rows = json.loads(report_path.read_text())["jobs"]
    assert len(rows) == len(ALPHAS)
    assert sorted(row["nodes"]["avg"] for row in rows) == ["cached"] * 4 + ["computed"]
    assert all(row["nodes"]["blend"] == "computed" for row in rows)
    outputs = {row["overrides"][-1]: Path(row["outputs"]["blend"]["path"]) for row in rows}
    models = [load(sweep_project / "models" / f"m{i}.safetensors") for i in range(1, 5)]
    key = "body.0.weight"
    average = (models[0][key] + models[1][key] + models[2][key]) / 3
    for alpha in ALPHAS:
        got = load(outputs[f"alpha={alpha}"])[key]
        expected = (1 - float(alpha)) * average + float(alpha) * models[3][key]
        assert (got - expected).abs().max() < 1e-5
