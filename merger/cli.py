"""The `merger` command: a Hydra app with a pre-flight check.

Before Hydra's runner starts, every job the command line asks for (one, or
each point of a sweep) is composed with Hydra's Compose API and validated as
far as specs allow: recipe syntax, ops, parameters, references, cycles, file
headers, shapes. A problem is printed as one short block and exits 2, without
Hydra's traceback and before any output directory is made. Then Hydra runs
the jobs as usual (run dirs, multirun, launchers, callbacks); each job
validates again (it may run in another process) and executes.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from merger.config_check import checked_recipe_data, override_keys
from merger.failure import fail, wants_traceback
from merger.hydra_errors import explain_hydra_error
from merger.recipe_source import RecipeDirSource, find_recipe

#: flags after which Hydra only prints something (help, config, info): no pre-flight
PASSTHROUGH_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
#: flags that change where configs come from; the pre-flight does not model them
CONFIG_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir"}
MAX_PREFLIGHT_JOBS = 256


def _label(path: Path, launch_dir: Path) -> str:
    try:
        return str(path.relative_to(launch_dir))
    except ValueError:
        return str(path)


def recipe_data(
    cfg: DictConfig, choice: str | None, launch_dir: Path, overrides: list[str]
) -> tuple[dict[str, Any], str, Path | None]:
    """Checked, resolved recipe data from a composed config (its hydra node ignored)."""
    file = find_recipe(choice, launch_dir) if choice else None
    label = _label(file, launch_dir) if file else "the command line"
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    assert isinstance(config, DictConfig)
    if "hydra" in config:
        with open_dict(config):
            del config["hydra"]
    return checked_recipe_data(config, label, override_keys(overrides)), label, file


def _split_args(args: list[str]) -> tuple[bool, list[str], bool]:
    """(multirun?, overrides, skip the pre-flight?)"""
    multirun = False
    overrides: list[str] = []
    skip = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in PASSTHROUGH_FLAGS or arg in CONFIG_FLAGS or arg.split("=")[0] in CONFIG_FLAGS:
            skip = True
            i += 1 if arg in CONFIG_FLAGS else 0
        elif not arg.startswith("-"):
            overrides.append(arg)
        i += 1
    return multirun, overrides, skip


def job_overrides(overrides: list[str], multirun: bool) -> tuple[list[list[str]], int]:
    """The override lists of the first MAX_PREFLIGHT_JOBS jobs (sweeps expanded as Hydra's
    basic sweeper does), and how many jobs there are in all."""
    if not multirun:
        return [overrides], 1
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices: list[list[str]] = []
    for override in parsed:
        if override.is_sweep_override() and not override.is_hydra_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line or ""])
    jobs = [list(combo) for combo in itertools.islice(itertools.product(*choices), MAX_PREFLIGHT_JOBS)]
    return jobs, math.prod(len(c) for c in choices)


def _recipe_keys(overrides: list[str]) -> list[str]:
    """The top-level keys of the config that the group choices in `overrides` select."""
    choices = [o for o in overrides if "=" in o and "/" not in o.split("=")[0] and o.split("=")[0] == "recipe"]
    try:
        cfg = compose(config_name="config", overrides=choices)
    except (HydraException, OmegaConfBaseException):
        return []
    return sorted(str(k) for k in cfg)


def job_output_dir(cfg: DictConfig, launch_dir: Path, index: int, sweep_dir: Path | None) -> Path:
    """Where Hydra will put this job's outputs (its `${now:...}` read a moment early). In a sweep,
    `sweep_dir` is the sweep's directory, resolved once (as Hydra does), from the first job."""
    try:
        if sweep_dir is None:
            return launch_dir / str(cfg.hydra.run.dir)
        return sweep_dir / str(cfg.hydra.sweep.subdir)
    except OmegaConfBaseException:  # ${hydra.job.num}: not known until the sweep runs
        return (sweep_dir or launch_dir / "outputs") / str(index)


def sweep_root(cfg: DictConfig, launch_dir: Path) -> Path:
    try:
        return launch_dir / str(cfg.hydra.sweep.dir)
    except OmegaConfBaseException:
        return launch_dir / "outputs" / "multirun"


def preflight(overrides: list[str], multirun: bool, launch_dir: Path) -> None:
    """Compose and validate every job; raises MergerError on the first problem."""
    from merger.catalog import SpecsSeen
    from merger.job import prepare
    from merger.ops import builtin_registry
    from merger.output_targets import OutputTarget, check_sweep_targets
    from merger.recipe import Recipe

    registry = builtin_registry()
    seen: SpecsSeen = {}
    recipes: list[Recipe] = []
    targets: list[list[OutputTarget]] = []
    sweep_dir: Path | None = None
    jobs, total = job_overrides(overrides, multirun)
    if total > len(jobs):
        print(f"merger: checking the first {len(jobs)} of {total} jobs before the sweep starts", file=sys.stderr)
    with initialize_config_module(config_module="merger.conf", version_base="1.3"):
        for index, job in enumerate(jobs):
            try:
                cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
                raise explain_hydra_error(e, job, launch_dir, functools.partial(_recipe_keys, job)) from None
            choice = cfg.hydra.runtime.choices.get("recipe")
            data, label, _ = recipe_data(cfg, choice, launch_dir, job)
            if multirun and sweep_dir is None:
                sweep_dir = sweep_root(cfg, launch_dir)
            output_dir = job_output_dir(cfg, launch_dir, index, sweep_dir)
            prepared = prepare(data, registry, file=label, launch_dir=launch_dir, seen=seen, output_dir=output_dir)
            prepared.catalog.close()
            recipes.append(prepared.plan.recipe)
            targets.append(prepared.targets or [])
    check_sweep_targets(recipes, targets)


def _task(cfg: DictConfig) -> None:
    """One Hydra job: validate, execute, report."""
    from merger.gitinfo import git_state
    from merger.job import prepare, run
    from merger.ops import builtin_registry
    from merger.report import RunContext

    hc = HydraConfig.get()
    launch_dir = Path(hc.runtime.cwd)
    choice = hc.runtime.choices.get("recipe")
    try:
        data, label, file = recipe_data(cfg, choice, launch_dir, list(hc.overrides.task))
        prepared = prepare(data, builtin_registry(), file=label, launch_dir=launch_dir)
        context = RunContext(
            recipe_name=choice,
            recipe_file=str(file) if file else None,
            git=git_state(file) if file else None,
            overrides=tuple(hc.overrides.task),
            launch_dir=launch_dir,
            output_dir=Path(hc.runtime.output_dir),
        )
        run(prepared, context)
    except Exception as e:
        raise SystemExit(fail(e, traceback=wants_traceback(sys.argv))) from None


_hydra_main = hydra.main(version_base="1.3", config_path="conf", config_name="config")(_task)


def run(argv: list[str]) -> None:
    """The `merger` command: pre-flight, then Hydra's app (see merger.command for the entry point)."""
    sys.argv = argv  # Hydra reads its arguments from sys.argv
    Plugins.instance().register(RecipeDirSource)
    multirun, overrides, skip = _split_args(argv[1:])
    if not skip:
        preflight(overrides, multirun, Path(os.getcwd()))
    _hydra_main()


def main() -> None:
    """`python -m merger`, and older entry points: the same as the `merger` command."""
    from merger.command import merger

    merger()
