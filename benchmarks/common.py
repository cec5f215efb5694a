"""Helpers shared by the benchmarks: whole-process timing and peak memory, and model files.

Every figure is a whole child process (its wall time and peak RSS from
`wait4`), started from a parent that never imports torch: a child forked from
a large parent would report the parent's peak RSS as its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: how to run merger from here: `python -m merger` works wherever the package imports
MERGER = [sys.executable, "-m", "merger"]


@dataclass(frozen=True)
class Measure:
    wall: float  # seconds
    rss: float  # peak RSS, MB
    cpu: float = 0.0  # user + system seconds


def measure(
    command: list[str], cwd: Path, *, stdout: int | None = subprocess.DEVNULL, env: dict[str, str] | None = None
) -> Measure:
    """Wall time and peak RSS of one child process; exits with its stderr if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}\n{stderr}")
    return Measure(wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


def drop_caches() -> bool:
    """Empty the page cache (needs root); False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_python(code: str, *args: object, python: str = sys.executable) -> None:
    """Run a snippet in a child Python (so that this process stays small); quiet unless it fails."""
    done = subprocess.run([python, "-c", code, str(HERE), *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {python} -c <snippet> {' '.join(map(str, args))}\n{done.stderr}")


RANDOM_LLAMA = """
import sys
from pathlib import Path
import numpy as np
from merger.core.arrays import NumpyBackend
from merger.io.safetensors_file import SafetensorsWriter
from merger.core.specs import TensorSpec
path, dtype = Path(sys.argv[2]), sys.argv[3]
n_bytes, seed, hidden, vocab, layers = map(int, sys.argv[4:])
inter = hidden * 11 // 4
per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 4
layers = layers or max(1, (n_bytes - 2 * vocab * hidden * 4) // per_layer)
shapes = {"model.embed_tokens.weight": (vocab, hidden)}
for i in range(layers):
    p = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
    shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
    shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
    shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes[p + "input_layernorm.weight"] = (hidden,)
    shapes[p + "post_attention_layernorm.weight"] = (hidden,)
shapes["model.norm.weight"] = (hidden,)
shapes["lm_head.weight"] = (vocab, hidden)
specs = {k: TensorSpec(dtype, s) for k, s in shapes.items()}
rng, xp = np.random.default_rng(seed), NumpyBackend()
path.parent.mkdir(parents=True, exist_ok=True)
writer = SafetensorsWriter(path, specs, {})
for key, spec in specs.items():
    for start in range(0, spec.numel, 1 << 22):
        values = rng.standard_normal(min(1 << 22, spec.numel - start), dtype=np.float32)
        writer.write_chunk(key, xp.store(values, dtype))
writer.finish()
"""


def write_llama_like(
    path: Path,
    *,
    n_bytes: int = 0,
    seed: int,
    hidden: int = 1024,
    vocab: int = 32000,
    layers: int = 0,
    dtype: str = "F32",
) -> None:
    """A random Llama-shaped safetensors file: `layers` layers, or as many as fit in n_bytes (float32)."""
    run_python(RANDOM_LLAMA, path, dtype, n_bytes, seed, hidden, vocab, layers)


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return path.stat().st_size / 1e6
