"""The contact sheet of a sweep: one tile per job's preview, labelled with its overrides, beside the
low-resolution input, in one PNG at the sweep root. This is what a person looks at to pick alpha.

One sheet per preview file name (`<node>__<image>.png`, the same in every job): `contact_sheet.png`
when the sweep previewed one, else `contact_sheet_<node>__<image>.png` for each. When there is none,
`no_contact_sheet` says why (previews off, no output a model spandrel knows, spandrel missing, every
preview failed), from the jobs' reports.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

COLUMNS = 6
LABEL_HEIGHT = 18
GAP = 6
SHEET = "contact_sheet.png"


def _label(overrides: list[str]) -> str:
    shown = [o for o in overrides if not o.startswith(("recipe=", "hydra")) and "launcher" not in o]
    return " ".join(shown) or "(as written)"


def sheet_name(png: str, several: bool) -> str:
    """'contact_sheet.png', or 'contact_sheet_blend__sample.png' when the sweep makes several."""
    return f"contact_sheet_{Path(png).name}" if several else SHEET


def contact_sheets(sweep_dir: Path, jobs: list[dict[str, Any]]) -> tuple[list[Path], str | None]:
    """The sheets written (see `build`), and why there is none when there is none."""
    if not any(job.get("previews") for job in jobs):
        return [], no_contact_sheet(jobs)
    try:
        sheets = build(sweep_dir, jobs)
    except ImportError:
        return [], "it needs Pillow (pip install 'merger[sr]')"
    return sheets, None if sheets else "the jobs' preview PNGs are gone"


def no_contact_sheet(jobs: list[dict[str, Any]]) -> str:
    """Why jobs without previews make no contact sheet, from their reports' `preview_notes`."""
    if not jobs:
        return "no job wrote a run report"
    notes = [note for job in jobs for note in job.get("preview_notes", [])]
    if not notes:
        return "previews are off (preview: sample, image files or a folder of them make one)"
    why = Counter(str(note.get("why")) for note in notes)
    if why["no_spandrel"]:
        return "spandrel is not installed (pip install 'merger[sr]')"
    if why["failed"]:
        return f"every preview failed ({why['failed']} failures; see the jobs' warnings)"
    if why["masked"] and not why["unknown"]:
        return "every image model is an inpainting model (it takes a mask as well)"
    return "no output is an image model spandrel knows"


def build(sweep_dir: Path, jobs: list[dict[str, Any]]) -> list[Path]:
    """Write one contact sheet per preview file name that the jobs made; returns their paths."""
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for job in jobs:
        seen: set[str] = set()
        for row in job.get("previews", []):
            name = Path(row["png"]).name
            if name not in seen:  # a node's outputs share one PNG: one tile per job
                seen.add(name)
                groups.setdefault(name, []).append((_label(job["overrides"]), row))
    sheets = []
    for name, tiles in groups.items():
        try:
            sheet = _sheet(tiles)
        except (OSError, ValueError, KeyError, TypeError):  # a PNG or an input that is gone or damaged
            continue
        if sheet is None:
            continue
        path = sweep_dir / sheet_name(name, len(groups) > 1)
        sheet.save(path)
        sheets.append(path)
    return sheets


def _sheet(tiles: list[tuple[str, dict[str, Any]]]) -> Any:
    """The sheet of one preview file name: the low-resolution input, then each job's PNG (None: none is left)."""
    from PIL import Image, ImageDraw

    from merger.report.preview_tensors import model_input

    pictures = []
    for label, row in tiles:
        if Path(row["png"]).is_file():
            with Image.open(row["png"]) as opened:
                pictures.append((label, opened.convert("RGB"), row))
    if not pictures:
        return None
    width, height = pictures[0][1].size
    first = pictures[0][2]
    crop = tuple(first["crop"]) if first.get("crop") else None
    image = model_input(Path(first["image"]), crop, int(first.get("downscale", 1)), 3)
    pixels = (image.clamp(0, 1)[0].permute(1, 2, 0) * 255.0).round().byte().numpy()
    lr = Image.fromarray(pixels).resize((width, height), Image.Resampling.NEAREST)
    cells = [("input (low resolution, nearest)", lr), *((label, picture) for label, picture, _ in pictures)]
    columns = min(COLUMNS, len(cells))
    rows = -(-len(cells) // columns)
    sheet = Image.new("RGB", (columns * (width + GAP) + GAP, rows * (height + LABEL_HEIGHT + GAP) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, picture) in enumerate(cells):
        x = GAP + (i % columns) * (width + GAP)
        y = GAP + (i // columns) * (height + LABEL_HEIGHT + GAP)
        sheet.paste(picture.resize((width, height)), (x, y))
        draw.text((x + 2, y + height + 3), label[: width // 6], fill="black")
    return sheet
