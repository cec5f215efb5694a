"""The contact sheet of a sweep: one tile per job's preview, labelled with its
overrides, beside the low-resolution input, in one PNG at the sweep root.
This is what a person looks at to pick alpha.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = 6
LABEL_HEIGHT = 18
GAP = 6


def _label(overrides: list[str]) -> str:
    shown = [o for o in overrides if not o.startswith(("recipe=", "hydra")) and "launcher" not in o]
    return " ".join(shown) or "(as written)"


def build(sweep_dir: Path, jobs: list[dict[str, Any]]) -> list[Path]:
    """Write one contact sheet per (output, image) that the jobs previewed; returns their paths."""
    from PIL import Image, ImageDraw

    from merger.report.preview import PreviewImage, load_image, save_image

    groups: dict[tuple[str, str, str], list[tuple[str, Path]]] = defaultdict(list)
    for job in jobs:
        for row in job.get("previews", []):
            groups[(row["output"], row["image"], row["downscale"])].append((_label(job["overrides"]), Path(row["png"])))
    sheets = []
    for (output, image, downscale), tiles in groups.items():
        pictures = [(label, Image.open(png).convert("RGB")) for label, png in tiles if png.is_file()]
        if not pictures:
            continue
        width, height = pictures[0][1].size
        source = PreviewImage(Path(image), int(downscale))
        low = sweep_dir / f".lr_{source.stem}.png"
        save_image(load_image(source), low)
        with Image.open(low) as opened:
            lr = opened.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
        low.unlink()
        cells = [("input (low resolution, nearest)", lr), *pictures]
        columns = min(COLUMNS, len(cells))
        rows = -(-len(cells) // columns)
        sheet = Image.new("RGB", (columns * (width + GAP) + GAP, rows * (height + LABEL_HEIGHT + GAP) + GAP), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (label, picture) in enumerate(cells):
            x = GAP + (i % columns) * (width + GAP)
            y = GAP + (i // columns) * (height + LABEL_HEIGHT + GAP)
            sheet.paste(picture.resize((width, height)), (x, y))
            draw.text((x + 2, y + height + 3), label[: width // 6], fill="black")
        name = "contact_sheet.png" if len(groups) == 1 else f"contact_sheet_{output}_{source.stem}.png"
        sheet.save(sweep_dir / name)
        sheets.append(sweep_dir / name)
    return sheets
