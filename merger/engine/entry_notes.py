"""What a node's cache entry notes besides its tensors: what the op noted while computing
(RUNTIME_NOTE, summarised and bounded), the non-finite values counted in its inputs and output
(NONFINITE_NOTE), and how a report merges them with the plan's notes."""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from merger.core.nonfinite import nonfinite_error
from merger.errors import Where

if TYPE_CHECKING:
    from merger.cache.store import EntryInfo
    from merger.engine.byte_io import Noted
    from merger.engine.plan import PlannedNode
    from merger.ops.base import AnyOp

log = logging.getLogger("merger")


NONFINITE_NOTE = "nonfinite"
#: the entry note holding what the op noted while computing (summarised), merged into the node's notes
RUNTIME_NOTE = "runtime"
#: a larger summary would crowd the entry's record (merger.cache.record caps it): per-key tables are dropped
MAX_RUNTIME_NOTE_BYTES = 256 * 1024


def runtime_notes(op: AnyOp, noted: Noted) -> dict[str, Any]:
    """The report notes of what `op` noted: its summary, else `{"noted": noted}`; bounded in size."""
    if not noted:
        return {}
    summary = op.summarise_notes(noted)
    if len(json.dumps(summary)) <= MAX_RUNTIME_NOTE_BYTES:
        return summary
    log.warning(f"op '{op.name}': its per-key notes are over {MAX_RUNTIME_NOTE_BYTES} bytes; only totals are kept")
    return {
        name: {k: v for k, v in value.items() if not isinstance(v, dict)} | {"per_key_dropped": True}
        if isinstance(value, dict)
        else value
        for name, value in summary.items()
    }


def node_notes(planned: dict[str, Any], entry: EntryInfo) -> dict[str, Any]:
    """A node's notes: the plan's, with what its entry records from computing it merged in
    (one level deep: a runtime `lora` table joins the plan's `lora` table)."""
    notes = dict(planned)
    runtime = entry.notes.get(RUNTIME_NOTE)
    for name, value in (runtime if isinstance(runtime, dict) else {}).items():
        known = notes.get(name)
        notes[name] = {**known, **value} if isinstance(known, dict) and isinstance(value, dict) else value
    return notes


class NonFiniteWatch:
    """Counts a node's non-finite values as its pipeline reports them; raises under `nonfinite: error`."""

    def __init__(self, node: PlannedNode, where: Where) -> None:
        self._node = node
        self._where = where
        self._lock = threading.Lock()
        self.output: dict[str, int] = {}
        self.inputs: dict[str, dict[str, int]] = {}

    def __call__(self, index: int | None, key: str, count: int) -> None:
        name = "output" if index is None else f"input '{self._node.inputs[index].name}'"
        with self._lock:
            counts = self.output if index is None else self.inputs.setdefault(self._node.inputs[index].name, {})
            counts[key] = counts.get(key, 0) + count
        if self._node.nonfinite == "error":
            raise nonfinite_error(self._where, f"node '{self._node.name}': its {name}", key, counts[key])

    def notes(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if self.output:
            found["output"] = self.output
        if self.inputs:
            found["inputs"] = self.inputs
        return {NONFINITE_NOTE: found} if found else {}
