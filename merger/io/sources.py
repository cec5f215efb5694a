"""Model files as lazy tensor sources: a spec up front, tensors one at a time.

Kinds: a `.safetensors` file; a Hugging Face-style folder (safetensors or
PyTorch `.bin` weights, one file or sharded with an index, or a PEFT adapter;
see `_folder_files`); a PyTorch checkpoint (`.pth/.pt/.ckpt/.bin`). Every
pickle, a folder's `.bin` files too, is read by merger's own restricted
unpickler (`merger.io.pth`), which never runs pickled code. Each reader
reports its spec, reads one tensor at a time and says which files make it up
(the source's identity for the memo).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from merger.core.limits import MAX_INDEX_BYTES, MAX_TENSORS
from merger.core.regular_file import read_bounded
from merger.core.specs import TensorSpec
from merger.core.strict_json import JSONError, kind, loads_strict, short
from merger.errors import MergerError, Where, shown
from merger.io.folder_config import ADAPTER_CONFIG
from merger.io.safetensors_file import SafetensorsReader
from merger.io.safetensors_header import SafetensorsHeader, read_header

SAFETENSORS_SUFFIX = ".safetensors"
PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
PACKAGE_SCHEME = "pkg://"
FOLDER_INDEX = "model.safetensors.index.json"
FOLDER_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: a folder's model forms, most preferred first: (file name, whether it is an index of shards)
MODEL_FORMS = ((FOLDER_INDEX, True), (FOLDER_SINGLE, False), (BIN_INDEX, True), (BIN_SINGLE, False))
#: the suffix of a weights file that is a pickle (read by merger.io.pth), not safetensors
PICKLE_SUFFIX = ".bin"


class TensorSource(Protocol):
    """An open model: its spec in storage order, and tensor bytes on demand."""

    def spec(self) -> dict[str, TensorSpec]: ...

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        """Bytes [start, stop) of tensor `key` (C order): read into `out`, or a view
        of memory the source already holds. Safe to call from another thread."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceLocation:
    """Where a model lives: the path the recipe named and the files that hold it."""

    path: Path
    kind: str  # "safetensors" | "folder" (a model's or a PEFT adapter's) | "pth"
    files: tuple[Path, ...]
    key: str | None = None


def resolve_path(text: str, launch_dir: Path, *, where: Where) -> Path:
    """A recipe's path: relative to the launch directory, or `pkg://<package>/<file>`
    for a file shipped inside an installed Python package (the demo models). The package
    is found, never imported: importing it would run its code."""
    if text.startswith(PACKAGE_SCHEME):
        package, _, inner = text[len(PACKAGE_SCHEME) :].partition("/")
        return _package_file(package, inner, text, where)
    return launch_dir / Path(text).expanduser()


def _package_file(package: str, inner: str, text: str, where: Where) -> Path:
    problem = None
    if not package.isidentifier():
        problem = f"'{shown(package)}' is not a top-level package name"
    else:
        try:
            spec = importlib.util.find_spec(package)  # a top-level name: found on sys.path, not executed
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            problem = f"package '{shown(package)}' in '{shown(text)}' is not installed"
    if problem is None:
        root = Path(os.path.realpath(locations[0]))
        path = Path(os.path.realpath(root / inner))
        if path.is_relative_to(root) and inner:
            return path
        problem = f"'{shown(text)}' names no file inside package '{shown(package)}'"
    raise MergerError(problem, where=where, fix="write pkg://<installed package>/<file inside it>")


def locate(path: Path, key: str | None, *, where: Where) -> SourceLocation:
    """Check that `path` is a model merger can read, and list its files."""
    if not path.exists():
        hint = "check the path (relative paths resolve against the directory you ran merger in)"
        raise MergerError(f"model file not found: '{path}'", where=where, fix=hint)
    if path.is_dir():
        _no_key(key, path, where)
        return SourceLocation(path, "folder", _folder_files(path, where))
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        _no_key(key, path, where)
        return SourceLocation(path, "safetensors", (path,))
    if suffix in PTH_SUFFIXES:
        return SourceLocation(path, "pth", (path,), key)
    raise MergerError(
        f"'{path}' is not a model format merger reads",
        where=where,
        fix="use a .safetensors file, a .pth/.pt/.ckpt checkpoint, or a Hugging Face model folder",
    )


def _no_key(key: str | None, path: Path, where: Where) -> None:
    if key is not None:
        raise MergerError(
            f"'key: {key}' applies to PyTorch checkpoints, not to '{path}'",
            where=where,
            fix="remove key: from this source (safetensors files hold one flat state dict)",
        )


def _folder_files(folder: Path, where: Where) -> tuple[Path, ...]:
    """The files of the first form `folder` holds: an index then its shards, one weights
    file, or a PEFT adapter's config then its weights (the source's identity for the memo,
    so a changed index, shard or adapter config changes it).

    Forms, preferred in the order of MODEL_FORMS (safetensors first, as transformers
    does), then an adapter: `adapter_config.json` with `adapter_model.safetensors` (or
    `adapter_model.bin`). `.bin` files are pickles, opened by `merger.io.pth`.
    """
    for name, is_index in MODEL_FORMS:
        path = folder / name
        if not path.is_file():
            continue
        if not is_index:
            return (path,)
        shards = sorted(set(_read_index(path, where).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MergerError(
                f"shard '{shown(missing[0])}' named in '{path}' is missing",
                where=where,
                fix="download or copy every shard the index names into the folder",
            )
        return (path, *(folder / s for s in shards))
    config = folder / ADAPTER_CONFIG
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if config.is_file() and weights is not None:
        return (config, weights)
    forms = ", ".join(name for name, _ in MODEL_FORMS)
    adapter = f"{ADAPTER_CONFIG} with {' or '.join(ADAPTER_WEIGHTS)}"
    found = f" ({weights.name} without {ADAPTER_CONFIG})" if weights is not None else ""
    raise MergerError(
        f"folder '{folder}' holds no weights merger reads{found}: a folder needs one of {forms},"
        f" or (a PEFT adapter) {adapter}",
        where=where,
        fix="point the source at a model file (.safetensors, .pth, .bin), or at a folder written by"
        " save_pretrained() (a model's, or a PEFT adapter's with its adapter_config.json)",
    )


def _is_pickle(path: Path) -> bool:
    """Whether a folder's weights file is a PyTorch pickle (`.bin`), not safetensors."""
    return path.suffix.lower() == PICKLE_SUFFIX


def _read_index(index: Path, where: Where) -> dict[str, str]:
    """A sharded folder's weight_map (tensor name -> shard file), read strictly.

    The same rules for `model.safetensors.index.json` and `pytorch_model.bin.index.json`:
    the index is at most MAX_INDEX_BYTES of strict JSON (see merger.core.strict_json),
    names at most MAX_TENSORS tensors, and every shard it names is a file of the
    folder: no absolute path, no `..`, nothing a symlink takes outside the folder
    (except into the `blobs` folder of a Hugging Face cache, whose snapshot
    folders hold symlinks to `../../blobs/<hash>`).
    """
    what = "PyTorch weights index" if index.name == BIN_INDEX else "safetensors index"

    def bad(why: str) -> MergerError:
        return MergerError(
            f"'{index}' is not a valid {what}: {why}",
            where=where,
            fix="re-download the model (its index and shards come together), or re-save it with"
            " save_pretrained(..., safe_serialization=True)",
        )

    try:
        data, size = read_bounded(index, MAX_INDEX_BYTES)
    except OSError as e:
        raise MergerError(f"cannot read '{index}': {e.strerror}", where=where) from None
    if size > MAX_INDEX_BYTES:
        raise bad(f"it is {size} bytes, more than the {MAX_INDEX_BYTES} allowed (MAX_INDEX_BYTES)")
    try:
        parsed = loads_strict(data, what="it")
    except JSONError as e:
        raise bad(f"{e} (expected a JSON object with a weight_map)" if "not JSON" in e.reason else str(e)) from None
    if not isinstance(parsed, dict):
        raise bad(f"it is {kind(parsed)}, not a JSON object with a weight_map")
    if "weight_map" not in parsed:
        raise bad("it has no weight_map")
    weight_map = parsed["weight_map"]
    if not isinstance(weight_map, dict):
        raise bad(f"its weight_map is {kind(weight_map)}, not an object")
    if len(weight_map) > MAX_TENSORS:
        raise bad(f"its weight_map names {len(weight_map)} tensors, more than the {MAX_TENSORS} allowed (MAX_TENSORS)")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise bad(f"its weight_map gives '{short(key)}' {kind(shard)}, not a shard file name")

    folder = index.parent
    root = folder.resolve()
    hub_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None

    def outside(name: str) -> str | None:
        """Why shard `name` is not a file of the folder, or None when it is."""
        if not name:
            return "an empty name"
        if "\x00" in name:
            return "a name with a NUL character"
        relative = Path(name)
        if relative.anchor:
            return "an absolute path"
        if ".." in relative.parts:
            return "a path that climbs out of the folder with '..'"
        try:
            target = (folder / relative).resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            return "a path that cannot be resolved (a symlink loop?)"
        if target.is_relative_to(root) or (hub_blobs is not None and target.is_relative_to(hub_blobs)):
            return None
        return f"a path that a symlink takes outside the folder, to '{shown(target)}'"

    for shard in sorted(set(weight_map.values())):
        problem = outside(shard)
        if problem is not None:
            raise bad(f"the shard '{short(shard)}' is {problem}; shards must be files inside the folder")
    return weight_map


class SafetensorsSource:
    """One or more safetensors files presented as one model."""

    def __init__(self, headers: list[SafetensorsHeader], key_to_file: dict[str, int] | None = None) -> None:
        self._readers = [SafetensorsReader(h) for h in headers]
        self._spec: dict[str, TensorSpec] = {}
        self._owner: dict[str, int] = {}
        if len(headers) == 1 and key_to_file is None:  # one file: every key of its header
            self._spec = dict(headers[0].tensors)
            self._owner = dict.fromkeys(self._spec, 0)
            return
        for i, header in enumerate(headers):
            for key, spec in header.tensors.items():
                if key_to_file is not None and key_to_file.get(key) != i:
                    continue
                self._spec[key] = spec
                self._owner[key] = i

    def spec(self) -> dict[str, TensorSpec]:
        return self._spec

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        return self._readers[self._owner[key]].read_into(key, start, stop, out)

    def read_tensors(self, keys: Sequence[str], sizes: Sequence[int], out: memoryview) -> memoryview:
        """Whole tensors `keys` (of `sizes` bytes) one after another into `out`: in one read where one
        file holds them one after another, else tensor by tensor."""
        owner = self._owner
        first = owner[keys[0]]
        if len(self._readers) == 1 or all(owner[key] == first for key in keys):
            return self._readers[first].read_tensors(keys, sizes, out)
        return tensors_by_key(self.read_into, keys, sizes, out)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class ShardedSource:
    """Several opened shards presented as one model: each key read from the shard the index names."""

    def __init__(self, shards: list[TensorSource], key_to_shard: dict[str, int]) -> None:
        self._shards = shards
        self._spec: dict[str, TensorSpec] = {}
        self._owner: dict[str, int] = {}
        for i, shard in enumerate(shards):
            for key, spec in shard.spec().items():
                if key_to_shard.get(key) == i:
                    self._spec[key] = spec
                    self._owner[key] = i

    def spec(self) -> dict[str, TensorSpec]:
        return self._spec

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        # the maps are only read after __init__, and each shard's read_into is thread-safe
        return self._shards[self._owner[key]].read_into(key, start, stop, out)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def open_source(location: SourceLocation, *, where: Where) -> TensorSource:
    if location.kind == "pth":
        from merger.io.pth import PthSource  # the unpickler: only for checkpoints

        return PthSource(location.path, location.key)
    if location.kind == "safetensors":
        return SafetensorsSource([read_header(location.path)])
    first = location.files[0]
    if first.name in (FOLDER_INDEX, BIN_INDEX):
        return _open_sharded(first, where)
    weights = location.files[1] if first.name == ADAPTER_CONFIG else first
    return _open_file(weights)


def _open_file(path: Path) -> TensorSource:
    """One weights file of a folder: a `.bin` pickle through merger's unpickler, else safetensors."""
    return _open_pickle(path) if _is_pickle(path) else SafetensorsSource([read_header(path)])


def _open_sharded(index: Path, where: Where) -> TensorSource:
    """A sharded folder: its index read again (strictly), each shard opened, every key it names present."""
    weight_map = _read_index(index, where)
    shard_names = sorted(set(weight_map.values()))
    position = {name: i for i, name in enumerate(shard_names)}
    key_to_shard = {k: position[v] for k, v in weight_map.items()}
    folder = index.parent
    source: TensorSource
    if index.name == FOLDER_INDEX:
        source = SafetensorsSource([read_header(folder / s) for s in shard_names], key_to_shard)
    else:
        shards: list[TensorSource] = []
        try:
            for name in shard_names:
                shards.append(_open_pickle(folder / name))  # a .bin index's shards are pickles, whatever their names
        except BaseException:
            for shard in shards:
                shard.close()
            raise
        source = ShardedSource(shards, key_to_shard)
    absent = sorted(set(weight_map) - set(source.spec()))
    if absent:
        source.close()
        raise MergerError(
            f"'{index}' maps {len(absent)} tensors to shards that lack them (e.g. '{shown(absent[0])}')",
            where=where,
            fix="re-download the model: its index and shards disagree",
        )
    return source


def _open_pickle(path: Path) -> TensorSource:
    """A folder's pickled weights (one state dict, unwrapped as a checkpoint is), never running its code."""
    from merger.io.pth import PthSource  # the unpickler: only for checkpoints

    return PthSource(path, None)


def tensors_by_key(
    read_into: Callable[[str, int, int, memoryview], memoryview],
    keys: Sequence[str],
    sizes: Sequence[int],
    out: memoryview,
) -> memoryview:
    """Whole tensors `keys` (of `sizes` bytes) one after another into `out`, key by key (`read_into`
    may give a view of memory its source holds: copied in)."""
    offset = 0
    for key, size in zip(keys, sizes, strict=True):
        view = out[offset : offset + size]
        got = read_into(key, 0, size, view)
        if got.obj is not view.obj or len(got) != size:
            view[:] = got
        offset += size
    return out


def read_whole_tensors(source: Any, keys: Sequence[str], sizes: Sequence[int], out: memoryview) -> memoryview:
    """Whole tensors `keys` (of `sizes` bytes) of `source` one after another into `out` (of their
    bytes together): in one read where the source can (its `read_tensors`: a file that holds them
    one after another), else key by key through its `read_into`."""
    read_many = getattr(source, "read_tensors", None)
    if read_many is not None:
        view: memoryview = read_many(keys, sizes, out)
        return view
    return tensors_by_key(source.read_into, keys, sizes, out)
