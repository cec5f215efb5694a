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

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from merger.cache.atomic import TMP_MARK, fsync_dir, is_stale_tmp, tmp_path_for
from merger.cache.keys import shard_key
from merger.cache.store import Cache, EntryInfo
from merger.core.specs import TensorSpec
from merger.engine.adapter_trim import trimmed_adapter
from merger.engine.executor import NodeResult
from merger.engine.folder_facts import FolderFacts
from merger.engine.folder_files import check_regular, choose_files
from merger.engine.model_card import CardContext, model_card
from merger.engine.output_targets import FOLDER_MANIFEST, OutputTarget, folder_not_mergers
from merger.engine.placement import PLACE_FIXES, OutputResult, copy_hashed, link_or_copy, output_artifact, write_variant
from merger.engine.plan import Plan
from merger.errors import MergerError, shown
from merger.io.folder_config import ADAPTER_CONFIG, MODEL_CONFIG, read_config
from merger.io.safetensors_header import read_header
from merger.recipe.model import OutputDef

WEIGHTS_SINGLE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD_NAME = "README.md"
#: safetensors dtype code -> the name config.json gives it
CONFIG_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


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


@contextmanager
def _writing(output: OutputDef, plan: Plan, target: OutputTarget) -> Iterator[None]:
    """An OSError while the folder is written, as the error block of that output."""
    try:
        yield
    except OSError as e:
        raise MergerError(
            f"cannot write output '{output.name}': {e.strerror or e} ({shown(e.filename or target.path)})",
            where=plan.recipe.where(f"outputs.{output.name}.path"),
            fix=PLACE_FIXES.get(e.errno or 0, "choose a path in a writable directory"),
        ) from None


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
    with _writing(output, plan, target):
        weights = output_artifact(output, node, cache, "safetensors", nonfinite=nonfinite)
        header = read_header(weights.path)
        target.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp_beside(target.path)
        tmp = tmp_path_for(target.path)
        tmp.mkdir()
        left_out: dict[str, str] = {}
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
                    copied, left_out = _copy_config_files(facts.config_dir, tmp, _config_dtype(output, header.tensors))
                    files.update(copied)
            card = model_card(
                output, node, plan, facts, context, library="transformers" if MODEL_CONFIG in files else None
            )
            files[CARD_NAME] = _write_text(tmp / CARD_NAME, card)
            listed = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha} for name, sha in files.items()}
            _write_json(tmp / FOLDER_MANIFEST, {"key": weights.key, "node": node.key, "files": listed})
            fsync_dir(tmp)
            _swap_into_place(tmp, target.path, allowed=output.overwrite and plan.recipe.settings.allow_overwrite)
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
            left_out=left_out,
        )


def remove_stale_tmp_beside(path: Path) -> None:
    """Remove what a killed run left beside `path` (a temporary folder or file of a dead process)."""
    prefix = f"{path.name}{TMP_MARK}"
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        stale = Path(entry.path)
        if is_stale_tmp(stale):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


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


def _copy_config_files(source: Path, folder: Path, dtype: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The config and tokenizer files of `source` into `folder` (see merger.engine.folder_files):
    name -> sha256 of what was written, and name -> why, for the files left out."""
    chosen = choose_files(source)
    files: dict[str, str] = {}
    for name in chosen.names:
        path = source / name
        if name == MODEL_CONFIG:
            config = read_config(path, where=f"config_from: {shown(source)}")
            if dtype is not None:
                config["dtype"] = dtype  # transformers 5 reads `dtype`; older releases `torch_dtype`
                config["torch_dtype"] = dtype
            files[name] = _write_json(folder / name, config)
            continue
        check_regular(path)
        files[name] = copy_hashed(path, folder / name)
    return files, chosen.left_out


def _write_json(path: Path, data: dict[str, Any]) -> str:
    return _write_text(path, json.dumps(data, indent=2) + "\n")


def _write_text(path: Path, text: str) -> str:
    data = text.encode()
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _swap_into_place(tmp: Path, final: Path, *, allowed: bool) -> None:
    """Rename the finished folder into place; a folder merger wrote there before (and that nobody
    changed since: checked again now, as in the pre-flight) is replaced, any folder when `allowed`
    (overwrite: true and allow_overwrite=true)."""
    if not (final.exists() or final.is_symlink()):
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise MergerError(
                f"'{shown(final)}' appeared while the folder was written", fix="run again, or choose another path"
            ) from None
        fsync_dir(final.parent)
        return
    why = "it is a link or a file" if final.is_symlink() or not final.is_dir() else None
    why = why or (folder_not_mergers(final) if any(final.iterdir()) and not allowed else None)
    if why is not None:
        raise MergerError(f"'{shown(final)}' changed during the run: {why}", fix="choose another path")
    aside = tmp_path_for(final)
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
