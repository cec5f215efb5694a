"""The sources of one run: located, identified, opened lazily, hashed as they are read.

A source's content hash is known from the memo when its files are unchanged;
otherwise it is learnt in the same pass that reads the tensors (each tensor's
bytes are digested as they go by, the few never read are hashed at the end),
and remembered for the next run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merger.cache.hashing import digest_json, new_tensor_hasher, source_content_hash, spec_content_hash, tensor_digest
from merger.cache.memo import MemoEntry, SourceMemo, source_identity
from merger.core.specs import TensorSpec
from merger.engine.globbing import bounded_glob
from merger.errors import MergerError, Where, os_error_block
from merger.io.folder_config import ADAPTER_CONFIG, read_config
from merger.io.sources import (
    SourceLocation,
    TensorSource,
    locate,
    open_source,
    read_whole_tensors,
    resolve_path,
    tensors_by_key,
)
from merger.recipe.model import Recipe, SourceDef

HASH_CHUNK_BYTES = 1024 * 1024  # reads of what the merge did not read, digested while in the CPU's cache

#: specs already read in this process, by source identity (shared by the jobs a pre-flight checks)
SpecsSeen = dict[str, dict[str, TensorSpec]]


class SourceHandle:
    """One model file (or folder) of the run."""

    def __init__(
        self, name: str, location: SourceLocation, memo: SourceMemo, where: Where, seen: SpecsSeen | None = None
    ) -> None:
        self.name = name
        self.location = location
        self.where = where
        self._memo = memo
        self._seen = seen if seen is not None else {}
        self.identity = source_identity(location)
        entry = memo.get(self.identity)
        self.content_hash: str | None = entry.content_hash if entry else None
        self._spec: dict[str, TensorSpec] | None = entry.spec if entry else self._seen.get(self.identity)
        self._reader: TensorSource | None = None
        self._sizes: dict[str, int] | None = None  # key -> bytes, once the spec is known
        self._digests: dict[str, str] = {}
        self._hashing: dict[str, tuple[Any, int]] = {}  # key -> (hasher, bytes fed so far)
        self._learnt = False  # a content hash computed in this run, not memoised yet
        self._configs: dict[str, dict[str, Any] | None] = {}

    @property
    def path(self) -> Path:
        return self.location.path

    def folder_config(self, name: str) -> dict[str, Any] | None:
        """The folder's `config.json` or `adapter_config.json` (by `name`), read once; None when the
        source is not a folder or has no such file."""
        if name not in self._configs:
            path = self.location.path / name
            found = self.location.kind == "folder" and path.is_file()
            self._configs[name] = read_config(path, where=self.where) if found else None
        return self._configs[name]

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        """A PEFT adapter folder's config (what ops may read: it is part of the content hash)."""
        return self.folder_config(ADAPTER_CONFIG)

    def _open(self) -> TensorSource:
        if self._reader is None:
            try:
                self._reader = self._open_reader()
            except MergerError as e:
                raise self._located(e) from None
            except OSError as e:
                raise self._located(os_error_block(e)) from None
            self._spec = self._reader.spec()
        return self._reader

    def _open_reader(self) -> TensorSource:
        """The file's reader; a checkpoint is unpickled once, then read through its remembered layout."""
        if self.location.kind != "pth":
            return open_source(self.location, where=self.where)
        from merger.io.pth import PthSource  # the unpickler: only for checkpoints

        layout = self._memo.get_layout(self.identity)
        if layout is not None:
            try:
                return PthSource(self.location.path, self.location.key, layout=layout)
            except MergerError:
                pass  # a damaged memo entry: parse the file itself
        reader = PthSource(self.location.path, self.location.key)
        self._memo.put_layout(self.identity, reader.layout())
        return reader

    def _located(self, error: MergerError) -> MergerError:
        """An error in the model file, told with the recipe and `sources.<name>` that brought it in."""
        if error.where and error.where.startswith(str(self.where)):
            return error
        return error.located(self.where)

    def spec(self) -> dict[str, TensorSpec]:
        if self._spec is None:
            self._open()
        assert self._spec is not None
        self._seen[self.identity] = self._spec
        return self._spec

    def sizes(self) -> dict[str, int]:
        """Each tensor's bytes (computed once per distinct spec: equal specs are mostly one object)."""
        if self._sizes is None:
            self._sizes = tensor_sizes(self.spec())
        return self._sizes

    def peek_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        """Bytes [start, stop) of tensor `key`, not digested (samples for the family check)."""
        return self._open().read_into(key, start, stop, out)

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        """Bytes [start, stop) of tensor `key`, digested on the way when the content hash is unknown.

        Ranges of a tensor are digested when they come in order from its start;
        a range read again (the same source twice in one node) is not.
        """
        try:
            view = self._open().read_into(key, start, stop, out)
        except OSError as e:
            raise self._located(os_error_block(e)) from None
        except MergerError as e:
            raise self._located(e) from None
        if self.content_hash is None and key not in self._digests:
            hasher, fed = self._hashing.get(key) or (new_tensor_hasher(), 0)
            if fed == start:
                hasher.update(view)
                fed = stop
                if fed == self.sizes()[key]:
                    self._digests[key] = hasher.hexdigest()
                    self._hashing.pop(key, None)
                else:
                    self._hashing[key] = (hasher, fed)
        return view

    def digest_whole(self, keys: Sequence[str], out: memoryview) -> memoryview:
        """Read tensors `keys` whole, one after another into `out` (which fits them), digesting each
        (the content hash is unknown, and none of them was read yet): what `read_into` of each key
        from 0 to its end does, in one read where the file holds them one after another. Returns the
        filled part of `out`."""
        sizes = self.sizes()
        lengths = [sizes[key] for key in keys]
        total = sum(lengths)
        view = self._read_whole(keys, lengths, out[:total])
        digest, digests, at = tensor_digest, self._digests, 0
        for key, size in zip(keys, lengths, strict=True):
            digests[key] = digest(view[at : at + size])
            at += size
        return view

    def read_tensors(self, keys: Sequence[str], sizes: Sequence[int], out: memoryview) -> memoryview:
        """Whole tensors `keys` (of `sizes` bytes) one after another into `out` (of their bytes
        together), as `read_into` of each gives them: in one read where the file holds them one after
        another, once the content hash is known (until then, key by key, digested on the way)."""
        if self.content_hash is None:
            return tensors_by_key(self.read_into, keys, sizes, out)
        return self._read_whole(keys, sizes, out)

    def _read_whole(self, keys: Sequence[str], sizes: Sequence[int], out: memoryview) -> memoryview:
        try:
            return read_whole_tensors(self._open(), keys, sizes, out)
        except OSError as e:
            raise self._located(os_error_block(e)) from None
        except MergerError as e:
            raise self._located(e) from None

    def refresh(self) -> None:
        """Pick up a content hash another process has memoised meanwhile."""
        if self.content_hash is None:
            entry = self._memo.get(self.identity)
            if entry is not None:
                self.content_hash = entry.content_hash

    def finish_hash(self) -> str:
        """The content hash: digest what was not read yet (call `remember` to memoise it)."""
        if self.content_hash is None:
            spec = self._open().spec()
            digested = self._digests
            scratch = memoryview(bytearray(HASH_CHUNK_BYTES if len(digested) < len(spec) else 0))
            for key, tensor in spec.items() if len(digested) < len(spec) else ():
                if key in digested:
                    continue
                start = self._hashing[key][1] if key in self._hashing else 0
                if start == 0 and tensor.nbytes == 0:
                    self.read_into(key, 0, 0, scratch)
                for begin in range(start, tensor.nbytes, HASH_CHUNK_BYTES):
                    self.read_into(key, begin, min(begin + HASH_CHUNK_BYTES, tensor.nbytes), scratch)
            adapter = self.adapter_config
            if adapter is None:
                self.content_hash = spec_content_hash(spec, self._digests)
            else:  # an adapter's alpha and rank rules change what applying it gives
                rows = [(k, s.dtype, s.shape, self._digests[k]) for k, s in spec.items()]
                rows.append((ADAPTER_CONFIG, "JSON", (), digest_json(adapter)))
                self.content_hash = source_content_hash(rows)
            self._learnt = True
            self._digests = {}
            self._hashing = {}
        return self.content_hash

    def remember(self) -> None:
        """Memoise a content hash learnt in this run. The executor calls it once the node
        that read the source is committed: a concurrent run that learns the real key
        from the memo then finds the entry, rather than computing it again."""
        if self._learnt and self.content_hash is not None:
            self._memo.put(self.identity, MemoEntry(self.content_hash, dict(self.spec())))
            self._learnt = False

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def tensor_sizes(spec: Mapping[str, TensorSpec]) -> dict[str, int]:
    """Each tensor's bytes (TensorSpec.nbytes is computed once per spec object, and a model's equal
    specs are mostly one object: merger.io.safetensors_plain.shared_spec)."""
    return {key: tensor.nbytes for key, tensor in spec.items()}


class SourceCatalog:
    """Every source a recipe names, each a list of handles (one, or a glob's matches)."""

    def __init__(self, recipe: Recipe, launch_dir: Path, memo: SourceMemo, seen: SpecsSeen | None = None) -> None:
        self.memo = memo  # also where image-model detections are remembered (merger.archs.detect's store)
        self._handles = {name: self._resolve(recipe, d, launch_dir, memo, seen) for name, d in recipe.sources.items()}

    @staticmethod
    def _resolve(
        recipe: Recipe, source: SourceDef, launch_dir: Path, memo: SourceMemo, seen: SpecsSeen | None
    ) -> list[SourceHandle]:
        where = recipe.where(f"sources.{source.name}")
        if source.glob is not None:
            pattern = str(launch_dir / Path(source.glob).expanduser())
            matches = [str(m) for m in bounded_glob(Path(pattern), where=where, shown_as=source.glob)]
            if not matches:
                raise MergerError(
                    f"glob '{source.glob}' matches no files",
                    where=where,
                    fix=f"check the pattern; it was searched as {pattern}",
                )
            return [
                SourceHandle(f"{source.name}[{i}]", locate(Path(m), source.key, where=where), memo, where, seen)
                for i, m in enumerate(matches)
            ]
        assert source.path is not None
        path = resolve_path(source.path, launch_dir, where=where)
        return [SourceHandle(source.name, locate(path, source.key, where=where), memo, where, seen)]

    def get(self, name: str) -> list[SourceHandle]:
        return self._handles[name]

    def all(self) -> list[SourceHandle]:
        return [h for handles in self._handles.values() for h in handles]

    def close(self) -> None:
        for handle in self.all():
            handle.close()
