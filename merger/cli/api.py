"""The Python API: `merger.run(recipe, overrides)` for notebooks and other programs; the `merger`
command runs its jobs through the same `execute`.

```python
import merger
result = merger.run("recipes/esrgan_dni.yaml", overrides=["alpha=0.6"])
result.outputs["dni"].path, result.outputs["dni"].sha256, result.nodes["dni"].status
```

A recipe file is composed by Hydra as `merger recipe=...` composes it (defaults lists, the trust
rules of merger.recipe.file_rules); a mapping is the caller's own data. Overrides use Hydra's
grammar (`alpha=0.6`, `nodes.dni.alpha=0.3`, `+extra=1`), one run each (no sweeps: loop in Python).
Errors raise MergerError.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merger.errors import MergerError, os_error_block, shown

if TYPE_CHECKING:
    from merger.cli.job import Prepared
    from merger.engine.output_targets import SweepJob


_RECIPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class NodeRun:
    """One node of a run: its op, content key, whether it was computed or taken from the cache."""

    name: str
    op: str
    key: str
    status: str  # "computed" | "cached"
    seconds: float


@dataclass(frozen=True)
class OutputRun:
    """One output of a run: where it is and the sha256 of the file there."""

    name: str
    node: str
    path: Path
    sha256: str
    bytes: int
    dtype: str


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    report_path: Path  # merge_report.json
    nodes: dict[str, NodeRun]
    outputs: dict[str, OutputRun]
    warnings: tuple[str, ...]
    report: dict[str, Any]  # all of merge_report.json
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # output -> metric -> value (evaluate)
    objective: float | list[float] | None = None  # what the job returns to Hydra's sweeper (NaN: failed)


@dataclass(frozen=True)
class JobSource:
    """Where a job's recipe came from, for its report: the recipe's name and file, if a file."""

    name: str | None
    file: Path | None


def execute(
    data: Mapping[str, Any],
    *,
    label: str,
    source: JobSource,
    overrides: Sequence[str],
    launch_dir: Path,
    output_dir: Path,
    sweep_job: SweepJob | None = None,
    prepared: Prepared | None = None,
) -> RunResult:
    """Prepare, run and report one job of checked recipe data (the command's jobs come here too).
    `prepared`: what `prepare` made of this very data already (the command's pre-flight)."""
    from merger.cli.job import prepare, run
    from merger.ops import builtin_registry
    from merger.report.git_state import git_state
    from merger.report.run_report import REPORT_NAME, RunContext

    if prepared is None:
        prepared = prepare(data, builtin_registry(), file=label, launch_dir=launch_dir)
    context = RunContext(
        recipe_name=source.name,
        recipe_file=str(source.file) if source.file else None,
        git=git_state(source.file) if source.file else None,
        overrides=tuple(overrides),
        launch_dir=launch_dir,
        output_dir=output_dir,
    )
    report = run(prepared, context, sweep_job)
    return RunResult(
        output_dir=output_dir,
        report_path=output_dir / REPORT_NAME,
        nodes={
            name: NodeRun(name, node["op"], node["key"], node["status"], node["seconds"])
            for name, node in report["nodes"].items()
        },
        outputs={
            name: OutputRun(name, out["node"], Path(out["path"]), out["sha256"], out["bytes"], out["dtype"])
            for name, out in report["outputs"].items()
        },
        warnings=tuple(report["warnings"]),
        report=report,
        metrics=dict(report.get("metrics", {})),
        objective=objective_value(report),
    )


def objective_value(report: Mapping[str, Any]) -> float | list[float] | None:
    """The report's objective as a sweeper takes it: a float for one, a list for several, NaN for a
    failed one (Optuna counts that trial as failed), None when the recipe has no objective."""
    values = [
        float(o["value"]) if isinstance(o.get("value"), int | float) else math.nan for o in report.get("objective", [])
    ]
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _default_output_dir(launch_dir: Path) -> Path:
    """As the command's: outputs/<date>/<time to the microsecond>/ under the launch directory."""
    now = datetime.datetime.now()
    return launch_dir / "outputs" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")


def _from_file(path: Path, overrides: list[str], launch_dir: Path) -> tuple[dict[str, Any], str]:
    """Compose a recipe file as `merger recipe=...` does, from its own directory."""
    from hydra import compose, initialize_config_module
    from hydra.core.plugins import Plugins
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from merger.cli.hydra_errors import explain_hydra_error
    from merger.cli.job_config import recipe_data
    from merger.cli.recipe_source import RecipeDirSource

    if not path.is_file():
        raise MergerError(f"recipe file not found: '{path}'", fix="give the path of a recipe .yaml file")
    folder = str(path.parent.resolve())
    if path.suffix != ".yaml" or not _RECIPE_NAME.fullmatch(path.stem) or "$" in folder:
        raise MergerError(
            f"cannot run '{shown(path)}' as a recipe: its name must be NAME.yaml (letters, digits, _ . -)"
            " in a folder whose path has no '$'",
            fix="rename the file, or copy it to such a place",
        )
    Plugins.instance().register(RecipeDirSource)
    from merger.cli.recipe_path import default_searchpath

    entries = [f"merger-recipes://{folder}", *default_searchpath()]  # as `merger recipe=PATH` finds it
    job = [f"recipe={path.stem}", f"hydra.searchpath=[{','.join(_quoted(e) for e in entries)}]", *overrides]
    try:
        with initialize_config_module(config_module="merger.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise explain_hydra_error(e, list(overrides), launch_dir, list) from None
    data, label, _ = recipe_data(cfg, None, launch_dir, job, file=path)
    return data, label


def _quoted(text: str) -> str:
    """`text` as one quoted value of Hydra's override grammar, where backslashes are literal except
    those before a quote or at the end, which come in pairs."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def _from_mapping(recipe: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The caller's own mapping (trusted, as the command line is), with overrides applied."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from merger.recipe.config_check import checked_recipe_data

    try:
        config = OmegaConf.merge(OmegaConf.create(dict(recipe)), OmegaConf.from_dotlist(overrides))
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise MergerError(f"cannot apply the overrides: {e}", where="overrides", fix="write key=value") from None
    assert isinstance(config, DictConfig)
    return checked_recipe_data(config, "the recipe mapping", trusted=True)


def run(
    recipe: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> RunResult:
    """Run one recipe (a recipe file's path, or a mapping of sources, nodes, outputs and settings).

    Relative source paths resolve against the current directory; outputs land in `output_dir`
    (default outputs/<date>/<time>/, as the command's); the cache is `cache_dir`, else
    $MERGER_CACHE_DIR, else outputs/cache. Raises MergerError."""
    launch_dir = Path.cwd()
    extra = [str(o) for o in overrides]
    try:
        if isinstance(recipe, Mapping):
            data, label, source = _from_mapping(recipe, extra), "the recipe mapping", JobSource(None, None)
        else:
            path = Path(recipe)
            data, label = _from_file(path, extra, launch_dir)
            source = JobSource(path.stem, path.resolve())
        data = {**data, "progress": progress}
        if cache_dir is not None:
            data["cache_dir"] = str(cache_dir)
        where = Path(output_dir) if output_dir is not None else _default_output_dir(launch_dir)
        return execute(
            data, label=label, source=source, overrides=extra, launch_dir=launch_dir, output_dir=where.absolute()
        )
    except OSError as e:
        raise os_error_block(e) from None
