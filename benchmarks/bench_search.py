"""Searching the demo's alpha with Hydra's Optuna sweeper, against the 11-point grid (issue 12).

    pip install -e ".[search]"
    python benchmarks/bench_search.py [--trials 12] [--seed 1]

1. The grid: `merger -m alpha=0,0.1,...,1`: the best PSNR, and the Pareto front of (PSNR, sharpness).
2. A single-objective search: `merger -m hydra/sweeper=optuna hydra.sweeper.direction=maximize
   'alpha=interval(0,1)'` (TPE, seeded): the best PSNR it found, how far from the grid's best, and
   the trial at which it first came within 0.01 dB of it.
3. A two-objective search (`objective=[psnr,sharpness]`, both maximised): its Pareto front, and
   the share of the grid front's hypervolume (reference point: the worst PSNR and sharpness seen) it covers.
Every job's metrics come from merger's `evaluate` block; previews are off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import MERGER

QUIET = ["preview=false", "sanity=off", "progress=false"]


def run_sweep(work: Path, name: str, extra: list[str]) -> tuple[dict[str, object], float]:
    start = time.perf_counter()
    subprocess.run(
        [*MERGER, "-m", *extra, *QUIET, f"hydra.sweep.dir={name}"], cwd=work, check=True, capture_output=True
    )
    return json.loads((work / name / "sweep_report.json").read_text()), time.perf_counter() - start


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both (both maximised), sorted by the first."""
    kept = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points)]
    return sorted(set(kept))


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    area, last_y = 0.0, reference[1]
    for x, y in sorted(front(points), key=lambda p: -p[0]):
        if y > last_y:
            area += (x - reference[0]) * (y - last_y)
            last_y = y
    return area


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merger-search-"))
    optuna = [
        "hydra/sweeper=optuna",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.sampler.seed={args.seed}",
    ]
    try:
        grid, grid_s = run_sweep(work, "grid", ["alpha=" + ",".join(str(i / 10) for i in range(11))])
        grid_points = [
            (float(j["values"]["alpha"]), j["metrics"]["blend"]["psnr"], j["metrics"]["blend"]["sharpness"])
            for j in grid["jobs"]
        ]
        best_grid = max(grid_points, key=lambda p: p[1])
        print(f"grid of 11 ({grid_s:.1f} s): best PSNR {best_grid[1]:.4f} dB at alpha={best_grid[0]:g}")

        one, one_s = run_sweep(work, "one", [*optuna, "hydra.sweeper.direction=maximize", "alpha=interval(0,1)"])
        found = [(j["job"], j["values"]["alpha"], j["objective"]) for j in one["jobs"]]
        found.sort(key=lambda f: int(f[0]))
        best = max(found, key=lambda f: f[2])
        within = next((i + 1 for i, f in enumerate(found) if f[2] >= best_grid[1] - 0.01), None)
        print(
            f"Optuna, PSNR ({len(found)} trials, {one_s:.1f} s): best {best[2]:.4f} dB at alpha={best[1]:.4f}"
            f" ({best[2] - best_grid[1]:+.4f} dB against the grid's best);"
            f" within 0.01 dB of it from trial {within}"
        )

        two, two_s = run_sweep(
            work,
            "two",
            [
                *optuna,
                "objective=[psnr,sharpness]",
                "hydra.sweeper.direction=[maximize,maximize]",
                "alpha=interval(0,1)",
            ],
        )
        searched = [(j["objective"][0], j["objective"][1]) for j in two["jobs"]]
        grid_pairs = [(p[1], p[2]) for p in grid_points]
        everything = searched + grid_pairs
        reference = (min(p[0] for p in everything), min(p[1] for p in everything))
        share = hypervolume(searched, reference) / hypervolume(grid_pairs, reference)
        print(
            f"Optuna, PSNR and sharpness ({len(searched)} trials, {two_s:.1f} s): {len(two['pareto'])} jobs on the"
            f" front (the grid's: {len(front(grid_pairs))}); hypervolume {share:.1%} of the grid front's"
        )
        print(f"best.yaml of the PSNR search: {(work / 'one' / 'best.yaml').is_file()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
