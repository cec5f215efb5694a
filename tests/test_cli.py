"""The `merger` command as a user runs it: a subprocess in a fresh directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import load, run_cli, tiny_state_dict

BLEND = """# @package _global_
alpha: 0.5
sources:
  a: models/a.safetensors
  b: models/b.safetensors
nodes:
  blend: {op: lerp, inputs: [a, b], alpha: "${alpha}"}
outputs:
  blend: {path: "blend_${alpha}.safetensors"}
"""


def write_recipe(root: Path, name: str, text: str) -> None:
    (root / "recipes").mkdir(exist_ok=True)
    (root / "recipes" / f"{name}.yaml").write_text(text)


@pytest.fixture
def project(launch_dir: Path, models: dict[str, Path]) -> Path:
    write_recipe(launch_dir, "blend", BLEND)
    return launch_dir


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "outputs").glob("*/*/merge_report.json"))


def assert_user_error(done: object, *phrases: str) -> None:
    assert done.returncode == 2, done.stderr  # type: ignore[attr-defined]
    stderr: str = done.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    assert stderr.startswith("merger: error:"), stderr
    for phrase in phrases:
        assert phrase in stderr, stderr


def test_no_arguments_runs_the_builtin_demo(launch_dir: Path) -> None:
    done = run_cli([], launch_dir)
    assert done.returncode == 0, done.stderr
    assert "not available" not in done.stderr and "Warning" not in done.stderr
    (run_dir,) = run_dirs(launch_dir)
    report = json.loads((run_dir / "merge_report.json").read_text())
    assert report["recipe"]["name"] == "demo"
    assert report["nodes"]["blend"]["status"] == "computed"
    output = Path(report["outputs"]["blend"]["path"])
    assert output.parent == run_dir and output.name == "demo_alpha0.5.safetensors"
    assert len(load(output)) > 10
    assert [Path(row["png"]).name for row in report["previews"]] == ["blend__sample.png"]
    assert (run_dir / "blend__sample.png").is_file()


@pytest.mark.parametrize(
    "args", [["--help", "alpha=0.3"], ["-h", "alpha=0.3"], ["alpha=0.3", "--help"], ["-m", "alpha=0.3", "-h"]]
)
def test_help_is_merger_s_and_shows_the_config(launch_dir: Path, args: list[str]) -> None:
    done = run_cli(args, launch_dir)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("merger: declarative, recipe-driven merging of neural-network weights")
    assert "merger -m hydra/sweeper=optuna" in out and "== Config (the chosen recipe over the defaults) ==" in out
    assert "alpha: 0.3" in out and "Docs: README.md." in out  # the composed config, then the footer
    assert "Powered by Hydra" not in out and "$CONFIG" not in out and not run_dirs(launch_dir)


def test_help_of_another_choice_is_that_one(launch_dir: Path) -> None:
    done = run_cli(["--help", "hydra/help=default"], launch_dir)  # Hydra's own help text, chosen by the user
    assert done.returncode == 0, done.stderr
    assert "Powered by Hydra" in done.stdout and not done.stdout.startswith("merger: declarative")


def test_a_run_logs_to_stdout_in_merger_s_format_and_to_its_log_in_the_file_s(launch_dir: Path) -> None:
    done = run_cli(["preview=null"], launch_dir)
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(launch_dir)
    log = (run_dir / "merger.log").read_text()
    assert "[INFO]" in log and "blend" in log
    assert "blend" in done.stdout and "[INFO]" not in done.stdout  # merger's console format, not the file's


def test_recipe_from_local_directory_with_override(project: Path, models: dict[str, Path]) -> None:
    done = run_cli(["recipe=blend", "alpha=0.3"], project)
    assert done.returncode == 0, done.stderr
    assert "computed" in done.stdout
    (run_dir,) = run_dirs(project)
    out = load(run_dir / "blend_0.3.safetensors")
    a, b = load(models["a"]), load(models["b"])
    torch.testing.assert_close(out["body.0.weight"], 0.7 * a["body.0.weight"] + 0.3 * b["body.0.weight"])
    assert (project / "outputs" / "cache" / "objects").is_dir()

    again = run_cli(["recipe=blend", "alpha=0.3"], project)
    assert again.returncode == 0, again.stderr
    reports = [json.loads((d / "merge_report.json").read_text()) for d in run_dirs(project)]
    assert sorted(r["nodes"]["blend"]["status"] for r in reports) == ["cached", "computed"]
    assert len({r["output_dir"] for r in reports}) == 2  # two runs never share a directory


def test_local_recipe_shadows_builtin(project: Path) -> None:
    write_recipe(project, "demo", BLEND.replace("alpha: 0.5", "alpha: 0.25"))
    done = run_cli([], project)
    assert done.returncode == 0, done.stderr
    (run_dir,) = run_dirs(project)
    assert (run_dir / "blend_0.25.safetensors").is_file()


def test_python_dash_m_runs_merger(project: Path) -> None:
    done = run_cli(["-m", "merger", "recipe=blend"], project, command="python")
    assert done.returncode == 0, done.stderr
    assert (run_dirs(project)[0] / "blend_0.5.safetensors").is_file()


def test_sweep_runs_one_job_per_value_and_writes_sweep_report(project: Path) -> None:
    done = run_cli(["-m", "recipe=blend", "alpha=0,0.5,1"], project)
    assert done.returncode == 0, done.stderr
    (sweep_report,) = (project / "outputs" / "multirun").glob("*/*/sweep_report.json")
    rows = json.loads(sweep_report.read_text())["jobs"]
    assert [row["job"] for row in rows] == ["0", "1", "2"]
    assert [row["overrides"] for row in rows] == [["recipe=blend", f"alpha={a}"] for a in ("0", "0.5", "1")]
    for row, alpha in zip(rows, ("0", "0.5", "1"), strict=True):
        assert row["nodes"] == {"blend": "computed"}
        assert Path(row["outputs"]["blend"]["path"]) == sweep_report.parent / row["job"] / f"blend_{alpha}.safetensors"


def test_cache_dir_command_line_beats_environment(project: Path) -> None:
    env = {"MERGER_CACHE_DIR": "env_cache"}
    assert run_cli(["recipe=blend"], project, env=env).returncode == 0
    assert (project / "env_cache" / "objects").is_dir()
    assert run_cli(["recipe=blend", "cache_dir=cli_cache"], project, env=env).returncode == 0
    assert (project / "cli_cache" / "objects").is_dir()
    assert not (project / "outputs" / "cache").exists()


def test_inspect_shows_provenance_and_run(project: Path) -> None:
    assert run_cli(["recipe=blend", "alpha=0.3"], project).returncode == 0
    (run_dir,) = run_dirs(project)
    done = run_cli([str(run_dir / "blend_0.3.safetensors"), "models/a.safetensors"], project, command="merger-inspect")
    assert done.returncode == 0, done.stderr
    assert "made by merger" in done.stdout
    assert "alpha: 0.3" in done.stdout
    assert "run: output 'blend' of recipe blend" in done.stdout
    assert "compatible: all 2 models have the same 8 keys and shapes" in done.stdout


# --- bad input: one short block, exit 2, no traceback, nothing written -------------------------


def test_malformed_yaml(project: Path) -> None:
    write_recipe(project, "bad", "# @package _global_\nsources:\n  a: [unclosed\nnodes: {}\n")
    assert_user_error(run_cli(["recipe=bad"], project), "not valid YAML", "bad.yaml, line")
    assert not (project / "outputs").exists()


def test_unknown_op_with_did_you_mean(project: Path) -> None:
    write_recipe(project, "typo", BLEND.replace("op: lerp", "op: lerpp"))
    assert_user_error(run_cli(["recipe=typo"], project), "unknown op 'lerpp'", "nodes.blend.op", "did you mean 'lerp'")


def test_typo_node_section_is_caught(project: Path) -> None:
    write_recipe(project, "node", BLEND.replace("nodes:", "node:"))
    assert_user_error(run_cli(["recipe=node"], project), "'node'", "did you mean 'nodes'")


def test_cycle_is_printed(project: Path) -> None:
    text = BLEND.replace(
        'nodes:\n  blend: {op: lerp, inputs: [a, b], alpha: "${alpha}"}',
        'nodes:\n  blend: {op: lerp, inputs: [a, loop], alpha: "${alpha}"}\n  loop: {op: average, inputs: [blend]}',
    )
    write_recipe(project, "cycle", text)
    assert_user_error(run_cli(["recipe=cycle"], project), "cycle: blend -> loop -> blend")


def test_mismatched_shapes_name_keys_and_shapes(project: Path) -> None:
    wide = tiny_state_dict(5, width=16)
    save_file(wide, project / "models" / "b.safetensors")
    assert_user_error(run_cli(["recipe=blend"], project), "'body.0.weight' is [8, 8, 3, 3] in 'a' but [16, 16, 3, 3]")


def test_missing_file(project: Path) -> None:
    (project / "models" / "b.safetensors").unlink()
    assert_user_error(run_cli(["recipe=blend"], project), "model file not found", "sources.b")


def test_malicious_pickle_is_refused_without_running(project: Path) -> None:
    marker = project / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"conv.weight": torch.zeros(1), "x": Payload()}, project / "models" / "evil.pth")
    write_recipe(project, "evil", BLEND.replace("models/b.safetensors", "models/evil.pth"))
    assert_user_error(run_cli(["recipe=evil"], project), "refused to load", "could run code")
    assert not marker.exists()


def test_unknown_recipe_suggests_close_name(project: Path) -> None:
    assert_user_error(run_cli(["recipe=blnd"], project), "recipe 'blnd' not found", "did you mean 'blend'")


def test_unknown_override_suggests_variable(project: Path) -> None:
    assert_user_error(run_cli(["recipe=blend", "alpah=0.3"], project), "'alpah'", "did you mean 'alpha'")


def test_sweep_value_without_multirun(project: Path) -> None:
    assert_user_error(run_cli(["recipe=blend", "alpha=0,1"], project), "several values", "--multirun")


def test_bad_sweep_value_fails_before_any_job_runs(project: Path) -> None:
    assert_user_error(run_cli(["-m", "recipe=blend", "alpha=0,abc"], project), "valid number", "nodes.blend.alpha")
    assert not (project / "outputs").exists()


def test_concurrent_runs_compute_a_node_once(project: Path) -> None:
    """Two runs started together: one computes, the other waits on the lock and reads the entry."""
    import subprocess
    import sys

    merger = str(Path(sys.executable).parent / "merger")
    procs = [
        subprocess.Popen([merger, "recipe=blend"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr.decode()
    reports = [json.loads((d / "merge_report.json").read_text()) for d in run_dirs(project)]
    assert sorted(r["nodes"]["blend"]["status"] for r in reports) == ["cached", "computed"]
    assert len({r["outputs"]["blend"]["sha256"] for r in reports}) == 1
    assert not list((project / "outputs" / "cache" / "tmp").iterdir())


@pytest.mark.parametrize(
    ("sweep", "phrases"),
    [
        ("alpha=range(0,1,0)", ("not a finite range", "step that is not 0")),
        ("alpha=range(0,inf)", ("not a finite range",)),
        ("alpha=[1", ("cannot parse the override 'alpha=[1'",)),
        ("hydra/launcher=nope", ("'hydra/launcher/nope' not found",)),
        ("alpah=0,1", ("'alpah'", "did you mean 'alpha'")),
    ],
)
def test_a_bad_sweep_is_one_block_not_hydras_text(project: Path, sweep: str, phrases: tuple[str, ...]) -> None:
    done = run_cli(["-m", "recipe=blend", sweep], project)
    assert_user_error(done, *phrases)
    assert "HYDRA_FULL_ERROR" not in done.stderr and not (project / "outputs").exists()


def test_dash_v_shows_hydras_traceback_under_multirun(project: Path) -> None:
    done = run_cli(["-v", "-m", "recipe=blend", "alpha=[1"], project)
    assert done.returncode != 0 and "Traceback" in done.stderr and "OverrideParseException" in done.stderr
