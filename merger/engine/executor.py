"""Runs a Plan: each needed node is found in the cache or materialised into it.

A node whose content key is in the cache costs a lookup. Otherwise it is
computed tensor by tensor: inputs are read one tensor at a time (sources
lazily, upstream nodes from their cache entries), moved to the compute
device, combined by the op, and streamed into a new cache entry, so memory
holds a few tensors, never a model. A node that feeds other nodes is written at
the maths precision (float32 for float16 / bfloat16 tensors: `PlannedNode.stored`)
and read by them as it is, so a chain rounds once, when its outputs are cast. A
source whose content hash is not in the memo is hashed before the node computes
when the sources fit in half the memory available (the pass warms the page cache,
and the entry's header is final before its data, so its sha256 is taken as it is
written); otherwise in the pass that reads it, and the entry's key and metadata
are patched in when the pass ends. A lock per node keeps concurrent runs from computing the
same node twice: the second waits, then finds the first one's entry.

What an op notes while computing (`TensorInputs.note`: per output key, e.g. a reconstruction
error) is summarised by the op (`summarise_notes`, when it has one) and committed with the entry,
under RUNTIME_NOTE, so a cached run reports the same notes as the run that computed it. So are the
family check's figures (merger.engine.family, FAMILY_NOTE): a cache hit warns, or under
`family: error` fails, as the run that computed it did; `family: off` skips the check.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from merger.cache.keys import node_key, provisional_key
from merger.cache.store import Cache, EntryInfo, cache_error
from merger.core.nonfinite import nonfinite_error
from merger.core.specs import TensorSpec
from merger.engine.entry_notes import NONFINITE_NOTE, RUNTIME_NOTE, NonFiniteWatch, node_notes, runtime_notes
from merger.engine.family import FAMILY_NOTE, FAMILY_THRESHOLD, family_error, family_figures, unrelated_warning
from merger.engine.plan import Plan, PlannedNode, presented_spec
from merger.engine.progress import Progress
from merger.engine.provenance import node_metadata
from merger.engine.source_hashing import changed_sources, fit_in_memory, hash_sources, unknown_sources
from merger.errors import MergerError
from merger.io.safetensors_file import SafetensorsReader, SafetensorsWriter
from merger.io.safetensors_header import read_header

if TYPE_CHECKING:
    from merger.core.arrays import Backend
    from merger.engine.byte_io import ByteSource
    from merger.engine.catalog import SourceHandle

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
    warnings: list[str] = field(default_factory=list)  # the family check's, said as the node ran
    #: tensor -> the op's dtype, where the entry keeps a wider one (a node that feeds others: its
    #: outputs under `dtype: keep` are cast back to these); empty when the entry has the op's dtypes
    natural: dict[str, str] = field(default_factory=dict)

    @property
    def nonfinite(self) -> dict[str, Any]:
        """{"output": {key: count}, "inputs": {source: {key: count}}}, as far as any were found."""
        found: dict[str, Any] = self.entry.notes.get(NONFINITE_NOTE, {})
        return found


def source_changed(handle: SourceHandle, node: str) -> MergerError:
    return MergerError(
        f"source '{handle.name}' changed while node '{node}' read it ({handle.path})",
        where=handle.where,
        fix="run again once the file is written (is something saving over it?); nothing was cached",
    )


class _Peek:
    """Reads a source without feeding its content hash (for samples)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        data: memoryview = self._source.peek_into(key, start, stop, out)
        return data


class Executor:
    def __init__(self, plan: Plan, cache: Cache, *, device: str, progress: bool) -> None:
        self.plan = plan
        self.cache = cache
        self.requested_device = device
        self.progress = progress
        self._backend: Backend | None = None
        self.results: dict[str, NodeResult] = {}

    @property
    def device(self) -> str | None:
        """Where maths ran ("cpu (numpy)", "cuda (torch)", ...); None when nothing was computed."""
        if self._backend is None:
            return None
        return f"{self._backend.device} ({self._backend.name})"

    def _backend_for(self) -> Backend:
        if self._backend is None:
            dtypes = {t.dtype for node in self.plan.nodes.values() for t in node.stored.values()}
            for node in self.plan.nodes.values():
                for ref in node.inputs:
                    if ref.handle is not None:
                        dtypes.update(t.dtype for t in ref.handle.spec().values())
            from merger.core.arrays import select_backend  # numpy: only when something is computed

            self._backend = select_backend(self.requested_device, dtypes)
        return self._backend

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
        return node_key(node.content, [k for k in keys if k is not None])

    def _run_node(self, node: PlannedNode) -> NodeResult:
        start = time.perf_counter()
        key = self._known_key(node)
        entry = self.cache.lookup(key) if key else None
        if entry is None:
            lock_name = key or provisional_key(node.content, self._input_keys(node)[1])
            with self.cache.lock(lock_name):
                for ref in node.inputs:
                    if ref.handle is not None:
                        ref.handle.refresh()
                key = self._known_key(node)
                if key is None and self._hash_sources_first(node):
                    key = self._known_key(node)
                entry = self.cache.lookup(key) if key else None
                if entry is not None:  # found once the sources were hashed: their hashes are worth keeping
                    for ref in node.inputs:
                        if ref.handle is not None:
                            ref.handle.remember()
                if entry is None:
                    try:
                        entry = self._compute(node)
                    except OSError as e:
                        raise cache_error(e, f"compute node '{node.name}'").located(
                            self.plan.recipe.where(f"nodes.{node.name}")
                        ) from None
                    return NodeResult(
                        node.name,
                        node.op.name,
                        entry.key,
                        "computed",
                        time.perf_counter() - start,
                        entry,
                        self._notes(node, entry),
                        self._family_verdict(node, entry, say=False),
                        node.natural,
                    )
        assert key is not None
        self._recheck_nonfinite(node, entry)
        said = self._family_verdict(node, entry, say=True)
        return NodeResult(
            node.name,
            node.op.name,
            key,
            "cached",
            time.perf_counter() - start,
            entry,
            self._notes(node, entry),
            said,
            node.natural,
        )

    def _notes(self, node: PlannedNode, entry: EntryInfo) -> dict[str, Any]:
        """The node's report notes, with the family check's medians (`family: {input: median}`) from its entry."""
        notes = node_notes(node.spec.notes, entry)
        found = family_figures(entry.notes)
        if found is not None:
            notes["family"] = {name: round(figures[0], 4) for name, figures in found[1].items()}
        return notes

    def _family_policy(self, node: PlannedNode) -> str:
        """warn | error | off: the node's `family:`, else the run's."""
        defined = self.plan.recipe.nodes.get(node.name)
        return (defined.family if defined is not None else None) or self.plan.recipe.settings.family

    def _family_verdict(self, node: PlannedNode, entry: EntryInfo, *, say: bool) -> list[str]:
        """The family warnings of the node's entry; logged when `say` (a cache hit: the run that computed it
        said them then), raised under `family: error` (checked afresh on a hit without figures)."""
        policy = self._family_policy(node)
        found = family_figures(entry.notes)
        if policy == "off":
            return []
        if found is None:
            if say:
                self._family_on_hit(node)
            return []
        first, inputs = found
        lines = [
            unrelated_warning(name, first, median, tensors)
            for name, (median, tensors) in inputs.items()
            if tensors and median < FAMILY_THRESHOLD
        ]
        if lines and policy == "error":
            raise family_error(self.plan.recipe.where(f"nodes.{node.name}"), lines[0])
        said = [f"node '{node.name}': {line}" for line in lines]
        if say:
            for line in said:
                log.warning(line)
        return said

    def _recheck_nonfinite(self, node: PlannedNode, entry: EntryInfo) -> None:
        """A cached entry's recorded non-finite values fail a node that now says `nonfinite: error`."""
        found = entry.notes.get(NONFINITE_NOTE, {})
        if node.nonfinite != "error" or not found:
            return
        where = self.plan.recipe.where(f"nodes.{node.name}")
        if found.get("output"):
            key, count = next(iter(found["output"].items()))
            raise nonfinite_error(where, f"node '{node.name}': its output", key, count)
        name, counts = next(iter(found["inputs"].items()))
        key, count = next(iter(counts.items()))
        raise nonfinite_error(where, f"node '{node.name}': its input '{name}'", key, count)

    def _source_hashes(self) -> dict[str, str | None]:
        hashes: dict[str, str | None] = {}
        for planned in self.plan.nodes.values():
            for ref in planned.inputs:
                if ref.handle is not None:
                    hashes[ref.handle.name] = ref.handle.content_hash
        return hashes

    def _check_family(
        self, node: PlannedNode, sources: list[ByteSource], specs: list[dict[str, TensorSpec]]
    ) -> dict[str, Any]:
        """Compare a merge's inputs (sampled cosine similarity, see merger.engine.family) before it computes:
        inputs that look unrelated are a warning, or under `family: error` an error; returns the entry note."""
        policy = self._family_policy(node)
        if policy == "off":
            return {}
        from merger.engine.family import compare

        peekers = [_Peek(s) if hasattr(s, "peek_into") else s for s in sources]
        names = [ref.name for ref in node.inputs]
        found = compare(peekers, specs, names)
        for similarity in found:
            if similarity.tensors and not similarity.related:
                line = unrelated_warning(similarity.name, names[0], similarity.median, similarity.tensors)
                if policy == "error":
                    raise family_error(self.plan.recipe.where(f"nodes.{node.name}"), line)
                log.warning(f"node '{node.name}': {line}")
        inputs = {s.name: {"median": s.median, "tensors": s.tensors} for s in found if s.tensors}
        return {FAMILY_NOTE: {"first": names[0], "inputs": inputs}}

    def _open_inputs(
        self, node: PlannedNode, entry_readers: list[SafetensorsReader]
    ) -> tuple[list[ByteSource], list[dict[str, TensorSpec]]]:
        """The node's inputs as it reads them (sources lazily; upstream nodes' entries, whose readers
        join `entry_readers` for the caller to close), with their specs as the node sees them."""
        from merger.engine.byte_io import RenamedSource

        sources: list[ByteSource] = []
        specs: list[dict[str, TensorSpec]] = []
        for ref in node.inputs:
            source: ByteSource
            if ref.handle is not None:
                source, spec_of_input = ref.handle, ref.handle.spec()
            else:
                reader = SafetensorsReader(read_header(self.results[ref.name].entry.path))
                entry_readers.append(reader)
                source, spec_of_input = reader, self.plan.nodes[ref.name].stored  # as its entry holds it
            if ref.adaptation is not None:
                source = RenamedSource(source, ref.adaptation.rename)
            sources.append(source)
            specs.append(presented_spec(spec_of_input, ref.adaptation))
        return sources, specs

    def _family_on_hit(self, node: PlannedNode) -> None:
        """`family: error` on a cache hit whose entry has no figures (computed under `family: off`, or by
        an older merger): the inputs are compared now (sampled reads), so the error holds. Under `warn` a
        hit stays free of tensor reads."""
        if not node.op.family_check or len(node.inputs) < 2 or self._family_policy(node) != "error":
            return
        entry_readers: list[SafetensorsReader] = []
        try:
            self._check_family(node, *self._open_inputs(node, entry_readers))
        finally:
            for reader in entry_readers:
                reader.close()

    def _hash_sources_first(self, node: PlannedNode) -> bool:
        """Hash the node's sources whose content hash is unknown before it computes, when they fit
        in memory (merger.engine.source_hashing); returns whether it did (the node's key is known)."""
        handles = unknown_sources(node)
        if not handles or not fit_in_memory(handles):
            return False
        if node.op.family_check and len(node.inputs) > 1 and self._family_policy(node) == "error":
            self._family_on_hit(node)  # unrelated inputs fail before the pass, as before it
        gigabytes = sum(s.nbytes for h in handles.values() for s in h.spec().values()) / 1e9
        log.info(f"node '{node.name}': hashing {len(handles)} source(s) first ({gigabytes:.2f} GB)")
        where = self.plan.recipe.where(f"nodes.{node.name}")
        hash_sources(handles, NonFiniteWatch(node, where) if node.nonfinite == "error" else None)
        return True

    def _compute(self, node: PlannedNode) -> EntryInfo:
        from merger.engine.pipeline import Pipeline

        backend = self._backend_for()
        spec = node.stored  # a node that feeds others: float tensors at the maths precision
        known = self._known_key(node)
        tmp = self.cache.new_tmp(known or node.name)
        progress = Progress(node.name, len(spec), sum(s.nbytes for s in spec.values()), enabled=self.progress)
        watch = NonFiniteWatch(node, self.plan.recipe.where(f"nodes.{node.name}"))
        entry_readers: list[SafetensorsReader] = []
        writer: SafetensorsWriter | None = None
        try:
            sources, specs = self._open_inputs(node, entry_readers)
            family = self._check_family(node, sources, specs) if node.op.family_check and len(sources) > 1 else {}
            metadata = node_metadata(self.plan, node.name, known, self._source_hashes())
            writer = SafetensorsWriter(tmp, spec, metadata, final_header=known is not None)
            watched = frozenset(i for i, ref in enumerate(node.inputs) if ref.handle is not None)
            pipeline = Pipeline(
                node.op, node.keyed, sources, tuple(specs), backend, watched=watched, on_nonfinite=watch
            )
            pipeline.run(writer, replace(node.spec, tensors=spec), progress.advance)
            runtime = runtime_notes(node.op, pipeline.noted)
            for handle in changed_sources(node):
                raise source_changed(handle, node.name)
            for ref in node.inputs:
                if ref.handle is not None:
                    ref.handle.finish_hash()
            key = self._known_key(node)
            assert key is not None
            sha = writer.finish(node_metadata(self.plan, node.name, key, self._source_hashes()))
            made = {"kind": "node", "node": node.name, "op": node.op.name, "recipe": self.plan.recipe.file}
            notes = watch.notes() | ({RUNTIME_NOTE: runtime} if runtime else {}) | family
            # committed inside the guard: a stop (SIGTERM, Ctrl-C) between the finished file and its
            # commit would otherwise leave the temporary file behind
            entry = self.cache.commit(tmp, key, sha, made=made, notes=notes)
        except BaseException:
            if writer is not None:
                writer.abort()
            tmp.unlink(missing_ok=True)
            raise
        finally:
            progress.close()
            for reader in entry_readers:
                reader.close()
        for ref in node.inputs:
            if ref.handle is not None:
                ref.handle.remember()
        return entry
