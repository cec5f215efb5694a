"""The `merger` command: a Hydra app with a pre-flight check.

Before Hydra's runner starts, the job of a run is composed with Hydra's Compose
API and validated as far as specs allow: recipe syntax, ops, parameters,
references, cycles, file headers, shapes, where outputs land. A sweep's jobs
are checked the same way by merger's sweeper (hydra/sweeper=merger, the
default), where Hydra knows them. A problem is printed as one short block and
exits 2, without Hydra's traceback and before any output directory is made.
A search (`-m hydra/sweeper=optuna`, another sweeper than merger's) is checked
at the bounds of its search space (merger.cli.search_check). Then Hydra runs the
jobs as usual (run dirs, multirun, launchers, callbacks); each job validates
again (it may run in another process), executes, and returns the recipe's
objective (what a sweeper such as Optuna's optimises; None without one).
`recipe=path/to/file.yaml` runs a recipe file by its path (merger.cli.recipe_path).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import hydra
import yaml
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from merger.cli.failure import fail, wants_traceback
from merger.cli.hydra_errors import explain_hydra_error
from merger.cli.job_config import check_jobs, recipe_data
from merger.cli.recipe_path import recipe_file, rewrite_recipe_args
from merger.cli.recipe_source import RecipeDirSource

#: flags after which Hydra only prints something (help, config, info): no pre-flight
PASSTHROUGH_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
#: flags that change where configs come from; the pre-flight does not model them
CONFIG_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir"}


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


def _recipe_keys(overrides: list[str]) -> list[str]:
    """The top-level keys of the config that the group choices in `overrides` select."""
    choices = [o for o in overrides if o.split("=")[0] in ("recipe", "hydra.searchpath")]
    try:
        cfg = compose(config_name="config", overrides=choices)
    except (HydraException, OmegaConfBaseException):
        return []
    return sorted(str(k) for k in cfg)


def preflight(overrides: list[str], launch_dir: Path) -> None:
    """Compose and check the one job of a run before Hydra makes its directory; raises MergerError.
    (A sweep is checked by merger's sweeper, where Hydra knows its jobs: merger.cli.sweep_check.)"""
    with initialize_config_module(config_module="merger.conf", version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
            raise explain_hydra_error(e, overrides, launch_dir, functools.partial(_recipe_keys, overrides)) from None
        check_jobs([(overrides, cfg)], launch_dir, None)


def _task(cfg: DictConfig) -> float | list[float] | None:
    """One Hydra job: validate, execute, report (through merger.cli.api.execute, as merger.run).
    Returns the recipe's objective, what a search's sweeper optimises (NaN where a metric failed)."""
    from merger.cli.api import JobSource, execute
    from merger.engine.output_targets import SweepJob

    hc = HydraConfig.get()
    launch_dir = Path(hc.runtime.cwd)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_job = SweepJob(launch_dir / str(hc.sweep.dir), int(hc.job.num)) if multirun else None
    choice = hc.runtime.choices.get("recipe")
    overrides = list(hc.overrides.task)
    try:
        file = recipe_file(list(hc.searchpath), choice, launch_dir) if choice else None
        data, label, file = recipe_data(cfg, choice, launch_dir, overrides, file=file)
        source = JobSource(choice, file)
        result = execute(
            data,
            label=label,
            source=source,
            overrides=overrides,
            launch_dir=launch_dir,
            output_dir=Path(hc.runtime.output_dir),
            sweep_job=sweep_job,
        )
    except Exception as e:
        raise SystemExit(fail(e, traceback=wants_traceback(sys.argv))) from None
    objective: float | list[float] | None = getattr(result, "objective", None)
    return objective


_hydra_main = hydra.main(version_base="1.3", config_path="pkg://merger.conf", config_name="config")(_task)


def run(argv: list[str]) -> None:
    """The `merger` command: pre-flight, then Hydra's app (see merger.cli.command for the entry point)."""
    # optuna's storage module imports alembic, whose INFO lines ("setup plugin ...") Hydra's logging would print
    logging.getLogger("alembic").setLevel(logging.WARNING)
    launch_dir = Path(os.getcwd())
    argv = [argv[0], *rewrite_recipe_args(argv[1:], launch_dir)]  # recipe=path/to/file.yaml
    sys.argv = argv  # Hydra reads its arguments from sys.argv
    Plugins.instance().register(RecipeDirSource)
    multirun, overrides, skip = _split_args(argv[1:])
    if not skip and not multirun:
        preflight(overrides, launch_dir)
    if not skip and multirun:
        from merger.cli.search_check import preflight_search

        preflight_search(overrides, launch_dir)
    # Hydra prints its own errors (a traceback, or a line and advice about HYDRA_FULL_ERROR) unless that
    # is set; set, it raises them, and merger shows its block (the user's -v is MERGER_VERBOSE: failure.py)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError, OverflowError) as e:
        if wants_traceback(argv):
            raise
        raise explain_hydra_error(e, overrides, launch_dir, functools.partial(_recipe_keys, overrides)) from None


def main() -> None:
    """`python -m merger`, and older entry points: the same as the `merger` command."""
    from merger.cli.command import merger

    merger()
