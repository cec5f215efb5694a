"""The DNI effect of the built-in demo pair, measured on its held-out image (issue 4).

    python benchmarks/bench_dni.py                      # prints the table
    python benchmarks/bench_dni.py --svg docs/dni_demo.svg

Runs `merger -m alpha=0,0.1,...,1` on the built-in demo recipe (lerp of the
PSNR model and its sharper fine-tune), then upscales the held-out image
(`merger/demo/eval.png`, box-downscaled by 2) with each output through
spandrel, and prints, next to bicubic upscaling: PSNR against the original
image, and sharpness (variance of the Laplacian of the grey image, 8-bit
units squared). As alpha goes from 0 to 1, PSNR should fall and sharpness
rise, both monotonically. Needs `merger[sr]` (spandrel, Pillow).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import MERGER
from spandrel import ModelLoader

from merger.report.preview import SAMPLE_IMAGE, PreviewImage, load_image

ALPHAS = [round(i / 10, 1) for i in range(11)]
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * math.log10(1 / F.mse_loss(out.clamp(0, 1), ref).item())


def sharpness(out: torch.Tensor) -> float:
    grey = (out.clamp(0, 1) * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True) * 255
    return F.conv2d(grey, LAPLACIAN).var().item()


def svg_plot(rows: list[tuple[float, float, float]], bicubic: tuple[float, float]) -> str:
    """Two panels (PSNR, sharpness) against alpha, with bicubic as a dashed line."""
    width, height, pad = 360, 240, 48
    panels = []
    for index, (column, label, color) in enumerate(((1, "PSNR (dB)", "#1f77b4"), (2, "sharpness", "#d62728"))):
        values = [row[column] for row in rows] + [bicubic[column - 1]]
        low, high = min(values), max(values)
        margin = (high - low) * 0.08 or 1.0
        low, high = low - margin, high + margin

        def x(alpha: float) -> float:
            return pad + alpha * (width - 1.5 * pad)

        def y(value: float, low: float = low, high: float = high) -> float:
            return height - pad + (value - low) / (high - low) * (2 * pad - height)

        points = " ".join(f"{x(r[0]):.1f},{y(r[column]):.1f}" for r in rows)
        ticks = "".join(
            f'<text x="{pad - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.1f}</text>'
            for v in (low + margin, (low + high) / 2, high - margin)
        )
        xticks = "".join(
            f'<text x="{x(a):.1f}" y="{height - pad + 14}" text-anchor="middle" font-size="10">{a:g}</text>'
            for a in (0, 0.5, 1)
        )
        base = y(bicubic[column - 1])
        panels.append(
            f'<g transform="translate({index * width},0)">'
            f'<rect x="{pad}" y="{pad}" width="{width - 1.5 * pad}" height="{height - 2 * pad}" fill="none"'
            f' stroke="#999"/>{ticks}{xticks}'
            f'<line x1="{pad}" x2="{width - pad / 2}" y1="{base:.1f}" y2="{base:.1f}" stroke="#777"'
            f' stroke-dasharray="4 3"/><text x="{width - pad / 2 - 2}" y="{base - 4:.1f}" text-anchor="end"'
            f' font-size="10" fill="#555">bicubic</text>'
            f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>'
            + "".join(f'<circle cx="{x(r[0]):.1f}" cy="{y(r[column]):.1f}" r="3" fill="{color}"/>' for r in rows)
            + f'<text x="{width / 2}" y="{pad - 14}" text-anchor="middle" font-size="13">{label}</text>'
            f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="11">alpha</text></g>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height}"'
        f' font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>{"".join(panels)}</svg>\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svg", type=Path, help="also write the plot as SVG here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merger-dni-"))
    try:
        alphas = ",".join(str(a) for a in ALPHAS)
        command = [*MERGER, "-m", f"alpha={alphas}", "preview=false", "progress=false", "hydra.sweep.dir=sweep"]
        subprocess.run(command, cwd=work, check=True, capture_output=True)
        jobs = json.loads((work / "sweep" / "sweep_report.json").read_text())["jobs"]
        hr = load_image(PreviewImage(SAMPLE_IMAGE))
        low = load_image(PreviewImage(SAMPLE_IMAGE, 2))
        rows = []
        for job in jobs:
            alpha = float(next(o for o in job["overrides"] if o.startswith("alpha=")).split("=")[1])
            model = ModelLoader().load_from_file(job["outputs"]["blend"]["path"]).eval()
            with torch.no_grad():
                out = model(low)
            rows.append((alpha, psnr(out, hr), sharpness(out)))
        rows.sort()
        up = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False)
        bicubic = (psnr(up, hr), sharpness(up))
        print(f"held-out image {SAMPLE_IMAGE.name} ({hr.shape[3]}x{hr.shape[2]}), box-downscaled x2, upscaled x2")
        print(f"{'':>8} {'PSNR dB':>8} {'sharpness':>10}")
        print(f"{'bicubic':>8} {bicubic[0]:8.3f} {bicubic[1]:10.1f}")
        for alpha, p, s in rows:
            print(f"{'a=' + format(alpha, 'g'):>8} {p:8.3f} {s:10.1f}")
        falling = all(b[1] < a[1] for a, b in itertools.pairwise(rows))
        rising = all(b[2] > a[2] for a, b in itertools.pairwise(rows))
        print(
            f"PSNR model beats bicubic by {rows[0][1] - bicubic[0]:+.3f} dB;"
            f" PSNR falls monotonically: {falling}; sharpness rises monotonically: {rising}"
        )
        if args.svg:
            args.svg.parent.mkdir(parents=True, exist_ok=True)
            args.svg.write_text(svg_plot(rows, bicubic))
            print(f"plot: {args.svg}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
