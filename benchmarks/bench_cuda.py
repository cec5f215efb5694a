"""The CUDA path against the CPU path: same results, and its speed (issue 3, goal 6; issue 13, part 5).

    python benchmarks/bench_cuda.py              # inputs of ~1.3 GB each, float32 and bfloat16
    python benchmarks/bench_cuda.py --mb 300

Runs the same recipes with device=cpu (numpy) and device=cuda (torch, pinned
buffers, a reader thread ahead of the GPU), each a first run with its own
empty cache: a float32 lerp and an add_difference, a bfloat16 weighted sum,
and TIES of two bfloat16 fine-tunes over their base (density 0.5).
Prints, per recipe and device, wall time and merge GB/s (input bytes over
wall time minus the start-up of the same merge on tiny models), and the
largest relative difference between the CUDA and CPU outputs (goal: 1e-6).
Without a CUDA device it says so and runs the CPU path only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import MERGER, measure, write_llama_like

RECIPES = {
    "lerp_f32": ("F32", "lerp", "alpha: 0.3", 2),
    "add_difference_f32": ("F32", "add_difference", "multiplier: 0.7", 3),
    "weighted_sum_bf16": ("BF16", "weighted_sum", "weights: [0.5, 0.3, 0.2]", 3),
    "ties_bf16": ("BF16", "ties", "density: 0.5", 3),  # m0 the base, m1 and m2 the models
}
#: the ops whose first input is a `base:`, not one of `inputs:`
BASED = {"ties"}


def recipe(kind: str) -> str:
    dtype, op, params, n = RECIPES[kind]
    suffix = "bf16" if dtype == "BF16" else "f32"
    sources = "\n".join(f"  m{i}: m{i}_{suffix}.safetensors" for i in range(n))
    first = 1 if op in BASED else 0
    inputs = ", ".join(f"m{i}" for i in range(first, n))
    base = "base: m0, " if first else ""
    return (
        f"# @package _global_\nsources:\n{sources}\nnodes:\n  out: {{op: {op}, {base}inputs: [{inputs}], {params}}}\n"
        "outputs:\n  out: {}\n"
    )


def cuda_available() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return os.system(f"{sys.executable} -c '{code}' 2>/dev/null") == 0


def max_relative_difference(a: Path, b: Path) -> float:
    import numpy as np

    from merger.core.arrays import NumpyBackend
    from merger.io.safetensors_file import SafetensorsReader
    from merger.io.safetensors_header import read_header

    xp = NumpyBackend()
    ra, rb = SafetensorsReader(read_header(a)), SafetensorsReader(read_header(b))
    worst = 0.0
    for key, spec in ra.header.tensors.items():
        x = xp.load(ra.read_bytes(key), spec.dtype, spec.shape).astype(np.float64)
        y = xp.load(rb.read_bytes(key), spec.dtype, spec.shape).astype(np.float64)
        scale = np.maximum(np.abs(x), np.abs(y))
        diff = np.abs(x - y)
        rel = np.where(scale > 1e-30, diff / np.where(scale > 1e-30, scale, 1), 0)
        worst = max(worst, float(rel.max()) if rel.size else 0.0)
    return worst


def output_of(root: Path) -> Path:
    return sorted(root.glob("outputs/*/*/out.safetensors"))[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1300, help="size of each float32 input in MB")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="merger-cuda-"))
    devices = ["cpu", "cuda"] if cuda_available() else ["cpu"]
    if devices == ["cpu"]:
        print("no CUDA device: running the CPU path only")
    try:
        for i in range(3):
            write_llama_like(work / f"m{i}_f32.safetensors", n_bytes=args.mb * 10**6, seed=i)
            write_llama_like(work / f"m{i}_bf16.safetensors", n_bytes=args.mb * 10**6, seed=10 + i, dtype="BF16")
            for suffix, dtype in (("f32", "F32"), ("bf16", "BF16")):
                write_llama_like(
                    work / "tiny" / f"m{i}_{suffix}.safetensors", seed=i, hidden=64, vocab=256, layers=1, dtype=dtype
                )
        print(f"{'recipe':<20} {'device':<6} {'read GB':>8} {'wall s':>7} {'merge s':>8} {'GB/s':>6}")
        for kind, (dtype, _, _, n) in RECIPES.items():
            suffix = "bf16" if dtype == "BF16" else "f32"
            read = sum((work / f"m{i}_{suffix}.safetensors").stat().st_size for i in range(n)) / 1e9
            outputs = {}
            for device in devices:
                for root in (work, work / "tiny"):
                    (root / "recipes").mkdir(exist_ok=True)
                    (root / "recipes" / f"{kind}.yaml").write_text(recipe(kind))
                command = [*MERGER, f"recipe={kind}", f"device={device}", "progress=false"]
                tiny = measure([*command, f"cache_dir=cache_{device}_{kind}"], work / "tiny")
                real = measure([*command, f"cache_dir=cache_{device}_{kind}"], work)
                outputs[device] = output_of(work)
                merge = real.wall - tiny.wall
                print(f"{kind:<20} {device:<6} {read:8.2f} {real.wall:7.2f} {merge:8.2f} {read / merge:6.2f}")
                shutil.rmtree(work / f"cache_{device}_{kind}")
            if "cuda" in outputs:
                rel = max_relative_difference(outputs["cpu"], outputs["cuda"])
                print(f"{kind:<20} max relative difference cuda vs cpu: {rel:.2e} (goal <= 1e-6)")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
