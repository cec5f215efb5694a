"""Whether image models can be merged key by key, said in words.

A merge of image models means something only between models of one
architecture and one size (fine-tunes of one parent): `image_mismatch` names
the first input that differs from the first one, and how: another architecture
(or not an image model at all), other sizes ("'a' is Compact (SRVGGNetCompact)
with num_conv 32, 'b' is ... with num_conv 16"), or only another scale or
upsampler, the one case where the trunk is shared (`kind` "scale").

May import: merger.core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from merger.archs.detection import CHANNEL_NAMES, SCALE_NAMES, Detection, ImageModel, plain_text

#: hyper-parameters of the upsampler (the head): models that differ only in these and the scale share a trunk
HEAD_NAMES = SCALE_NAMES | {"scale", "upsampler", "upsampler_type", "upsample_mode", "upsample_dim"}


@dataclass(frozen=True)
class ImageMismatch:
    """How input `index` differs from the first: `kind` architecture | size | scale, in words (`what`)."""

    kind: Literal["architecture", "size", "scale"]
    index: int
    what: str
    first: ImageModel | None
    other: ImageModel | None


def short(model: ImageModel) -> str:
    """'Compact (SRVGGNetCompact)', 'SPAN'."""
    return model.arch if model.model_class == model.arch else f"{model.arch} ({model.model_class})"


def differences(a: ImageModel, b: ImageModel) -> list[tuple[str, str, str]]:
    """(what, a's, b's) for each size in which two models of one architecture differ: the scale and
    channels first, then spandrel's hyper-parameters (those both have, not the training-only ones)."""
    if not (a.resolved and b.resolved):
        return []
    rows: list[tuple[str, str, str]] = []
    skip: set[str] = set()
    if a.scale != b.scale:
        rows.append(("scale", f"{a.scale}x", f"{b.scale}x"))
        skip |= SCALE_NAMES
    if (a.in_channels, a.out_channels) != (b.in_channels, b.out_channels):
        rows.append(("channels", f"{a.in_channels}->{a.out_channels}", f"{b.in_channels}->{b.out_channels}"))
        skip |= CHANNEL_NAMES
    sizes_a, sizes_b = a.sizes, b.sizes
    for name, value in sizes_a.items():
        if name in sizes_b and sizes_b[name] != value and name not in skip:
            rows.append((name, plain_text(value), plain_text(sizes_b[name])))
    if not sizes_a and not sizes_b and a.tags != b.tags:  # a model class that keeps no hyper-parameters
        rows.append(("tags", " ".join(a.tags), " ".join(b.tags)))
    return rows


def image_mismatch(names: Sequence[str], found: Sequence[Detection]) -> ImageMismatch | None:
    """The first input that is not the first one's image model, or None (also when none of them is an
    image model, or when their sizes need tensor values that were not read)."""
    if len(found) < 2 or all(d.model is None for d in found):
        return None
    first = found[0].model
    for index, detection in enumerate(found[1:], start=1):
        other = detection.model
        if first is None or other is None:
            what = ", ".join(
                f"'{names[i]}' is {short(d.model)}"
                if d.model
                else f"'{names[i]}' is not an image model spandrel knows ({d.why})"
                for i, d in ((0, found[0]), (index, detection))
            )
            return ImageMismatch("architecture", index, what, first, other)
        if first.arch != other.arch:
            what = f"'{names[0]}' is {short(first)}, '{names[index]}' is {short(other)}: different architectures"
            return ImageMismatch("architecture", index, what, first, other)
        rows = differences(first, other)
        if rows:
            mine = ", ".join(f"{n} {a}" for n, a, _ in rows)
            theirs = ", ".join(f"{n} {b}" for n, _, b in rows)
            kind: Literal["size", "scale"] = "scale" if all(n in HEAD_NAMES for n, _, _ in rows) else "size"
            what = f"'{names[0]}' is {short(first)} with {mine}, '{names[index]}' is {short(other)} with {theirs}"
            return ImageMismatch(kind, index, what, first, other)
    return None
