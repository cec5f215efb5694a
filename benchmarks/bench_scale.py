"""Memory independent of model size, time linear in bytes (issue 3, goal 3).

    python benchmarks/bench_scale.py                          # 0.3, 1.3, 2.7 GB x 2, 4, 8 inputs
    python benchmarks/bench_scale.py --sizes 0.3 --inputs 2,4
    python benchmarks/bench_scale.py --cold                   # empty the page cache before each run (root)

For each size, writes 8 random float32 Llama-shaped models (the 2.7 GB one
has a 268 MB embedding, 65536 x 1024, larger than merger's chunk budget) and
runs `merger` with `average` over the first 2, 4 and 8 of them, each a first
run with an empty cache. GB/s is (bytes read + bytes written) over the merge
phase (wall time minus that of the same merge of tiny models); working memory
is the peak RSS minus that of the tiny merge. Needs about 9 x the largest
size of free disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import MERGER, drop_caches, measure, write_llama_like

#: size in GB -> (vocabulary, number of layers) at hidden 1024
SHAPES = {0.3: (32000, 2), 1.3: (32000, 20), 2.7: (65536, 42)}


def recipe(n: int) -> str:
    sources = "\n".join(f"  m{i}: m{i}.safetensors" for i in range(n))
    inputs = ", ".join(f"m{i}" for i in range(n))
    return (
        f"# @package _global_\nsources:\n{sources}\nnodes:\n  mean: {{op: average, inputs: [{inputs}]}}\n"
        "outputs:\n  mean: {}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.3,1.3,2.7", help="sizes per input in GB, from 0.3, 1.3, 2.7")
    parser.add_argument("--inputs", default="2,4,8", help="numbers of inputs")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.inputs.split(",")]
    work = args.dir or Path(tempfile.mkdtemp(prefix="merger-scale-"))
    cache_note = "cold page cache" if args.cold else "warm page cache where it fits in RAM"
    print(f"average of N random float32 models, first runs, {os.cpu_count()} CPUs, {cache_note}")
    print(
        f"{'GB/input':>8} {'inputs':>6} {'largest MB':>10} {'read GB':>8} {'written GB':>10} {'wall s':>7}"
        f" {'merge s':>7} {'GB/s':>6} {'work MB':>8}"
    )
    try:
        tiny = work / "tiny"
        for i in range(max(counts)):
            write_llama_like(tiny / f"m{i}.safetensors", seed=i, hidden=64, vocab=256, layers=1)
        baselines = {}
        for n in counts:
            (tiny / "recipes").mkdir(exist_ok=True)
            (tiny / "recipes" / f"avg{n}.yaml").write_text(recipe(n))
            baselines[n] = measure([*MERGER, f"recipe=avg{n}", "progress=false", "cache_dir=cache"], tiny)
        for size in sizes:
            vocab, layers = SHAPES[size]
            folder = work / f"{size}"
            for i in range(max(counts)):
                write_llama_like(folder / f"m{i}.safetensors", seed=i, vocab=vocab, layers=layers)
            one = (folder / "m0.safetensors").stat().st_size
            for n in counts:
                (folder / "recipes").mkdir(exist_ok=True)
                (folder / "recipes" / f"avg{n}.yaml").write_text(recipe(n))
                if args.cold:
                    drop_caches()
                m = measure([*MERGER, f"recipe=avg{n}", "progress=false", f"cache_dir=cache{n}"], folder)
                shutil.rmtree(folder / f"cache{n}")
                shutil.rmtree(folder / "outputs")
                read = n * one / 1e9
                merge = m.wall - baselines[n].wall
                work_mb = m.rss - baselines[n].rss
                largest = vocab * 1024 * 4 / 1e6
                print(
                    f"{one / 1e9:8.2f} {n:6d} {largest:10.0f} {read:8.1f} {one / 1e9:10.2f} {m.wall:7.2f}"
                    f" {merge:7.2f} {(read + one / 1e9) / merge:6.2f} {work_mb:8.0f}"
                )
            shutil.rmtree(folder)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
