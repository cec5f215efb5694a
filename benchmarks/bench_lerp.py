"""Time and peak memory of `merger` on a two-model lerp, next to `cat` (the I/O floor).

    python benchmarks/bench_lerp.py               # 2 x ~650 MB float32 inputs
    python benchmarks/bench_lerp.py --mb 100      # smaller

Writes two random float32 safetensors files (Llama-like tensor shapes) into a
temporary directory, then measures, each as a whole process:
- `cat a b > /dev/null`: reading both inputs;
- `cat a > file`: reading and writing one model-sized file;
- `merger` on two tiny models (its start-up);
- `merger` first run (empty cache: reads, hashes, merges, writes the entry);
- `merger` re-run (cache hit: no tensor is read);
and prints wall seconds, peak RSS and ratios. The files are freshly written,
so they sit in the page cache: these are warm-cache figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import MERGER, measure, write_llama_like

RECIPE = """# @package _global_
alpha: 0.3
sources:
  a: a.safetensors
  b: b.safetensors
nodes:
  blend: {op: lerp, inputs: [a, b], alpha: "${alpha}"}
outputs:
  blend: {}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=650, help="size of each input in MB (default 650)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="merger-bench-"))
    try:
        for name, seed in (("a", 1), ("b", 2)):
            write_llama_like(work / f"{name}.safetensors", n_bytes=args.mb * 1_000_000, seed=seed)
            write_llama_like(work / "tiny" / f"{name}.safetensors", seed=seed, hidden=64, vocab=256, layers=1)
        for folder in (work, work / "tiny"):
            (folder / "recipes").mkdir(parents=True, exist_ok=True)
            (folder / "recipes" / "bench.yaml").write_text(RECIPE)
        size = (work / "a.safetensors").stat().st_size
        base = [*MERGER, "recipe=bench", "progress=false", "cache_dir=cache"]
        read_floor = measure(["cat", "a.safetensors", "b.safetensors"], work)
        with open(work / "copy.bin", "wb") as sink:
            write_floor = measure(["cat", "a.safetensors"], work, stdout=sink.fileno())
        (work / "copy.bin").unlink()
        tiny = measure(base, work / "tiny")
        first = measure(base, work)
        rerun = measure(base, work)
        print(f"inputs: 2 x {size / 1e6:.0f} MB float32 safetensors, {os.cpu_count()} CPUs, warm page cache")
        print(f"{'what':<36} {'wall s':>8} {'peak RSS MB':>12}")
        rows = [
            ("cat a b > /dev/null (read floor)", read_floor),
            ("cat a > file (read+write one)", write_floor),
            ("merger lerp, tiny models (start-up)", tiny),
            ("merger lerp, first run", first),
            ("merger lerp, re-run (cache hit)", rerun),
        ]
        for what, m in rows:
            print(f"{what:<36} {m.wall:8.2f} {m.rss:12.0f}")
        merge = first.wall - tiny.wall
        floor = read_floor.wall + write_floor.wall
        print(f"merge phase (first run - start-up): {merge:.2f} s = {merge / floor:.2f}x cat's read+write")
        print(f"working memory (peak RSS - start-up peak RSS): {first.rss - tiny.rss:.0f} MB")
        print(f"re-run: {rerun.wall:.2f} s = {rerun.wall / first.wall:.2f}x the first run")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
