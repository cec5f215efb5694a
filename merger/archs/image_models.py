"""Image models (super-resolution, restoration) as spandrel knows them, from a spec alone.

`image_model(spec)` names the spandrel architecture a state dict's spec is (id,
name, model class), its scale, input and output channels, and the
hyper-parameters spandrel reads from it (plain JSON values). The planner,
previews, placement and `merger-inspect` all ask here. How, without reading a
tensor:

1. A filter that imports nothing: a spec is not an image model when it has no
   4-D float tensor, more than MAX_IMAGE_MODEL_TENSORS tensors, more than
   MAX_IMAGE_MODEL_BYTES bytes, or (for the spandrel version of the table) none
   of the keys spandrel's detection needs (merger.archs.spandrel_keys). So the
   plan of a language model never imports spandrel.
2. spandrel detects the architecture from key names, and its loader reads the
   hyper-parameters from shapes: it is handed tensors with shapes and no data
   (meta tensors whose copy into a model does nothing), the model built on the
   meta device (no memory) or, when a constructor needs real numbers (the
   drop-path schedules of Swin-like models), on the CPU.
3. A few loaders read tensor values (spandrel 0.4.2: DAT's `rpe_biases`, FDAT's
   and MoESR's `MetaUpsample`, IPT's `sub_mean.bias`). Reading one from a
   shape-only tensor fails; then the real tensors are read, only when a reader
   is given and the model holds at most VALUE_READ_BYTES. Otherwise the
   architecture is known and its hyper-parameters are not (`resolved` False).

Without spandrel (the `merger[sr]` extra), ESRGAN is still known by merger's own
key rules (merger.archs.esrgan); other image models are unknown. A `module.` or
`netG.` prefix on every key is stripped first, as spandrel does. Results are
memoised per process by a digest of the keys and shapes (and of the source's
identity where values were read), and between runs in a `DetectionStore` given to `detect` (the
cache's source memo: merger.archs.detection); spandrel's warnings and prints are kept quiet.

May import: merger.core.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from merger.archs import esrgan, spandrel_keys
from merger.archs.detection import (
    Detection,
    DetectionStore,
    ImageModel,
    detection_data,
    detection_from_data,
    plain,
)
from merger.core.specs import TensorSpec, total_bytes

#: a spec with more tensors than this is not taken for an image model (the largest spandrel models have ~3000)
MAX_IMAGE_MODEL_TENSORS = 20_000
#: nor one larger than this (HAT-L, DAT, DRCT-L hold 40-200 MB in float32)
MAX_IMAGE_MODEL_BYTES = 1 << 30
#: a model whose loader needs tensor values is read whole only up to this size
VALUE_READ_BYTES = 256 << 20
#: prefixes spandrel strips when every key has one (DataParallel, BasicSR's generator)
PREFIXES = ("module.", "netG.")
#: bump when what `detect` answers for a spec changes (its rules, or the data merger.archs.detection writes):
#: detections remembered in a store (the cache) under another version are not used
DETECTION_VERSION = 1
SPANDREL_MISSING = "spandrel is not installed (pip install 'merger[sr]'), so only ESRGAN is known"

#: reads bytes [start, stop) of tensor `key` into `out` (a source's `read_into` / `peek_into`)
ReadInto = Callable[[str, int, int, memoryview], memoryview]


def image_model(
    spec: Mapping[str, TensorSpec],
    *,
    read: ReadInto | None = None,
    identity: str | None = None,
    store: DetectionStore | None = None,
) -> ImageModel | None:
    """The image model a spec is, or None (see `detect` for why)."""
    return detect(spec, read=read, identity=identity, store=store).model


def is_image_model(spec: Mapping[str, TensorSpec]) -> bool:
    return detect(spec).model is not None


@functools.cache
def spandrel_available() -> bool:
    return importlib.util.find_spec("spandrel") is not None


@functools.cache
def _spandrel_version() -> str:
    import importlib.metadata  # its import (email, zipfile) is not paid by runs that detect no image model

    try:
        return importlib.metadata.version("spandrel")
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def _anchors_apply() -> bool:
    """Whether `spandrel_keys.ANCHORS` describes the installed spandrel."""
    return _spandrel_version() == spandrel_keys.SPANDREL_VERSION


def wrapping_prefix(spec: Mapping[str, TensorSpec]) -> str:
    """The prefix every key has ('module.', 'netG.', both, or ''), as spandrel strips them, in order."""
    found = ""
    for prefix in PREFIXES:
        if spec and all(key.startswith(found + prefix) for key in spec):
            found += prefix
    return found


def canonical(spec: Mapping[str, TensorSpec]) -> Mapping[str, TensorSpec]:
    """The spec with the prefix every key has stripped (`wrapping_prefix`)."""
    prefix = wrapping_prefix(spec)
    return {k[len(prefix) :]: t for k, t in spec.items()} if prefix else spec


def prefilter(spec: Mapping[str, TensorSpec]) -> str | None:
    """Why a spec cannot be an image model spandrel detects, from what needs no import; None: it may be."""
    if len(spec) > MAX_IMAGE_MODEL_TENSORS:
        return f"it has {len(spec)} tensors, more than an image model has ({MAX_IMAGE_MODEL_TENSORS})"
    if not any(t.is_float and len(t.shape) == 4 for t in spec.values()):
        return "it has no 4-D float tensor (no convolution)"
    if total_bytes(spec) > MAX_IMAGE_MODEL_BYTES:
        return f"it holds more than {MAX_IMAGE_MODEL_BYTES >> 20} MiB, more than an image model does"
    if spandrel_available() and _anchors_apply() and not spandrel_keys.may_be_detected(canonical(spec)):
        return "spandrel detects no architecture in its keys"
    return None


_MEMO: dict[tuple[str, str | None], Detection] = {}
_MEMO_SIZE = 512
_LOCK = threading.Lock()


def spec_digest(spec: Mapping[str, TensorSpec]) -> str:
    rows = sorted((k, list(t.shape), t.is_float) for k, t in spec.items())
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def detect(
    spec: Mapping[str, TensorSpec],
    *,
    read: ReadInto | None = None,
    identity: str | None = None,
    store: DetectionStore | None = None,
) -> Detection:
    """What `spec` is. `read` (with the source's `identity`, for the memo) lets a loader that needs
    tensor values have them, for a model of at most VALUE_READ_BYTES; nothing else is ever read.
    `store` remembers spandrel's answers between runs (`store_key`), so that a later run (a cache
    hit above all) neither asks spandrel again nor imports torch."""
    why = prefilter(spec)
    if why is not None:
        return _fallback(spec, why)
    if not spandrel_available():
        return _fallback(spec, SPANDREL_MISSING)
    digest = spec_digest(spec)
    with _LOCK:
        found = _recalled((digest, None), store)
        if found is None:
            try:
                found = _remember((digest, None), _run_spandrel(canonical(spec), None), store)
            except ImportError as e:  # a broken install: as if it were not there
                return _fallback(spec, f"spandrel cannot be imported ({e})")
        if found.needs_values and read is not None and total_bytes(spec) <= VALUE_READ_BYTES:
            found = _recalled((digest, identity), store) if identity is not None else None
            if found is None:
                found = _run_spandrel(canonical(spec), _reader_of(spec, read, wrapping_prefix(spec)))
                if identity is not None:  # a read that failed is not remembered past this run
                    _remember((digest, identity), found, store if found.model is not None else None)
    return found if found.model is not None else _fallback(spec, found.why)


def store_key(digest: str, identity: str | None) -> str:
    """Where a store keeps the detection of a spec (by its digest; with the source's `identity` where
    tensor values were read): a digest that changes with spandrel's version and DETECTION_VERSION."""
    data = {"detector": DETECTION_VERSION, "spandrel": _spandrel_version(), "spec": digest, "values_of": identity}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _recalled(key: tuple[str, str | None], store: DetectionStore | None) -> Detection | None:
    """A detection made before: in the store (then remembered in this process too), else in this
    process (then put in the store, which may be another run's: a sweep's job after its pre-flight)."""
    if store is None:
        return _MEMO.get(key)
    found = detection_from_data(store.get_detection(store_key(*key)))
    if found is not None:
        return _remember(key, found, None)
    found = _MEMO.get(key)
    return _remember(key, found, store) if found is not None else None


def _remember(key: tuple[str, str | None], found: Detection, store: DetectionStore | None) -> Detection:
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = found
    if store is not None:
        store.put_detection(store_key(*key), detection_data(found))
    return found


def _fallback(spec: Mapping[str, TensorSpec], why: str) -> Detection:
    """ESRGAN by merger's own key rules (without spandrel, or where spandrel fails), else why not."""
    found = esrgan.detect(canonical(spec))
    if found is None:
        return Detection(None, why)
    return Detection(
        ImageModel(
            "ESRGAN",
            "ESRGAN",
            "RRDBNet",
            found.scale,
            found.in_channels,
            found.out_channels,
            {
                "in_nc": found.in_channels,
                "out_nc": found.out_channels,
                "num_filters": found.filters,
                "num_blocks": found.blocks,
                "scale": found.scale,
                "plus": found.plus,
                "shuffle_factor": found.shuffle if found.shuffle > 1 else None,
            },
            purpose="SR" if found.scale > 1 else "Restoration",
            by="merger",
        )
    )


def _reader_of(spec: Mapping[str, TensorSpec], read: ReadInto, prefix: str) -> Callable[[str], Any]:
    """The real tensor of a (canonical) key, read whole."""

    def tensor(canonical_key: str) -> Any:
        from merger.core.tensor_bytes import tensor_from_buffer

        key = prefix + canonical_key
        t = spec[key]
        buffer = bytearray(t.nbytes)
        view = read(key, 0, t.nbytes, memoryview(buffer))
        data = buffer if view.obj is buffer and view.nbytes == t.nbytes else bytearray(view)
        return tensor_from_buffer(data, t.dtype, t.shape)

    return tensor


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """spandrel's (and torch's) warnings and prints, kept out of merger's output."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _reads_values(error: BaseException) -> bool:
    """Whether a loader failed because it read a value from a shape-only (meta) tensor."""
    return "meta" in str(error)


def _run_spandrel(spec: Mapping[str, TensorSpec], values: Callable[[str], Any] | None) -> Detection:
    """spandrel's detection and loader, on shape-only tensors (or, with `values`, the real ones)."""
    with _quiet():
        import torch
        from spandrel import MAIN_REGISTRY

        if values is None:
            shape_only = _shape_only_type()
            base = {k: shape_only.of(t.shape, _torch_dtype(t.dtype)) for k, t in spec.items()}
        else:
            try:
                base = {k: values(k) for k in spec}
            except Exception as e:  # a damaged file: the plan's own reads will say so
                return Detection(None, f"its tensors could not be read ({type(e).__name__}: {e})")
        support = next((s for s in MAIN_REGISTRY.architectures("detection") if s.detect(base)), None)
        if support is None:
            return Detection(None, "spandrel detects no architecture in its keys")
        arch = support.architecture
        descriptor = None
        if values is None:  # the meta device first: no memory, no time (convolutional nets)
            with contextlib.suppress(Exception), torch.device("meta"):
                descriptor = arch.load(dict(base))
        if descriptor is None:  # on the CPU: constructors that compute numbers (Swin-like)
            try:
                descriptor = arch.load(dict(base))
            except Exception as e:
                if values is None and _reads_values(e):
                    note = (
                        "its sizes are read from tensor values, which were not read"
                        f" (they are from a source of at most {VALUE_READ_BYTES >> 20} MiB)"
                    )
                    model = ImageModel(arch.id, arch.name, arch.id, None, None, None, resolved=False, note=note)
                    return Detection(model, needs_values=True)
                return Detection(None, f"spandrel takes it for {arch.id} but cannot load it ({type(e).__name__}: {e})")
    hyper = getattr(descriptor.model, "hyperparameters", None) or {}
    return Detection(
        ImageModel(
            arch.id,
            arch.name,
            type(descriptor.model).__name__,
            int(descriptor.scale),
            int(descriptor.input_channels),
            int(descriptor.output_channels),
            {str(k): plain(v) for k, v in hyper.items()},
            purpose=str(descriptor.purpose),
            tags=tuple(str(t) for t in descriptor.tags),
            min_size=int(descriptor.size_requirements.minimum),
        ),
        needs_values=values is not None,
    )


def _torch_dtype(code: str) -> Any:
    from merger.core.tensor_bytes import TORCH_DTYPES

    return TORCH_DTYPES[code]


@functools.cache
def _shape_only_type() -> Any:
    """A tensor type with a shape and a dtype and no data: a meta tensor whose copy into a
    model's parameter does nothing (so a model loads it); reading a value from it fails."""
    import torch

    class ShapeOnly(torch.Tensor):
        @staticmethod
        def of(shape: tuple[int, ...], dtype: Any) -> Any:
            return torch.Tensor._make_subclass(ShapeOnly, torch.empty(shape, dtype=dtype, device="meta"))

        @classmethod
        def __torch_function__(
            cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            if func is torch.Tensor.copy_:
                return args[0]
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    return ShapeOnly
