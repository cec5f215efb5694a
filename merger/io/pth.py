"""PyTorch checkpoints (.pth/.pt/.ckpt/.bin), read by merger itself: no torch, no pickled code.

Formats: torch's zip format (torch >= 1.6: `<archive>/data.pkl`, the storages
as uncompressed records `<archive>/data/<key>`, `<archive>/byteorder`), and its
legacy format (`_use_new_zipfile_serialization=False`, e.g. the 2018 ESRGAN
models: a magic-number pickle, a protocol pickle, a sys_info pickle, the main
pickle, a pickle of the storage keys, then each storage as an 8-byte element
count and its bytes). Pickle protocols 0 to 5. Anything else (torch's old tar
format, TorchScript, a plain pickle, text) is refused with the reason. Every
failure, on any bytes, is a MergerError that names the file.

How: the pickle is run by `merger.io.pickle_safe.RestrictedUnpickler`, which
builds only merger's own stand-ins (a tensor is storage, offset, shape, stride,
dtype) and refuses every other Python object before anything in the file runs;
nothing from the pickle is ever called. Each storage's place in the file is
found without reading it: an uncompressed record's data starts after its
*local* zip header (whose extra field, torch's alignment padding, differs from
the central directory's); a legacy storage after its size field, found by
seeking. A contiguous tensor is read with positioned reads (os.preadv, safe
from several threads) straight into the caller's buffer; a strided view (a
transposed weight) is gathered with numpy from its storage's bytes, keeping
only the most recent one. torch is never imported, numpy only for a gather.

Limits (merger.core.limits): the pickle may unpack to PICKLE_BASE_BYTES plus
PICKLE_BYTES_PER_STORAGE per storage, counted while it is decompressed or read;
at most MAX_TENSORS tensors; each tensor must lie inside its storage, and a
tensor bigger than its storage (a stride-0 expand, an overlapping view) is
refused, since reading it would allocate more than the file holds; all the
tensors together may hold at most ALIAS_FACTOR times their distinct storages'
bytes plus ALIAS_SLACK_BYTES. The unpickler's own bounds are in its module.

Unwrapping, when no `key:` is given: while the object is a dict holding one of
WRAPPER_KEYS whose value is a dict, descend into the first present, in that
order (`params_ema` before `params`, as BasicSR/traiNNer save the EMA weights
there); then keep the tensor values and strip a `module.` prefix that every
key shares (DataParallel). `key: a.b` picks the nested dict explicitly. Only
that path and the chosen dict's own entries are looked at.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.core.limits import MIB
from merger.core.regular_file import open_regular
from merger.core.specs import DTYPE_SIZES, TensorSpec
from merger.errors import Location, MergerError, shown
from merger.io.pickle_safe import (
    PickleDict,
    PickleSet,
    Tensor,
)
from merger.io.pth_archive import _READABLE, _unreadable, load_archive

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
DATAPARALLEL_PREFIX = "module."
#: all tensors of a state dict may hold this many times their storages' bytes (tied weights, views)...
ALIAS_FACTOR = 4
#: ...plus this much
ALIAS_SLACK_BYTES = 64 * MIB


@dataclass(frozen=True)
class _Plan:
    """Where one tensor's bytes are: from `start` in the file, C order unless `strides` (bytes) say not."""

    spec: TensorSpec
    start: int
    strides: tuple[int, ...] | None
    span: int


class PthSource:
    """A PyTorch checkpoint: parsed once, unwrapped, read tensor by tensor with positioned reads."""

    def __init__(self, path: Path, key: str | None, *, layout: PthLayout | None = None) -> None:
        """Parse the checkpoint at `path` (unpickling it), or, given the `layout` an earlier parse of
        this very file found (merger's source memo keeps it), only check that layout against the file."""
        self._path = path
        self._lock = threading.Lock()
        self._gathered: tuple[str, memoryview] | None = None
        try:
            self._fd = _opened(path)
        except OSError as e:
            raise MergerError(
                f"cannot read '{path}': {e.strerror}", where=Location(model=str(path)), fix=_READABLE
            ) from None
        try:
            if layout is not None:
                self._plans = _plans_from_layout(path, layout, os.fstat(self._fd).st_size)
            else:
                root, storages = load_archive(path, self._fd)
                self._plans = _plan(path, unwrap(root, key, path), storages)
        except BaseException:
            os.close(self._fd)
            raise
        self._spec = {name: plan.spec for name, plan in self._plans.items()}

    def layout(self) -> PthLayout:
        """Where each tensor's bytes are, as plain data (for the source memo): a later run of the
        same file reads it without unpickling again."""
        return [
            [name, p.spec.dtype, list(p.spec.shape), p.start, None if p.strides is None else list(p.strides), p.span]
            for name, p in self._plans.items()
        ]

    def spec(self) -> dict[str, TensorSpec]:
        return self._spec

    def read_into(self, key: str, start: int, stop: int, out: memoryview) -> memoryview:
        plan = self._plans[key]
        if plan.strides is None:
            return self._pread(plan.start + start, out[: stop - start], key)
        return self._gather(key, plan, plan.strides)[start:stop]

    def _pread(self, offset: int, view: memoryview, key: str) -> memoryview:
        done = 0
        try:
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if not n:
                    raise _unreadable(self._path, f"the data of '{shown(key)}' is cut short (the file shrank?)")
                done += n
        except OSError as e:
            raise MergerError(
                f"cannot read '{self._path}': {e.strerror}", where=Location(model=str(self._path)), fix=_READABLE
            ) from None
        return view

    def _gather(self, key: str, plan: _Plan, strides: tuple[int, ...]) -> memoryview:
        """A strided view in C order: its storage span read, then copied by numpy (the latest one kept)."""
        with self._lock:
            if self._gathered is not None and self._gathered[0] == key:
                return self._gathered[1]
            self._gathered = None
            import numpy as np

            raw = bytearray(plan.span)
            self._pread(plan.start, memoryview(raw), key)
            elements = np.frombuffer(raw, dtype=np.dtype(f"<u{DTYPE_SIZES[plan.spec.dtype]}"))
            view = np.lib.stride_tricks.as_strided(elements, plan.spec.shape, strides, writeable=False)
            data = np.ascontiguousarray(view).data.cast("B")
            self._gathered = (key, data)
            return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._gathered = None


def _opened(path: Path) -> int:
    """A descriptor of its own for the regular file at `path` (a FIFO would block a plain open)."""
    with open_regular(path) as f:
        return os.dup(f.fileno())


def _type_name(value: Any) -> str:
    if isinstance(value, (PickleDict, PickleSet)):
        return value.kind
    return type(value).__name__


def _key_text(key: Any) -> str:
    if type(key) is str:
        return shown(key if len(key) <= 100 else key[:100] + "...")
    if type(key) in (int, bool) and abs(key) < 10**18:
        return str(key)
    return f"<{type(key).__name__}>"


def _describe_keys(obj: PickleDict, limit: int = 12) -> str:
    pairs = obj.pairs()
    parts = [f"{_key_text(k)} ({_type_name(v)})" for k, v in pairs[:limit]]
    more = f", ... {len(pairs) - limit} more" if len(pairs) > limit else ""
    return ", ".join(parts) + more


def unwrap(obj: Any, key: str | None, path: Path) -> dict[str, Tensor]:
    """The state dict a checkpoint holds: the chosen (or wrapped) dict's tensors, keys as str."""
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, PickleDict) or part not in obj:
                available = _describe_keys(obj) if isinstance(obj, PickleDict) else _type_name(obj)
                raise MergerError(
                    f"'{path}' has no entry '{part}' (of key: {key})",
                    where=Location(model=str(path)),
                    fix=f"choose the state dict with key: one of {available}",
                )
            obj = obj.get(part)
    else:
        seen: set[int] = set()
        while isinstance(obj, PickleDict) and id(obj) not in seen:
            seen.add(id(obj))
            wrapper = next((w for w in WRAPPER_KEYS if isinstance(obj.get(w), PickleDict)), None)
            if wrapper is None:
                break
            obj = obj.get(wrapper)
    if not isinstance(obj, PickleDict):
        raise MergerError(
            f"'{path}' holds a {_type_name(obj)}, not a state dict",
            where=Location(model=str(path)),
            fix="save a dict of tensors (model.state_dict())",
        )
    tensors: dict[str, Tensor] = {}
    for k, v in obj.pairs():
        if not isinstance(v, Tensor):
            continue
        if type(k) not in (str, int, bool) or (type(k) is not str and abs(k) >= 10**18):
            raise _unreadable(path, f"a tensor's key is a {type(k).__name__}, not a name")
        tensors[str(k)] = v
    if not tensors:
        raise MergerError(
            f"'{path}' holds no tensors at this level: {_describe_keys(obj)}",
            where=Location(model=str(path)),
            fix="name the dict that holds the weights with key: (e.g. key: generator)",
        )
    if all(k.startswith(DATAPARALLEL_PREFIX) for k in tensors):
        tensors = {k[len(DATAPARALLEL_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def _plan(path: Path, tensors: dict[str, Tensor], storages: dict[str, tuple[int, int]]) -> dict[str, _Plan]:
    """Check every tensor against its storage and the aliasing bound; where each one's bytes are."""
    plans: dict[str, _Plan] = {}
    total, roots = 0, {}
    for name, tensor in tensors.items():
        dtype, ref, shape = tensor.dtype, tensor.storage, tensor.shape
        if dtype.code is None:
            raise MergerError(
                f"tensor '{shown(name)}' in '{path}' has dtype torch.{dtype.name}, which merger does not merge",
                where=Location(model=str(path)),
                fix="save the weights as float32, float16, bfloat16 or an integer dtype",
            )
        numel = math.prod(shape)
        nbytes = numel * dtype.size
        span = (
            0 if not numel else (sum((d - 1) * s for d, s in zip(shape, tensor.stride, strict=True)) + 1) * dtype.size
        )
        if tensor.offset * dtype.size + span > ref.nbytes:
            raise _unreadable(
                path,
                f"tensor '{shown(name)}' (shape {list(shape)}, stride {list(tensor.stride)}, offset {tensor.offset})"
                f" reaches past the {ref.nbytes} bytes of its storage",
            )
        if nbytes > ref.nbytes:
            raise MergerError(
                f"refused to load '{path}': tensor '{shown(name)}' has shape {list(shape)} ({nbytes} bytes) but its"
                f" storage holds only {ref.nbytes} bytes (a stride-0 expand or an overlapping view)",
                where=Location(model=str(path)),
                fix=f"re-save that tensor as real data: sd['{shown(name)}'] = sd['{shown(name)}'].contiguous().clone()",
            )
        total += nbytes
        roots[ref.name] = storages[ref.name][1]
        start = storages[ref.name][0] + ref.base + tensor.offset * dtype.size
        strides = (
            None
            if not numel or _contiguous(shape, tensor.stride)
            else tuple(s * dtype.size if d != 1 else 0 for d, s in zip(shape, tensor.stride, strict=True))
        )
        plans[name] = _Plan(TensorSpec(dtype.code, shape), start, strides, span)
    allowed = ALIAS_FACTOR * sum(roots.values()) + ALIAS_SLACK_BYTES
    if total > allowed:
        raise MergerError(
            f"refused to load '{path}': its tensors add up to {total} bytes from {sum(roots.values())} bytes of"
            f" storage (more than {ALIAS_FACTOR}x plus {ALIAS_SLACK_BYTES // MIB} MiB): many keys view the same data",
            where=Location(model=str(path)),
            fix="re-save each tensor as its own data: {k: t.clone() for k, t in sd.items()}",
        )
    return plans


#: [name, dtype code, shape, file offset, byte strides or None (C order), byte span] per tensor
PthLayout = list[list[Any]]


def _plans_from_layout(path: Path, layout: PthLayout, file_size: int) -> dict[str, _Plan]:
    """The plans a layout describes, each checked to lie within the file (a damaged memo is refused)."""
    plans: dict[str, _Plan] = {}
    try:
        for name, dtype, shape, start, strides, span in layout:
            spec = TensorSpec(str(dtype), tuple(int(d) for d in shape))
            byte_strides = None if strides is None else tuple(int(s) for s in strides)
            ok = (
                spec.dtype in DTYPE_SIZES
                and all(d >= 0 for d in spec.shape)
                and int(start) >= 0
                and int(start) + int(span) <= file_size
                and (byte_strides is not None or int(span) == spec.nbytes or spec.numel == 0)
                and (byte_strides is None or _strides_fit(spec, byte_strides, int(span)))
            )
            if not ok or str(name) in plans:
                raise ValueError(name)
            plans[str(name)] = _Plan(spec, int(start), byte_strides, int(span))
    except (TypeError, ValueError) as e:
        raise _unreadable(path, f"its remembered layout does not fit the file ({shown(e)})") from None
    return plans


def _strides_fit(spec: TensorSpec, strides: tuple[int, ...], span: int) -> bool:
    """Whether a strided view of `span` bytes stays inside them (numpy's as_strided does not check)."""
    if len(strides) != len(spec.shape) or any(s < 0 for s in strides):
        return False
    reach = sum((d - 1) * s for d, s in zip(spec.shape, strides, strict=True)) + DTYPE_SIZES[spec.dtype]
    return spec.numel == 0 or reach <= span


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True
