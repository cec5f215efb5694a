"""merger against mergekit and the I/O floor, on the same inputs (issue 3, goals 1, 2 and 4).

    python benchmarks/bench_mergekit.py                       # mergekit-yaml from PATH
    python benchmarks/bench_mergekit.py --mergekit-yaml ~/mk/bin/mergekit-yaml
    python benchmarks/bench_mergekit.py --cold                # also cold-cache floors (root)

Inputs: two Hugging Face Llama folders (hidden 1024, 8 layers, vocabulary
32000, float32, ~650 MB each) built with `transformers` from a config with
random init (in mergekit's Python, which has transformers), and the same
architecture at toy size for the start-up figures. The merge: a 0.7/0.3
linear merge (mergekit `linear`, merger `weighted_sum`).

Printed: each tool's wall time and peak RSS on the tiny and on the real
merge, working memory (real peak RSS - tiny peak RSS), the ratios, the
largest difference between the two outputs, the I/O floor (read both inputs
and write one output of the same size, with fsync as merger does) and the
re-run (cache hit) time. Without mergekit, its rows are skipped with a line
saying so and the inputs are written by this script instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import MERGER, Measure, drop_caches, measure, run_python, size_mb, write_llama_like

HF_LLAMA = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, seed, hidden, layers, vocab = sys.argv[2], *map(int, sys.argv[3:])
torch.manual_seed(seed)
config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                     vocab_size=vocab, tie_word_embeddings=False, torch_dtype="float32")
LlamaForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
"""

MERGEKIT_CONFIG = """models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.3}}
merge_method: linear
dtype: float32
"""

RECIPE = """# @package _global_
sources:
  a: {a}
  b: {b}
nodes:
  blend: {{op: weighted_sum, inputs: [a, b], weights: [0.7, 0.3]}}
outputs:
  blend: {{path: blend.safetensors}}
"""

IO_FLOOR = """
import os, sys
a, b, out, sync = sys.argv[2:6]
buf = bytearray(8 << 20); view = memoryview(buf)
for path in (a, b):
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf): pass
size = os.path.getsize(a)
with open(out, "wb", buffering=0) as f:
    left = size
    while left:
        left -= f.write(view[: min(left, len(buf))])
    if sync == "1":
        os.fsync(f.fileno())
"""


def python_of(script: str) -> str:
    """The interpreter a console script runs with (its shebang)."""
    first = Path(script).read_text(errors="replace").splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


def build_inputs(work: Path, python: str | None) -> str:
    """Real and tiny pairs under work/{real,tiny}/{a,b}; returns how they were built."""
    for kind, (hidden, layers, vocab) in {"real": (1024, 8, 32000), "tiny": (64, 1, 256)}.items():
        for name, seed in (("a", 1), ("b", 2)):
            folder = work / kind / name
            if python:
                run_python(HF_LLAMA, folder, seed, hidden, layers, vocab, python=python)
            else:
                write_llama_like(folder / "model.safetensors", seed=seed, hidden=hidden, vocab=vocab, layers=layers)
    return "transformers LlamaForCausalLM, random init" if python else "merger's own Llama-shaped writer"


def run_merger(root: Path, cold: bool) -> Measure:
    root.joinpath("recipes").mkdir(exist_ok=True)
    root.joinpath("recipes", "bench.yaml").write_text(RECIPE.format(a=root / "a", b=root / "b"))
    if cold:
        drop_caches()
    return measure([*MERGER, "recipe=bench", "progress=false", "cache_dir=cache"], root)


def run_mergekit(root: Path, mergekit: str, cold: bool) -> Measure:
    config = root / "mergekit.yaml"
    config.write_text(MERGEKIT_CONFIG.format(a=root / "a", b=root / "b"))
    shutil.rmtree(root / "mergekit_out", ignore_errors=True)
    if cold:
        drop_caches()
    return measure([mergekit, str(config), str(root / "mergekit_out"), "--quiet"], root)


def newest_output(root: Path) -> Path:
    reports = sorted(root.glob("outputs/*/*/merge_report.json"))
    return Path(json.loads(reports[-1].read_text())["outputs"]["blend"]["path"])


def max_difference(ours: Path, theirs: Path) -> tuple[float, int]:
    """(largest absolute difference over all tensors, number of tensors compared)."""
    import numpy as np

    from merger.io.sources import locate, open_source

    a = open_source(locate(ours, None, where="ours"), where="ours")
    b = open_source(locate(theirs, None, where="mergekit"), where="mergekit")
    if set(a.spec()) != set(b.spec()):
        sys.exit(f"outputs differ in keys: {sorted(set(a.spec()) ^ set(b.spec()))[:5]}")
    worst = 0.0
    for key, spec in a.spec().items():
        x = np.frombuffer(a.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes))), np.float32)
        y = np.frombuffer(b.read_into(key, 0, spec.nbytes, memoryview(bytearray(spec.nbytes))), np.float32)
        worst = max(worst, float(np.max(np.abs(x - y))) if x.size else 0.0)
    return worst, len(a.spec())


def row(what: str, m: Measure) -> str:
    return f"{what:<44} {m.wall:8.2f} {m.rss:12.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"), help="mergekit's CLI")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    mergekit = args.mergekit_yaml
    work = args.dir or Path(tempfile.mkdtemp(prefix="merger-vs-mergekit-"))
    try:
        built = build_inputs(work, python_of(mergekit) if mergekit else None)
        real, tiny = work / "real", work / "tiny"
        print(f"inputs: 2 x {size_mb(real / 'a'):.0f} MB float32 HF Llama folders ({built}); {os.cpu_count()} CPUs")
        cache_state = "cold page cache" if args.cold else "warm page cache"
        print(f"{'what (' + cache_state + ')':<44} {'wall s':>8} {'peak RSS MB':>12}")
        ours_tiny, ours = run_merger(tiny, False), run_merger(real, args.cold)
        rerun = run_merger(real, False)
        print(row("merger, tiny merge (start-up)", ours_tiny))
        print(row("merger, real merge (first run, empty cache)", ours))
        print(row("merger, re-run (cache hit)", rerun))
        floors = {}
        for sync in ("1", "0"):
            if args.cold:
                drop_caches()
            command = [sys.executable, "-c", IO_FLOOR, ".", "a/model.safetensors", "b/model.safetensors", "f.bin", sync]
            floors[sync] = measure(command, real)
            (real / "f.bin").unlink()
        print(row("I/O floor: read both, write one, fsync", floors["1"]))
        print(row("I/O floor: read both, write one, no fsync", floors["0"]))
        merge_phase = ours.wall - ours_tiny.wall
        print(f"\nmerger working memory: {ours.rss - ours_tiny.rss:.0f} MB")
        for sync, label in (("1", "with fsync, as merger"), ("0", "without fsync")):
            ratio = merge_phase / floors[sync].wall
            print(f"merger merge phase: {merge_phase:.2f} s = {ratio:.2f}x the I/O floor {label} (goal <= 1.5x)")
        if mergekit is None:
            print("mergekit: not installed (pip install mergekit==0.1.5, or --mergekit-yaml PATH): skipped")
            return
        theirs_tiny, theirs = run_mergekit(tiny, mergekit, False), run_mergekit(real, mergekit, args.cold)
        print(row("mergekit, tiny merge (start-up)", theirs_tiny))
        print(row("mergekit, real merge", theirs))
        worst, count = max_difference(newest_output(real), real / "mergekit_out")
        ours_memory, their_memory = ours.rss - ours_tiny.rss, theirs.rss - theirs_tiny.rss
        print(f"\noutputs: {count} tensors, max |merger - mergekit| = {worst:.2e} (goal <= 1e-6)")
        print(f"wall time: merger / mergekit = {ours.wall / theirs.wall:.2f}x (goal <= 0.4x)")
        print(
            f"working memory: merger {ours_memory:.0f} MB / mergekit {their_memory:.0f} MB"
            f" = {ours_memory / their_memory:.2f}x (goal <= 0.15x)"
        )
        print(f"re-run: {rerun.wall:.2f} s = {rerun.wall / theirs_tiny.wall:.2f}x mergekit's start-up (goal <= 0.5x)")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
