"""The run report (`merge_report.json`) and the human summary printed at the end."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger import __version__
from merger.atomic import write_text_atomic
from merger.executor import NodeResult
from merger.placement import OutputResult
from merger.plan import Plan
from merger.progress import human_size

REPORT_NAME = "merge_report.json"


@dataclass(frozen=True)
class RunContext:
    """What belongs to this run rather than to the content it made."""

    recipe_name: str | None
    recipe_file: str | None
    git: dict[str, object] | None
    overrides: tuple[str, ...]
    launch_dir: Path
    output_dir: Path


def build_report(
    plan: Plan,
    results: dict[str, NodeResult],
    outputs: dict[str, OutputResult],
    context: RunContext,
    *,
    device: str | None,
    seconds: float,
) -> dict[str, Any]:
    sources = {}
    for node in plan.nodes.values():
        for ref in node.inputs:
            if ref.handle is not None:
                sources[ref.handle.name] = {"path": str(ref.handle.path), "key": ref.handle.content_hash}
    return {
        "merger_version": __version__,
        "recipe": {
            "name": context.recipe_name,
            "file": context.recipe_file,
            "git": context.git,
            "description": plan.recipe.settings.description,
        },
        "overrides": list(context.overrides),
        "variables": plan.recipe.variables,
        "launch_dir": str(context.launch_dir),
        "output_dir": str(context.output_dir),
        "device": device,
        "seconds": round(seconds, 4),
        "warnings": list(plan.warnings),
        "sources": sources,
        "nodes": {
            name: {
                "op": r.op,
                "key": r.key,
                "status": r.status,
                "seconds": round(r.seconds, 4),
                "bytes": r.entry.bytes,
                **({"keys": r.notes} if r.notes else {}),
            }
            for name, r in results.items()
        },
        "outputs": {
            name: {
                "node": o.node,
                "path": str(o.path),
                "sha256": o.sha256,
                "bytes": o.bytes,
                "dtype": o.dtype,
                "placed": o.how,
            }
            for name, o in outputs.items()
        },
    }


def write_report(output_dir: Path, report: dict[str, Any]) -> Path:
    path = output_dir / REPORT_NAME
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return path


def summary(report: dict[str, Any]) -> str:
    recipe = report["recipe"]["name"] or report["recipe"]["file"]
    lines = [f"merger: recipe {recipe} -> {report['output_dir']} ({report['seconds']:.2f} s)"]
    for name, node in report["nodes"].items():
        lines.append(
            f"  node   {name:<16} {node['op']:<14} {node['status']:<8} {node['seconds']:7.2f} s"
            f"  {human_size(node['bytes'])}"
        )
        copied = node.get("keys", {}).get("copied", 0)
        if copied:
            lines.append(f"         {copied} keys copied from the first input (not merged)")
    for name, out in report["outputs"].items():
        lines.append(f"  output {name:<16} {out['path']}  ({out['dtype']}, {human_size(out['bytes'])})")
    return "\n".join(lines)
