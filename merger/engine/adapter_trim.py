"""An extracted LoRA adapter cut to the ranks its energy asked for, as it is written.

`extract_lora` with `energy` fixes every pair's shape at `rank` rows before any tensor is read,
with zeros past the rank each weight needed (the run's notes, `lora.ranks`, say which). A folder
output writes each pair cut to that rank, and gives the adapter's `rank_pattern` and
`alpha_pattern` those ranks (alpha = rank, so the scale stays 1): the same adapter, as small as
the energy asks. The cut adapter is a cache entry of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merger.cache.hashing import KEY_SCHEME, digest_json
from merger.cache.store import Cache, EntryInfo
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.io.safetensors_file import SafetensorsReader, SafetensorsWriter
from merger.io.safetensors_header import SafetensorsHeader, read_header

PEFT_PREFIX = "base_model.model."


def _cuts(header: SafetensorsHeader, ranks: Mapping[str, Any]) -> dict[str, int]:
    """module -> the rank to cut its pair to, where that is fewer rows than it has."""
    cuts = {}
    for module, rank in ranks.items():
        a = header.tensors.get(f"{PEFT_PREFIX}{module}.lora_A.weight")
        b = header.tensors.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
        if a is None or b is None or not isinstance(rank, int) or len(a.shape) != 2 or len(b.shape) != 2:
            continue
        keep = max(rank, 1)  # a zero delta keeps one row of zeros: peft has no rank 0
        if keep < a.shape[0] and a.shape[0] == b.shape[1]:
            cuts[module] = keep
    return cuts


def trimmed_adapter(
    weights: EntryInfo, cache: Cache, notes: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[EntryInfo, dict[str, Any]]:
    """The adapter entry to write and its config: cut where the run's ranks say, else as it is."""
    lora = notes.get("lora")
    ranks = lora.get("ranks") if isinstance(lora, Mapping) else None
    header = read_header(weights.path)
    cuts = _cuts(header, ranks) if isinstance(ranks, Mapping) else {}
    if not cuts:
        return weights, dict(config)
    patterns = {**dict(config.get("rank_pattern") or {}), **cuts}
    adapter = {**config, "rank_pattern": patterns, "alpha_pattern": dict(patterns)}
    key = digest_json({"scheme": KEY_SCHEME, "trimmed_adapter_of": weights.key, "ranks": cuts})
    entry = cache.lookup(key)
    if entry is None:
        with cache.lock(key):
            entry = cache.lookup(key) or _write(cache, header, cuts, key, weights.key)
    return entry, adapter


def _write(cache: Cache, header: SafetensorsHeader, cuts: dict[str, int], key: str, of: str) -> EntryInfo:
    import numpy as np

    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in header.tensors.items():
        module, _, which = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        keep = cuts.get(module)
        if keep is not None and which == "A.weight":
            shapes[name] = (keep, spec.shape[1])
        elif keep is not None and which == "B.weight":
            shapes[name] = (spec.shape[0], keep)
        else:
            shapes[name] = spec.shape
    specs = {name: TensorSpec(spec.dtype, shapes[name]) for name, spec in header.tensors.items()}
    tmp = cache.new_tmp(key)
    reader = SafetensorsReader(header)
    writer: SafetensorsWriter | None = None
    try:  # the file is made, written and committed inside: a stop at any point leaves no temporary file
        writer = SafetensorsWriter(tmp, specs, header.metadata)
        for name, spec in header.tensors.items():
            size = DTYPE_SIZES[spec.dtype]
            data = reader.read_into(name, 0, spec.nbytes, memoryview(bytearray(spec.nbytes)))
            if shapes[name] != spec.shape:
                rows = np.frombuffer(data, dtype=np.uint8).reshape(spec.shape[0], spec.shape[1] * size)
                rows = rows[: shapes[name][0], : shapes[name][1] * size]  # A: the first rows; B: the first columns
                data = memoryview(np.ascontiguousarray(rows).tobytes())
            writer.write_chunk(name, data)
        sha = writer.finish()
        return cache.commit(tmp, key, sha, made={"kind": "trimmed adapter", "of": of, "ranks": cuts})
    except BaseException:
        if writer is not None:
            writer.abort()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
