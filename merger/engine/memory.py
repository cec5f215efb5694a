"""The machine's memory as the engine uses it: what the page cache can hold, and an allocator
that keeps chunk-sized blocks for reuse.

- `available_bytes`: the kernel's estimate of memory available without swapping (Linux's
  MemAvailable), which bounds what a pass over the sources can leave in the page cache for the
  merge that follows (see merger.engine.executor's hashing pass).
- `keep_freed_blocks`: glibc serves blocks above its mmap threshold (128 KB, rising to at most
  32 MB) with fresh mappings and trims the heap's top above twice that, so every chunk's arrays
  (a few MB each) come back as new pages, zeroed by the kernel on first touch: 0.7 s of page
  faults in a merge of two 1.7 GB float16 models. Raising both thresholds once per process keeps
  freed chunks in the heap, where the next chunk's arrays reuse them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's memory.max and memory.current
#: glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest: blocks up to it come from the heap
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024  # free memory the heap's top may keep


def available_bytes() -> int | None:
    """MemAvailable in bytes, or less when a container's memory limit leaves less; None where the
    kernel does not say (not Linux)."""
    try:
        text = MEMINFO.read_text()
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if name == "MemAvailable" and parts and parts[0].isdigit():
            found = int(parts[0]) * 1024
    if found is None:
        return None
    limit, used = _cgroup_number("memory.max"), _cgroup_number("memory.current")
    if limit is not None and used is not None:
        found = min(found, max(0, limit - used))
    return found


def _cgroup_number(name: str) -> int | None:
    try:
        text = (CGROUP / name).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


@functools.cache
def keep_freed_blocks() -> bool:
    """Tune glibc's malloc (once per process) so freed chunk-sized blocks are reused; whether it took."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
