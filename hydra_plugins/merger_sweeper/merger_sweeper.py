"""`hydra/sweeper=merger`, merger's default: Hydra's basic sweeper that checks every job first.

Before Hydra's basic sweeper makes the sweep directory and launches the first batch, every job
of the sweep (from the command line and from the recipe's `hydra.sweeper.params`) is composed
with Hydra's own config loader and checked as merger checks one run, and the jobs' outputs are
checked to be distinct files. A problem prints merger's error block and exits 2, with nothing
written. Other sweepers (Optuna's, say) run as they are; merger checks a search at its bounds
before it starts (merger.cli.search_check), and each job checks itself when it starts.

The config also takes the Optuna sweeper's search settings (n_trials, direction, n_jobs, sampler,
study_name), so that a recipe which keeps its search in `hydra.sweeper` composes for a single run
and a grid sweep; a sweep with `n_trials` or an `interval(...)` (or any of these settings on the
command line) is a search, which this sweeper refuses with the advice to run it with
hydra/sweeper=optuna (see merger.cli.search_check.search_in_basic_sweep).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # see merger.cli.hydra_private
from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    seed: int | None = None  # the Optuna sampler's seed: what makes a search repeatable


@dataclass
class MergerSweeperConf:
    _target_: str = "hydra_plugins.merger_sweeper.merger_sweeper.MergerSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    # the Optuna sweeper's search settings: accepted (a recipe may hold them), refused in a sweep
    n_trials: int | None = None
    direction: Any = None
    n_jobs: int | None = None
    sampler: SamplerConf = field(default_factory=SamplerConf)  # {seed: 1}
    study_name: str | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="merger", node=MergerSweeperConf, provider="merger")


class MergerSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        n_trials: int | None = None,
        direction: Any = None,
        n_jobs: int | None = None,
        sampler: Any = None,
        study_name: str | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        settings = {
            "n_trials": n_trials,
            "direction": direction,
            "n_jobs": n_jobs,
            "sampler": sampler,
            "study_name": study_name,
        }
        self.search_settings = {
            key: value
            for key, value in settings.items()
            if value is not None and not (isinstance(value, Mapping) and all(v is None for v in value.values()))
        }

    def sweep(self, arguments: list[str]) -> Any:
        from merger.cli.failure import fail
        from merger.cli.search_check import search_in_basic_sweep
        from merger.cli.sweep_check import check_sweep
        from merger.errors import MergerError

        assert self.hydra_context is not None and self.config is not None
        hydra_overrides = [str(o) for o in self.config.hydra.overrides.hydra]
        try:
            if search_in_basic_sweep(self.params, self.search_settings, arguments, hydra_overrides):
                self.params = {}  # a recipe's search space: not this sweep's
        except MergerError as e:
            raise SystemExit(fail(e, traceback=False)) from None
        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        check_sweep(self.hydra_context.config_loader, self.config, [*params, *arguments])
        return super().sweep(arguments)
