"""`merger-inspect FILE...`: keys, shapes, dtypes, parameter count, the detected
architecture, provenance, and, for two or more models, whether they can be
merged key by key.

Reads headers only for safetensors files and folders; a `.pth` is loaded
safely (no pickled code runs). Provenance comes from the file's metadata (or
the `.json` beside a `.pth`), the run context from a `merge_report.json`
beside the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from merger.archs import describe as describe_architecture
from merger.errors import EXIT_USER_ERROR, MergerError, shown
from merger.family import FAMILY_THRESHOLD, compare
from merger.io.safetensors_file import read_header
from merger.io.sources import TensorSource, locate, open_source
from merger.progress import human_size
from merger.provenance import parse_metadata
from merger.report import REPORT_NAME
from merger.specs import ModelSpec, spec_differences, total_bytes, total_params

MAX_DIFFERENCES = 10


def open_model(path: Path) -> TensorSource:
    where = str(path)
    return open_source(locate(path, None, where=where), where=where)


def family(paths: list[Path], sources: list[TensorSource], specs: list[ModelSpec], names: list[str]) -> list[str]:
    """How related the models are: sampled cosine similarity of each weight tensor to the first model's."""
    found = compare(sources, [dict(s) for s in specs], names, max_tensors=64, max_elements=1 << 18)
    lines = [f"family (cosine similarity to {names[0]}; below {FAMILY_THRESHOLD} reads as unrelated):"]
    for similarity in found:
        if not similarity.tensors:
            lines.append(f"  {similarity.name}: no weight tensor in common to compare")
            continue
        lines.append(f"  {similarity.describe(names[0])}")
        lines.append("    least similar: " + ", ".join(f"{shown(key)} {score:.4f}" for key, score in similarity.lowest))
    return lines


def provenance(path: Path) -> dict[str, Any] | None:
    if path.suffix == ".safetensors":
        return parse_metadata(read_header(path).metadata)
    sidecar = path.with_suffix(".json")
    if path.suffix == ".pth" and sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except ValueError:
            return None
        return data if isinstance(data, dict) and "key" in data else None
    return None


def run_context(path: Path) -> dict[str, Any] | None:
    """This file's run, from a merge_report.json beside it that lists it."""
    report_path = path.parent / REPORT_NAME
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return None
    for name, output in report.get("outputs", {}).items():
        if Path(output.get("path", "")).name == path.name:
            return {"output": name, "report": str(report_path), **{k: report.get(k) for k in ("recipe", "overrides")}}
    return None


def describe(path: Path, spec: ModelSpec, *, max_keys: int) -> list[str]:
    dtypes = Counter(t.dtype for t in spec.values())
    lines = [
        f"{path}",
        f"  {len(spec)} tensors, {total_params(spec):,} parameters, {human_size(total_bytes(spec))};"
        f" dtypes: {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}",
    ]
    architecture = describe_architecture(spec)
    if architecture:
        lines.append(f"  architecture: {architecture}")
    width = min(max((len(shown(k)) for k in spec), default=0), 60)
    listed = list(spec.items()) if max_keys < 0 else list(spec.items())[:max_keys]
    lines.extend(f"    {shown(key):<{width}}  {t.dtype:<5} {list(t.shape)}" for key, t in listed)
    if len(listed) < len(spec):
        lines.append(f"    ... {len(spec) - len(listed)} more (--keys -1 lists all)")
    made = provenance(path)
    if made:
        lines.append(f"  made by merger {made.get('version')}, key {made.get('key')}")
        sources = made.get("sources")
        if isinstance(sources, dict):
            for name, info in sources.items():
                lines.append(f"    source {name}: {info.get('hash', '?')[:16]}  {info.get('path', '?')}")
        if made.get("dtype"):
            lines.append(f"    cast to {made['dtype']}")
        lines.append("    recipe:")
        lines.extend(f"      {line}" for line in str(made.get("recipe", "")).splitlines())
    context = run_context(path)
    if context:
        recipe = context.get("recipe") or {}
        git = recipe.get("git") or {}
        git_text = f", git {git.get('commit', '?')[:12]}{' (dirty)' if git.get('dirty') else ''}" if git else ""
        lines.append(
            f"  run: output '{context['output']}' of recipe {recipe.get('name')}{git_text};"
            f" overrides {' '.join(context.get('overrides') or []) or '(none)'}"
        )
    return lines


def display_names(paths: list[Path]) -> list[str]:
    return [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]


def compatibility(paths: list[Path], specs: list[ModelSpec]) -> list[str]:
    names = display_names(paths)
    diffs = spec_differences(names, specs)
    if not diffs:
        return [f"compatible: all {len(paths)} models have the same {len(specs[0])} keys and shapes"]
    lines = [f"not compatible for a strict merge: {len(diffs)} differences"]
    lines.extend(f"  {d}" for d in diffs[:MAX_DIFFERENCES])
    if len(diffs) > MAX_DIFFERENCES:
        lines.append(f"  ... and {len(diffs) - MAX_DIFFERENCES} more")
    lines.append("  (keys: intersection merges the common keys and copies the rest from the first model)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="merger-inspect", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="model files or Hugging Face folders")
    parser.add_argument("--keys", type=int, default=20, metavar="N", help="list the first N keys (-1: all)")
    args = parser.parse_args(argv)
    sources: list[TensorSource] = []
    try:
        for path in args.files:
            sources.append(open_model(path))
        specs: list[ModelSpec] = [dict(s.spec()) for s in sources]
        blocks = [describe(p, s, max_keys=args.keys) for p, s in zip(args.files, specs, strict=True)]
        if len(specs) > 1:
            blocks.append(compatibility(args.files, specs))
            blocks.append(family(args.files, sources, specs, display_names(args.files)))
    except MergerError as e:
        print(e.render(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        for source in sources:
            source.close()
    print("\n\n".join("\n".join(block) for block in blocks))
