"""Pre-flight checks of merges of image models, from specs alone (merger.archs.image_models).

- A merge node (an op with the family check, or one that aligns keys) whose
  image-model inputs differ in architecture or size fails with both named in
  words, and the fix that fits: `convert_scale` for ESRGANs of two scales,
  `keys: intersection` only where the inputs share a trunk (another scale or
  upsampler) and it merges most of the parameters; nothing about it when the
  architectures differ.
- A merge node that merges no key (the output would be a copy of its first
  input), or that leaves more than half of an image model's parameters
  unmerged (`keys: intersection` between models that do not share a trunk),
  fails and says so.

Nothing is read, but for the few spandrel architectures whose sizes are tensor
values (DAT, FDAT, MoESR, IPT: read from a source of at most
merger.archs.image_models.VALUE_READ_BYTES).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from merger.archs import SPANDREL_MISSING, Detection, DetectionStore, ImageMismatch, detect, image_mismatch
from merger.core.specs import TensorSpec, spec_differences
from merger.engine.catalog import SourceHandle
from merger.errors import MergerError
from merger.ops.base import AnyOp
from merger.ops.elementwise import AlignedOp, MergeParams, key_filter, mergeable
from merger.ops.params import OpParams

#: a plan warning, given once, when merge inputs may be image models merger cannot tell apart
SPANDREL_NOTE = (
    "spandrel is not installed (pip install 'merger[sr]'): merger knows ESRGAN only, so merges of other"
    " image models are checked key by key, not by architecture"
)


def merges(op: AnyOp, n_inputs: int) -> bool:
    """Whether a node merges its inputs key by key (and so they must be one architecture)."""
    return n_inputs >= 2 and (op.family_check or isinstance(op, AlignedOp))


def detections(
    handles: Sequence[SourceHandle | None], specs: Sequence[dict[str, TensorSpec]], store: DetectionStore | None = None
) -> list[Detection]:
    """What each input is; a source's reader is handed on for the architectures whose sizes are values.
    `store` (the cache's source memo) remembers what spandrel found, for the next run."""
    return [
        detect(spec, read=h.peek_into, identity=h.identity, store=store) if h is not None else detect(spec, store=store)
        for h, spec in zip(handles, specs, strict=True)
    ]


def image_error(
    node: str,
    names: Sequence[str],
    found: Sequence[Detection],
    specs: Sequence[dict[str, TensorSpec]],
    params: OpParams,
) -> MergerError | None:
    """The inputs are not one image model (None: they are, none is one, or only the scale differs under
    `keys: intersection`, which `coverage_error` then checks)."""
    mismatch = image_mismatch(names, found)
    if mismatch is None:
        return None
    if mismatch.kind != "architecture" and isinstance(params, MergeParams):
        if mismatch.kind == "scale" and params.keys == "intersection":
            return None
        if (params.include or params.exclude) and _selection_agrees(names, specs, params):
            return None  # include/exclude picks a part the inputs share: the coverage check follows
    return MergerError(
        f"the inputs are not one image model: {mismatch.what}",
        fix=_fix(node, names, mismatch, specs, params),
    )


def _fix(
    node: str, names: Sequence[str], mismatch: ImageMismatch, specs: Sequence[dict[str, TensorSpec]], params: OpParams
) -> str:
    first, other = names[0], names[mismatch.index]
    if mismatch.kind == "architecture":
        return (
            "merge models of one architecture: a key-by-key merge of different networks means nothing"
            " (merger-inspect FILE names a model's architecture)"
        )
    if mismatch.kind == "size":
        return (
            "merge models of one architecture and size, such as fine-tunes of one parent"
            " (merger-inspect FILE shows a model's hyper-parameters)"
        )
    shared = _merged_share(specs, params)
    percent = math.floor(shared * 100)  # never "100%" when a stage is not shared
    intersection = (
        f"set `keys: intersection` on node '{node}': the trunk both share ({percent}% of the parameters) is"
        f" merged, the upsampler taken from '{first}'"
    )
    if mismatch.first is not None and mismatch.first.arch == "ESRGAN" and mismatch.first.scale:
        scale = mismatch.first.scale
        convert = (
            f"convert '{other}' to {scale}x first, with a node {{op: convert_scale, inputs: [{other}], scale: {scale}}}"
            " merged in its place"
        )
        return f"{convert}; or {intersection}" if shared >= 0.5 else convert
    if shared >= 0.5:
        return intersection
    return "merge models of one scale"


def _selection_agrees(names: Sequence[str], specs: Sequence[dict[str, TensorSpec]], params: MergeParams) -> bool:
    selected = key_filter(params)
    return not spec_differences(names, [{k: t for k, t in spec.items() if selected(k)} for spec in specs])


def _float_keys(spec: dict[str, TensorSpec], params: OpParams) -> list[str]:
    selected = key_filter(params) if isinstance(params, MergeParams) else (lambda key: True)
    return [k for k, t in spec.items() if t.is_float and selected(k)]


def _merged_share(specs: Sequence[dict[str, TensorSpec]], params: OpParams) -> float:
    """The share of the first input's (selected) float parameters that every input has with one shape."""
    keys = _float_keys(specs[0], params)
    total = sum(specs[0][k].numel for k in keys)
    merged = sum(specs[0][k].numel for k in keys if mergeable(k, specs))
    return merged / total if total else 1.0


def coverage_error(
    names: Sequence[str], found: Sequence[Detection], specs: Sequence[dict[str, TensorSpec]], params: OpParams
) -> MergerError | None:
    """The node merges no key, or (for an image model) leaves more than half of its parameters unmerged."""
    if not isinstance(params, MergeParams):
        return None
    keys = _float_keys(specs[0], params)
    if not keys:
        return None
    if found[0].model is None and any(mergeable(k, specs) for k in keys):
        return None  # not an image model, and it merges a key: nothing to say (without a pass over every key)
    merged = [k for k in keys if mergeable(k, specs)]
    mismatch = image_mismatch(names, found)
    differ = f" ({mismatch.what})" if mismatch else ""
    if not merged:
        return MergerError(
            f"the node merges no key: none of the {len(keys)} float tensors of '{names[0]}' is in every input"
            f" with one shape{differ}, so its output would be a copy of '{names[0]}'",
            fix="merge models of one architecture and size (merger-inspect A B lists how they differ)",
        )
    if found[0].model is None:
        return None
    total = sum(specs[0][k].numel for k in keys)
    unmerged = total - sum(specs[0][k].numel for k in merged)
    if 2 * unmerged <= total:
        return None
    return MergerError(
        f"the node leaves {unmerged:,} of the {total:,} parameters of '{names[0]}' ({unmerged / total:.0%})"
        f" unmerged: only {len(merged)} of its {len(keys)} float tensors are in every input with one shape{differ}",
        fix="merge models of one architecture and size; `keys: intersection` is for models that share a trunk"
        " and differ in the upsampler",
    )


def spandrel_note(found: Sequence[Detection]) -> bool:
    """Whether merger could not tell these inputs' architectures for want of spandrel."""
    return any(d.model is None and d.why == SPANDREL_MISSING for d in found)
