"""Time and peak memory of `merger` on a two-model lerp, next to the I/O floor.

    python benchmarks/bench_lerp.py               # 2 x ~650 MB float32 inputs
    python benchmarks/bench_lerp.py --mb 100      # smaller

Writes two random float32 safetensors files (Llama-like tensor shapes) into a
temporary directory, then measures, each as a whole process:
- `cat a b > /dev/null`: reading both inputs (the I/O floor for the read side);
- `cat a > out`: reading and writing one model-sized file;
- `merger` first run (empty cache: reads, hashes, merges, writes the entry);
- `merger` re-run (cache hit: no tensor is read);
and prints wall seconds, peak RSS, and ratios. The files are freshly written,
so they sit in the page cache: these are warm-cache figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HIDDEN = 1024
INTERMEDIATE = 2816
VOCAB = 32000


def llama_like(n_bytes: int, seed: int, hidden: int = HIDDEN, vocab: int = VOCAB) -> dict[str, Any]:
    """A Llama-shaped state dict of about n_bytes of float32 (at least one layer)."""
    import torch

    intermediate = hidden * INTERMEDIATE // HIDDEN
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    embed = vocab * hidden * 4
    tensors["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g)
    layer_bytes = (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) * 4
    layers = max(1, (n_bytes - 2 * embed) // layer_bytes)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=g)
        tensors[p + "mlp.gate_proj.weight"] = torch.randn(intermediate, hidden, generator=g)
        tensors[p + "mlp.up_proj.weight"] = torch.randn(intermediate, hidden, generator=g)
        tensors[p + "mlp.down_proj.weight"] = torch.randn(hidden, intermediate, generator=g)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return tensors


def write_model(path: Path, n_bytes: int, seed: int, hidden: int = HIDDEN, vocab: int = VOCAB) -> None:
    """Write a model in a child process, so this process stays small: a child
    forked from a large parent would inherit its peak RSS figure."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench_lerp import llama_like;"
        "from safetensors.torch import save_file;"
        "save_file(llama_like(*map(int, sys.argv[3:])), sys.argv[2])"
    )
    here = str(Path(__file__).parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    numbers = [str(n) for n in (n_bytes, seed, hidden, vocab)]
    subprocess.run([sys.executable, "-c", code, here, str(path), *numbers], check=True)


def measure(command: list[str], cwd: Path, stdout: int | None = subprocess.DEVNULL) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a whole child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        assert proc.stderr is not None
        sys.exit(f"failed: {' '.join(command)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


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
    work.mkdir(parents=True, exist_ok=True)
    merger = str(Path(sys.executable).parent / "merger")
    try:
        for name, seed in (("a", 1), ("b", 2)):
            write_model(work / f"{name}.safetensors", args.mb * 1_000_000, seed)
            write_model(work / "tiny" / f"{name}.safetensors", 1, seed, hidden=64, vocab=256)
        for folder in (work, work / "tiny"):
            (folder / "recipes").mkdir(parents=True, exist_ok=True)
            (folder / "recipes" / "bench.yaml").write_text(RECIPE)
        size = (work / "a.safetensors").stat().st_size
        rows = []
        rows.append(("cat a b > /dev/null (read floor)", *measure(["cat", "a.safetensors", "b.safetensors"], work)))
        with open(work / "copy.bin", "wb") as sink:
            rows.append(("cat a > file (read+write one)", *measure(["cat", "a.safetensors"], work, sink.fileno())))
        (work / "copy.bin").unlink()
        base = [merger, "recipe=bench", "progress=false", "cache_dir=cache"]
        rows.append(("merger lerp, tiny models (start-up)", *measure(base, work / "tiny")))
        rows.append(("merger lerp, first run", *measure(base, work)))
        rows.append(("merger lerp, re-run (cache hit)", *measure(base, work)))
        print(f"inputs: 2 x {size / 1e6:.0f} MB float32 safetensors, {os.cpu_count()} CPUs")
        print(f"{'what':<36} {'wall s':>8} {'peak RSS MB':>12}")
        for what, wall, rss in rows:
            print(f"{what:<36} {wall:8.2f} {rss:12.0f}")
        tiny, first, rerun = rows[2], rows[3], rows[4]
        floor = rows[0][1] + rows[1][1]
        print(
            f"merge phase (first run - start-up): {first[1] - tiny[1]:.2f} s = {(first[1] - tiny[1]) / floor:.2f}x"
            " the I/O floor (read both + write one)"
        )
        print(f"working memory (peak RSS - start-up peak RSS): {first[2] - tiny[2]:.0f} MB")
        print(
            f"re-run: {rerun[1]:.2f} s = {rerun[1] / first[1]:.2f}x the first run, {rerun[1] / tiny[1]:.2f}x start-up"
        )
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
