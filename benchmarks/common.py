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


@dataclass(frozen=True)
class Measure:
    wall: float  # seconds
    rss: float  # peak RSS, MB


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
    return Measure(wall, usage.ru_maxrss / 1024)


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


LLAMA_LIKE = """
import sys; sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torch
from safetensors.torch import save_file
path, n_bytes, seed, hidden, vocab, layers = Path(sys.argv[2]), *map(int, sys.argv[3:])
inter = hidden * 11 // 4
g = torch.Generator().manual_seed(seed)
t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 4
count = layers or max(1, (n_bytes - 2 * vocab * hidden * 4) // per_layer)
for i in range(count):
    p = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        t[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=g)
    t[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g)
    t[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g)
    t[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g)
    t[p + "input_layernorm.weight"] = torch.ones(hidden)
    t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
t["model.norm.weight"] = torch.ones(hidden)
t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
path.parent.mkdir(parents=True, exist_ok=True)
save_file(t, path)
"""


def write_llama_like(
    path: Path, *, n_bytes: int = 0, seed: int, hidden: int = 1024, vocab: int = 32000, layers: int = 0
) -> None:
    """A Llama-shaped float32 safetensors file: `layers` layers, or as many as fit in n_bytes."""
    run_python(LLAMA_LIKE, path, n_bytes, seed, hidden, vocab, layers)


def size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return path.stat().st_size / 1e6
