"""The run report (`merge_report.json`) and the human summary printed at the end."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.cache.atomic import write_text_atomic
from merger.core.version import VERSION as __version__
from merger.engine.executor import NodeResult
from merger.engine.placement import OutputResult
from merger.engine.plan import Plan
from merger.engine.progress import human_size
from merger.errors import shown
from merger.report.evaluate import metric_line
from merger.report.sanity import Sanity

REPORT_NAME = "merge_report.json"
SHOWN_WARNINGS = 3  # the summary's; the report has them all


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
    sanity: Mapping[str, Sanity] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The report of a run. `warnings`: every warning the job said (the plan's are always among them),
    once each; `sanity`: the sanity checks of merged image models, by node (merger.report.sanity)."""
    sanity = sanity or {}
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
        "warnings": list(dict.fromkeys([*plan.warnings, *warnings])),
        "sources": sources,
        "nodes": {
            name: {
                "op": r.op,
                "key": r.key,
                "status": r.status,
                "seconds": round(r.seconds, 4),
                "bytes": r.entry.bytes,
                **({"notes": r.notes} if r.notes else {}),
                **({"nonfinite": r.nonfinite} if r.nonfinite else {}),
                **({"sanity": sanity[name].as_report()} if name in sanity else {}),
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
                **({"overflow": o.overflow} if o.overflow else {}),
                **({"files": o.files} if o.files else {}),
                **({"left_out": o.left_out} if o.left_out else {}),
                **{
                    setting: value
                    for setting in ("layout", "wrap")
                    if (value := getattr(plan.recipe.outputs[name], setting, None)) is not None
                },
            }
            for name, o in outputs.items()
        },
    }


def write_report(output_dir: Path, report: dict[str, Any]) -> Path:
    path = output_dir / REPORT_NAME
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    return path


def _short(path: str, base: str) -> str:
    try:
        return shown(Path(path).relative_to(base))
    except ValueError:
        return shown(path)


def summary(report: dict[str, Any]) -> str:
    recipe = report["recipe"]["name"] or report["recipe"]["file"]
    base = report["launch_dir"]
    lines = [f"merger: recipe {recipe} -> {_short(report['output_dir'], base)} ({report['seconds']:.2f} s)"]
    for name, node in report["nodes"].items():
        lines.append(
            f"  node   {name:<16} {node['op']:<14} {node['status']:<8} {node['seconds']:7.2f} s"
            f"  {human_size(node['bytes'])}"
        )
        not_shared = (node.get("notes") or node.get("keys") or {}).get("not_shared", 0)  # "keys": reports before 0.2
        if not_shared:
            noun = "key" if not_shared == 1 else "keys"
            lines.append(f"         {not_shared} {noun} not shared by every input: copied from the first")
        sanity = node.get("sanity")
        if isinstance(sanity, dict):
            lines.append(f"         {sanity_line(name, sanity)}")
    for name, out in report["outputs"].items():
        dtype = "" if out["dtype"] == "keep" else f"{out['dtype']}, "
        lines.append(f"  output {name:<16} {_short(out['path'], base)}  ({dtype}{human_size(out['bytes'])})")
    for row in report.get("previews", []):
        lines.append(f"  preview {row['output']:<15} {_short(row['png'], base)}")
    for name, figures in report.get("metrics", {}).items():
        lines.append(f"  metrics {name:<15} {metric_line(name, figures)}")
    for objective in report.get("objective", []):
        value = objective["value"]
        shown_value = f"{value:.6g}" if isinstance(value, float | int) else "failed"
        lines.append(
            f"  objective {objective['output']}.{objective['metric']} = {shown_value} ({objective['direction']})"
        )
    said = [str(w) for w in report.get("warnings", [])]
    for warning in said[:SHOWN_WARNINGS]:
        lines.append(f"  warning {shown(warning)}")
    if len(said) > SHOWN_WARNINGS:
        lines.append(f"  ... and {len(said) - SHOWN_WARNINGS} more warnings in {REPORT_NAME}")
    return "\n".join(lines)


def sanity_line(name: str, sanity: Mapping[str, Any]) -> str:
    """A node's sanity check in the summary: what it found, or its figures."""
    if sanity.get("warning"):
        prefix = f"node '{name}': "
        return f"sanity: {shown(str(sanity['warning']).removeprefix(prefix))}"
    if sanity.get("status") == "skipped":
        return f"sanity: skipped, {shown(sanity.get('note'))}"
    images = sanity.get("images", {})
    figures = ", ".join(
        f"{image} -> mean {m['mean']:.3f}" + (f" std {m['std']:.3f}" if image == "sample" else "")
        for image, m in images.items()
        if isinstance(m.get("mean"), float | int) and isinstance(m.get("std"), float | int)
    )
    return f"sanity: ok ({figures}; {sanity.get('seconds', 0):.2f} s on {sanity.get('device')})"
