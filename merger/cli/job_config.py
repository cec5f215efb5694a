"""From a composed Hydra config to checked jobs: their recipe data, output directories, and the
checks a whole set of jobs gets before any of them runs (the pre-flight of a run, and merger's
sweeper before a sweep): everything that specs and file headers can tell, and that the jobs'
outputs are distinct files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from merger.cli.recipe_path import recipe_file
from merger.recipe.config_check import checked_recipe_data, override_keys

if TYPE_CHECKING:
    from merger.cli.job import Prepared

#: the jobs of a sweep checked in full before it starts (each job checks itself again when it runs)
MAX_PREFLIGHT_JOBS = 256


def _label(path: Path, launch_dir: Path) -> str:
    try:
        return str(path.relative_to(launch_dir))
    except ValueError:
        return str(path)


def recipe_data(
    cfg: DictConfig, choice: str | None, launch_dir: Path, overrides: list[str], *, file: Path | None = None
) -> tuple[dict[str, Any], str, Path | None]:
    """Checked, resolved recipe data from a composed config (its hydra node ignored); `file` is the
    recipe file, when not the one `recipe=choice` finds."""
    if file is None and choice:  # as the config's search path found it (recipe=path/to/file.yaml adds one)
        searchpath = OmegaConf.select(cfg, "hydra.searchpath", default=None)
        file = recipe_file([str(e) for e in searchpath] if searchpath else None, choice, launch_dir)
    label = _label(file, launch_dir) if file else "the command line"
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    assert isinstance(config, DictConfig)
    swept = set()  # keys a sweeper sweeps from its params (a recipe's): their values are not the user's own
    if "hydra" in config:
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        swept = {str(k).lstrip("+~") for k in params} if isinstance(params, DictConfig) else set()
        with open_dict(config):
            del config["hydra"]
    return checked_recipe_data(config, label, override_keys(overrides) - swept), label, file


def job_output_dir(cfg: DictConfig, launch_dir: Path, index: int, sweep_dir: Path | None) -> Path:
    """Where Hydra will put this job's outputs (its `${now:...}` read a moment early). In a sweep,
    `sweep_dir` is the sweep's directory, resolved once (as Hydra does)."""
    try:
        if sweep_dir is None:
            return launch_dir / str(cfg.hydra.run.dir)
        with open_dict(cfg):
            cfg.hydra.job.num = index
        return sweep_dir / str(cfg.hydra.sweep.subdir)
    except OmegaConfBaseException:  # a subdir from what only the launcher knows
        return (sweep_dir or launch_dir / "outputs") / str(index)


@dataclass(frozen=True)
class CheckedJob:
    """A job the pre-flight checked: its recipe data and where it came from, and what `prepare` made
    of it (its sources open: whoever takes it closes them). A job in the same process that finds the
    same data runs this plan rather than planning again (merger.cli.app)."""

    data: dict[str, Any]
    label: str
    launch_dir: Path
    prepared: Prepared

    def fits(self, data: dict[str, Any], label: str, launch_dir: Path) -> bool:
        """Whether a job's recipe data is what was checked (then its plan is this one)."""
        return label == self.label and launch_dir == self.launch_dir and same_data(data, self.data)


def same_data(a: Any, b: Any) -> bool:
    """Equal plain data, types included (`True == 1 == 1.0` in Python; not in a recipe)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_data(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_data(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check_jobs(
    jobs: Iterable[tuple[list[str], DictConfig]], launch_dir: Path, sweep_dir: Path | None, *, keep: bool = False
) -> list[CheckedJob]:
    """Check each (overrides, composed config) job as a run would be, and that no two write one file;
    raises MergerError on the first problem. With `keep`, returns each job's data and plan (a run's
    one job hands them to itself; a sweep keeps none: hundreds of plans would fill memory)."""
    from merger.cli.job import prepare
    from merger.engine.catalog import SpecsSeen
    from merger.engine.output_targets import OutputTarget, check_sweep_targets
    from merger.ops import builtin_registry
    from merger.recipe.model import Recipe

    registry = builtin_registry()
    seen: SpecsSeen = {}
    recipes: list[Recipe] = []
    targets: list[list[OutputTarget]] = []
    kept: list[CheckedJob] = []  # their sources stay open, for the job
    try:
        for index, (overrides, cfg) in enumerate(jobs):
            choice = cfg.hydra.runtime.choices.get("recipe")
            data, label, _ = recipe_data(cfg, choice, launch_dir, overrides)
            output_dir = job_output_dir(cfg, launch_dir, index, sweep_dir)
            prepared = prepare(data, registry, file=label, launch_dir=launch_dir, seen=seen, output_dir=output_dir)
            if keep:
                kept.append(CheckedJob(data, label, launch_dir, prepared))
            else:
                prepared.catalog.close()
            recipes.append(prepared.plan.recipe)
            targets.append(prepared.targets or [])
        check_sweep_targets(recipes, targets)
    except BaseException:
        for job in kept:
            job.prepared.catalog.close()
        raise
    return kept
