"""The sweep report's content: a row per job (from its merge_report.json), the variables the sweep
varied, the best job by the objective (and, for two or more objectives, their Pareto front), and
`best.yaml`: the recipe the best job ran, with its values filled in.

Rows are read from the jobs' reports, so jobs that ran in other processes or on other machines
count. `best.yaml` is made from the best job's own composed config (`<job>/.hydra/config.yaml`, as
Hydra saved it, interpolations unresolved), less the settings at their defaults and those only the
command line may set; so `merger recipe=<sweep>/best.yaml` runs what the job ran and finds its nodes
(and metrics) in the cache.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from merger.core.regular_file import open_regular, read_bounded
from merger.core.strict_json import loads_strict
from merger.errors import shown
from merger.recipe.file_rules import COMMAND_LINE_SETTINGS
from merger.report.svg_plots import pareto_front

BEST_RECIPE_NAME = "best.yaml"
MAX_REPORT_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
DEFAULTS = Path(__file__).parents[1] / "conf" / "config.yaml"


def read_report(path: Path) -> dict[str, Any]:
    """A job's merge_report.json (strict JSON, bounded); ValueError when it is not one."""
    with open_regular(path) as f:
        raw = f.read(MAX_REPORT_BYTES + 1)
    if len(raw) > MAX_REPORT_BYTES:
        raise ValueError("too large")
    report = loads_strict(raw, what="a run report")
    if not isinstance(report, dict):
        raise ValueError("not a mapping")
    return report


def _averages(metrics: Any) -> dict[str, dict[str, Any]]:
    """output -> metric -> value (no per-image figures); a failed or skipped output as it is."""
    if not isinstance(metrics, dict):
        return {}
    kept: dict[str, dict[str, Any]] = {}
    for name, figures in metrics.items():
        if not isinstance(figures, dict):
            continue
        if "failed" in figures or "skipped" in figures:
            kept[str(name)] = {k: figures[k] for k in ("failed", "skipped") if k in figures}
            continue
        kept[str(name)] = {
            str(k): v for k, v in figures.items() if k in ("psnr", "ssim", "psnr_rgb", "sharpness", "perplexity")
        }
    return kept


def command(report: Mapping[str, Any]) -> str:
    """The command that runs the job again (from its launch directory)."""
    overrides = [str(o) for o in report.get("overrides", [])]
    recipe = report.get("recipe") or {}
    file, name = recipe.get("file"), recipe.get("name")
    if file and not any(o.startswith("recipe=") for o in overrides) and name not in (None, "demo"):
        overrides.insert(0, f"recipe={file}")
    return " ".join(["merger", *(shlex.quote(o) for o in overrides)])


def job_row(report: Mapping[str, Any], job: str) -> dict[str, Any]:
    """One row of the sweep report (KeyError/TypeError/ValueError when the report lacks what a row needs)."""
    objective = report.get("objective")
    values = [o.get("value") for o in objective] if isinstance(objective, list) else None
    said = report.get("warnings")
    return {
        "job": job,
        "overrides": [str(o) for o in report["overrides"]],
        "seconds": float(report["seconds"]),
        "nodes": {str(name): str(node["status"]) for name, node in report["nodes"].items()},
        "outputs": {
            str(name): {"path": str(out["path"]), "sha256": str(out["sha256"])}
            for name, out in report["outputs"].items()
        },
        "warnings": [str(w) for w in said] if isinstance(said, list) else [],
        **({"previews": list(report["previews"])} if report.get("previews") else {}),
        **({"preview_notes": list(report["preview_notes"])} if report.get("preview_notes") else {}),
        **({"metrics": _averages(report["metrics"])} if "metrics" in report else {}),
        **({"objective": values[0] if len(values) == 1 else values} if values else {}),
        "provenance": {
            "recipe": {k: (report.get("recipe") or {}).get(k) for k in ("name", "file", "git")},
            "sources": dict(report.get("sources") or {}),
            "command": command(report),
            "launch_dir": report.get("launch_dir"),
        },
    }


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _override_value(text: str) -> Any:
    """An override's value as Hydra reads it: numbers (1e-4 too, which YAML 1.1 reads as text), else YAML."""
    if _NUMBER.match(text.strip()):
        number = float(text)
        return int(number) if number.is_integer() and not re.search(r"[.eE]", text) else number
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def swept_values(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The overridden keys whose values differ between jobs, with each job's value (rows get `values`)."""
    per_job = []
    for row in rows:
        values = {}
        for override in row["overrides"]:
            key, sep, value = override.partition("=")
            if sep and not key.startswith(("hydra.", "hydra/")):
                values[key.lstrip("+~")] = _override_value(value)
        per_job.append(values)
    keys = list(dict.fromkeys(k for values in per_job for k in values))
    varied = [k for k in keys if len({repr(values.get(k)) for values in per_job}) > 1]
    for row, values in zip(rows, per_job, strict=True):
        row["values"] = {k: values.get(k) for k in varied}
    return {k: [values.get(k) for values in per_job] for k in varied}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def best_jobs(
    rows: Sequence[Mapping[str, Any]], objectives: Sequence[Mapping[str, Any]]
) -> tuple[str | None, list[str]]:
    """The best job (by the first objective, among the Pareto front of all of them) and the front
    (empty for one objective). Jobs whose objective failed are left out."""
    if not objectives:
        return None, []
    directions = [str(o.get("direction", "maximize")) for o in objectives]
    points: list[list[float | None]] = []
    for row in rows:
        value = row.get("objective")
        values = value if isinstance(value, list) else [value]
        points.append([_number(v) for v in values] if len(values) == len(objectives) else [None] * len(objectives))
    front = pareto_front(points, directions)
    if not front:
        return None, []
    sign = 1.0 if directions[0] == "maximize" else -1.0
    best = max(front, key=lambda i: (sign * (points[i][0] or 0.0), -i))
    return str(rows[best]["job"]), ([str(rows[i]["job"]) for i in front] if len(objectives) > 1 else [])


def objectives_of(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The sweep's objectives (metric, output, direction), as the first job that has them says."""
    for report in reports:
        found = report.get("objective")
        if isinstance(found, list) and found:
            return [{k: o.get(k) for k in ("metric", "output", "direction")} for o in found if isinstance(o, dict)]
    return []


def _defaults() -> dict[str, Any]:
    loaded = yaml.safe_load(DEFAULTS.read_text())
    return {k: v for k, v in loaded.items() if k not in ("defaults", "hydra")}


def best_recipe(job_dir: Path, row: Mapping[str, Any], objectives: Sequence[Mapping[str, Any]]) -> str | None:
    """best.yaml's text: the job's composed recipe with its values (None when Hydra's copy is missing)."""
    try:
        data, _ = read_bounded(job_dir / ".hydra" / "config.yaml", MAX_CONFIG_BYTES)
        config = yaml.safe_load(data) if data else None
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    defaults = _defaults()
    kept = {
        k: v
        for k, v in config.items()
        if k not in COMMAND_LINE_SETTINGS and k not in ("hydra", "recipe") and (k not in defaults or defaults[k] != v)
    }
    value = row.get("objective")
    values = value if isinstance(value, list) else [value]
    scored = ", ".join(
        f"{o.get('output')}.{o.get('metric')} = {v:.6g} ({o.get('direction')})"
        for o, v in zip(objectives, values, strict=False)
        if isinstance(v, int | float)
    )
    swept: dict[str, Any] = row.get("values") or {}
    overrides = shown(" ".join(f"{k}={v}" for k, v in swept.items()) or " ".join(row["overrides"]) or "no overrides")
    scored = shown(scored)
    header = [
        "# @package _global_",
        f"# The best job of a sweep: job {row['job']} ({overrides}){': ' + scored if scored else ''}.",
        "# Its composed recipe with those values filled in; run it from the sweep's launch directory:",
        "#   merger recipe=<this file>     (its nodes and metrics come from the cache)",
    ]
    body = yaml.safe_dump(kept, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def one_job_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """A run's own report as a sweep of one job (for the report.html in its run directory)."""
    row = job_row(report, ".")
    row["values"] = {}
    objectives = objectives_of([report])
    return {"objective": objectives, "best": "." if objectives else None, "pareto": [], "swept": {}, "jobs": [row]}
