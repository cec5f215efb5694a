"""Knowledge of architectures, from state dicts' specs alone (keys, shapes, dtypes; no tensor read).

- `image_model(spec)`: the image model (super-resolution, restoration) a spec
  is, as spandrel knows it: architecture, scale, channels, hyper-parameters
  (merger.archs.image_models; without spandrel, only ESRGAN, by merger's own
  rules). The one place the planner, previews, placement and `merger-inspect`
  ask. `image_mismatch` says in words how image models differ
  (merger.archs.image_compat).
  What spandrel found is remembered between runs in a `DetectionStore` (the
  cache's source memo; merger.archs.detection), so a re-run does not import
  spandrel and torch to detect an architecture again.
- ESRGAN (RRDBNet) layouts and scales (merger.archs.esrgan); `describe` names
  an ESRGAN for `merger-inspect` and messages.
- Language models' token embeddings and LM heads (merger.archs.embeddings).
- `align_layouts`: inputs that are one network under other key names (ESRGAN's
  old/new/basicsr layouts; a `module.` or `netG.` prefix on every key, which
  spandrel strips too) are presented to a node in the first input's names.

May import: merger.core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from merger.archs import esrgan
from merger.archs.detection import Detection, DetectionStore, ImageModel
from merger.archs.image_compat import ImageMismatch, image_mismatch
from merger.archs.image_models import (
    SPANDREL_MISSING,
    detect,
    image_model,
    is_image_model,
    spandrel_available,
    wrapping_prefix,
)
from merger.core.specs import TensorSpec

__all__ = [
    "SPANDREL_MISSING",
    "Adaptation",
    "Detection",
    "DetectionStore",
    "ImageMismatch",
    "ImageModel",
    "align_layouts",
    "describe",
    "detect",
    "image_mismatch",
    "image_model",
    "is_image_model",
    "spandrel_available",
]


def describe(spec: Mapping[str, TensorSpec]) -> str | None:
    """A one-line description of an ESRGAN merger knows by its own rules, or None."""
    found = esrgan.detect(spec)
    return found.describe() if found else None


@dataclass(frozen=True)
class Adaptation:
    """How one input is presented to a node: its keys renamed (source key -> node key)."""

    tag: str  # what was done, for the node's content key, e.g. "esrgan-layout:old"
    rename: Mapping[str, str]


def align_layouts(specs: Sequence[Mapping[str, TensorSpec]]) -> list[Adaptation | None]:
    """For each input, the renaming that brings it to the first input's layout (None: as is).

    ESRGAN models in the old, new and basicsr layouts are the same network under
    other names, and so is a state dict whose every key has a `module.` or `netG.`
    prefix; a merge of models in mixed layouts merges them in the first one's.
    """
    result: list[Adaptation | None] = [None] * len(specs)
    if not specs:
        return result
    prefixes = [wrapping_prefix(spec) for spec in specs]
    bare = [
        {key[len(p) :]: t for key, t in spec.items()} if p else spec for spec, p in zip(specs, prefixes, strict=True)
    ]
    first = esrgan.detect(bare[0])
    for i in range(1, len(specs)):
        other = esrgan.detect(bare[i]) if first is not None else None
        relayout = first is not None and other is not None and other.layout != first.layout
        if not relayout and prefixes[i] == prefixes[0]:
            continue
        inner = other.rename(first.layout) if relayout and other and first else {k: k for k in bare[i]}
        rename = {prefixes[i] + key: prefixes[0] + name for key, name in inner.items()}
        if not relayout and not any(name in specs[0] for name in rename.values()):
            continue  # not the first one's network under a prefix: left as it is
        tags = [f"esrgan-layout:{first.layout}"] if relayout and first else []
        if prefixes[i] != prefixes[0]:
            tags.append(f"prefix:{prefixes[i] or '-'}->{prefixes[0] or '-'}")
        result[i] = Adaptation("+".join(tags), rename)
    return result
