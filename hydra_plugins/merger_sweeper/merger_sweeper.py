"""`hydra/sweeper=merger`, merger's default: Hydra's basic sweeper that checks every job first.

Before Hydra's basic sweeper makes the sweep directory and launches the first batch, every job
of the sweep (from the command line and from the recipe's `hydra.sweeper.params`) is composed
with Hydra's own config loader and checked as merger checks one run, and the jobs' outputs are
checked to be distinct files. A problem prints merger's error block and exits 2, with nothing
written. Other sweepers (Optuna's, say) run as they are; each job checks itself when it starts.
"""

from dataclasses import dataclass
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # see merger.cli.hydra_private
from hydra.core.config_store import ConfigStore


@dataclass
class MergerSweeperConf:
    _target_: str = "hydra_plugins.merger_sweeper.merger_sweeper.MergerSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="merger", node=MergerSweeperConf, provider="merger")


class MergerSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from merger.cli.sweep_check import check_sweep

        assert self.hydra_context is not None and self.config is not None
        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        check_sweep(self.hydra_context.config_loader, self.config, [*params, *arguments])
        return super().sweep(arguments)
