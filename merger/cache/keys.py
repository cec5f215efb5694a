"""Content keys of nodes and output artifacts.

A node's key is a digest of (op name, op version, canonical parameters, which
for random ops include the seed in force, its inputs' keys in order, and, for a node
kept at float32 because it feeds others, that precision); a source's key is
its content hash. Equal keys mean equal content, on any machine. Before a
source's content hash is known, a provisional key built from file identities
names the lock that keeps concurrent runs from computing the same node twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from merger.cache.hashing import KEY_SCHEME, digest_json


@dataclass(frozen=True)
class NodeContent:
    """What, besides its inputs, determines a node's result."""

    op: str
    version: int
    params: dict[str, Any]  # canonical JSON data; a random op's seed in force among them, no references (base)
    adaptations: tuple[str | None, ...]  # how each input is presented (e.g. another ESRGAN layout), or None
    #: "float32" when the node feeds other nodes and its float tensors are kept at the maths precision
    #: rather than the op's dtype (float16, bfloat16); None (and not in the key) otherwise
    precision: str | None = None


def node_key(content: NodeContent, input_keys: Sequence[str]) -> str:
    data: dict[str, Any] = {
        "scheme": KEY_SCHEME,
        "op": content.op,
        "version": content.version,
        "params": content.params,
        "inputs": list(input_keys),
    }
    if any(content.adaptations):
        data["adapt"] = list(content.adaptations)
    if content.precision is not None:  # only then: the keys of other nodes stay as they were
        data["precision"] = content.precision
    return digest_json(data)


def provisional_key(content: NodeContent, input_ids: Sequence[str]) -> str:
    return "provisional-" + node_key(content, input_ids)


def artifact_key(key: str, dtype: str, fmt: str, layout: str | None = None, *, promoted: bool = False) -> str:
    """The key of an output artifact: a node's content cast to `dtype`, in key layout
    `layout` (ESRGAN), in format `fmt`. Of a `promoted` node (its entry kept at float32, its key
    says so), `dtype: keep` casts to the op's own dtypes, so it is an artifact even as safetensors."""
    if dtype == "keep" and fmt == "safetensors" and layout is None and not promoted:
        return key
    content = {"scheme": KEY_SCHEME, "artifact_of": key, "dtype": dtype, "format": fmt}
    if layout is not None:
        content["layout"] = layout
    return digest_json(content)


def shard_key(key: str, shard_size: int, index: int, count: int) -> str:
    """The key of shard `index` of `count` of the entry `key`, cut at `shard_size` bytes."""
    content = {"scheme": KEY_SCHEME, "shard_of": key, "shard_size": shard_size, "index": index, "count": count}
    return digest_json(content)
