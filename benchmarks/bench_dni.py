"""The DNI effect of the built-in demo pair, as merger itself measures it (issues 4 and 12).

    python benchmarks/bench_dni.py                      # prints the table
    python benchmarks/bench_dni.py --svg docs/dni_demo.svg

Runs `merger -m alpha=0,0.1,...,1` on the built-in demo recipe (lerp of the PSNR model and its
sharper fine-tune), whose `evaluate` block measures each job's output on the held-out image
(`merger/demo/eval.png`, box-downscaled by 2): PSNR and SSIM on the Y channel (BasicSR's
conventions: 8-bit output, BT.601 Y, a border of 2 pixels cropped), PSNR on RGB, and sharpness
(variance of the Laplacian of the grey image, 8-bit units squared). Bicubic upscaling of the same
input is measured with the same functions. Then the same sweep again (every job a cache hit, its
metrics too), to time what a cached job's metrics cost, and one job with and without `evaluate`.
As alpha goes from 0 to 1, PSNR should fall and sharpness rise. Needs `merger[sr]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import MERGER

ALPHAS = [round(i / 10, 1) for i in range(11)]
METRICS = ("psnr", "ssim", "psnr_rgb", "sharpness")


def bicubic_figures() -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from merger.report.image_metrics import degrade, image_metrics, mod_crop
    from merger.report.preview import SAMPLE_IMAGE

    hr = mod_crop(np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB")), 2)
    low = degrade(hr, 2, "box")
    up = np.asarray(Image.fromarray(low).resize((hr.shape[1], hr.shape[0]), Image.Resampling.BICUBIC))
    return image_metrics(up, hr, border=2, names=METRICS)


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


def sweep(work: Path, name: str) -> tuple[list[dict[str, object]], float]:
    alphas = ",".join(str(a) for a in ALPHAS)
    command = [*MERGER, "-m", f"alpha={alphas}", "preview=false", "progress=false", f"hydra.sweep.dir={name}"]
    start = time.perf_counter()
    subprocess.run(command, cwd=work, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return json.loads((work / name / "sweep_report.json").read_text())["jobs"], seconds


def job_metric_seconds(work: Path, name: str) -> list[float]:
    reports = sorted((work / name).glob("*/merge_report.json"))
    return [json.loads(p.read_text())["metrics"]["blend"]["seconds"] for p in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svg", type=Path, help="also write the plot as SVG here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merger-dni-"))
    try:
        jobs, first_seconds = sweep(work, "sweep")
        measured = job_metric_seconds(work, "sweep")
        _, cached_seconds = sweep(work, "again")
        cached = job_metric_seconds(work, "again")
        rows = sorted((float(job["values"]["alpha"]), job["metrics"]["blend"]) for job in jobs)
        bicubic = bicubic_figures()
        print("held-out image eval.png (256x256), box-downscaled x2, upscaled x2; Y PSNR/SSIM with a 2-pixel border")
        print(f"{'':>8} {'PSNR dB':>8} {'SSIM':>7} {'PSNR RGB':>9} {'sharpness':>10}")
        for label, figures in [("bicubic", bicubic), *((f"a={alpha:g}", figures) for alpha, figures in rows)]:
            print(
                f"{label:>8} {figures['psnr']:8.3f} {figures['ssim']:7.4f} {figures['psnr_rgb']:9.3f}"
                f" {figures['sharpness']:10.1f}"
            )
        falling = all(b[1]["psnr"] < a[1]["psnr"] for a, b in itertools.pairwise(rows))
        rising = all(b[1]["sharpness"] > a[1]["sharpness"] for a, b in itertools.pairwise(rows))
        print(
            f"PSNR model beats bicubic by {rows[0][1]['psnr'] - bicubic['psnr']:+.3f} dB;"
            f" PSNR falls monotonically: {falling}; sharpness rises monotonically: {rising}"
        )
        print(
            f"metrics per job: {sum(measured) / len(measured):.3f} s measured (mean of {len(measured)}),"
            f" {sum(cached) / len(cached):.4f} s from the cache; sweep of 11: {first_seconds:.1f} s,"
            f" again (all cached): {cached_seconds:.1f} s"
        )
        if args.svg:
            args.svg.parent.mkdir(parents=True, exist_ok=True)
            args.svg.write_text(
                svg_plot([(a, f["psnr"], f["sharpness"]) for a, f in rows], (bicubic["psnr"], bicubic["sharpness"]))
            )
            print(f"plot: {args.svg}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
