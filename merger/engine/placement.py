"""Outputs: a node's cache entry put at the output's path.

With `dtype: keep` and a `.safetensors` path the output is the entry itself,
hard-linked (or copied across filesystems). A dtype or format change makes an
artifact (the entry cast, or saved as `.pth`), and so does `dtype: keep` of a node
that feeds other nodes, whose entry is kept at float32 (merger.engine.plan): cast
back to the op's dtypes (`NodeResult.natural`), so it rounds once; an explicit dtype
is cast from the float32 entry. An artifact is itself cached under a key
derived from the node's, so a re-run links it too. The output appears
atomically: linked or copied to a temporary name beside it, then renamed.
A `.pth` output gets its provenance in a `.json` beside it. The sha256 the
report gives is that of the file now at the path: the entry's, checked when
it was looked up, for a link; the one computed while copying, for a copy.
Where the output may land was checked before the run (merger.engine.output_targets).
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger.archs import esrgan
from merger.cache.atomic import tmp_path_for, write_text_atomic
from merger.cache.keys import artifact_key
from merger.cache.store import Cache, EntryInfo
from merger.core.nonfinite import NonFiniteCounts, nonfinite_error
from merger.core.specs import DTYPE_NAMES, DTYPE_SIZES, TensorSpec
from merger.engine.entry_notes import NONFINITE_NOTE
from merger.engine.executor import NodeResult
from merger.engine.output_targets import OutputTarget
from merger.engine.provenance import DTYPE_FIELD, SIDE_FILE_FIELD, parse_metadata
from merger.errors import MergerError
from merger.io.safetensors_file import SafetensorsReader, SafetensorsWriter, file_sha256
from merger.io.safetensors_header import SafetensorsHeader, read_header
from merger.recipe.model import OutputDef

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
    entry_key: str  # the cache entry placed (the node's, or the artifact made from it)
    overflow: dict[str, int] = field(default_factory=dict)  # tensor -> values the cast made non-finite
    more_keys: tuple[str, ...] = ()  # other cache entries it places (a folder's shards)
    files: dict[str, str] = field(default_factory=dict)  # a folder's files: name -> sha256
    left_out: dict[str, str] = field(default_factory=dict)  # a folder's source files not copied -> why

    @property
    def model_file(self) -> Path:
        """The file a loader reads: the output itself, or a folder's single weights file."""
        single = self.path / "model.safetensors"
        return single if self.files and "model.safetensors" in self.files else self.path


def place_output(
    output: OutputDef, node: NodeResult, cache: Cache, target: OutputTarget, *, nonfinite: str = "warn"
) -> OutputResult:
    """Put node's entry (or an artifact made from it) at the output's path. `nonfinite: error`
    refuses an output whose cast (to float16, say) made values infinite, before it is placed."""
    try:
        return _place(output, node, cache, target, nonfinite)
    except OSError as e:
        raise MergerError(
            f"cannot write output '{output.name}': {e.strerror or e} ({e.filename or target.path})",
            where=f"outputs.{output.name}.path",
            fix=PLACE_FIXES.get(
                e.errno or 0,
                "choose a path in a writable directory (relative paths land in the run's output directory)",
            ),
        ) from None


PLACE_FIXES = {
    errno.ENOSPC: "free space on that disk, or write the output to another disk",
    errno.EFBIG: "the file is larger than this filesystem or your file-size limit (ulimit -f) allows",
    errno.EROFS: "that filesystem is read-only: choose a path in a writable directory",
}


def _overflow(node: NodeResult, artifact: EntryInfo) -> dict[str, int]:
    """Tensors with more non-finite values in the artifact than in the node's entry (a cast overflowed)."""
    before = node.nonfinite.get("output", {})
    after: dict[str, int] = artifact.notes.get(NONFINITE_NOTE, {}).get("output", {})
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def output_artifact(output: OutputDef, node: NodeResult, cache: Cache, fmt: str, *, nonfinite: str) -> EntryInfo:
    """The cache entry an output places: the node's own, or made from it (cast, renamed, saved as
    .pth, wrapped) and cached; `nonfinite: error` refuses one whose cast made values infinite."""
    suffix = ".pth" if fmt == "pth" else ".safetensors"
    tagged = f"pth+{output.wrap}" if fmt == "pth" and output.wrap else fmt  # the key of a wrapped .pth differs
    key = artifact_key(node.key, output.dtype, tagged, output.layout, promoted=bool(node.natural))
    artifact = cache.lookup(key, suffix)
    if artifact is None:
        with cache.lock(key):
            artifact = cache.lookup(key, suffix) or _make_artifact(cache, node, output, fmt, key)
    overflow = _overflow(node, artifact)
    if overflow and nonfinite == "error":
        first, count = next(iter(overflow.items()))
        raise nonfinite_error(f"outputs.{output.name}", f"output '{output.name}' cast to {output.dtype}", first, count)
    return artifact


def _place(output: OutputDef, node: NodeResult, cache: Cache, target: OutputTarget, nonfinite: str) -> OutputResult:
    artifact = output_artifact(output, node, cache, output.format, nonfinite=nonfinite)
    overflow = _overflow(node, artifact)
    how, sha = link_or_copy(artifact, target.path)
    if how == "linked":
        cache.placed(artifact)
    elif sha != artifact.sha256:
        target.path.unlink(missing_ok=True)
        cache.quarantine(artifact.path, "its copy's sha256 differs from its record")
        raise MergerError(
            f"the cache entry of output '{output.name}' changed while it was copied",
            where=f"outputs.{output.name}",
            fix="run again: the damaged entry was moved aside and will be computed again",
        )
    if target.side is not None:
        provenance = parse_metadata(read_header(node.entry.path).metadata) or {}
        if output.dtype != "keep":
            provenance["dtype"] = output.dtype
        provenance.update({k: v for k, v in (("layout", output.layout), ("wrap", output.wrap)) if v is not None})
        provenance[SIDE_FILE_FIELD] = {"sha256": sha, "bytes": artifact.bytes}  # ties the .json to this .pth
        write_text_atomic(target.side, json.dumps(provenance, indent=2) + "\n")
    return OutputResult(
        output.name, node.name, target.path, sha, artifact.bytes, output.dtype, how, artifact.key, overflow
    )


def link_or_copy(entry: EntryInfo, target: Path) -> tuple[str, str]:
    """Put the entry at `target` atomically: ("linked" | "copied", sha256 of the file now there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(target)
    try:
        try:
            os.link(entry.path, tmp)
            how, sha = "linked", entry.sha256
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            how, sha = "copied", copy_hashed(entry.path, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return how, sha


def copy_hashed(source: Path, target: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """Copy `source` to a new file `target` (fsynced); the sha256 of the bytes written."""
    sha = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(source, "rb", buffering=0) as src, open(target, "xb", buffering=0) as dst:
        while n := src.readinto(buffer):
            sha.update(view[:n])
            done = 0
            while done < n:
                done += dst.write(view[done:n]) or 0
        os.fsync(dst.fileno())
    return sha.hexdigest()


def _cast_spec(spec: TensorSpec, dtype: str, natural: str | None = None) -> TensorSpec:
    """The spec of a tensor of the entry in an output of `dtype` (`natural`: the op's dtype for it,
    where the entry keeps a wider one)."""
    if not spec.is_float:
        return spec
    if dtype == "keep":
        return TensorSpec(natural, spec.shape) if natural is not None else spec
    return TensorSpec(DTYPE_NAMES[dtype], spec.shape)


def _make_artifact(cache: Cache, node: NodeResult, output: OutputDef, fmt: str, key: str) -> EntryInfo:
    header = read_header(node.entry.path)
    made = {"kind": "artifact", "of": node.key, "node": node.name, "dtype": output.dtype, "format": fmt}
    if output.layout is not None:
        made["layout"] = output.layout
    notes: dict[str, Any] = {}
    if output.dtype != "keep" or output.layout is not None or node.natural:
        variant_key = key if fmt == "safetensors" else key + "-variant"
        rename = _layout_rename(header, output)
        variant = write_variant(cache, header, output.dtype, rename, variant_key, made, natural=node.natural)
        if fmt == "safetensors":
            return variant
        header = read_header(variant.path)
        notes = variant.notes
    if output.wrap:
        made["wrap"] = output.wrap
    return _write_pth(cache, header, key, made, notes, output.wrap)


def _layout_rename(header: SafetensorsHeader, output: OutputDef) -> dict[str, str] | None:
    if output.layout is None:
        return None
    found = esrgan.detect(header.tensors)
    if found is None:  # the plan checked the node's spec; this is a damaged entry
        raise MergerError(f"output '{output.name}' asks for a layout, but its model is not an ESRGAN")
    return found.rename(output.layout)


def write_variant(
    cache: Cache,
    header: SafetensorsHeader,
    dtype: str,
    rename: dict[str, str] | None,
    key: str,
    made: dict[str, Any],
    keys: Sequence[str] | None = None,
    *,
    natural: Mapping[str, str] | None = None,
) -> EntryInfo:
    """The entry (or its tensors `keys`) with float tensors cast to `dtype` (`keep`: to `natural`,
    the op's dtypes of the tensors a node that feeds others keeps wider) and keys renamed, in chunks
    (numpy); the non-finite values of the result are counted (a cast to float16 may overflow)."""
    from merger.core.arrays import select_backend

    chosen = header.tensors if keys is None else {k: header.tensors[k] for k in keys}
    natural = natural or {}
    specs = {(rename or {}).get(k, k): _cast_spec(s, dtype, natural.get(k)) for k, s in chosen.items()}
    xp = select_backend("cpu", {s.dtype for s in chosen.values()} | {s.dtype for s in specs.values()})
    metadata = {**header.metadata, **({DTYPE_FIELD: dtype} if dtype != "keep" else {})}
    tmp = cache.new_tmp(key)
    reader = SafetensorsReader(header)
    buffer = memoryview(bytearray(VARIANT_CHUNK * 8))
    counts = NonFiniteCounts()
    writer: SafetensorsWriter | None = None
    try:  # the file is made, written and committed inside: a stop at any point leaves no temporary file
        writer = SafetensorsWriter(tmp, specs, metadata)
        for name, spec in chosen.items():
            new_name = (rename or {}).get(name, name)
            target = specs[new_name]
            size = DTYPE_SIZES[spec.dtype]
            for start in range(0, max(spec.numel, 1), VARIANT_CHUNK):
                stop = min(start + VARIANT_CHUNK, spec.numel)
                data = reader.read_into(name, start * size, stop * size, buffer)
                if target.dtype != spec.dtype:
                    data = xp.store(xp.load(data, spec.dtype, (stop - start,)), target.dtype)
                counts.add(new_name, data, target.dtype)
                writer.write_chunk(new_name, data)
        sha = writer.finish()
        notes = {NONFINITE_NOTE: {"output": counts.counts}} if counts.counts else {}
        return cache.commit(tmp, key, sha, made=made, notes=notes)
    except BaseException:
        if writer is not None:
            writer.abort()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()


def _write_pth(
    cache: Cache, header: SafetensorsHeader, key: str, made: dict[str, Any], notes: dict[str, Any], wrap: str | None
) -> EntryInfo:
    """`torch.save` of the bare state dict (or of `{wrap: state dict}`), its tensors viewing a memory
    map of the entry."""
    tmp = cache.new_tmp(key, ".pth")
    try:
        with open(header.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            _save_views(mapped, header, tmp, wrap)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        return cache.commit(tmp, key, file_sha256(tmp), ".pth", made=made, notes=notes)
    finally:
        tmp.unlink(missing_ok=True)


def _save_views(mapped: mmap.mmap, header: SafetensorsHeader, target: Path, wrap: str | None) -> None:
    import torch

    from merger.core.tensor_bytes import TORCH_DTYPES

    state: dict[str, torch.Tensor] = {}
    for name, spec in header.tensors.items():
        dtype = TORCH_DTYPES[spec.dtype]
        if spec.numel == 0:
            state[name] = torch.empty(spec.shape, dtype=dtype)
        else:
            offset = header.data_start + header.offsets[name][0]
            state[name] = torch.frombuffer(mapped, dtype=dtype, count=spec.numel, offset=offset).reshape(spec.shape)
    torch.save({wrap: state} if wrap else state, target)
