"""A recipe file is data: no Hydra settings beyond the sweep allowlist, no code, no environment reads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from merger.cli.recipe_source import load_recipe_file
from merger.core.limits import MAX_ALIAS_EXPANSIONS, MAX_RECIPE_BYTES
from merger.errors import MergerError
from tests.conftest import run_cli

HEAD = "# @package _global_\n"
BODY = (
    "alpha: 0.5\nsources:\n  a: models/a.safetensors\n  b: models/b.safetensors\n"
    "nodes:\n  blend: {op: lerp, inputs: [a, b], alpha: '${alpha}'}\noutputs:\n  blend: {}\n"
)


def refusal(tmp_path: Path, text: str) -> MergerError:
    file = tmp_path / "r.yaml"
    file.write_text(text)
    with pytest.raises(MergerError) as info:
        load_recipe_file(file)
    assert str(file) in (info.value.where or "")
    return info.value


@pytest.mark.parametrize(
    ("hydra", "key"),
    [
        (
            "hydra:\n  job:\n    env_set:\n      GIT_CONFIG_PARAMETERS: \"'core.fsmonitor=touch x'\"\n",
            "hydra.job.env_set",
        ),
        ("hydra:\n  run:\n    dir: /tmp/elsewhere\n", "hydra.run.dir"),
        ("hydra:\n  output_subdir: ../..\n", "hydra.output_subdir"),
        ("hydra:\n  job_logging:\n    handlers:\n      file:\n        filename: /tmp/x.log\n", "hydra.job_logging"),
        ("hydra:\n  verbose: true\n", "hydra.verbose"),
        ("hydra:\n  searchpath: [file:///tmp]\n", "hydra.searchpath"),
        ("hydra:\n  sweeper: 5\n", "hydra.sweeper"),
        ("hydra: 3\n", "hydra"),
    ],
)
def test_hydra_settings_are_refused(tmp_path: Path, hydra: str, key: str) -> None:
    error = refusal(tmp_path, HEAD + BODY + hydra)
    assert f"a recipe may not set Hydra's '{key}" in error.what
    assert "command line" in (error.fix or "") and "hydra.sweeper.params" in (error.fix or "")


def test_sweep_settings_are_allowed(tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_text(
        HEAD + BODY + "hydra:\n  sweeper:\n    params:\n      alpha: 0,0.5,1\n      +seed: [1, 2]\n"
        "    n_trials: 4\n    direction: maximize\n    sampler:\n      seed: 3\n  launcher:\n    n_jobs: 2\n"
    )
    config, header = load_recipe_file(file)
    assert header["package"] == "_global_"
    assert config.hydra.sweeper.params.alpha == "0,0.5,1"


@pytest.mark.parametrize(
    ("sweep", "phrase"),
    [
        ("params:\n      hydra.job.env_set.X: a,b\n", "cannot be swept from a recipe"),
        ("params:\n      hydra/launcher: joblib\n", "cannot be swept from a recipe"),
        ("params:\n      alpha: ${oc.env:HOME}\n", "plain value or list"),
        ("params:\n      alpha: {a: 1}\n", "plain value or list"),
        ("params:\n      alpha: '{a: 1}'\n", "plain value or list"),  # Hydra would parse it as a mapping
        ("params:\n      alpha: '[0, {a: 1}]'\n", "plain value or list"),
        ("params:\n      alpha: '\\\\${oc.env:HOME}'\n", "plain value or list"),  # an escaped interpolation
        ("params:\n      alpha: [0, '$x']\n", "plain value or list"),
        ("max_batch_size: 0\n", "must hold a plain int"),  # Hydra's sweeper would loop forever
        ("n_trials: ten\n", "must hold a plain int"),
        ("n_trials: true\n", "must hold a plain int"),
        ("direction: ${oc.env:HOME}\n", "plain string"),
        ("n_jobs: 100000\n", "a recipe may ask for 1 to"),  # a process each: the machine's memory
        ("n_jobs: 0\n", "a recipe may ask for 1 to"),
        ("n_trials: -5\n", "a search runs 1 to"),
    ],
)
def test_sweep_values_must_be_plain(tmp_path: Path, sweep: str, phrase: str) -> None:
    error = refusal(tmp_path, HEAD + BODY + "hydra:\n  sweeper:\n    " + sweep)
    assert phrase in error.what


def test_a_recipe_may_not_start_a_process_per_job_beyond_the_machine(tmp_path: Path) -> None:
    error = refusal(tmp_path, HEAD + BODY + "hydra:\n  launcher:\n    n_jobs: 100000\n")
    assert "'hydra.launcher.n_jobs' is 100000: a recipe may ask for 1 to" in error.what


@pytest.mark.parametrize(
    "defaults",
    [
        "defaults:\n  - override hydra/job_logging: disabled\n  - _self_\n",
        "defaults:\n  - hydra/launcher: joblib\n",
        "defaults:\n  - /hydra/callbacks/x\n",
        "defaults:\n  - {part: x}\n",
        "defaults:\n  - ../secrets\n",
    ],
)
def test_defaults_name_only_recipe_files(tmp_path: Path, defaults: str) -> None:
    error = refusal(tmp_path, HEAD + defaults + BODY)
    assert "the defaults list may only name other recipe files" in error.what
    assert error.where is not None and "defaults[" in error.where


@pytest.mark.parametrize(
    "header",
    [
        "# @package hydra",
        "# @package _global_.hydra",
        "# @package _group_",
        "# @package _global_.q._global_.hydra",  # Hydra resolves this to `hydra`
        "# @package _global_\n# @package _global_.q._global_",  # Hydra keeps the last header line
        "# @package _global_\n# @other x",
        "# a comment first",
    ],
)
def test_the_header_is_exactly_the_global_package(tmp_path: Path, header: str) -> None:
    error = refusal(tmp_path, f"{header}\njob:\n  env_set: {{A: b}}\nhydra:\n  run: {{dir: /tmp/x}}\n")
    assert "starts with exactly one line '# @package _global_'" in error.what


@pytest.mark.parametrize("key", ["_target_", "_partial_", "_args_", "()"])
def test_code_keys_are_refused_anywhere(tmp_path: Path, key: str) -> None:
    error = refusal(tmp_path, HEAD + BODY + f"extra:\n  deep:\n    - {{'{key}': os.system}}\n")
    assert "recipes may not name code to run" in error.what and key in error.what


@pytest.mark.parametrize(
    "setting", ["allow_env: true", "allow_overwrite: true", "cache_dir: /tmp/elsewhere", "cache_max_size: 0"]
)
def test_command_line_settings_are_refused_in_files(tmp_path: Path, setting: str) -> None:
    error = refusal(tmp_path, HEAD + BODY + setting + "\n")
    assert f"a recipe file may not set '{setting.split(':')[0]}'" in error.what
    assert "command line" in (error.fix or "")


@pytest.mark.parametrize(
    "value", ["${oc.decode:'1'}", "${oc.create:{}}", "${hydra:runtime.cwd}", "${${alpha}}", "${oc.select:alpha}"]
)
def test_only_plain_interpolations(tmp_path: Path, value: str) -> None:
    error = refusal(tmp_path, HEAD + BODY + f'other: "{value}"\n')
    assert "uses an interpolation a recipe may not" in error.what


def test_plain_interpolations_pass(tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_text(
        HEAD + BODY + "name: 'm_${alpha}_${now:%Y}_${nodes.blend.alpha}_${env:x}'\n".replace("${env:x}", "x")
    )
    load_recipe_file(file)


def test_billion_laughs_is_refused_before_it_grows(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    start = time.perf_counter()
    error = refusal(tmp_path, HEAD + "\n".join(lines) + "\n")
    assert time.perf_counter() - start < 5
    assert f"{MAX_ALIAS_EXPANSIONS} alias expansions" in error.what


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    error = refusal(tmp_path, HEAD + "a: &r [*r, *r]\n")
    assert "alias" in error.what


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_text(HEAD + "common: &c {op: lerp}\nnodes:\n  x: {<<: *c, inputs: [a, b]}\n")
    load_recipe_file(file)


def test_deep_nesting_is_an_error(tmp_path: Path) -> None:
    error = refusal(tmp_path, HEAD + "a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in error.what


def test_huge_recipe_file_is_refused(tmp_path: Path) -> None:
    error = refusal(tmp_path, HEAD + "# " + "x" * MAX_RECIPE_BYTES + "\n")
    assert f"limit of {MAX_RECIPE_BYTES}" in error.what


def test_non_utf8_recipe_is_an_error(tmp_path: Path) -> None:
    file = tmp_path / "r.yaml"
    file.write_bytes(HEAD.encode() + b"alpha: \xff\xfe\n")
    with pytest.raises(MergerError, match="not UTF-8"):
        load_recipe_file(file)


# --- end to end: the command line -------------------------------------------------------------------


def write(launch_dir: Path, name: str, text: str) -> None:
    (launch_dir / "recipes").mkdir(exist_ok=True)
    (launch_dir / "recipes" / f"{name}.yaml").write_text(text)


def assert_refused(done: object, *phrases: str) -> None:
    stderr: str = done.stderr  # type: ignore[attr-defined]
    assert done.returncode == 2, stderr  # type: ignore[attr-defined]
    assert stderr.startswith("merger: error:") and "Traceback" not in stderr, stderr
    for phrase in phrases:
        assert phrase in stderr, stderr


def test_included_file_setting_hydra_is_refused_and_nothing_runs(launch_dir: Path, models: dict[str, Path]) -> None:
    marker = launch_dir / "pwned"
    write(launch_dir, "nice", HEAD + "defaults:\n  - part\n  - _self_\n" + BODY)
    write(launch_dir, "part", HEAD + f"hydra:\n  job:\n    env_set:\n      GIT_DIR: {marker}\n")
    done = run_cli(["recipe=nice"], launch_dir)
    assert_refused(done, "a recipe may not set Hydra's 'hydra.job.env_set.GIT_DIR'", "part.yaml")
    assert not (launch_dir / "outputs").exists() and not marker.exists()


def test_environment_reads_need_allow_env(launch_dir: Path, models: dict[str, Path]) -> None:
    write(
        launch_dir,
        "env",
        HEAD
        + BODY.replace("alpha: 0.5", "alpha: 0.5\nsecret: ${oc.env:MERGER_TEST_SECRET}").replace(
            "blend: {}", "blend: {path: 'm_${secret}.safetensors'}"
        ),
    )
    env = {"MERGER_TEST_SECRET": "hunter2"}
    assert_refused(
        run_cli(["recipe=env"], launch_dir, env=env),
        "reads the environment variable MERGER_TEST_SECRET",
        "allow_env=true",
    )
    assert not (launch_dir / "outputs").exists()
    assert run_cli(["recipe=env", "allow_env=true"], launch_dir, env=env).returncode == 0
    assert list(launch_dir.glob("outputs/*/*/m_hunter2.safetensors"))


def test_environment_reads_on_the_command_line_are_the_users(launch_dir: Path, models: dict[str, Path]) -> None:
    write(launch_dir, "plain", HEAD + BODY)
    done = run_cli(
        ["recipe=plain", "description=${oc.env:MERGER_TEST_TEXT}"], launch_dir, env={"MERGER_TEST_TEXT": "hi"}
    )
    assert done.returncode == 0, done.stderr
    (report,) = launch_dir.glob("outputs/*/*/merge_report.json")
    assert '"description": "hi"' in report.read_text()


def test_a_recipe_may_shape_its_sweep(launch_dir: Path, models: dict[str, Path]) -> None:
    write(launch_dir, "swept", HEAD + BODY + "hydra:\n  sweeper:\n    params:\n      alpha: 0,1\n")
    done = run_cli(["-m", "recipe=swept"], launch_dir)
    assert done.returncode == 0, done.stderr
    assert len(list(launch_dir.glob("outputs/multirun/*/*/*/merge_report.json"))) == 2


@pytest.mark.parametrize("key", ["cache_dir", "cache_max_size", "allow_env", "+cache_dir", "recipe"])
def test_a_recipe_may_not_sweep_command_line_settings(tmp_path: Path, key: str) -> None:
    error = refusal(tmp_path, HEAD + BODY + f"hydra:\n  sweeper:\n    params:\n      '{key}': a,b\n")
    assert "cannot be swept from a recipe" in error.what


def test_a_recipe_may_not_define_the_recipe_key(tmp_path: Path) -> None:
    error = refusal(tmp_path, HEAD + BODY + "recipe: '${oc.env:HOME}'\n")
    assert "may not set 'recipe'" in error.what


def test_the_recipe_choice_is_not_a_value_from_the_command_line() -> None:
    from merger.recipe.config_check import override_keys

    assert override_keys(["recipe=r", "hydra/launcher=joblib", "+x.y=1", "alpha=0.5"]) == {"x.y", "alpha"}


def test_interpolations_that_fan_out_are_refused(launch_dir: Path) -> None:
    lines = [HEAD.strip(), "l0: [" + ", ".join(str(i) for i in range(50)) + "]"]
    lines += [f"l{i}: [" + ", ".join([f"'${{l{i - 1}}}'"] * 50) + "]" for i in range(1, 6)]
    write(launch_dir, "fan", "\n".join([*lines, "description: '${l5}'", "outputs: {x: {}}"]) + "\n")
    start = time.perf_counter()
    assert_refused(run_cli(["recipe=fan"], launch_dir), "interpolations expand to more than 200000 values")
    assert time.perf_counter() - start < 20


def test_keys_a_recipe_sweeps_are_not_the_command_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hydra hands a recipe's sweep params to each job as overrides: they are the recipe's values, so an
    environment read in one is not the user's own (as `extra.n=\\${oc.env:X}` would be once unescaped)."""
    from omegaconf import OmegaConf

    from merger.cli.job_config import recipe_data

    monkeypatch.setenv("MERGER_TEST_SECRET", "hunter2")
    cfg = OmegaConf.create(
        {
            "extra": {"n": "${oc.env:MERGER_TEST_SECRET}"},
            "description": "${extra.n}",
            "hydra": {"sweeper": {"params": {"extra.n": "a,b"}}},
        }
    )
    with pytest.raises(MergerError) as info:
        recipe_data(cfg, None, tmp_path, ["extra.n=x"])
    assert "reads the environment variable MERGER_TEST_SECRET" in info.value.what
    del cfg["hydra"]  # the same key given on the command line alone is the user's
    data, _, _ = recipe_data(cfg, None, tmp_path, ["extra.n=x"])
    assert data["description"] == "hunter2"
