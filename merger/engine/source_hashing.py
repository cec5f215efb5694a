"""A first run's hashing pass, and the check that no source changed while a node read it.

A node's key names its sources' content hashes. On a first run they are not in the memo, so
without this pass the key (which the entry's header records) is known only once the merge
has read every source: the header is then patched and the whole entry read again for its
sha256. When the unknown sources fit in half the memory available, `hash_sources` reads
them first instead (two threads; the pass leaves them in the page cache for the merge), so
the header is final before the data, the sha256 is taken as the entry is written, and an
entry the same bytes made under another path is found without computing.

The pass stops within one chunk of an error or an interrupt, and fails as early as the merge
would under `nonfinite: error` (a non-finite input value). Because the merge reads the
sources again, `changed_sources` compares each source's identity (size, times, inode) with
the one taken when it was opened: a file rewritten in between would otherwise be merged under
the key of its old bytes.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING

from merger.cache.memo import source_identity
from merger.core.nonfinite import count_nonfinite
from merger.engine.memory import available_bytes

if TYPE_CHECKING:
    from merger.engine.catalog import SourceHandle
    from merger.engine.entry_notes import NonFiniteWatch
    from merger.engine.plan import PlannedNode

#: sources hashed at once (reads and hashing of large tensors release the GIL)
HASHING_THREADS = 2
HASH_CHUNK_BYTES = 16 * 1024 * 1024  # small tensors read and digested together, at most
#: a large tensor's reads: a span that stays in the CPU's cache between the read's copy and the digest
#: (15 % less time a GB than 16 MB spans, which the digest reads back from memory)
HASH_READ_BYTES = 1024 * 1024
#: tensors of at most this many bytes are read and digested together, a block of them at a time
SMALL_TENSOR_BYTES = 64 * 1024


def unknown_sources(node: PlannedNode) -> dict[int, SourceHandle]:
    """The node's sources whose content hash is unknown, by the index of their first input."""
    found: dict[int, SourceHandle] = {}
    for index, ref in enumerate(node.inputs):
        handle = ref.handle
        if handle is not None and handle.content_hash is None and all(h is not handle for h in found.values()):
            found[index] = handle
    return found


def fit_in_memory(handles: dict[int, SourceHandle]) -> bool:
    """Whether the sources fit in half the memory available (so the merge finds them in the page cache)."""
    available = available_bytes()
    need = sum(sum(handle.sizes().values()) for handle in handles.values())
    return available is not None and need <= available // 2


def hash_sources(handles: dict[int, SourceHandle], watch: NonFiniteWatch | None) -> None:
    """Hash every source in `handles` (their content hashes are then known); `watch` (under
    `nonfinite: error`) is told of non-finite values as they are read, and raises."""
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(hashing_threads(handles), thread_name_prefix="merger-hash")
    try:
        for done in [pool.submit(_hash_one, index, handle, watch, stop) for index, handle in handles.items()]:
            done.result()  # a source's error, as the merge would have met it
    except BaseException:
        stop.set()  # the other threads stop within one chunk
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def hashing_threads(handles: dict[int, SourceHandle]) -> int:
    """Threads for the pass: one when the sources' tensors are small on average (each one's digest,
    then its row of the content hash, is Python work that holds the GIL, so a second thread only
    contends for it: a 200,000-tensor pair hashes 30 % slower on two), else one per source up to
    HASHING_THREADS."""
    sizes = [handle.sizes() for handle in handles.values()]
    tensors = sum(len(s) for s in sizes)
    if sum(sum(s.values()) for s in sizes) <= tensors * SMALL_TENSOR_BYTES:
        return 1
    return max(1, min(len(handles), HASHING_THREADS))


def _hash_one(index: int, handle: SourceHandle, watch: NonFiniteWatch | None, stop: threading.Event) -> None:
    """Digest every tensor of one source: a small one together with the small ones after it (one read,
    a block of up to HASH_CHUNK_BYTES), a large one HASH_READ_BYTES at a time."""
    scratch = memoryview(bytearray(HASH_CHUNK_BYTES))
    spec = handle.spec()
    sizes = handle.sizes()
    small = min(SMALL_TENSOR_BYTES, HASH_CHUNK_BYTES)
    batch: list[str] = []
    batch_bytes = 0

    def digest_batch() -> None:
        data = handle.digest_whole(batch, scratch)
        if watch is not None:
            at = 0
            for key in batch:
                size = sizes[key]
                if found := count_nonfinite(data[at : at + size], spec[key].dtype):
                    watch(index, key, found)
                at += size
        batch.clear()

    for key, size in sizes.items():
        if size <= small:
            if batch and batch_bytes + size > HASH_CHUNK_BYTES:
                if stop.is_set():
                    return
                digest_batch()
                batch_bytes = 0
            batch.append(key)
            batch_bytes += size
            continue
        if batch:
            if stop.is_set():
                return
            digest_batch()
            batch_bytes = 0
        for begin in range(0, size, HASH_READ_BYTES):
            if stop.is_set():
                return
            data = handle.read_into(key, begin, min(begin + HASH_READ_BYTES, size), scratch)  # digests it
            if watch is not None and (found := count_nonfinite(data, spec[key].dtype)):
                watch(index, key, found)
    if batch:
        if stop.is_set():
            return
        digest_batch()
    handle.finish_hash()  # what is left, then the content hash


def changed_sources(node: PlannedNode) -> list[SourceHandle]:
    """The node's sources whose files are not the ones opened (rewritten, replaced or gone)."""
    changed: list[SourceHandle] = []
    for ref in node.inputs:
        handle = ref.handle
        if handle is None or any(h is handle for h in changed):
            continue
        try:
            same = source_identity(handle.location) == handle.identity
        except OSError:
            same = False
        if not same:
            changed.append(handle)
    return changed
