"""Content keys of nodes and output artifacts.

A node's key is a digest of (op name, op version, canonical parameters, which
for random ops include the seed in force, its inputs' keys in order); a source's key is
its content hash. Equal keys mean equal content, on any machine. Before a
source's content hash is known, a provisional key built from file identities
names the lock that keeps concurrent runs from computing the same node twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from merger.hashing import KEY_SCHEME, digest_json
from merger.plan import PlannedNode


def node_key(node: PlannedNode, input_keys: Sequence[str]) -> str:
    content = {
        "scheme": KEY_SCHEME,
        "op": node.op.name,
        "version": node.op.version,
        # a random op's seed in force is among the params; a reference (base) is an input, by content
        "params": node.params.model_dump(mode="json", exclude=set(node.op.references)),
        "inputs": list(input_keys),
    }
    adaptations = [ref.adaptation.tag if ref.adaptation else None for ref in node.inputs]
    if any(adaptations):
        content["adapt"] = adaptations
    return digest_json(content)


def provisional_key(node: PlannedNode, input_ids: Sequence[str]) -> str:
    return "provisional-" + node_key(node, input_ids)


def artifact_key(key: str, dtype: str, fmt: str, layout: str | None = None) -> str:
    """The key of an output artifact: a node's content cast to `dtype`, in key layout
    `layout` (ESRGAN), in format `fmt`."""
    if dtype == "keep" and fmt == "safetensors" and layout is None:
        return key
    content = {"scheme": KEY_SCHEME, "artifact_of": key, "dtype": dtype, "format": fmt}
    if layout is not None:
        content["layout"] = layout
    return digest_json(content)
