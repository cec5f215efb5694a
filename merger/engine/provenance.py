"""What determines an entry's content, written into its safetensors metadata.

- `merger.recipe`: the resolved recipe of the subgraph that made it (YAML),
- `merger.sources`: source name -> content hash and the path it was read from
  when this content was first computed (JSON),
- `merger.key`: the node's content key, `merger.version`.
Hashes not known until the sources are read are written as placeholders of
the same length, and patched when the entry is committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from merger.core.strict_json import loads_strict
from merger.core.version import VERSION as __version__
from merger.engine.plan import Plan

PLACEHOLDER_HASH = "0" * 64
FORMAT_FIELD = "format"
KEY_FIELD = "merger.key"
RECIPE_FIELD = "merger.recipe"
SOURCES_FIELD = "merger.sources"
VERSION_FIELD = "merger.version"
DTYPE_FIELD = "merger.dtype"
SIDE_FILE_FIELD = "file"  # in the .json beside a .pth output: the sha256 and size of that .pth


def upstream(plan: Plan, name: str) -> list[str]:
    """`name` and every node it depends on, in execution order."""
    needed = {name}
    for node_name in reversed(list(plan.nodes)):
        if node_name in needed:
            needed.update(ref.name for ref in plan.nodes[node_name].inputs if ref.handle is None)
    return [n for n in plan.nodes if n in needed]


def subgraph_recipe(plan: Plan, name: str) -> dict[str, Any]:
    recipe = plan.recipe
    nodes: dict[str, Any] = {}
    source_names: list[str] = []
    seeds = set()
    for node_name in upstream(plan, name):
        node = recipe.nodes[node_name]
        planned = plan.nodes[node_name]
        nodes[node_name] = {"op": node.op, "inputs": list(node.inputs), **node.params.model_dump(mode="json")}
        if node.vocab is not None:
            nodes[node_name]["vocab"] = node.vocab
        source_names.extend(i for i in node.references if i in recipe.sources and i not in source_names)
        if planned.seed is not None:
            seeds.add(planned.seed)
    sources: dict[str, Any] = {}
    for source_name in source_names:
        source = recipe.sources[source_name]
        entry: dict[str, Any] = {"glob": source.glob} if source.glob is not None else {"path": source.path}
        if source.key is not None:
            entry["key"] = source.key
        sources[source_name] = entry if len(entry) > 1 or source.glob is not None else source.path
    result: dict[str, Any] = {"sources": sources, "nodes": nodes}
    if seeds:
        result["seed"] = sorted(seeds)[0] if len(seeds) == 1 else sorted(seeds)
    return result


def node_metadata(plan: Plan, name: str, key: str | None, source_hashes: dict[str, str | None]) -> dict[str, str]:
    """The metadata of node `name`'s entry; unknown hashes become placeholders."""
    handles = [ref.handle for node_name in upstream(plan, name) for ref in plan.nodes[node_name].inputs if ref.handle]
    sources = {
        h.name: {"hash": source_hashes.get(h.name) or PLACEHOLDER_HASH, "path": str(h.path.resolve())} for h in handles
    }
    return {
        FORMAT_FIELD: "pt",  # as torch's safetensors writer says; transformers 4 refuses metadata without it
        VERSION_FIELD: __version__,
        KEY_FIELD: key or PLACEHOLDER_HASH,
        RECIPE_FIELD: yaml.safe_dump(subgraph_recipe(plan, name), sort_keys=False),
        SOURCES_FIELD: json.dumps(sources, sort_keys=True),
    }


def parse_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The provenance in a file's metadata, decoded; None for a file merger did not make."""
    if KEY_FIELD not in metadata:
        return None
    result: dict[str, Any] = {"key": metadata[KEY_FIELD], "version": metadata.get(VERSION_FIELD)}
    try:
        result["sources"] = json.loads(metadata.get(SOURCES_FIELD, "{}"))
    except ValueError:
        result["sources"] = metadata.get(SOURCES_FIELD)
    result["recipe"] = metadata.get(RECIPE_FIELD, "")
    if DTYPE_FIELD in metadata:
        result["dtype"] = metadata[DTYPE_FIELD]
    return result


@dataclass(frozen=True)
class SourceOrigin:
    hash: str
    path: str


@dataclass(frozen=True)
class Provenance:
    """What a file says about how merger made it, checked (files come from anywhere)."""

    key: str
    version: str | None
    sources: dict[str, SourceOrigin]
    recipe: str
    dtype: str | None

    @classmethod
    def from_fields(cls, fields: Any, sources: Any) -> Provenance:
        """From decoded fields (key, version, recipe, dtype) and the decoded sources; ValueError if malformed."""
        if not isinstance(fields, dict) or not isinstance(fields.get("key"), str):
            raise ValueError("no key")
        if not isinstance(sources, dict):
            raise ValueError("its sources are not a mapping")
        origins = {}
        for name, info in sources.items():
            if not isinstance(info, dict) or not all(isinstance(info.get(k, ""), str) for k in ("hash", "path")):
                raise ValueError(f"source {name!r} is malformed")
            origins[str(name)] = SourceOrigin(info.get("hash", "?"), info.get("path", "?"))
        texts = [fields.get(k) for k in ("version", "recipe", "dtype")]
        if not all(t is None or isinstance(t, str) for t in texts):
            raise ValueError("a field is not text")
        version, recipe, dtype = texts
        return cls(fields["key"], version, origins, recipe or "", dtype)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Provenance | None:
        """From a safetensors file's metadata; None for a file merger did not make; ValueError if malformed."""
        if KEY_FIELD not in metadata:
            return None
        sources = loads_strict(metadata.get(SOURCES_FIELD, "{}").encode(), what="merger.sources")
        fields = {
            "key": metadata[KEY_FIELD],
            "version": metadata.get(VERSION_FIELD),
            "recipe": metadata.get(RECIPE_FIELD),
            "dtype": metadata.get(DTYPE_FIELD),
        }
        return cls.from_fields(fields, sources)

    @classmethod
    def from_json(cls, raw: bytes) -> Provenance:
        """From the `.json` beside a `.pth` (what `parse_metadata` gave when it was written)."""
        data = loads_strict(raw, what="the provenance file")
        if not isinstance(data, dict):
            raise ValueError("not a mapping")
        return cls.from_fields(data, data.get("sources", {}))
