"""The pipeline's read buffers: a pool that hands chunk-sized buffers out and takes them back (so a
node's memory is a few chunks), and whether a result still lies in its inputs' buffers (a copy's
bytes, a view) so they must live until it is written."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from merger.core.arrays import Backend

POOLED_MAX_BYTES = 16 * 1024 * 1024  # larger read buffers are not kept for reuse
POOLED_MIN_BYTES = 64 * 1024  # nor smaller ones (small tensors' reads get their own)
MAX_POOLED = 32


class BufferPool:
    """Reusable read buffers, handed out and given back (bounds memory)."""

    def __init__(self, allocate: Callable[[int], Any]) -> None:
        self._allocate = allocate
        self._free: list[Any] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> Any:
        if nbytes < POOLED_MIN_BYTES:  # a small tensor: new memory costs less than a chunk-sized buffer held
            return self._allocate(max(nbytes, 1))
        with self._lock:
            for i, buffer in enumerate(self._free):
                if len(buffer) >= nbytes:
                    return self._free.pop(i)
        return self._allocate(nbytes)

    def put(self, buffers: list[Any]) -> None:
        kept = [b for b in buffers if POOLED_MIN_BYTES <= len(b) <= POOLED_MAX_BYTES]
        if kept:
            with self._lock:
                self._free.extend(kept)
                del self._free[MAX_POOLED:]


def backend_allocator(backend: Backend) -> Callable[[int], Any]:
    """Read buffers: page-locked on CUDA (for asynchronous copies), plain elsewhere."""
    if backend.name == "torch" and backend.device.startswith("cuda"):
        import torch

        return lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy()
    return bytearray


def _address(buffer: Any) -> tuple[int, int]:
    array = np.frombuffer(buffer, dtype=np.uint8)
    return array.ctypes.data, array.ctypes.data + array.size


def _owner(data: Any) -> Any:
    """The object at the root of a chain of memoryviews and numpy views (what holds the memory)."""
    while True:
        if isinstance(data, memoryview):
            data = data.obj
        elif isinstance(data, np.ndarray) and data.base is not None:
            data = data.base
        else:
            return data


def aliases(data: memoryview, buffers: list[Any]) -> bool:
    """Whether `data` lies in one of `buffers` (then they must live until it is written)."""
    if not len(data) or not buffers:
        return False
    owner = _owner(data)
    if any(owner is buffer for buffer in buffers):
        return True
    if isinstance(owner, bytearray | bytes) or (isinstance(owner, np.ndarray) and owner.flags.owndata):
        return False  # its own memory (a result): no need to compare addresses
    start, stop = _address(data)
    for buffer in buffers:
        if not len(buffer):
            continue
        begin, end = _address(buffer)
        if start < end and begin < stop:
            return True
    return False
