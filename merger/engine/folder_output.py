"""Folder outputs: a Hugging Face model folder that loads as written, or a PEFT adapter folder.

An output whose path has no extension is a folder:

- the weights as safetensors, the node's entry cast to the output's dtype: one `model.safetensors`
  when it fits `shard_size`, else `model-0000i-of-0000n.safetensors` shards (cut as transformers
  cuts them: tensors in order, a new shard when the next would overflow this one) and
  `model.safetensors.index.json`; each shard is a cache entry of its own with merger's provenance,
  so a re-run links them;
- the small non-weight files of one source folder (`config_from`, see `folder_facts`): its
  `config.json` with the dtype set to the one written, its generation config, tokenizer files and
  the like;
- a `README.md` model card (merger.engine.model_card).

A node whose op describes a PEFT adapter (spec notes `peft`, from `extract_lora`) is written as
`adapter_model.safetensors` and `adapter_config.json` instead. The folder is assembled under a
temporary name beside its place and renamed into it: it appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.cache.atomic import fsync_dir, tmp_path_for
from merger.cache.keys import shard_key
from merger.cache.store import Cache, EntryInfo
from merger.core.regular_file import open_regular
from merger.core.specs import TensorSpec
from merger.engine.adapter_trim import trimmed_adapter
from merger.engine.catalog import SourceHandle
from merger.engine.executor import NodeResult
from merger.engine.model_card import CardContext, model_card
from merger.engine.output_targets import OutputTarget
from merger.engine.placement import OutputResult, copy_hashed, link_or_copy, output_artifact, write_variant
from merger.engine.plan import Plan
from merger.errors import MergerError, shown
from merger.io.folder_config import ADAPTER_CONFIG, MODEL_CONFIG, read_config
from merger.io.safetensors_header import read_header
from merger.recipe.model import OutputDef

WEIGHTS_SINGLE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD_NAME = "README.md"
#: files of a source folder that are never copied: weights (merger writes its own), their indexes,
#: the source's own card (merger writes one), adapter files in a model folder
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pkl")
#: a larger non-weight file is not "small": it is left out, with a note in the report
MAX_COPIED_FILE = 128 * 1024 * 1024
#: safetensors dtype code -> the name config.json gives it
CONFIG_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class FolderFacts:
    """What a folder output takes from the recipe's sources, decided in the pre-flight."""

    config_from: str | None  # the source whose non-weight files the folder gets
    config_dir: Path | None
    base_models: tuple[str, ...]  # the card's base_model: hub ids or folder names
    source_names: tuple[str, ...]  # the recipe's names of those sources, in the same order
    adapter: dict[str, Any] | None  # a PEFT adapter's config (the node's spec notes), else None
    adapter_base: str | None  # an adapter's base_model_name_or_path


def plan_shards(tensors: dict[str, TensorSpec], shard_size: int) -> list[list[str]]:
    """Tensors in order, into shards of at most `shard_size` bytes (a larger tensor alone in its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in tensors.items():
        if shards[-1] and size + spec.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def place_folder(
    output: OutputDef,
    node: NodeResult,
    plan: Plan,
    cache: Cache,
    target: OutputTarget,
    facts: FolderFacts,
    context: CardContext,
    *,
    nonfinite: str = "warn",
) -> OutputResult:
    """Write the folder at the output's path, whole or not at all."""
    weights = output_artifact(output, node, cache, "safetensors", nonfinite=nonfinite)
    header = read_header(weights.path)
    tmp = tmp_path_for(target.path)
    target.path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        keys = [weights.key]
        if facts.adapter is not None:
            weights, adapter = trimmed_adapter(weights, cache, node.notes, facts.adapter)
            keys = [weights.key]
            how, files[ADAPTER_WEIGHTS] = _link(weights, cache, tmp / ADAPTER_WEIGHTS)
            config = {**adapter, "base_model_name_or_path": facts.adapter_base}
            files[ADAPTER_CONFIG] = _write_json(tmp / ADAPTER_CONFIG, config)
        else:
            how = _write_weights(output, weights, cache, tmp, files, keys)
            if facts.config_dir is not None:
                files.update(_copy_config_files(facts.config_dir, tmp, _config_dtype(output, header.tensors)))
        card = model_card(output, node, plan, facts, context, library="transformers" if MODEL_CONFIG in files else None)
        files[CARD_NAME] = _write_text(tmp / CARD_NAME, card)
        fsync_dir(tmp)
        _swap_into_place(tmp, target.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = "".join(f"{name} {sha}\n" for name, sha in sorted(files.items()))
    total = sum((target.path / name).stat().st_size for name in files)
    return OutputResult(
        output.name,
        node.name,
        target.path,
        hashlib.sha256(manifest.encode()).hexdigest(),
        total,
        output.dtype,
        how,
        weights.key,
        more_keys=tuple(keys[1:]),
        files=files,
    )


def _write_weights(
    output: OutputDef, weights: EntryInfo, cache: Cache, folder: Path, files: dict[str, str], keys: list[str]
) -> str:
    """The weights into `folder`: the entry itself, or shards (cached) and their index."""
    header = read_header(weights.path)
    shards = plan_shards(dict(header.tensors), output.shard_size)
    names = shard_names(len(shards))
    if len(shards) == 1:
        how, files[WEIGHTS_SINGLE] = _link(weights, cache, folder / WEIGHTS_SINGLE)
        return how
    weight_map: dict[str, str] = {}
    how = "linked"
    for index, (name, shard) in enumerate(zip(names, shards, strict=True)):
        key = shard_key(weights.key, output.shard_size, index, len(shards))
        entry = cache.lookup(key)
        if entry is None:
            with cache.lock(key):
                made = {"kind": "shard", "of": weights.key, "index": index, "count": len(shards)}
                entry = cache.lookup(key) or write_variant(cache, header, "keep", None, key, made, keys=shard)
        shard_how, files[name] = _link(entry, cache, folder / name)
        how = "copied" if shard_how == "copied" else how
        keys.append(key)
        weight_map.update(dict.fromkeys(shard, name))
    metadata = {"total_size": sum(spec.nbytes for spec in header.tensors.values()), **_provenance(header.metadata)}
    files[WEIGHTS_INDEX] = _write_json(folder / WEIGHTS_INDEX, {"metadata": metadata, "weight_map": weight_map})
    return how


def _link(entry: EntryInfo, cache: Cache, path: Path) -> tuple[str, str]:
    how, sha = link_or_copy(entry, path)
    if how == "linked":
        cache.placed(entry)
    elif sha != entry.sha256:
        cache.quarantine(entry.path, "its copy's sha256 differs from its record")
        raise MergerError(
            f"the cache entry for '{shown(path.name)}' changed while it was copied",
            fix="run again: the damaged entry was moved aside and will be computed again",
        )
    return how, sha


def _provenance(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k in ("merger.key", "merger.version")}


def _config_dtype(output: OutputDef, tensors: dict[str, TensorSpec]) -> str | None:
    """The dtype config.json must name: the one asked for, else the float dtype most weights have."""
    if output.dtype != "keep":
        return output.dtype
    counts: dict[str, int] = {}
    for spec in tensors.values():
        if spec.dtype in CONFIG_DTYPES:
            counts[spec.dtype] = counts.get(spec.dtype, 0) + spec.numel
    return CONFIG_DTYPES[max(counts, key=lambda d: counts[d])] if counts else None


def copied_names(folder: Path) -> list[str]:
    """The files of a source folder that a folder output gets (regular files, not weights)."""
    names = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = entry.name
        lowered = name.lower()
        if name.startswith(".") or lowered == CARD_NAME.lower() or lowered.endswith(WEIGHT_SUFFIXES):
            continue
        if lowered.endswith(".index.json") or name in (ADAPTER_CONFIG, "merge_report.json"):
            continue
        if entry.is_file() and _inside(folder, Path(entry.path)):
            names.append(name)
    return names


def _inside(folder: Path, path: Path) -> bool:
    """A file of the folder: links followed only within it (or a Hugging Face cache's blobs), so that
    a downloaded folder cannot copy a file from elsewhere on this machine into the output."""
    root = folder.resolve()
    real = path.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    return real.is_relative_to(root) or (blobs is not None and real.is_relative_to(blobs))


def _copy_config_files(source: Path, folder: Path, dtype: str | None) -> dict[str, str]:
    files: dict[str, str] = {}
    for name in copied_names(source):
        path = source / name
        if path.stat().st_size > MAX_COPIED_FILE:
            continue
        if name == MODEL_CONFIG:
            config = read_config(path, where=f"config_from: {shown(source)}")
            if dtype is not None:
                config["dtype"] = dtype  # transformers 5 reads `dtype`; older releases `torch_dtype`
                config["torch_dtype"] = dtype
            files[name] = _write_json(folder / name, config)
            continue
        with open_regular(path):  # a FIFO or device would block: refused here
            pass
        files[name] = copy_hashed(path, folder / name)
    return files


def _write_json(path: Path, data: dict[str, Any]) -> str:
    return _write_text(path, json.dumps(data, indent=2) + "\n")


def _write_text(path: Path, text: str) -> str:
    data = text.encode()
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; a folder merger wrote there before is replaced."""
    if not (final.exists() or final.is_symlink()):
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return
    if not final.is_dir() or final.is_symlink():
        raise MergerError(f"'{shown(final)}' is not a folder merger wrote", fix="choose another path")
    aside = tmp_path_for(final)
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


# --- what a folder output takes from the sources (the pre-flight) ----------------------------------


def folder_facts(plan: Plan, output: OutputDef) -> tuple[FolderFacts, list[str]]:
    """Where a folder output's config, tokenizer and card facts come from; warnings to print once.
    `config_from` must name a source folder with a config.json; by default it is the source the
    output's vocabulary comes from (`vocab: first`), else the node's base, else its first input,
    looked for upstream, that is a folder with a config.json."""
    planned = plan.nodes[output.node]
    handles = _upstream_handles(plan, output.node)
    adapter = planned.spec.notes.get("peft")
    warnings: list[str] = []
    config_from: SourceHandle | None = None
    if output.config_from is not None:
        config_from = _named_config_source(plan, output)
    elif adapter is None:
        preferred = planned.vocab_from
        while preferred in plan.nodes:  # the first input is a node: its own vocabulary's source
            preferred = plan.nodes[preferred].vocab_from
        ordered = sorted(handles, key=lambda h: h.name != preferred)
        config_from = next((h for h in ordered if _has_config(h)), None)
        if config_from is None:
            warnings.append(
                f"output '{output.name}': no source of node '{output.node}' is a model folder with a config.json,"
                " so the folder gets the weights and a model card only (transformers needs a config.json)"
            )
    base = handles[0] if handles else None
    return (
        FolderFacts(
            config_from.name if config_from else None,
            config_from.path if config_from else None,
            tuple(model_id(h) for h in handles),
            tuple(h.name for h in handles),
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
    return handle.location.kind == "folder" and (handle.path / MODEL_CONFIG).is_file()


def _named_config_source(plan: Plan, output: OutputDef) -> SourceHandle:
    recipe = plan.recipe
    where = recipe.where(f"outputs.{output.name}.config_from")
    name = output.config_from
    assert name is not None
    handles = [h for node in plan.nodes.values() for ref in node.inputs if (h := ref.handle) and h.name == name]
    if name not in recipe.sources:
        raise MergerError(
            f"config_from '{shown(name)}' is not a source of the recipe",
            where=where,
            fix=f"name one of the sources: {', '.join(recipe.sources)}",
        )
    if not handles:
        raise MergerError(
            f"config_from '{shown(name)}' names a source no node of this run reads (or a glob)",
            where=where,
            fix="name a source folder one of the merged models comes from",
        )
    handle = handles[0]
    if not _has_config(handle):
        what = "is not a folder" if handle.location.kind != "folder" else "has no config.json"
        raise MergerError(
            f"config_from '{shown(name)}' ({shown(handle.path)}) {what}",
            where=where,
            fix="name a source that is a Hugging Face model folder (config.json and weights)",
        )
    return handle


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
