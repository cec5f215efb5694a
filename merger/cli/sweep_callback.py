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
from merger.core.regular_file import open_regular
from merger.core.strict_json import loads_strict
from merger.errors import shown
from merger.report.run_report import REPORT_NAME

SWEEP_REPORT_NAME = "sweep_report.json"
log = logging.getLogger("merger")


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


MAX_REPORT_BYTES = 64 * 1024 * 1024


def _row(report_path: Path, sweep_dir: Path) -> dict[str, Any]:
    with open_regular(report_path) as f:
        raw = f.read(MAX_REPORT_BYTES + 1)
    if len(raw) > MAX_REPORT_BYTES:
        raise ValueError("too large")
    report = loads_strict(raw, what="a run report")
    if not isinstance(report, dict):
        raise ValueError("not a mapping")
    return {
        "job": str(report_path.parent.relative_to(sweep_dir)),
        "overrides": list(report["overrides"]),
        "seconds": float(report["seconds"]),
        "nodes": {str(name): str(node["status"]) for name, node in report["nodes"].items()},
        "outputs": {
            str(name): {"path": str(out["path"]), "sha256": str(out["sha256"])}
            for name, out in report["outputs"].items()
        },
        "warnings": [str(w) for w in said] if isinstance(said := report.get("warnings"), list) else [],
        **({"previews": list(report["previews"])} if report.get("previews") else {}),
        **({"preview_notes": list(report["preview_notes"])} if report.get("preview_notes") else {}),
    }


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
    rows = []
    for report_path in sorted(sweep_dir.glob(f"**/{REPORT_NAME}"), key=_job_order):
        try:
            rows.append(_row(report_path, sweep_dir))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning(f"merger: {shown(report_path)} is not a run report merger can read ({shown(e)}); skipped")
    return rows


class SweepReportCallback(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        if not sweep_dir.is_dir():
            return
        rows = sweep_rows(sweep_dir)
        summary: dict[str, Any] = {"warned": [row["job"] for row in rows if row["warnings"]], "jobs": rows}
        from merger.report.contact_sheet import contact_sheets

        sheets, no_sheet = contact_sheets(sweep_dir, rows)
        summary.update({"contact_sheets": [str(p) for p in sheets]} if sheets else {"no_contact_sheet": no_sheet})
        path = sweep_dir / SWEEP_REPORT_NAME
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
        log.info(f"merger: sweep of {len(rows)} jobs -> {path}")
        for sheet in summary.get("contact_sheets", []):
            log.info(f"merger: contact sheet -> {sheet}")
        if no_sheet:
            log.info(f"merger: no contact sheet: {no_sheet}")
        for line in warned_lines(rows):
            log.warning(line)
