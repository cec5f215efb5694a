"""`merger-inspect FILE...`: keys, shapes, dtypes, parameter count, the detected
architecture (for an image model, spandrel's architecture, scale, channels and
hyper-parameters; otherwise that it is not one), provenance, and, for two or
more models, whether they can be merged key by key.

Reads headers only for safetensors files and folders; a `.pth` is loaded
safely (no pickled code runs). Provenance comes from the file's metadata (or
the `.json` beside a `.pth`), the run context from a `merge_report.json`
beside the file.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from merger.archs import SPANDREL_MISSING, Detection, detect, image_mismatch
from merger.archs import describe as describe_architecture
from merger.core.regular_file import open_regular
from merger.core.specs import ModelSpec, spec_differences, total_bytes, total_params
from merger.core.strict_json import loads_strict
from merger.engine.family import FAMILY_THRESHOLD, compare
from merger.engine.progress import human_size
from merger.engine.provenance import Provenance
from merger.errors import EXIT_USER_ERROR, MergerError, shown
from merger.io.safetensors_header import read_header
from merger.io.sources import TensorSource, locate, open_source
from merger.report.run_report import REPORT_NAME

MAX_DIFFERENCES = 10


def open_model(path: Path) -> TensorSource:
    where = str(path)
    return open_source(locate(path, None, where=where), where=where)


def family(paths: list[Path], sources: list[TensorSource], specs: list[ModelSpec], names: list[str]) -> list[str]:
    """How related the models are: sampled cosine similarity of each weight tensor to the first model's."""
    # each model against the first on the keys those two share: a third file never changes a pair's figure
    found = [
        compare(
            [sources[0], source], [dict(specs[0]), dict(spec)], [names[0], name], max_tensors=64, max_elements=1 << 18
        )[0]
        for source, spec, name in zip(sources[1:], specs[1:], names[1:], strict=True)
    ]
    lines = [f"family (cosine similarity to {names[0]}; below {FAMILY_THRESHOLD} reads as unrelated):"]
    for similarity in found:
        if not similarity.tensors:
            lines.append(f"  {similarity.name}: no weight tensor in common to compare")
            continue
        lines.append(f"  {similarity.describe(names[0])}")
        lines.append("    least similar: " + ", ".join(f"{shown(key)} {score:.4f}" for key, score in similarity.lowest))
    return lines


MAX_SIDE_FILE_BYTES = 16 * 1024 * 1024


def _side_file(path: Path) -> bytes | None:
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_SIDE_FILE_BYTES + 1)
    except OSError:
        return None
    return raw if len(raw) <= MAX_SIDE_FILE_BYTES else None


def provenance(path: Path) -> Provenance | str | None:
    """How merger made the file; a line saying why when what the file says is malformed; None if not merger's."""
    try:
        if path.suffix == ".safetensors":
            return Provenance.from_metadata(read_header(path).metadata)
        raw = _side_file(path.with_suffix(".json")) if path.suffix == ".pth" else None
        return Provenance.from_json(raw) if raw is not None else None
    except ValueError as e:
        return f"  provenance: unreadable ({shown(e)})"


def run_context(path: Path) -> dict[str, Any] | None:
    """This file's run, from a merge_report.json beside it that lists it (None if absent or malformed)."""
    raw = _side_file(path.parent / REPORT_NAME)
    try:
        report = loads_strict(raw, what="the run report") if raw is not None else None
    except ValueError:
        return None
    if not isinstance(report, dict) or not isinstance(report.get("outputs"), dict):
        return None
    outputs: dict[str, Any] = report["outputs"]
    for name, output in outputs.items():
        if isinstance(output, dict) and isinstance(output.get("path"), str) and Path(output["path"]).name == path.name:
            recipe = report.get("recipe") if isinstance(report.get("recipe"), dict) else {}
            overrides: list[Any] = report["overrides"] if isinstance(report.get("overrides"), list) else []
            return {
                "output": str(name),
                "report": str(path.parent / REPORT_NAME),
                "recipe": recipe,
                "overrides": [str(o) for o in overrides],
            }
    return None


def _made_lines(made: Provenance) -> list[str]:
    lines = [f"  made by merger {shown(made.version)}, key {shown(made.key)}"]
    for name, origin in made.sources.items():
        lines.append(f"    source {shown(name)}: {shown(origin.hash[:16])}  {shown(origin.path)}")
    if made.dtype:
        lines.append(f"    cast to {shown(made.dtype)}")
    lines.append("    recipe:")
    lines.extend(f"      {shown(line)}" for line in made.recipe.splitlines())
    return lines


def _run_line(context: dict[str, Any]) -> str:
    recipe = context["recipe"]
    git: dict[str, Any] = recipe["git"] if isinstance(recipe.get("git"), dict) else {}
    commit: str = git["commit"] if isinstance(git.get("commit"), str) else "?"
    git_text = f", git {commit[:12]}{' (dirty)' if git.get('dirty') is True else ''}" if git else ""
    return shown(
        f"  run: output '{context['output']}' of recipe {recipe.get('name')}{git_text};"
        f" overrides {' '.join(context['overrides']) or '(none)'}"
    )


def image_detection(path: Path, source: TensorSource, spec: ModelSpec) -> Detection:
    """What the file is as an image model (the few architectures whose sizes are tensor values read them,
    from a file of at most merger.archs.image_models.VALUE_READ_BYTES)."""
    try:
        stat = path.stat()
        identity: str | None = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        identity = None
    return detect(spec, read=source.read_into, identity=identity)


def _image_line(found: Detection) -> str:
    if found.model is not None:
        return f"  image model: {shown(found.model.describe())}"
    if found.why == SPANDREL_MISSING:
        return "; image model: unknown, spandrel is not installed (pip install 'merger[sr]')"
    return "; not an image model spandrel knows"


def describe(path: Path, spec: ModelSpec, *, max_keys: int, image: Detection | None = None) -> list[str]:
    dtypes = Counter(t.dtype for t in spec.values())
    lines = [
        shown(path),
        f"  {len(spec)} tensors, {total_params(spec):,} parameters, {human_size(total_bytes(spec))};"
        f" dtypes: {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}",
    ]
    if image is not None:
        line = _image_line(image)
        if line.startswith(";"):  # not an image model: said on the summary line
            lines[-1] += line
        else:
            lines.append(line)
    architecture = describe_architecture(spec)
    if architecture:
        lines.append(f"  architecture: {architecture}")
    width = min(max((len(shown(k)) for k in spec), default=0), 60)
    listed = list(spec.items()) if max_keys < 0 else list(spec.items())[:max_keys]
    lines.extend(f"    {shown(key):<{width}}  {t.dtype:<5} {list(t.shape)}" for key, t in listed)
    if len(listed) < len(spec):
        lines.append(f"    ... {len(spec) - len(listed)} more (--keys -1 lists all)")
    made = provenance(path)
    if isinstance(made, str):
        lines.append(made)
    elif made is not None:
        lines.extend(_made_lines(made))
    context = run_context(path)
    if context:
        lines.append(_run_line(context))
    return lines


def display_names(paths: list[Path]) -> list[str]:
    return [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]


IMAGE_HINTS = {
    "architecture": "  (different networks: no key-by-key merge of them means anything)",
    "size": "  (one architecture in other sizes: no key-by-key merge of them means anything)",
    "scale": "  (the trunk is shared: keys: intersection merges it and takes the upsampler from the first model;"
    " an ESRGAN converts to the other scale with convert_scale)",
}


def compatibility(paths: list[Path], specs: list[ModelSpec], found: list[Detection] | None = None) -> list[str]:
    names = display_names(paths)
    diffs = spec_differences(names, specs)
    mismatch = image_mismatch(names, found) if found else None
    if not diffs and mismatch is None:
        return [f"compatible: all {len(paths)} models have the same {len(specs[0])} keys and shapes"]
    lines = [
        f"not compatible for a strict merge: {len(diffs)} differences"
        if diffs
        else "not compatible: the same keys and shapes, but not one image model"
    ]
    if mismatch is not None:
        lines.append(f"  {shown(mismatch.what)}")
    lines.extend(f"  {d}" for d in diffs[:MAX_DIFFERENCES])
    if len(diffs) > MAX_DIFFERENCES:
        lines.append(f"  ... and {len(diffs) - MAX_DIFFERENCES} more")
    if mismatch is not None:
        lines.append(IMAGE_HINTS[mismatch.kind])
    else:
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
        found = [image_detection(p, src, s) for p, src, s in zip(args.files, sources, specs, strict=True)]
        blocks = [describe(p, s, max_keys=args.keys, image=d) for p, s, d in zip(args.files, specs, found, strict=True)]
        if len(specs) > 1:
            blocks.append(compatibility(args.files, specs, found))
            blocks.append(family(args.files, sources, specs, display_names(args.files)))
    except MergerError as e:
        print(e.render(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        for source in sources:
            source.close()
    print("\n\n".join("\n".join(block) for block in blocks))
