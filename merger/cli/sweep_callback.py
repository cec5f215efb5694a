"""`sweep_report.json` at the root of a multirun: one row per job.

A Hydra callback that runs once the sweep has ended, in the launching
process, whatever the launcher: it reads the jobs' `merge_report.json` files,
so jobs that ran in other processes or on other machines are included.
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
        **({"previews": list(report["previews"])} if report.get("previews") else {}),
    }


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
        summary: dict[str, Any] = {"jobs": rows}
        if any(row.get("previews") for row in rows):
            try:
                from merger.report.contact_sheet import build

                summary["contact_sheets"] = [str(p) for p in build(sweep_dir, rows)]
            except ImportError:
                log.info("merger: no contact sheet: it needs Pillow (pip install 'merger[sr]')")
        path = sweep_dir / SWEEP_REPORT_NAME
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
        log.info(f"merger: sweep of {len(rows)} jobs -> {path}")
        for sheet in summary.get("contact_sheets", []):
            log.info(f"merger: contact sheet -> {sheet}")
