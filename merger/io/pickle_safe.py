"""A restricted unpickler for PyTorch checkpoints: data only, bounded work, no code run.

Python's pure-Python unpickler (`pickle._Unpickler`) runs the opcodes, with
these changes. `find_class` returns merger's own stand-ins for the globals a
state dict uses (`CONSTANTS`, `FUNCTIONS`), never a real Python object, and
refuses every other name before anything else happens; `persistent_load` turns
torch's storage ids into `StorageRef`s through the caller's resolver. Pickled
dicts and sets become `PickleDict`/`PickleSet`, which never hash a key other
than a str or a small int: a tuple key could make Python hash an exponential
DAG of tuples (a hang from 200 bytes) or a million-deep tuple (a crash), and
ints built to collide (multiples of 2**61 - 1) make a dict quadratic. The
opcodes that build arbitrary objects (NEWOBJ, NEWOBJ_EX, INST, OBJ, EXT*),
which torch never writes, are refused; REDUCE calls only stand-ins; APPEND only
extends lists; BUILD only reaches stand-ins, whose `__setstate__` refuses (or,
for an OrderedDict's `_metadata`, ignores); BYTEARRAY8 allocates only bytes it
has read; a stand-in never allocates more than its arguments hold.

Why pure Python: the C unpickler hashes dict keys and set items itself, and
allocates a BINBYTES8's declared length before reading it; a subclass cannot
change either. The cost is speed, about a microsecond per opcode.

Work is bounded: each new container or memo entry (1-byte opcodes that each
make ~60 bytes of objects) charges CONTAINER_UNITS and each stand-in charges
what it copies, against `work_limit`, which the caller sets to WORK_PER_BYTE
times the pickle's byte limit (a state dict's pickle uses about 2.2 units per
byte). So memory stays within about 25 bytes per byte of pickle and the time
within a few microseconds per byte, and memo references that call one
stand-in a million times on one big list are refused, not obeyed.
"""

from __future__ import annotations

import pickle
import re
import struct
from collections.abc import Callable
from typing import Any, Protocol, cast

from merger.core.limits import MAX_DIMS, MAX_TENSORS
from merger.core.specs import DTYPE_SIZES
from merger.errors import shown

MAX_DIM = 1 << 62  # a dimension, stride, offset or storage size this big is corrupt
CONTAINER_UNITS = 8  # a new container or memo entry: ~60 bytes from a 1-byte opcode
#: work allowed per byte of the pickle's limit
WORK_PER_BYTE = 3
PAIR_UNITS = 16  # a pair copied into a new dict (a Python loop, about as slow as two containers)


class PickleCorrupt(Exception):
    """The file is malformed or not what torch writes (damaged, foreign); `fix` replaces the usual advice."""

    def __init__(self, detail: str, fix: str | None = None) -> None:
        super().__init__(detail)
        self.fix = fix


class PickleRefused(Exception):
    """The pickle holds something merger will not load; `what` and `fix` say why and how to re-save."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


class _Inert:
    """A stand-in BUILD may not alter."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise PickleCorrupt(f"a BUILD of a {type(self).__name__}")


class Token(_Inert):
    """A named constant: a type, a device, a layout."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class DType(Token):
    """A torch dtype: its safetensors code (None when merger does not merge it) and element size."""

    __slots__ = ("code", "size")

    def __init__(self, name: str, code: str | None, size: int) -> None:
        super().__init__(name)
        self.code, self.size = code, size


class StorageType(Token):
    __slots__ = ("dtype",)

    def __init__(self, name: str, dtype: DType) -> None:
        super().__init__(name)
        self.dtype = dtype


class StorageRef(Token):
    """Bytes [base, base + nbytes) of the storage named `name`, holding `dtype` elements."""

    __slots__ = ("base", "dtype", "nbytes")

    def __init__(self, name: str, dtype: DType, base: int, nbytes: int) -> None:
        super().__init__(name)
        self.dtype, self.base, self.nbytes = dtype, base, nbytes


class Tensor(_Inert):
    """A dense tensor: its storage, storage offset (elements), shape, strides (elements), dtype."""

    __slots__ = ("dtype", "offset", "shape", "storage", "stride")

    def __init__(self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], dtype: DType):
        self.storage, self.offset, self.shape, self.stride, self.dtype = storage, offset, shape, stride, dtype


class Parameter(Tensor):
    __slots__ = ()


class PickleDict:
    """A pickled dict, OrderedDict or Counter: its pairs in order; only str and small int keys are hashed."""

    __slots__ = ("_index", "_items", "kind")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: list[Any] | None = None  # key, value, key, value...: made with the first pair
        self._index: dict[str | int, int] | None = None

    def set(self, key: Any, value: Any) -> None:
        if self._items is None or self._index is None:
            self._items, self._index = [], {}
        if type(key) is str or (type(key) is int and -MAX_DIM < key < MAX_DIM):
            at = self._index.setdefault(key, len(self._items))
            if at < len(self._items):
                self._items[at + 1] = value
                return
        self._items += (key, value)

    def get(self, key: str) -> Any:
        at = None if self._index is None else self._index.get(key)
        return None if at is None or self._items is None else self._items[at + 1]

    def __contains__(self, key: str) -> bool:
        return self._index is not None and key in self._index

    def __len__(self) -> int:
        return len(self._items or ()) // 2

    def pairs(self) -> list[tuple[Any, Any]]:
        items = self._items or []
        return list(zip(items[::2], items[1::2], strict=True))

    def __setstate__(self, state: object) -> None:
        """An OrderedDict's attributes (a state_dict's `_metadata`): not needed."""


class PickleSet(_Inert):
    """A pickled set or frozenset: its items in order, never hashed."""

    __slots__ = ("items", "kind")

    def __init__(self, kind: str, items: list[Any]) -> None:
        self.kind, self.items = kind, items


Impl = Callable[["RestrictedUnpickler", tuple[Any, ...]], Any]


class _Call(_Inert):
    """An allowed global as the pickle sees it: calling it runs merger's stand-in `impl` (charged)."""

    __slots__ = ("impl", "name", "owner")

    def __init__(self, owner: RestrictedUnpickler, name: str, impl: Impl) -> None:
        self.owner, self.name, self.impl = owner, name, impl

    def __call__(self, *args: Any) -> Any:
        self.owner.charge(1 + len(args))
        return self.impl(self.owner, args)


def _dtypes() -> dict[str, DType]:
    merged = {
        "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
        "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
        "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
    }  # fmt: skip
    sizes = {"complex32": 4, "complex64": 8, "complex128": 16, "bcomplex32": 4, "qint32": 4, "bits16": 2}
    for name in ("qint8", "quint8", "quint4x2", "quint2x4", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
                 "float4_e2m1fn_x2", "bits8", "bits1x8", "bits2x4", "bits4x2"):  # fmt: skip
        sizes[name] = 1
    sizes.update({f"{kind}int{n}": 1 for kind in ("", "u") for n in range(1, 8)})
    table = {name: DType(name, None, size) for name, size in sizes.items()}
    table.update({name: DType(name, code, DTYPE_SIZES[code]) for name, code in merged.items()})
    aliases = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
               "short": "int16", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32"}  # fmt: skip
    table.update({alias: table[name] for alias, name in aliases.items()})
    return table


#: torch dtype name -> its stand-in
DTYPES = _dtypes()
_STORAGES = {
    "Double": "float64", "Float": "float32", "Half": "float16", "Long": "int64", "Int": "int32", "Short": "int16",
    "Char": "int8", "Byte": "uint8", "Bool": "bool", "BFloat16": "bfloat16", "ComplexDouble": "complex128",
    "ComplexFloat": "complex64", "QInt8": "qint8", "QInt32": "qint32", "QUInt8": "quint8", "QUInt4x2": "quint4x2",
    "QUInt2x4": "quint2x4",
}  # fmt: skip
TENSOR_TYPE, PARAMETER_TYPE = Token("torch.Tensor"), Token("torch.nn.parameter.Parameter")

#: the constant globals a state dict may name -> their stand-ins
CONSTANTS: dict[str, object] = {f"torch.{name}": dtype for name, dtype in DTYPES.items()}
CONSTANTS.update({
    f"{module}.{kind}Storage": StorageType(f"{kind}Storage", DTYPES[dtype])
    for kind, dtype in _STORAGES.items() for module in ("torch", "torch.cuda")
})  # fmt: skip
for _full in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
    CONSTANTS[_full] = StorageType("UntypedStorage", DTYPES["uint8"])
CONSTANTS.update({"torch.Tensor": TENSOR_TYPE, "torch._tensor.Tensor": TENSOR_TYPE})
CONSTANTS.update({"torch.nn.parameter.Parameter": PARAMETER_TYPE, "torch.nn.Parameter": PARAMETER_TYPE})
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg", "torch.tensor": "torch._tensor"}

_SPARSE = ("a sparse tensor", "re-save dense weights: {k: t.to_dense() for k, t in sd.items()}")
_META = ("a meta tensor (a shape without data)", "load the real weights into the model, then save model.state_dict()")
_QUANTIZED = ("a quantized tensor", "re-save dequantized weights: {k: t.dequantize() for k, t in sd.items()}")
_NESTED = ("a nested tensor", "re-save each part as its own dense tensor (t.unbind())")
_DEVICE = ("a tensor without plain CPU storage (XLA, a DTensor, a fake tensor)", "re-save t.cpu() of real tensors")
#: globals only non-dense tensors use -> (what they make, how to re-save)
NOT_DENSE: dict[str, tuple[str, str]] = {
    "torch._utils._rebuild_sparse_tensor": _SPARSE, "torch._utils._rebuild_sparse_csr_tensor": _SPARSE,
    "torch._utils._rebuild_meta_tensor_no_storage": _META, "torch._utils._rebuild_qtensor": _QUANTIZED,
    "torch._utils._rebuild_nested_tensor": _NESTED, "torch.nested._internal.nested_tensor.NestedTensor": _NESTED,
    "torch.nested._internal.nested_tensor._rebuild_njt": _NESTED, "torch._utils._rebuild_wrapper_subclass": _DEVICE,
    "torch._utils._rebuild_device_tensor_from_numpy": _DEVICE, "torch._utils._rebuild_xla_tensor": _DEVICE,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _DEVICE, "torch._utils._rebuild_mlc_tensor": _DEVICE,
}  # fmt: skip
NOT_DENSE.update({f"torch.{q}": _QUANTIZED for q in ("per_tensor_affine", "per_tensor_symmetric",
                  "per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams")})  # fmt: skip
NOT_DENSE.update({f"torch.{lay}": _SPARSE for lay in ("sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                  "sparse_bsc", "_mkldnn")})  # fmt: skip


def _seq(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if type(value) not in (list, tuple):
        raise PickleCorrupt(f"{what} is a {type(value).__name__}, not a sequence")
    return cast("list[Any] | tuple[Any, ...]", value)


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < MAX_DIM:
        raise PickleCorrupt(f"{what} is not a count ({type(value).__name__})")
    return value


def _dims(u: RestrictedUnpickler, value: Any, what: str) -> tuple[int, ...]:
    items = _seq(value, what)
    if len(items) > MAX_DIMS:
        raise PickleCorrupt(f"{what} has {len(items)} dimensions")
    u.charge(len(items))
    return tuple(_count(d, what) for d in items)


def _tensor(u: RestrictedUnpickler, args: tuple[Any, ...], dtype: Any, metadata: Any) -> Tensor:
    storage, offset, size, stride = args[:4]
    if not isinstance(storage, StorageRef) or not isinstance(dtype, DType):
        raise PickleCorrupt(f"a tensor of a {type(storage).__name__} with a {type(dtype).__name__} dtype")
    shape, strides = _dims(u, size, "a tensor's shape"), _dims(u, stride, "a tensor's stride")
    if len(shape) != len(strides):
        raise PickleCorrupt("a tensor's shape and stride differ in length")
    if metadata is not None and not isinstance(metadata, PickleDict):
        raise PickleCorrupt(f"a tensor's metadata is a {type(metadata).__name__}")
    if metadata is not None and any(value is not False for _, value in metadata.pairs()):
        raise PickleRefused(
            "its pickle holds a tensor with a pending negation or conjugation (a lazy view), not plain data",
            "re-save the tensor resolved: t.resolve_neg().resolve_conj().clone()",
        )
    u.tensors += 1
    if u.tensors > MAX_TENSORS:
        raise PickleRefused(f"its pickle builds more than {MAX_TENSORS} tensors (MAX_TENSORS)", "split the checkpoint")
    return Tensor(storage, _count(offset, "a storage offset"), shape, strides, dtype)


def _rebuild_tensor(u: RestrictedUnpickler, args: tuple[Any, ...]) -> Tensor:
    """v1 (storage, offset, size, stride); v2 adds (requires_grad, hooks[, metadata]); dtype from the storage."""
    if len(args) not in (4, 6, 7):
        raise PickleCorrupt(f"_rebuild_tensor_v2 called with {len(args)} arguments")
    dtype = args[0].dtype if isinstance(args[0], StorageRef) else None
    return _tensor(u, args, dtype, args[6] if len(args) == 7 else None)


def _rebuild_tensor_v3(u: RestrictedUnpickler, args: tuple[Any, ...]) -> Tensor:
    """(untyped storage, offset, size, stride, requires_grad, hooks, dtype[, metadata]): float8, uint16..."""
    if len(args) not in (7, 8):
        raise PickleCorrupt(f"_rebuild_tensor_v3 called with {len(args)} arguments")
    return _tensor(u, args, args[6], args[7] if len(args) == 8 else None)


def _rebuild_parameter(u: RestrictedUnpickler, args: tuple[Any, ...]) -> Parameter:
    """(data, requires_grad, hooks[, state]): a Parameter is its data."""
    if len(args) not in (3, 4) or not isinstance(args[0], Tensor):
        raise PickleCorrupt("a Parameter without a tensor")
    data = args[0]
    return Parameter(data.storage, data.offset, data.shape, data.stride, data.dtype)


def _rebuild_from_type_v2(u: RestrictedUnpickler, args: tuple[Any, ...]) -> Tensor:
    """(rebuild function, type, its arguments, Python attributes): a tensor that has attributes."""
    if len(args) != 4 or not isinstance(args[0], _Call) or args[0].impl not in _TENSOR_REBUILDS:
        raise PickleCorrupt("_rebuild_from_type_v2 without a tensor rebuild function")
    if args[1] is not TENSOR_TYPE and args[1] is not PARAMETER_TYPE:
        raise PickleCorrupt("_rebuild_from_type_v2 of a type other than Tensor or Parameter")
    tensor = args[0](*_seq(args[2], "_rebuild_from_type_v2's arguments"))
    return tensor if args[1] is TENSOR_TYPE else _rebuild_parameter(u, (tensor, False, None))


_TENSOR_REBUILDS: tuple[Impl, ...] = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


def _mapping(kind: str) -> Impl:
    """OrderedDict() / OrderedDict(pairs) / Counter(dict): a new PickleDict, the source copied (charged)."""

    def build(u: RestrictedUnpickler, args: tuple[Any, ...]) -> PickleDict:
        made = PickleDict(kind)
        if len(args) > 1:
            raise PickleCorrupt(f"{kind} called with {len(args)} arguments")
        source = args[0] if args else ()
        pairs = source.pairs() if isinstance(source, PickleDict) else _seq(source, f"{kind}'s items")
        u.charge(PAIR_UNITS * len(pairs))
        for pair in pairs:
            key, value = _seq(pair, f"an item of {kind}")
            made.set(key, value)
        return made

    return build


def _collection(kind: str) -> Impl:
    def build(u: RestrictedUnpickler, args: tuple[Any, ...]) -> PickleSet:
        source = args[0] if len(args) == 1 else () if not args else None
        items = source.items if isinstance(source, PickleSet) else _seq(source, f"{kind}'s items")
        u.charge(len(items))
        return PickleSet(kind, list(items))

    return build


def _complex(u: RestrictedUnpickler, args: tuple[Any, ...]) -> complex:
    if len(args) > 2 or any(type(a) not in (int, float) for a in args):
        raise PickleCorrupt("complex() of something other than numbers")
    return complex(*args)


def _bytes(u: RestrictedUnpickler, args: tuple[Any, ...]) -> bytes:
    """bytes() (how protocol 2 pickles b'') or bytes(bytes); never bytes(n)."""
    if not args:
        return b""
    if len(args) != 1 or type(args[0]) not in (bytes, bytearray):
        raise PickleCorrupt("bytes() of something other than bytes")
    u.charge(len(args[0]))
    return bytes(args[0])


def _bytearray(u: RestrictedUnpickler, args: tuple[Any, ...]) -> bytearray:
    """bytearray(bytes) or bytearray(str, 'latin-1'); never bytearray(n), which would allocate n."""
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin-1", "latin1"):
        u.charge(len(args[0]))
        return bytearray(args[0], "latin-1")
    return bytearray(_bytes(u, args))


_ENCODINGS = {"latin1": "latin-1", "latin-1": "latin-1", "ascii": "ascii", "utf-8": "utf-8", "utf8": "utf-8"}


def _encode(u: RestrictedUnpickler, args: tuple[Any, ...]) -> bytes:
    """_codecs.encode(str, 'latin1'): how protocol 2 pickles bytes."""
    encoding = args[1] if len(args) == 2 else "utf-8"
    if not 1 <= len(args) <= 2 or type(args[0]) is not str or encoding not in _ENCODINGS:
        raise PickleCorrupt("_codecs.encode of something other than text in latin-1, ascii or utf-8")
    u.charge(len(args[0]))
    return str(args[0]).encode(_ENCODINGS[encoding])


def _size(u: RestrictedUnpickler, args: tuple[Any, ...]) -> tuple[int, ...]:
    return _dims(u, args[0] if len(args) == 1 else args, "a torch.Size")


def _named(kind: str) -> Impl:
    """torch.device('cuda', 0), torch.serialization._get_layout('torch.strided'): an inert token."""

    def build(u: RestrictedUnpickler, args: tuple[Any, ...]) -> Token:
        if not 1 <= len(args) <= 2 or any(type(a) not in (str, int) for a in args):
            raise PickleCorrupt(f"a {kind} of something other than a name")
        u.charge(sum(len(a) for a in args if type(a) is str))
        return Token(f"{kind}({', '.join(map(str, args))})")

    return build


#: the callable globals a state dict may name -> merger's stand-in for each
FUNCTIONS: dict[str, Impl] = {
    "collections.OrderedDict": _mapping("OrderedDict"),
    "collections.Counter": _mapping("Counter"),
    "builtins.set": _collection("set"),
    "builtins.frozenset": _collection("frozenset"),
    "builtins.complex": _complex,
    "builtins.bytes": _bytes,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _encode,
    "torch.Size": _size,
    "torch.device": _named("device"),
    "torch.serialization._get_layout": _named("layout"),
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
}

#: a protocol-0 persistent id is the repr of torch's tuple: parsed, never evaluated
_TEXT_PID = re.compile(r"\('storage', <class '([\w.]+)'>, '(\w+)', '([\w:]+)', (\d+)(, None)?\)")

#: (storage key, dtype of the storage, its size in elements, legacy view or None) -> the storage
StorageResolver = Callable[[str, DType, int, Any], StorageRef]


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...

    def readline(self) -> bytes: ...


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickles a torch pickle into stand-ins; storage ids go to `resolve`.

    With `resolve=None` neither globals nor persistent ids are allowed (the
    legacy format's header pickles). `work_limit` bounds containers and copies.
    """

    stack: list[Any]
    metastack: list[list[Any]]
    memo: dict[int, Any]
    read: Callable[[int], bytes]
    readline: Callable[[], bytes]
    append: Callable[[Any], None]

    def __init__(self, file: Readable, *, resolve: StorageResolver | None, work_limit: int) -> None:
        super().__init__(file, encoding="utf-8")
        self.resolve, self.work_limit, self.work, self.tensors = resolve, work_limit, 0, 0

    def charge(self, units: int) -> None:
        self.work += units
        if self.work > self.work_limit:
            raise PickleRefused(
                f"its pickle builds more than its size allows ({self.work_limit} units: containers, and copies"
                " made through memo references); a state dict's pickle needs a fraction of that",
                "re-save the weights: torch.save(model.state_dict(), 'weights.pth')",
            )

    def find_class(self, module: str, name: str) -> Any:
        full = f"{_MODULE_ALIASES.get(module, module)}.{name}"
        self.charge(1)
        named = shown(full if len(full) <= 200 else full[:200] + "...")
        if self.resolve is None:
            raise PickleCorrupt(f"a header pickle names '{named}'")
        if full in CONSTANTS:
            return CONSTANTS[full]
        if full in FUNCTIONS:
            return _Call(self, full, FUNCTIONS[full])
        if full in NOT_DENSE:
            kind, fix = NOT_DENSE[full]
            raise PickleRefused(f"its pickle holds {kind} ('{named}'); merger merges dense tensors", fix)
        raise PickleRefused(
            f"its pickle names the Python object '{named}', not only tensors and plain containers;"
            " loading it could run code, and merger never runs pickled code",
            "if you trust the file, re-save just the weights in Python:\n"
            "torch.save(model.state_dict(), 'weights.pth') or save_file(sd, 'weights.safetensors')",
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        if self.resolve is None:
            raise PickleCorrupt("a header pickle holds a persistent id")
        if type(pid) is str:
            found = _TEXT_PID.fullmatch(pid)
            if found is None:
                raise PickleCorrupt("a protocol-0 persistent id that is not torch's")
            kind, key, location, numel, view = found.groups()
            pid = ("storage", CONSTANTS.get(kind), key, location, int(numel), *((None,) if view else ()))
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise PickleCorrupt("a persistent id that is not torch's ('storage', ...)")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType) or type(key) is not str or type(location) not in (str, bytes):
            raise PickleCorrupt("a malformed storage id")
        self.charge(1 + len(key))
        return self.resolve(key, storage_type.dtype, _count(numel, "a storage size"), pid[5] if len(pid) == 6 else None)

    # --- opcodes whose stock versions hash, allocate or call what they should not ------------------------

    def _pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.metastack.pop()
        self.append = self.stack.append
        return items

    def _target(self, kind: type) -> Any:
        if type(self.stack[-1]) is not kind:
            raise PickleCorrupt(f"an item added to a {type(self.stack[-1]).__name__}")
        return self.stack[-1]

    def _fill(self, target: PickleDict, items: list[Any]) -> None:
        if len(items) % 2:
            raise PickleCorrupt("a dict item without a value")
        for i in range(0, len(items), 2):
            target.set(items[i], items[i + 1])

    def _new(self, made: Any) -> None:
        self.work += CONTAINER_UNITS
        if self.work > self.work_limit:
            self.charge(0)
        self.append(made)

    def _empty_dict(self) -> None:
        self._new(PickleDict("dict"))

    def _dict(self) -> None:
        items = self._pop_mark()
        self._new(PickleDict("dict"))
        self._fill(self.stack[-1], items)

    def _setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._target(PickleDict).set(key, value)

    def _setitems(self) -> None:
        items = self._pop_mark()
        self._fill(self._target(PickleDict), items)

    def _empty_set(self) -> None:
        self._new(PickleSet("set", []))

    def _additems(self) -> None:
        items = self._pop_mark()
        self._target(PickleSet).items.extend(items)

    def _frozenset(self) -> None:
        self._new(PickleSet("frozenset", self._pop_mark()))

    def _append_op(self) -> None:
        value = self.stack.pop()
        self._target(list).append(value)

    def _appends(self) -> None:
        items = self._pop_mark()
        self._target(list).extend(items)

    def _build(self) -> None:
        state = self.stack.pop()
        if not isinstance(self.stack[-1], (_Inert, PickleDict)):
            raise PickleCorrupt(f"a BUILD of a {type(self.stack[-1]).__name__}")
        self.stack[-1].__setstate__(state)

    def _reduce(self) -> None:
        args = self.stack.pop()
        if type(self.stack[-1]) is not _Call or type(args) is not tuple:
            raise PickleCorrupt(f"a call of a {type(self.stack[-1]).__name__}")
        self.stack[-1] = self.stack[-1](*args)

    def _put(self) -> None:
        index = int(self.readline()[:-1])
        if not 0 <= index < 1 << 32:
            raise PickleCorrupt("a memo index out of range")
        self.charge(CONTAINER_UNITS)
        self.memo[index] = self.stack[-1]

    def _bytearray8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        data = self.read(length) if length <= self.work_limit else b""
        if len(data) != length:
            raise PickleCorrupt("a bytearray longer than the pickle")
        self._new(bytearray(data))

    def _refused_opcode(self) -> None:
        raise PickleCorrupt(
            "an opcode that builds arbitrary objects (NEWOBJ, INST, OBJ, EXT), which torch never writes"
        )


def _charged(stock: Callable[[Any], None]) -> Callable[[Any], None]:
    def handler(u: RestrictedUnpickler) -> None:
        u.work += CONTAINER_UNITS
        if u.work > u.work_limit:
            u.charge(0)
        stock(u)

    return handler


class _Dispatch(dict[int, Callable[[Any], None]]):
    def __missing__(self, opcode: int) -> Callable[[Any], None]:
        raise PickleCorrupt(f"unknown pickle opcode 0x{opcode:02x}")


def _dispatch() -> _Dispatch:
    stock = cast("dict[int, Callable[[Any], None]]", pickle._Unpickler.dispatch)
    table = _Dispatch(stock)
    for opcode in (pickle.MARK, pickle.EMPTY_LIST, pickle.LIST, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2,
                   pickle.TUPLE3, pickle.MEMOIZE, pickle.BINPUT, pickle.LONG_BINPUT):  # fmt: skip
        table[opcode[0]] = _charged(stock[opcode[0]])
    u = RestrictedUnpickler
    overrides: dict[bytes, Callable[[Any], None]] = {
        pickle.EMPTY_DICT: u._empty_dict, pickle.DICT: u._dict, pickle.SETITEM: u._setitem,
        pickle.SETITEMS: u._setitems, pickle.EMPTY_SET: u._empty_set, pickle.ADDITEMS: u._additems,
        pickle.FROZENSET: u._frozenset, pickle.APPEND: u._append_op, pickle.APPENDS: u._appends,
        pickle.BUILD: u._build, pickle.REDUCE: u._reduce, pickle.PUT: u._put, pickle.BYTEARRAY8: u._bytearray8,
    }  # fmt: skip
    for opcode in (pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        overrides[opcode] = u._refused_opcode
    table.update({opcode[0]: handler for opcode, handler in overrides.items()})
    return table


RestrictedUnpickler.dispatch = cast("dict[int, Callable[[pickle.Unpickler], None]]", _dispatch())
