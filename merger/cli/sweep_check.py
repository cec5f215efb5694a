"""What merger's sweeper (hydra_plugins.merger_sweeper) checks before a sweep starts.

The sweep's size first, without expanding it (a `range(0, 300000000)` would fill memory before a
single job ran), then the first MAX_PREFLIGHT_JOBS jobs, each composed with Hydra's own config
loader and checked as a run would be (see merger.cli.job_config). A problem is merger's error block,
exit status 2, and nothing written: Hydra has not made the sweep directory yet.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override, RangeSweep
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from merger.cli.failure import fail, wants_traceback
from merger.cli.hydra_errors import explain_hydra_error
from merger.cli.hydra_private import split_jobs
from merger.cli.job_config import MAX_PREFLIGHT_JOBS, check_jobs
from merger.core.limits import MAX_SWEEP_JOBS
from merger.errors import MergerError


def sweep_size(override: Override) -> int:
    """How many values a sweep override gives, counted without listing them."""
    if not override.is_sweep_override():
        return 1
    value = override.value()
    if isinstance(value, RangeSweep):
        assert value.start is not None and value.stop is not None
        start, stop, step = value.start, value.stop, 1 if value.step is None else value.step
        if not all(math.isfinite(v) for v in (start, stop, step)) or step == 0:
            raise MergerError(
                f"the sweep '{override.input_line}' is not a finite range: range(start, stop, step) needs"
                " finite numbers and a step that is not 0",
                where="the sweep (the command line and hydra.sweeper.params)",
                fix="e.g. alpha=range(0,1,0.25)",
            )
        return max(0, math.ceil((stop - start) / step))
    if isinstance(value, ChoiceSweep):
        return len(value.list)
    return 1  # glob and interval sweeps: the basic sweeper lists or refuses them itself


def _jobs(config_loader: Any, master: DictConfig, overrides: list[str]) -> tuple[list[list[str]], int]:
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(overrides)
    # a later value of a key replaces an earlier one, but Hydra's basic sweeper lists both first: each counts
    sizes = {o.get_key_element(): sweep_size(o) for o in parsed}
    total = max([math.prod(sizes.values()), *(sweep_size(o) for o in parsed)])
    if total > MAX_SWEEP_JOBS:
        raise MergerError(
            f"the sweep has {total} jobs, more than the limit of {MAX_SWEEP_JOBS} (MAX_SWEEP_JOBS)",
            where="the sweep (the command line and hydra.sweeper.params)",
            fix="sweep fewer values, or search with hydra/sweeper=optuna",
        )
    return split_jobs(parsed), total


def check_sweep(config_loader: Any, master: DictConfig, overrides: list[str]) -> None:
    """Check the sweep's jobs; on a problem print the block and exit 2 (Hydra would print a traceback)."""
    launch_dir = Path(str(master.hydra.runtime.cwd))
    jobs: list[list[str]] = []
    try:
        jobs, total = _jobs(config_loader, master, overrides)
        if total > MAX_PREFLIGHT_JOBS:
            print(
                f"merger: checking the first {MAX_PREFLIGHT_JOBS} of {total} jobs before the sweep starts",
                file=sys.stderr,
            )
        sweep_dir = launch_dir / str(master.hydra.sweep.dir)
        composed = (
            (job, config_loader.load_sweep_config(master_config=master, sweep_overrides=list(job)))
            for job in jobs[:MAX_PREFLIGHT_JOBS]
        )
        check_jobs(composed, launch_dir, sweep_dir)
    except MergerError as e:
        raise SystemExit(fail(e, traceback=False)) from None
    except (HydraException, OmegaConfBaseException) as e:
        keys = lambda: sorted(str(k) for k in master if k != "hydra")  # noqa: E731
        block = explain_hydra_error(e, jobs[0] if jobs else overrides, launch_dir, keys)
        raise SystemExit(fail(block, traceback=wants_traceback(sys.argv))) from None
