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

from merger.atomic import write_text_atomic
from merger.report import REPORT_NAME

SWEEP_REPORT_NAME = "sweep_report.json"
log = logging.getLogger("merger")


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for report_path in sorted(sweep_dir.glob(f"**/{REPORT_NAME}"), key=_job_order):
        report = json.loads(report_path.read_text())
        rows.append(
            {
                "job": str(report_path.parent.relative_to(sweep_dir)),
                "overrides": report["overrides"],
                "seconds": report["seconds"],
                "nodes": {name: node["status"] for name, node in report["nodes"].items()},
                "outputs": {
                    name: {"path": out["path"], "sha256": out["sha256"]} for name, out in report["outputs"].items()
                },
                **({"previews": report["previews"]} if report.get("previews") else {}),
            }
        )
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
                from merger.contact_sheet import build

                summary["contact_sheets"] = [str(p) for p in build(sweep_dir, rows)]
            except ImportError:
                log.info("merger: no contact sheet: it needs Pillow (pip install 'merger[sr]')")
        path = sweep_dir / SWEEP_REPORT_NAME
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
        log.info(f"merger: sweep of {len(rows)} jobs -> {path}")
        for sheet in summary.get("contact_sheets", []):
            log.info(f"merger: contact sheet -> {sheet}")
