"""Outputs: a node's cache entry put at the output's path.

With `dtype: keep` and a `.safetensors` path the output is the entry itself,
hard-linked (or copied across filesystems). A dtype or format change makes an
artifact (the entry cast, or saved as `.pth`), itself cached under a key
derived from the node's, so a re-run links it too. The output appears
atomically: linked or copied to a temporary name beside it, then renamed.
A `.pth` output gets its provenance in a `.json` beside it.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from merger.archs import esrgan
from merger.atomic import tmp_path_for, write_text_atomic
from merger.cache import Cache, EntryInfo
from merger.errors import MergerError
from merger.executor import NodeResult
from merger.io.safetensors_file import SafetensorsHeader, SafetensorsReader, SafetensorsWriter, file_sha256, read_header
from merger.keys import artifact_key
from merger.provenance import DTYPE_FIELD, parse_metadata
from merger.recipe import OutputDef
from merger.specs import DTYPE_NAMES, DTYPE_SIZES, TensorSpec

VARIANT_CHUNK = 4 * 1024 * 1024  # elements per read while casting or renaming


@dataclass(frozen=True)
class OutputResult:
    name: str
    node: str
    path: Path
    sha256: str
    bytes: int
    dtype: str
    how: str  # "linked" | "copied"


def output_format(path: str) -> str:
    return "pth" if path.lower().endswith(".pth") else "safetensors"


def place_output(output: OutputDef, node: NodeResult, cache: Cache, output_dir: Path) -> OutputResult:
    """Put node's entry (or an artifact made from it) at the output's path."""
    try:
        return _place(output, node, cache, output_dir)
    except OSError as e:
        raise MergerError(
            f"cannot write output '{output.name}': {e.strerror or e} ({e.filename or output.path})",
            where=f"outputs.{output.name}.path",
            fix="choose a path in a writable directory (relative paths land in the run's output directory)",
        ) from None


def _place(output: OutputDef, node: NodeResult, cache: Cache, output_dir: Path) -> OutputResult:
    fmt = output_format(output.path)
    suffix = ".pth" if fmt == "pth" else ".safetensors"
    key = artifact_key(node.key, output.dtype, fmt, output.layout)
    artifact = cache.lookup(key, suffix)
    if artifact is None:
        with cache.lock(key):
            artifact = cache.lookup(key, suffix) or _make_artifact(cache, node.entry, output, fmt, key)
    target = output_dir / Path(output.path).expanduser()
    how = link_or_copy(artifact.path, target)
    if fmt == "pth":
        provenance = parse_metadata(read_header(node.entry.path).metadata) or {}
        if output.dtype != "keep":
            provenance["dtype"] = output.dtype
        write_text_atomic(target.with_suffix(".json"), json.dumps(provenance, indent=2) + "\n")
    return OutputResult(output.name, node.name, target, artifact.sha256, artifact.bytes, output.dtype, how)


def link_or_copy(source: Path, target: Path) -> str:
    if target.is_dir():
        raise MergerError(
            f"output path '{target}' is a directory",
            where="outputs",
            fix="give the output a file path ending in .safetensors or .pth",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(target)
    try:
        try:
            os.link(source, tmp)
            how = "linked"
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            how = "copied"
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return how


def _cast_spec(spec: TensorSpec, dtype: str) -> TensorSpec:
    if dtype == "keep" or not spec.is_float:
        return spec
    return TensorSpec(DTYPE_NAMES[dtype], spec.shape)


def _make_artifact(cache: Cache, entry: EntryInfo, output: OutputDef, fmt: str, key: str) -> EntryInfo:
    header = read_header(entry.path)
    if output.dtype != "keep" or output.layout is not None:
        variant_key = key if fmt == "safetensors" else key + "-variant"
        variant = _write_variant(cache, header, output.dtype, _layout_rename(header, output), variant_key)
        if fmt == "safetensors":
            return variant
        header = read_header(variant.path)
    return _write_pth(cache, header, key)


def _layout_rename(header: SafetensorsHeader, output: OutputDef) -> dict[str, str] | None:
    if output.layout is None:
        return None
    found = esrgan.detect(header.tensors)
    if found is None:  # the plan checked the node's spec; this is a damaged entry
        raise MergerError(f"output '{output.name}' asks for a layout, but its model is not an ESRGAN")
    return found.rename(output.layout)


def _write_variant(
    cache: Cache, header: SafetensorsHeader, dtype: str, rename: dict[str, str] | None, key: str
) -> EntryInfo:
    """The entry with float tensors cast to `dtype` and keys renamed, in chunks (numpy)."""
    from merger.arrays import select_backend

    specs = {(rename or {}).get(k, k): _cast_spec(s, dtype) for k, s in header.tensors.items()}
    xp = select_backend("cpu", {s.dtype for s in header.tensors.values()} | {s.dtype for s in specs.values()})
    metadata = {**header.metadata, **({DTYPE_FIELD: dtype} if dtype != "keep" else {})}
    tmp = cache.new_tmp(key)
    writer = SafetensorsWriter(tmp, specs, metadata)
    reader = SafetensorsReader(header)
    buffer = memoryview(bytearray(VARIANT_CHUNK * 8))
    try:
        for name, spec in header.tensors.items():
            new_name = (rename or {}).get(name, name)
            target = specs[new_name]
            size = DTYPE_SIZES[spec.dtype]
            for start in range(0, max(spec.numel, 1), VARIANT_CHUNK):
                stop = min(start + VARIANT_CHUNK, spec.numel)
                data = reader.read_into(name, start * size, stop * size, buffer)
                if target.dtype != spec.dtype:
                    data = xp.store(xp.load(data, spec.dtype, (stop - start,)), target.dtype)
                writer.write_chunk(new_name, data)
        sha = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    return cache.commit(tmp, key, sha)


def _write_pth(cache: Cache, header: SafetensorsHeader, key: str) -> EntryInfo:
    """`torch.save` of the bare state dict, its tensors viewing a memory map of the entry."""
    tmp = cache.new_tmp(key, ".pth")
    try:
        with open(header.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            _save_views(mapped, header, tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        return cache.commit(tmp, key, file_sha256(tmp), ".pth")
    finally:
        tmp.unlink(missing_ok=True)


def _save_views(mapped: mmap.mmap, header: SafetensorsHeader, target: Path) -> None:
    import torch

    from merger.tensor_bytes import TORCH_DTYPES

    state: dict[str, torch.Tensor] = {}
    for name, spec in header.tensors.items():
        dtype = TORCH_DTYPES[spec.dtype]
        if spec.numel == 0:
            state[name] = torch.empty(spec.shape, dtype=dtype)
        else:
            offset = header.data_start + header.offsets[name][0]
            state[name] = torch.frombuffer(mapped, dtype=dtype, count=spec.numel, offset=offset).reshape(spec.shape)
    torch.save(state, target)
