"""Runs a Plan: each needed node is found in the cache or materialised into it.

A node whose content key is in the cache costs a lookup. Otherwise it is
computed tensor by tensor: inputs are read one tensor at a time (sources
lazily, upstream nodes from their cache entries), moved to the compute
device, combined by the op, and streamed into a new cache entry, so memory
holds a few tensors, never a model. A source whose content hash is not in the
memo is hashed in the same pass; the entry's key and metadata are patched in
when the pass ends. A lock per node keeps concurrent runs from computing the
same node twice: the second waits, then finds the first one's entry.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from merger.cache import Cache, EntryInfo
from merger.errors import MergerError
from merger.io.safetensors_file import SafetensorsReader, SafetensorsWriter, read_header
from merger.keys import node_key, provisional_key
from merger.plan import Plan, PlannedNode
from merger.progress import Progress
from merger.provenance import node_metadata
from merger.specs import TensorSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger("merger")


@dataclass
class NodeResult:
    name: str
    op: str
    key: str
    status: str  # "computed" | "cached"
    seconds: float
    entry: EntryInfo
    notes: dict[str, Any] = field(default_factory=dict)


class _NodeInputs:
    """`TensorInputs` for one node: reads go to source handles or upstream entries."""

    def __init__(self, node: PlannedNode, plan: Plan, results: dict[str, NodeResult], device: str) -> None:
        self._device = device
        self._readers: list[Any] = []
        self._entry_readers: list[SafetensorsReader] = []
        specs: list[dict[str, TensorSpec]] = []
        for ref in node.inputs:
            if ref.handle is not None:
                self._readers.append(ref.handle)
                specs.append(ref.handle.spec())
            else:
                reader = SafetensorsReader(read_header(results[ref.name].entry.path))
                self._entry_readers.append(reader)
                self._readers.append(_EntrySource(reader))
                specs.append(plan.nodes[ref.name].spec.tensors)
        self._specs = tuple(specs)

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]:
        return self._specs

    def read(self, index: int, key: str) -> torch.Tensor:
        tensor: torch.Tensor = self._readers[index].read(key)
        return tensor if self._device == "cpu" else tensor.to(self._device)

    def close(self) -> None:
        for reader in self._entry_readers:
            reader.close()


class _EntrySource:
    def __init__(self, reader: SafetensorsReader) -> None:
        self._reader = reader

    def read(self, key: str) -> torch.Tensor:
        return self._reader.read_tensor(key)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MergerError(
            f"device={requested} was asked for, but torch sees no CUDA device",
            where="device",
            fix="use device=auto or device=cpu, or install a CUDA build of torch on a machine with a GPU",
        )
    return requested


def tensor_rng(seed: int, key: str) -> torch.Generator:
    """A generator seeded from (seed, tensor key): independent of order, device and threads."""
    import hashlib

    import torch

    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Executor:
    def __init__(self, plan: Plan, cache: Cache, *, device: str, progress: bool) -> None:
        self.plan = plan
        self.cache = cache
        self.requested_device = device
        self.progress = progress
        self._device: str | None = None
        self.results: dict[str, NodeResult] = {}

    @property
    def device(self) -> str | None:
        """The compute device, resolved when the first node is computed (None if none was)."""
        return self._device

    def run(self) -> dict[str, NodeResult]:
        for name, node in self.plan.nodes.items():
            self.results[name] = self._run_node(node)
        return self.results

    def _input_keys(self, node: PlannedNode) -> tuple[list[str | None], list[str]]:
        keys: list[str | None] = []
        ids: list[str] = []
        for ref in node.inputs:
            if ref.handle is not None:
                keys.append(ref.handle.content_hash)
                ids.append(ref.handle.content_hash or ref.handle.identity)
            else:
                keys.append(self.results[ref.name].key)
                ids.append(self.results[ref.name].key)
        return keys, ids

    def _known_key(self, node: PlannedNode) -> str | None:
        keys, _ = self._input_keys(node)
        if any(k is None for k in keys):
            return None
        return node_key(node, [k for k in keys if k is not None])

    def _run_node(self, node: PlannedNode) -> NodeResult:
        start = time.perf_counter()
        key = self._known_key(node)
        entry = self.cache.lookup(key) if key else None
        if entry is None:
            lock_name = key or provisional_key(node, self._input_keys(node)[1])
            with self.cache.lock(lock_name):
                for ref in node.inputs:
                    if ref.handle is not None:
                        ref.handle.refresh()
                key = self._known_key(node)
                entry = self.cache.lookup(key) if key else None
                if entry is None:
                    entry = self._compute(node)
                    return NodeResult(
                        node.name,
                        node.op.name,
                        entry.key,
                        "computed",
                        time.perf_counter() - start,
                        entry,
                        dict(node.spec.notes),
                    )
        assert key is not None
        return NodeResult(
            node.name, node.op.name, key, "cached", time.perf_counter() - start, entry, dict(node.spec.notes)
        )

    def _source_hashes(self) -> dict[str, str | None]:
        hashes: dict[str, str | None] = {}
        for planned in self.plan.nodes.values():
            for ref in planned.inputs:
                if ref.handle is not None:
                    hashes[ref.handle.name] = ref.handle.content_hash
        return hashes

    def _compute(self, node: PlannedNode) -> EntryInfo:
        if self._device is None:
            self._device = resolve_device(self.requested_device)
        spec = node.spec.tensors
        known = self._known_key(node)
        tmp = self.cache.new_tmp(known or node.name)
        writer = SafetensorsWriter(tmp, spec, node_metadata(self.plan, node.name, known, self._source_hashes()))
        progress = Progress(node.name, len(spec), sum(s.nbytes for s in spec.values()), enabled=self.progress)
        with ExitStack() as stack:
            stack.callback(progress.close)
            inputs = _NodeInputs(node, self.plan, self.results, self._device)
            stack.callback(inputs.close)
            try:
                for key_name, tensor_spec in spec.items():
                    rng = tensor_rng(node.seed, key_name) if node.seed is not None else None
                    tensor = node.op.tensor(key_name, inputs, node.params, rng)
                    writer.write(key_name, tensor.cpu())
                    progress.advance(tensor_spec.nbytes)
                for ref in node.inputs:
                    if ref.handle is not None:
                        ref.handle.finish_hash()
                key = self._known_key(node)
                assert key is not None
                sha = writer.finish(node_metadata(self.plan, node.name, key, self._source_hashes()))
            except BaseException:
                writer.abort()
                raise
        return self.cache.commit(tmp, key, sha)
