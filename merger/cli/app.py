"""The `merger` command: a Hydra app with a pre-flight check.

Before Hydra's runner makes the directory of a run, its job is validated as
far as specs allow, on the config Hydra composed for it (`PreflightCallback`,
a Hydra callback of merger's config, at `on_run_start`): recipe syntax, ops,
parameters, references, cycles, file headers, shapes, where outputs land. A
sweep's jobs are checked the same way by merger's sweeper (hydra/sweeper=merger,
the default), where Hydra knows them. A problem is printed as one short block
and exits 2, without Hydra's traceback and before any output directory is made.
A search (`-m hydra/sweeper=optuna`, another sweeper than merger's) is checked
at the bounds of its search space (merger.cli.search_check). Then Hydra runs the
jobs as usual (run dirs, multirun, launchers, callbacks); each job validates
again (it may run in another process), executes, and returns the recipe's
objective (what a sweeper such as Optuna's optimises; None without one).
`recipe=path/to/file.yaml` runs a recipe file by its path (merger.cli.recipe_path).

The recipe is composed once per run where nothing of the launch can set
`hydra.mode` (merger.cli.run_mode; else twice, as in any Hydra app: Hydra's
`get_mode`, then the run's own), never again for the pre-flight; and the pre-flight
hands what it checked (the recipe data and its plan) to the job, which runs in
the same process (`on_job_start` gives it to the task, a `Job`): a job whose
recipe data is the checked data runs that plan, planned once. One whose data
differs (a value only the job knows, such as `${now:...}`) plans its own.
`preflight` composes and checks a run by itself (the Compose API), for callers
without Hydra's runner.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from merger.cli.failure import EXIT_BUG, fail, wants_traceback
from merger.cli.hydra_errors import explain_hydra_error
from merger.cli.hydra_private import unset_mode
from merger.cli.job_config import CheckedJob, check_jobs, recipe_data
from merger.cli.recipe_path import recipe_file, rewrite_recipe_args
from merger.cli.recipe_source import RecipeDirSource
from merger.cli.run_mode import mode_is_unset
from merger.errors import MergerError

if TYPE_CHECKING:
    from merger.cli.job import Prepared

#: flags after which Hydra only prints something (help, config, info): no pre-flight
PASSTHROUGH_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
#: Hydra's flags for the app's help
HELP_FLAGS = {"-h", "--help"}
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


def _first_override(argv: list[str]) -> int:
    """Where the first override is in `argv` (after the program's name), else its end."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in CONFIG_FLAGS:
            i += 2  # the flag's value
            continue
        if not arg.startswith("-"):
            return i
        i += 1
    return len(argv)


def _recipe_keys(overrides: list[str]) -> list[str]:
    """The top-level keys of the config that the group choices in `overrides` select."""
    if not GlobalHydra.instance().is_initialized():  # after Hydra's runner failed: a context of its own
        with initialize_config_module(config_module="merger.conf", version_base="1.3"):
            return _recipe_keys(overrides)
    choices = [o for o in overrides if o.split("=")[0] in ("recipe", "hydra.searchpath")]
    try:
        cfg = compose(config_name="config", overrides=choices)
    except (HydraException, OmegaConfBaseException):
        return []
    return sorted(str(k) for k in cfg)


def preflight(overrides: list[str], launch_dir: Path) -> None:
    """Compose and check the one job of a run, as `PreflightCallback` checks it in Hydra's runner (for
    callers without Hydra's runner); raises MergerError."""
    with initialize_config_module(config_module="merger.conf", version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
            raise explain_hydra_error(e, overrides, launch_dir, functools.partial(_recipe_keys, overrides)) from None
        check_jobs([(overrides, cfg)], launch_dir, None)


class PreflightCallback(Callback):
    """The pre-flight of a run, on the config Hydra composed for it, before Hydra makes its directory
    (`on_run_start`; in a sweep, merger's sweeper checks the jobs instead). A problem is merger's block
    and exit status 2. What it checked goes to the run's job (`on_job_start`, to a `Job` task)."""

    def __init__(self) -> None:
        self._checked: CheckedJob | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        launch_dir = Path(str(config.hydra.runtime.cwd))
        overrides = [str(o) for o in config.hydra.overrides.task]
        try:  # Hydra turns a callback's exception into a warning: the block and the exit are said here
            (self._checked,) = check_jobs([(overrides, config)], launch_dir, None, keep=True)
        except Exception as e:
            if wants_traceback(sys.argv) and not isinstance(e, MergerError):
                traceback.print_exc()
                raise SystemExit(EXIT_BUG) from None
            raise SystemExit(fail(e, traceback=False)) from None

    def on_job_start(self, config: DictConfig, *, task_function: Any, **kwargs: Any) -> None:
        checked, self._checked = self._checked, None
        if checked is None:
            return
        if isinstance(task_function, Job):
            task_function.offer(checked)
        else:  # another app's task: it plans for itself
            checked.prepared.catalog.close()


class Job:
    """Hydra's task function: one job of the run or sweep (`_task`), with the pre-flight's checked job
    when one was offered (`offer`: taken once, by the first job, and dropped if that job's recipe
    data is not what was checked)."""

    def __init__(self) -> None:
        self._checked: CheckedJob | None = None

    def offer(self, checked: CheckedJob) -> None:
        if self._checked is not None:
            self._checked.prepared.catalog.close()
        self._checked = checked

    def take(self, data: dict[str, Any], label: str, launch_dir: Path) -> Prepared | None:
        checked, self._checked = self._checked, None
        if checked is None:
            return None
        if checked.fits(data, label, launch_dir):
            return checked.prepared  # the job closes its sources when it ends
        checked.prepared.catalog.close()
        return None

    def __call__(self, cfg: DictConfig) -> float | list[float] | None:
        return _task(cfg, self)


def _task(cfg: DictConfig, job: Job) -> float | list[float] | None:
    """One Hydra job: validate, execute, report (through merger.cli.api.execute, as merger.run), with
    the pre-flight's plan when it fits (`job.take`). Returns the recipe's objective, what a search's
    sweeper optimises (NaN where a metric failed)."""
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
            prepared=job.take(data, label, launch_dir),
        )
    except Exception as e:
        raise SystemExit(fail(e, traceback=wants_traceback(sys.argv))) from None
    objective: float | list[float] | None = getattr(result, "objective", None)
    return objective


def hydra_main() -> Any:
    """Hydra's app, whose task is a `Job`."""
    return hydra.main(version_base="1.3", config_path="pkg://merger.conf", config_name="config")(Job())


def run(argv: list[str]) -> None:
    """The `merger` command: pre-flight, then Hydra's app (see merger.cli.command for the entry point)."""
    # optuna's storage module imports alembic, whose INFO lines ("setup plugin ...") Hydra's logging would print
    logging.getLogger("alembic").setLevel(logging.WARNING)
    launch_dir = Path(os.getcwd())
    given = argv
    argv = [argv[0], *rewrite_recipe_args(argv[1:], launch_dir)]  # recipe=path/to/file.yaml
    chosen_help = any(a.split("=")[0] in ("hydra/help", "override hydra/help") for a in argv[1:])
    if HELP_FLAGS & set(argv[1:]) and not chosen_help:  # merger's help (conf/hydra/help/merger.yaml): for help only
        argv.insert(_first_override(argv), "hydra/help=merger")  # beside the others: Hydra takes one run of them
    sys.argv = argv  # Hydra reads its arguments from sys.argv
    Plugins.instance().register(RecipeDirSource)
    multirun, overrides, skip = _split_args(argv[1:])
    # a run's pre-flight: PreflightCallback, on the config Hydra composes (merger/conf/config.yaml)
    if not skip and multirun:
        from merger.cli.search_check import preflight_search

        preflight_search(overrides, launch_dir)
    # Hydra prints its own errors (a traceback, or a line and advice about HYDRA_FULL_ERROR) unless that
    # is set; set, it raises them, and merger shows its block (the user's -v is MERGER_VERBOSE: failure.py)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    known_mode = unset_mode() if mode_is_unset(given[1:], launch_dir) else contextlib.nullcontext()
    try:
        with known_mode:  # Hydra's compose to read hydra.mode, skipped where nothing can set it
            hydra_main()()
    except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError, OverflowError) as e:
        if wants_traceback(argv):
            raise
        raise explain_hydra_error(e, overrides, launch_dir, functools.partial(_recipe_keys, overrides)) from None


def main() -> None:
    """`python -m merger`, and older entry points: the same as the `merger` command."""
    from merger.cli.command import merger

    merger()
