"""`sweep_report.json` at the root of a multirun: one row per job.

A Hydra callback that runs once the sweep has ended, in the launching
process, whatever the launcher: it reads the jobs' `merge_report.json` files,
so jobs that ran in other processes or on other machines are included. Each
row carries its job's `warnings`; the jobs that warned are listed at the top
(`warned`) and said again at the end of the sweep, so a warning does not
scroll past unseen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from merger.cache.atomic import write_text_atomic
from merger.errors import shown
from merger.report.html_report import write_html_report
from merger.report.run_report import REPORT_NAME
from merger.report.sweep_summary import (
    BEST_RECIPE_NAME,
    best_jobs,
    best_recipe,
    job_row,
    objectives_of,
    read_report,
    swept_values,
)

SWEEP_REPORT_NAME = "sweep_report.json"
log = logging.getLogger("merger")


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


#: the end of a sweep lists this many jobs that warned, with their first warning (the report has them all)
SHOWN_WARNED_JOBS = 10


def warned_lines(rows: list[dict[str, Any]]) -> list[str]:
    """'jobs 2, 5 warned (of 6): ...' and a line per job (its overrides and first warning), or nothing."""
    warned = [row for row in rows if row["warnings"]]
    if not warned:
        return []
    names = ", ".join(row["job"] for row in warned[:SHOWN_WARNED_JOBS]) + (
        " ..." if len(warned) > SHOWN_WARNED_JOBS else ""
    )
    noun = "job" if len(warned) == 1 else "jobs"
    lines = [f"merger: {noun} {names} warned (of {len(rows)}; every warning is in {SWEEP_REPORT_NAME}):"]
    for row in warned[:SHOWN_WARNED_JOBS]:
        more = len(row["warnings"]) - 1
        overrides = " ".join(row["overrides"]) or "no overrides"
        lines.append(
            f"  job {row['job']} ({shown(overrides)}): {shown(row['warnings'][0])}"
            + (f" (+{more} more)" if more else "")
        )
    return lines


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job's merge_report.json under the sweep; a file there that is not one is skipped, said."""
    return [row for row, _ in _read_rows(sweep_dir)]


def _read_rows(sweep_dir: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    found = []
    for report_path in sorted(sweep_dir.glob(f"**/{REPORT_NAME}"), key=_job_order):
        try:
            report = read_report(report_path)
            found.append((job_row(report, str(report_path.parent.relative_to(sweep_dir))), report))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning(f"merger: {shown(report_path)} is not a run report merger can read ({shown(e)}); skipped")
    return found


def summarise(sweep_dir: Path) -> dict[str, Any]:
    """The sweep report: its objectives, the best job (and the Pareto front), the swept variables, the rows."""
    found = _read_rows(sweep_dir)
    rows = [row for row, _ in found]
    objectives = objectives_of([report for _, report in found])
    best, front = best_jobs(rows, objectives)
    swept = swept_values(rows)
    return {
        "warned": [row["job"] for row in rows if row["warnings"]],
        "objective": objectives,
        "best": best,
        "pareto": front,
        "swept": swept,
        "jobs": rows,
    }


class SweepReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        if not sweep_dir.is_dir():
            return
        summary = summarise(sweep_dir)
        rows: list[dict[str, Any]] = summary["jobs"]
        from merger.report.contact_sheet import contact_sheets

        sheets, no_sheet = contact_sheets(sweep_dir, rows)
        summary.update({"contact_sheets": [str(p) for p in sheets]} if sheets else {"no_contact_sheet": no_sheet})
        best = next((row for row in rows if row["job"] == summary["best"]), None)
        if best is not None:
            text = best_recipe(sweep_dir / best["job"], best, summary["objective"])
            if text is not None:
                summary["best_recipe"] = str(sweep_dir / BEST_RECIPE_NAME)
                write_text_atomic(sweep_dir / BEST_RECIPE_NAME, text)
        page = write_html_report(sweep_dir, summary, title=f"merger sweep {sweep_dir.name}")
        path = sweep_dir / SWEEP_REPORT_NAME
        write_text_atomic(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
        log.info(f"merger: sweep of {len(rows)} jobs -> {path}")
        log.info(f"merger: report -> {page}")
        if best is not None:
            values = best.get("values") or {}
            scored = " ".join(f"{k}={v}" for k, v in values.items()) or " ".join(best["overrides"]) or "no overrides"
            log.info(f"merger: best job {best['job']} ({shown(scored)}), objective {best.get('objective')}")
            if "best_recipe" in summary:
                log.info(f"merger: its recipe -> {summary['best_recipe']} (merger recipe=<that file> runs it again)")
        for sheet in summary.get("contact_sheets", []):
            log.info(f"merger: contact sheet -> {sheet}")
        if no_sheet:
            log.info(f"merger: no contact sheet: {no_sheet}")
        for line in warned_lines(rows):
            log.warning(line)
