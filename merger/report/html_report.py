"""report.html: one self-contained page for a sweep (or one run), from the sweep report.

A grid of the jobs' previews (the best and the Pareto-front jobs marked), a view that compares two
images with a divider (any job's preview, or the low-resolution input upscaled by nearest or
bicubic), the metrics in a sortable table, plots of each metric against each numeric swept
variable and of one objective against the other, and each job's provenance. The page is rendered
by merger.report.html_page (every value escaped; its style and script are static files beside it); it
refers to images by paths relative to its folder and to nothing on a network. Numpy and Pillow are
imported only to make the input's upscaled images.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from merger.cache.atomic import write_bytes_atomic, write_text_atomic
from merger.report.html_page import render
from merger.report.svg_plots import finite, metric_value, number, objective_name, objective_values, shown, sweep_plots

HTML_REPORT_NAME = "report.html"
FILES_DIR = "report_files"
#: the grid, the table, the comparison and the provenance show this many jobs (and the best and the front)
MAX_JOBS_SHOWN = 500
MAX_FRONT_EXTRA = 100
MAX_TILE_IMAGES = 4
MAX_TILE_METRICS = 8
#: the upscaled input is not made past this many pixels
MAX_INPUT_PIXELS = 64 * 1024 * 1024


def write_html_report(directory: Path, summary: Mapping[str, Any], *, title: str) -> Path:
    """Write `directory/report.html` (and the input's upscaled images under `directory/report_files/`)."""
    directory = Path(directory).absolute()
    jobs: list[Mapping[str, Any]] = [job for job in summary.get("jobs") or [] if isinstance(job, Mapping)]
    objectives = [o for o in summary.get("objective") or [] if isinstance(o, Mapping)]
    best = summary.get("best")
    best = str(best) if best is not None else None
    pareto = {str(name) for name in summary.get("pareto") or []}
    index = {str(job.get("job")): i for i, job in enumerate(jobs)}
    marked = [index[name] for name in ([best] if best is not None else []) + sorted(pareto) if name in index]
    chosen = _selected(len(jobs), MAX_JOBS_SHOWN, marked[:MAX_FRONT_EXTRA])
    swept = [str(name) for name in summary.get("swept") or {}]
    columns = metric_columns(jobs)
    objective_names = [objective_name(o) for o in objectives]
    notes = []
    if len(chosen) < len(jobs):
        notes.append(
            f"The grid, the comparison, the table and the provenance show {len(chosen)} of {len(jobs)} jobs "
            f"(the first {MAX_JOBS_SHOWN}, the best and the Pareto front); the JSON report has them all."
        )
    plots, plot_notes = sweep_plots(jobs, summary.get("swept") or {}, columns, objectives, best)
    notes.extend(plot_notes)
    tiles = [_tile(jobs[i], directory, columns, objective_names, best, pareto) for i in chosen]
    context = {
        "title": title,
        "job_count": len(jobs),
        "objectives": [
            {"name": name, "direction": str(o.get("direction", ""))}
            for name, o in zip(objective_names, objectives, strict=True)
        ],
        "best": best,
        "swept": swept,
        "notes": notes,
        "tiles": tiles,
        "compare": _compare(tiles, [jobs[i] for i in chosen], directory),
        "table": _table(jobs, chosen, swept, columns, objective_names, best, pareto),
        "plots": [{"title": name, "svg": svg} for name, svg in plots],  # markup: escaped in svg_plots
        "provenance": [_provenance(jobs[i]) for i in chosen],
    }
    page = directory / HTML_REPORT_NAME
    write_text_atomic(page, render(context))
    return page


def _selected(count: int, limit: int, extra: Iterable[int]) -> list[int]:
    """The first `limit` indices and the `extra` ones, in order."""
    return sorted(set(range(min(count, limit))) | set(extra))


def metric_columns(jobs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(output, metric) of every metric any job has (measured or failed), in order of first appearance."""
    seen: dict[tuple[str, str], None] = {}
    for job in jobs:
        for output, metrics in (job.get("metrics") or {}).items():
            if not isinstance(metrics, Mapping):
                continue
            for metric, value in metrics.items():
                if metric == "failed" and isinstance(value, Mapping):
                    seen.update({(str(output), str(name)): None for name in value})
                elif metric != "skipped":
                    seen[(str(output), str(metric))] = None
    return list(seen)


def _cell(job: Mapping[str, Any], output: str, metric: str) -> dict[str, Any]:
    """A table cell: its text, the value it sorts by (None: last), a tooltip."""
    metrics = (job.get("metrics") or {}).get(output)
    if not isinstance(metrics, Mapping):
        return {"text": "", "sort": None, "title": ""}
    if metric in metrics:
        value = metrics[metric]
        if finite(value):
            return {"text": number(float(value)), "sort": float(value), "title": repr(value)}
        return {"text": "failed" if value is None else str(value), "sort": None, "title": ""}
    failed = metrics.get("failed")
    if isinstance(failed, Mapping) and metric in failed:
        return {"text": "failed", "sort": None, "title": str(failed[metric])}
    if "skipped" in metrics:
        return {"text": "skipped", "sort": None, "title": str(metrics["skipped"])}
    return {"text": "", "sort": None, "title": ""}


def _label(job: Mapping[str, Any]) -> str:
    return " ".join(str(o) for o in job.get("overrides") or []) or "(no overrides)"


def href(path_text: Any, directory: Path) -> str | None:
    """The path as a URL relative to `directory` ('0/blend__sample.png', '../eval.png'), quoted; None
    when there is none (no path, another drive)."""
    if not isinstance(path_text, str) or not path_text:
        return None
    path = Path(path_text)
    path = path if path.is_absolute() else directory / path
    try:
        relative = os.path.relpath(path, directory)
    except ValueError:
        return None
    return quote(Path(relative).as_posix(), safe="/")


def _previews(job: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The job's preview rows, one per PNG (a node's outputs share one), whose PNG is there."""
    rows: dict[str, Mapping[str, Any]] = {}
    for row in job.get("previews") or []:
        png = row.get("png") if isinstance(row, Mapping) else None
        if isinstance(png, str) and png not in rows and Path(png).is_file():
            rows[png] = row
    return list(rows.values())


def _tile(
    job: Mapping[str, Any],
    directory: Path,
    columns: Sequence[tuple[str, str]],
    objective_names: Sequence[str],
    best: str | None,
    pareto: set[str],
) -> dict[str, Any]:
    name = str(job.get("job"))
    images = []
    for row in _previews(job):
        src = href(row["png"], directory)
        if src is not None:
            images.append({"key": Path(row["png"]).name, "src": src, "caption": Path(row["png"]).stem})
    figures = [(f"{o}.{m}", value) for o, m in columns if (value := metric_value(job, o, m)) is not None]
    objective = [(n, v) for n, v in zip(objective_names, objective_values(job, len(objective_names)), strict=True)]
    return {
        "job": name,
        "label": _label(job),
        "images": images[:MAX_TILE_IMAGES],
        "all_images": images,
        "metrics": figures[:MAX_TILE_METRICS],
        "more_metrics": max(0, len(figures) - MAX_TILE_METRICS),
        "objective": objective,
        "best": name == best,
        "pareto": name in pareto,
        "warnings": len(job.get("warnings") or []),
    }


def _compare(tiles: Sequence[Mapping[str, Any]], jobs: Sequence[Mapping[str, Any]], directory: Path) -> dict[str, Any]:
    """What the comparison's script needs: each preview image (by PNG name) with its upscaled inputs,
    and each job's label and PNGs."""
    keys: dict[str, dict[str, Any]] = {}
    for job in jobs:
        for row in _previews(job):
            key = Path(row["png"]).name
            if key not in keys:
                keys[key] = {"key": key, "label": Path(key).stem, "row": row}
    images = []
    for n, entry in enumerate(keys.values()):
        made = upscaled_input(entry["row"], directory / FILES_DIR, f"input{n}")
        lr = {method: href(str(path), directory) for method, path in made.items()}
        images.append({"key": entry["key"], "label": entry["label"], "lr": lr})
    return {
        "images": images,
        "jobs": [
            {
                "job": t["job"],
                "label": t["label"],
                "best": t["best"],
                "images": {i["key"]: i["src"] for i in t["all_images"]},
            }
            for t in tiles
        ],
    }


def upscaled_input(row: Mapping[str, Any], folder: Path, stem: str) -> dict[str, Path]:
    """The low-resolution input of a preview row upscaled by its model's scale with Pillow's NEAREST
    and BICUBIC, as `folder/<stem>_nearest.png` and `_bicubic.png`: the input image cropped to `crop`,
    to a multiple of `downscale` from the top left, and box-downscaled by it (the mean of each block,
    rounded). Nothing ({}) when Pillow is missing or the image cannot be read."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return {}
    try:
        downscale, scale = max(1, int(row.get("downscale", 1))), max(1, int(row.get("scale", 1)))
        crop = row.get("crop")
        with Image.open(str(row["image"])) as opened:
            region = opened.crop((crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3])) if crop else opened
            grey = int(row.get("channels", 3)) not in (3, 4)
            pixels = np.asarray(region.convert("L" if grey else "RGB"), dtype=np.float64)
    except (OSError, ValueError, TypeError, KeyError, IndexError, Image.DecompressionBombError):
        return {}
    height, width = pixels.shape[0] // downscale, pixels.shape[1] // downscale
    if height == 0 or width == 0 or height * width * scale * scale > MAX_INPUT_PIXELS:
        return {}
    blocks = pixels[: height * downscale, : width * downscale].reshape(height, downscale, width, downscale, -1)
    small = np.clip(np.rint(blocks.mean(axis=(1, 3))), 0, 255).astype(np.uint8)
    low = Image.fromarray(small[..., 0] if grey else small)
    made = {}
    for method, resample in (("nearest", Image.Resampling.NEAREST), ("bicubic", Image.Resampling.BICUBIC)):
        buffer = io.BytesIO()
        low.resize((width * scale, height * scale), resample).save(buffer, format="PNG")
        path = folder / f"{stem}_{method}.png"
        write_bytes_atomic(path, buffer.getvalue())
        made[method] = path
    return made


def _table(
    jobs: Sequence[Mapping[str, Any]],
    chosen: Sequence[int],
    swept: Sequence[str],
    columns: Sequence[tuple[str, str]],
    objective_names: Sequence[str],
    best: str | None,
    pareto: set[str],
) -> dict[str, Any]:
    headers = ["job", *swept, *(f"{o}.{m}" for o, m in columns)]
    headers += [f"objective: {n}" if len(objective_names) > 1 else "objective" for n in objective_names]
    headers.append("seconds")
    rows = []
    for i in chosen:
        job = jobs[i]
        name = str(job.get("job"))
        values = job.get("values") or {}
        cells = [{"text": name, "sort": _sortable(name), "title": _label(job)}]
        cells += [{"text": shown(values.get(v)), "sort": _sortable(values.get(v)), "title": ""} for v in swept]
        cells += [_cell(job, o, m) for o, m in columns]
        cells += [{"text": shown(v), "sort": v, "title": ""} for v in objective_values(job, len(objective_names))]
        seconds = job.get("seconds")
        cells.append({"text": shown(seconds), "sort": _sortable(seconds), "title": ""})
        rows.append({"job": name, "best": name == best, "pareto": name in pareto, "cells": cells})
    return {"headers": headers, "rows": rows}


def _sortable(value: Any) -> float | str | None:
    """What a cell sorts by: a number as a number (job names '10' after '9'), else its text."""
    if finite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return None if value is None else str(value)


def _provenance(job: Mapping[str, Any]) -> dict[str, Any]:
    provenance = job.get("provenance") or {}
    recipe = provenance.get("recipe") or {}
    git = recipe.get("git") if isinstance(recipe.get("git"), Mapping) else None
    sources = provenance.get("sources") or {}
    return {
        "job": str(job.get("job")),
        "label": _label(job),
        "recipe": {"name": recipe.get("name"), "file": recipe.get("file")},
        "git": {"commit": git.get("commit"), "dirty": bool(git.get("dirty"))} if git else None,
        "sources": [
            {"name": str(name), "path": s.get("path"), "key": s.get("key")}
            for name, s in sources.items()
            if isinstance(s, Mapping)
        ],
        "command": provenance.get("command"),
        "outputs": [
            {"name": str(name), "path": o.get("path"), "sha256": o.get("sha256")}
            for name, o in (job.get("outputs") or {}).items()
            if isinstance(o, Mapping)
        ],
        "warnings": [str(w) for w in job.get("warnings") or []],
        "nodes": {str(k): str(v) for k, v in (job.get("nodes") or {}).items()},
    }
