"""What a node's pipeline (merger.engine.pipeline) reads from and writes into: a `ByteSource` (a
source, an upstream node's entry, or either under other key names: `RenamedSource`) and a
`ChunkWriter` (the entry being written); where its non-finite counts go (`NonFiniteSink`) and what
ops note (`Noted`). Free of numpy, so the executor imports it whatever it computes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from merger.io.sources import read_whole_tensors


class ByteSource(Protocol):
    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview: ...


class ChunkWriter(Protocol):
    def write_chunk(self, key: str, data: memoryview) -> None: ...


#: called with (input index, or None for the output; tensor key; how many non-finite values a chunk held)
NonFiniteSink = Callable[[int | None, str, int], None]
#: what an op noted while computing: name -> output key -> value (None: it was not finite)
Noted = dict[str, dict[str, float | None]]  # as merger.ops.base.Noted, filled in while computing


class RenamedSource:
    """A source read under other key names (`rename`: source key -> presented key)."""

    def __init__(self, source: ByteSource, rename: Mapping[str, str]) -> None:
        self._source = source
        self._back = {presented: stored for stored, presented in rename.items()}

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        return self._source.read_into(self._back[key], start, stop, out)

    def read_tensors(self, keys: Sequence[str], sizes: Sequence[int], out: memoryview) -> memoryview:
        back = self._back
        return read_whole_tensors(self._source, [back[key] for key in keys], sizes, out)
