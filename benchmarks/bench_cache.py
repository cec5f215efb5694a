"""What checking a cache entry costs: a lookup's cheap pins, `cache_verify`, `merger-cache verify`.

    python benchmarks/bench_cache.py              # one ~650 MB float32 entry
    python benchmarks/bench_cache.py --mb 100     # smaller

Writes one random float32 safetensors file (Llama-like tensor shapes) into a
temporary directory, commits it to a cache there, then measures:
- `Cache.lookup` of it with the cheap pins (size, header digest, inode, times): median of several;
- the same with `Cache(..., verify=True)` (the `cache_verify` setting: a full sha256 per hit);
- `merger-cache verify` over that cache, as a whole process (its start-up included),
  and the hashing rate it reports itself;
and prints seconds and GB/s. The file is freshly written, so it sits in the
page cache: these are warm-cache figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import measure, write_llama_like

from merger.cache.store import Cache
from merger.io.safetensors_file import file_sha256

MERGER_CACHE = [str(Path(sys.executable).parent / "merger-cache")]


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert fn() is not None, "the entry was not served"
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mb", type=int, default=650, help="size of the entry in MB (default 650)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="merger-bench-cache-"))
    try:
        source = work / "entry.safetensors"
        write_llama_like(source, n_bytes=args.mb * 1_000_000, seed=1)
        cache = Cache(work / "cache")
        start = time.perf_counter()
        sha = file_sha256(source)
        hash_s = time.perf_counter() - start
        tmp = cache.new_tmp(sha)
        os.replace(source, tmp)
        key = sha  # any 64 hex digits will do
        entry = cache.commit(tmp, key, sha)
        size = entry.bytes
        cheap = timed(lambda: Cache(cache.root).lookup(key), 21)
        full = timed(lambda: Cache(cache.root, verify=True).lookup(key), 3)
        command = [*MERGER_CACHE, "verify", "--cache-dir", str(cache.root)]
        whole = measure(command, work)
        printed = subprocess.run(command, cwd=work, capture_output=True, text=True, check=True).stdout
        reported = re.search(r"in ([\d.]+) s \(([\d.]+) GB/s\)", printed)
        print(f"entry: {size / 1e6:.0f} MB float32 safetensors, {os.cpu_count()} CPUs, warm page cache")
        print(f"{'what':<46} {'seconds':>10} {'GB/s':>8}")
        rows = [
            ("file_sha256 (one pass, in-process)", hash_s, True),
            ("Cache.lookup, cheap pins (median of 21)", cheap, False),  # reads the header only
            ("Cache(verify=True).lookup (median of 3)", full, True),
            ("merger-cache verify (whole process)", whole.wall, True),
        ]
        if reported:
            rows.append(("merger-cache verify (its own hashing figure)", float(reported.group(1)), True))
        for what, seconds, hashes in rows:
            rate = f"{size / seconds / 1e9:8.2f}" if hashes and seconds > 0 else "       -"
            print(f"{what:<46} {seconds:10.4f} {rate}")
        print(f"cheap lookup: {cheap * 1e3:.2f} ms = {cheap / full:.4f}x a verified one")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
