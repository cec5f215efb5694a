"""What a folder output takes from the recipe's sources, decided in the pre-flight: the source
folder its config and tokenizer come from (`config_from`), checked against the weights the output
will have (the vocabulary's rows, tied or untied embeddings), and the facts its model card names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.archs.embeddings import config_ties, is_input_embedding, lm_heads
from merger.core.specs import TensorSpec
from merger.engine.catalog import SourceHandle
from merger.engine.folder_files import config_inside
from merger.engine.plan import Plan
from merger.errors import MergerError, shown
from merger.io.folder_config import MODEL_CONFIG
from merger.recipe.model import OutputDef

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class FolderFacts:
    """What a folder output takes from the recipe's sources."""

    config_from: str | None  # the source whose non-weight files the folder gets
    config_dir: Path | None
    base_models: tuple[str, ...]  # the card's base_model: hub ids or folder names
    source_names: tuple[str, ...]  # the recipe's names of those sources, in the same order
    adapter: dict[str, Any] | None  # a PEFT adapter's config (the node's spec notes), else None
    adapter_base: str | None  # an adapter's base_model_name_or_path


def folder_facts(plan: Plan, output: OutputDef) -> tuple[FolderFacts, list[str]]:
    """Where a folder output's config, tokenizer and card facts come from; warnings to print once.
    `config_from` must name a source folder with a config.json that the output's node reads; by
    default it is the source the output's vocabulary comes from (`vocab: first`), else the node's
    base, else its first input, looked for upstream, that is a folder with a config.json."""
    planned = plan.nodes[output.node]
    handles = _upstream_handles(plan, output.node)
    adapter = planned.spec.notes.get("peft")
    warnings: list[str] = []
    config_from: SourceHandle | None = None
    if output.config_from is not None:
        config_from = _named_config_source(plan, output, handles)
    elif adapter is None:
        preferred = planned.vocab_from
        while preferred in plan.nodes:  # the first input is a node: its own vocabulary's source
            preferred = plan.nodes[preferred].vocab_from
        ordered = sorted(handles, key=lambda h: h.name != preferred)
        config_from = next((h for h in ordered if _has_config(h)), None)
        if config_from is None:
            warnings.append(
                f"node '{output.node}': no source it reads is a model folder with a config.json, so its folder"
                " outputs get the weights and a model card only (transformers needs a config.json to load them)"
            )
    if config_from is not None:
        _check_config(plan, output, config_from)
    base = handles[0] if handles else None
    named = handles[:1] if adapter is not None else handles  # an adapter applies to its base alone
    return (
        FolderFacts(
            config_from.name if config_from else None,
            config_from.path if config_from else None,
            tuple(model_id(h) for h in named),
            tuple(h.name for h in named),
            dict(adapter) if isinstance(adapter, dict) else None,
            model_id(base, full=True) if base is not None else None,
        ),
        warnings,
    )


def _upstream_handles(plan: Plan, name: str) -> list[SourceHandle]:
    """The sources a node reads, directly or through other nodes: references (base) first, in order."""
    found: list[SourceHandle] = []
    for ref in plan.nodes[name].inputs:
        more = [ref.handle] if ref.handle is not None else _upstream_handles(plan, ref.name)
        found.extend(h for h in more if all(h is not f for f in found))
    return found


def _has_config(handle: SourceHandle) -> bool:
    return handle.location.kind == "folder" and config_inside(handle.path)


def _named_config_source(plan: Plan, output: OutputDef, upstream: list[SourceHandle]) -> SourceHandle:
    recipe = plan.recipe
    where = recipe.where(f"outputs.{output.name}.config_from")
    name = output.config_from
    assert name is not None
    if name not in recipe.sources:
        raise MergerError(
            f"config_from '{shown(name)}' is not a source of the recipe",
            where=where,
            fix=f"name one of the sources: {', '.join(recipe.sources)}",
        )
    handle = next((h for h in upstream if h.name == name), None)
    if handle is None:
        raise MergerError(
            f"config_from '{shown(name)}' is not a model node '{output.node}' merges (or it is a glob)",
            where=where,
            fix=f"name a source folder node '{output.node}' reads: {', '.join(h.name for h in upstream)}",
        )
    if not _has_config(handle):
        what = "is not a folder" if handle.location.kind != "folder" else "has no config.json of its own"
        raise MergerError(
            f"config_from '{shown(name)}' ({shown(handle.path)}) {what}",
            where=where,
            fix="name a source that is a Hugging Face model folder (config.json and weights)",
        )
    return handle


def _check_config(plan: Plan, output: OutputDef, source: SourceHandle) -> None:
    """The config must describe the weights written: as many token rows, embeddings tied alike."""
    config = source.folder_config(MODEL_CONFIG) or {}
    tensors: dict[str, TensorSpec] = plan.nodes[output.node].spec.tensors
    where = plan.recipe.where(f"outputs.{output.name}.config_from")
    embedding = next((k for k, s in tensors.items() if is_input_embedding(k) and len(s.shape) == 2), None)
    vocab = config.get("vocab_size")
    if embedding is not None and isinstance(vocab, int) and vocab != tensors[embedding].shape[0]:
        raise MergerError(
            f"the config.json of '{source.name}' says vocab_size {vocab}, but output '{output.name}' has"
            f" {tensors[embedding].shape[0]} token rows ('{shown(embedding)}')",
            where=where,
            fix="take the config of the model whose vocabulary the output has (config_from:), or vocab: first"
            " on the node with that model first",
        )
    ties = config_ties(config)
    has_head = bool(lm_heads(tensors))
    if embedding is not None and ties is not None and ties == has_head:
        said = "ties the LM head to the embedding" if ties else "has an LM head of its own"
        has = "has an lm_head.weight" if has_head else "has no lm_head.weight"
        raise MergerError(
            f"the config.json of '{source.name}' {said}, but output '{output.name}' {has}",
            where=where,
            fix="take the config of a model that ties its embeddings as the merged ones do (config_from:)",
        )


def model_id(handle: SourceHandle, *, full: bool = False) -> str:
    """How the card names a source: its hub id (from a Hugging Face cache path, or the config's
    `_name_or_path` when it is one), else its folder (or file) name; `full`: else its path."""
    parts = handle.path.resolve().parts
    hub = next((p for p in reversed(parts) if p.startswith("models--")), None)
    if hub is not None:
        return "/".join(hub.split("--")[1:])
    config = handle.folder_config(MODEL_CONFIG) if _has_config(handle) else None
    recorded = config.get("_name_or_path") if config else None
    if isinstance(recorded, str) and _HUB_ID.fullmatch(recorded) and not Path(recorded).exists():
        return recorded
    return str(handle.path.resolve()) if full else handle.path.name
