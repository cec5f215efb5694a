"""What a search is checked for before its first trial, and how merger's own sweeper tells a search
from a sweep.

A search (`merger -m hydra/sweeper=optuna 'alpha=interval(0,1)'`, or a recipe that keeps its search
space in `hydra.sweeper.params`) is run by a sweeper that picks each trial's values as it goes, so
its jobs cannot be listed and checked in advance as merger's sweeper checks a sweep's. Instead,
before Hydra makes the sweep directory, `preflight_search` composes and checks (as a run is
checked: merger.cli.job_config.check_jobs) the jobs at the bounds of the search space:

- interval(a, b): a and b; range(start, stop, step): start and the last value the sampler can give
  (Optuna's ranges include `stop` when it is on the grid); choice(...) / a,b,c: every choice;
- the dimensions combined, not multiplied: every low bound together, every high bound together,
  and each choice with the others low (at most MAX_SEARCH_JOBS jobs; trials check themselves too);

and, for Optuna's sweeper, that the recipe has an objective (`objective:` with an `evaluate` block)
and that `hydra.sweeper.direction` agrees with it: one direction per objective, each the objective's
own (psnr is maximized, the Optuna sweeper minimizes unless told). A problem is merger's block and
exit status 2, before any trial. `hydra.sweeper.sampler.seed=N` makes a search repeatable: the
same seed, search space and n_trials give the same trials.

merger's sweeper (hydra/sweeper=merger, the default) lists and runs a grid, so it refuses a
search (`n_trials`, `interval(...)`): `search_in_basic_sweep` says to run it with the Optuna
sweeper; a plain sweep from the command line (`merger -m a0=0,0.5`) of a recipe that keeps a search
in hydra.sweeper runs the command line's values, with the recipe's values for the rest. A recipe's
`hydra.sweeper.direction` (or sampler seed) alone is no search: a grid ignores it.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from merger.errors import MergerError, shown

#: the jobs a search's pre-flight composes and checks (its bounds and choices)
MAX_SEARCH_JOBS = 64
#: the sweeper settings that make a sweep a search (the Optuna sweeper's), which merger's sweeper refuses
SEARCH_SETTINGS = ("n_trials", "direction", "n_jobs", "sampler", "study_name")
SEARCH_WHERE = "the search (the command line and hydra.sweeper.params)"
SEARCH_ERROR = "this sweep is a search (n_trials / interval(...)): run it with hydra/sweeper=optuna"
SEARCH_FIX = "pip install -e '.[search]'; merger -m hydra/sweeper=optuna ..."


def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parsed(lines: Sequence[str]) -> list[Any]:
    """Each line parsed on its own (a line that does not parse is left to Hydra, which explains it)."""
    from hydra.errors import HydraException

    parser = _parser()
    found = []
    for line in lines:
        try:
            found.extend(parser.parse_overrides([line]))
        except (HydraException, ValueError):
            continue
    return found


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


# -- merger's sweeper: a grid, not a search ---------------------------------------------------


def search_in_basic_sweep(
    params: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
    arguments: Sequence[str],
    hydra_overrides: Sequence[str],
) -> bool:
    """For merger's sweeper: whether to run without the params of the config (`hydra.sweeper.params`),
    which hold a recipe's search space (True); raises MergerError for a search, which it cannot run.

    `settings`: the search settings the composed sweeper config holds (not None); `arguments`: the
    command line's sweep; `hydra_overrides`: the command line's hydra.* overrides. Any search setting
    on the command line, or an interval(...), asks for a search; in a recipe, `n_trials` or an
    interval(...) in its params make one (its direction or sampler seed alone only say how a search
    of it would go, and a grid ignores them)."""
    given = [line for line in hydra_overrides if _key(line).startswith("hydra.sweeper.")]
    user_search = any(_key(line).split(".")[2] in SEARCH_SETTINGS for line in given)
    user_search = user_search or any(o.is_interval_sweep() for o in _parsed(arguments))
    param_lines = [f"{key}={value}" for key, value in (params or {}).items()]
    user_params = any(_key(line).startswith("hydra.sweeper.params") for line in given)
    recipe_search = "n_trials" in settings or any(o.is_interval_sweep() for o in _parsed(param_lines))
    if user_search or (recipe_search and user_params):
        raise MergerError(SEARCH_ERROR, where=SEARCH_WHERE, fix=SEARCH_FIX)
    if not recipe_search:
        return False
    if not any(o.is_sweep_override() for o in _parsed(arguments)):
        raise MergerError(
            SEARCH_ERROR,
            where=f"the recipe's hydra.sweeper: {', '.join([*settings, *(f'params.{k}' for k in params or {})])}",
            fix=f"{SEARCH_FIX}; or sweep values of your own: merger -m key=a,b,c",
        )
    print(
        "merger: the recipe's search (hydra.sweeper) is for hydra/sweeper=optuna; this sweep runs"
        " the command line's values, with the recipe's values for the other keys",
        file=sys.stderr,
    )
    return True


# -- a search's pre-flight ---------------------------------------------------------------------


def _number(value: float) -> float | int:
    return round(value, 12) if isinstance(value, float) else value


def _bounds(override: Any, *, optuna: bool) -> list[Any]:
    """The values of one dimension the pre-flight tries: its bounds, or each of its choices."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer

    from merger.cli.sweep_check import sweep_size

    value = override.value()
    line = shown(override.input_line)
    if isinstance(value, IntervalSweep):
        assert value.start is not None and value.end is not None
        low, high = value.start, value.end
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise MergerError(
                f"the search's '{line}' is not an interval: interval(low, high) needs finite numbers, low <= high",
                where=SEARCH_WHERE,
                fix="e.g. alpha=interval(0,1)",
            )
        if "log" in value.tags and low <= 0:
            raise MergerError(
                f"the search's '{line}' is on a log scale, so its low bound must be above 0",
                where=SEARCH_WHERE,
                fix="e.g. lr='tag(log,interval(1e-4,1e-1))'",
            )
        return [low, high]
    if isinstance(value, RangeSweep):
        count = sweep_size(override)  # a finite range with a step (or a MergerError)
        assert value.start is not None and value.stop is not None
        step = 1 if value.step is None else value.step
        if optuna and not value.shuffle:  # Optuna's range includes `stop` when it lies on the grid
            count = math.floor((value.stop - value.start) / step + 1e-9) + 1
        if count <= 0:
            raise MergerError(f"the search's '{line}' is empty", where=SEARCH_WHERE, fix="e.g. alpha=range(0,1,0.25)")
        return [_number(value.start), _number(value.start + (count - 1) * step)]
    if isinstance(value, ChoiceSweep):
        return list(override.sweep_iterator(transformer=Transformer.encode))
    return []  # a glob: not a search dimension (Optuna's sweeper refuses it)


def bound_jobs(dimensions: Sequence[Any], *, optuna: bool) -> list[list[str]]:
    """The jobs at the bounds of the search space (see the module's doc), in order, without repeats."""
    from hydra.core.override_parser.types import ChoiceSweep

    named = [(o.get_key_element(), isinstance(o.value(), ChoiceSweep), _bounds(o, optuna=optuna)) for o in dimensions]
    named = [(key, choice, values) for key, choice, values in named if values]
    low = {key: values[0] for key, _, values in named}
    high = {key: values[-1] for key, _, values in named}
    combos: list[dict[str, Any]] = [low, high]
    for key, choice, values in named:
        if choice:
            combos.extend({**low, key: value} for value in values)
    jobs: list[list[str]] = []
    for combo in combos:
        job = [f"{key}={value}" for key, value in combo.items()]
        if job not in jobs:
            jobs.append(job)
    return jobs


def _directions(value: Any) -> tuple[list[str], bool]:
    """The sweeper's direction(s) as names, and whether it is the Optuna sweeper's default (an Enum)."""
    from enum import Enum

    from omegaconf import ListConfig

    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    names = [item.name if isinstance(item, Enum) else str(item) for item in items]
    return names, len(items) == 1 and isinstance(items[0], Enum)


def check_directions(objectives: Sequence[Any], direction: Any, label: str) -> None:
    """The recipe has an objective, and the sweeper's direction(s) are the objectives' own."""
    if not objectives:
        raise MergerError(
            "a search needs an objective: add `objective: METRIC` and an `evaluate` block",
            where=label,
            fix="e.g. evaluate: {images: sample, metrics: [psnr]} and objective: psnr"
            " (or objective=psnr on the command line, with an evaluate block in the recipe)",
        )
    directions, default = _directions(direction)
    wanted = [str(o.direction) for o in objectives]
    names = [str(getattr(o, "label", o.metric)) for o in objectives]
    fix = (
        f"hydra.sweeper.direction={wanted[0]}" if len(wanted) == 1 else f"hydra.sweeper.direction=[{','.join(wanted)}]"
    )
    said = f"hydra.sweeper.direction is {', '.join(directions)}" + (", the Optuna sweeper's default" if default else "")
    if len(directions) != len(wanted):
        raise MergerError(
            f"the search has {len(wanted)} objectives ({', '.join(names)}) but {len(directions)} directions:"
            f" ({said}); a search needs one direction per objective",
            where="hydra.sweeper.direction",
            fix=fix,
        )
    for name, want, got in zip(names, wanted, directions, strict=True):
        if want != got:
            raise MergerError(
                f"the search should {want} {name}, but it would {got} it: {said}",
                where="hydra.sweeper.direction",
                fix=fix,
            )


def _is_hydra(key: str) -> bool:
    name = key.lstrip("+~")
    return name == "hydra" or name.startswith(("hydra.", "hydra/")) or "/" in name


def _sweeper_choice(overrides: Sequence[str]) -> str | None:
    choice = None
    for line in overrides:
        key, _, value = line.partition("=")
        if key.lstrip("+~") == "hydra/sweeper":
            choice = value
    return choice


def preflight_search(overrides: list[str], launch_dir: Path) -> None:
    """A sweep with another sweeper than merger's: check its jobs at the bounds of the search space
    (and, with Optuna's, its objective and directions) before Hydra makes any directory; raises MergerError."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from merger.cli.hydra_errors import explain_hydra_error
    from merger.cli.job_config import check_jobs, recipe_data
    from merger.core.limits import MAX_SWEEP_JOBS

    choice = _sweeper_choice(overrides)
    if choice in (None, "merger"):
        return  # merger's sweeper checks its jobs itself (merger.cli.sweep_check)
    if choice == "optuna" and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise MergerError(
            "the Optuna sweeper (hydra-optuna-sweeper) is not installed", where="hydra/sweeper=optuna", fix=SEARCH_FIX
        )
    try:
        parsed = _parser().parse_overrides(overrides)
    except HydraException:
        return  # told by Hydra's own pass, as for any run
    if any(o.is_sweep_override() and _is_hydra(o.get_key_element()) for o in parsed):
        return  # a sweep of Hydra's own settings or groups: Hydra's to run or refuse
    swept = [o for o in parsed if o.is_sweep_override()]
    base = [o.input_line for o in parsed if not o.is_sweep_override()]

    def composed(job: list[str]) -> DictConfig:
        try:
            return compose(config_name="config", overrides=[*base, *job], return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise explain_hydra_error(e, [*base, *job], launch_dir, list) from None

    with initialize_config_module(config_module="merger.conf", version_base="1.3"):
        master = composed([])
        sweeper = master.hydra.sweeper
        optuna = "optuna" in str(sweeper.get("_target_", "")).lower()
        params = OmegaConf.to_container(sweeper.params) if sweeper.get("params") else {}
        assert isinstance(params, dict)
        lines = [f"{k!s}={v!s}" for k, v in params.items()]
        try:
            from_recipe = _parser().parse_overrides(lines)
        except HydraException as e:
            raise explain_hydra_error(e, lines, launch_dir, list) from None
        dimensions: dict[str, Any] = {}
        for override in [*from_recipe, *swept]:
            dimensions[override.get_key_element()] = override  # the command line's wins, as in Optuna's sweeper
        trials = sweeper.get("n_trials")
        if isinstance(trials, int) and trials < 1:
            raise MergerError(
                f"the search has n_trials={trials}, so it would run no trial",
                where="hydra.sweeper.n_trials",
                fix="give hydra.sweeper.n_trials=N with N at least 1 (20 is the Optuna sweeper's default)",
            )
        if isinstance(trials, int) and trials > MAX_SWEEP_JOBS:
            raise MergerError(
                f"the search has n_trials={trials}, more than the limit of {MAX_SWEEP_JOBS} (MAX_SWEEP_JOBS)",
                where="hydra.sweeper.n_trials",
                fix=f"search with at most {MAX_SWEEP_JOBS} trials, e.g. hydra.sweeper.n_trials=50",
            )
        jobs = bound_jobs([o for o in dimensions.values() if o.is_sweep_override()], optuna=optuna)
        if len(jobs) > MAX_SEARCH_JOBS:
            print(
                f"merger: checking {MAX_SEARCH_JOBS} of the search's {len(jobs)} bounds and choices before"
                " it starts (each trial checks itself too)",
                file=sys.stderr,
            )
        jobs = jobs[:MAX_SEARCH_JOBS] or [[]]
        configs = [(job, composed(job)) for job in jobs]
        sweep_dir = launch_dir / str(master.hydra.sweep.dir)
        current: list[list[str] | None] = [configs[0][0]]  # the job being checked (None: the jobs together)

        def each() -> Iterator[tuple[list[str], DictConfig]]:
            for job, cfg in configs:
                current[0] = job
                yield [*base, *job], cfg
            current[0] = None

        def located(error: MergerError) -> MergerError:
            at = current[0]
            return error.located(f"the search at {', '.join(shown(v) for v in at)}" if at else "the search")

        if optuna:  # the objectives and directions first, from the first job's recipe (they need no file)
            job, cfg = configs[0]
            try:
                data, label, _ = recipe_data(cfg, cfg.hydra.runtime.choices.get("recipe"), launch_dir, [*base, *job])
                objectives = _objectives(data, label)
            except MergerError as e:
                raise located(e) from None
            if objectives is not None:  # a Recipe without objectives (older merger): nothing to check
                check_directions(objectives, sweeper.get("direction"), label)
        try:
            check_jobs(each(), launch_dir, sweep_dir)
        except MergerError as e:
            raise located(e) from None


def _objectives(data: dict[str, Any], label: str) -> Sequence[Any] | None:
    from merger.ops import builtin_registry
    from merger.recipe.model import build_recipe

    recipe = build_recipe(data, builtin_registry(), file=label)
    objectives: Sequence[Any] | None = getattr(recipe, "objectives", None)
    return objectives
