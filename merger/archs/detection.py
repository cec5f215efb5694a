"""What an image-model detection found (merger.archs.image_models), as values and as plain JSON data.

`ImageModel` and `Detection` are what `detect` answers; `detection_data` and `detection_from_data`
write them as JSON data and read them back, so that a detection spandrel made once is remembered
(`DetectionStore`: the cache's source memo) and a later run, a cache hit above all, neither asks
spandrel again nor imports torch. Data that is not exactly what `detection_data` writes reads as None.

May import: merger.core.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

#: spandrel's hyper-parameters that only matter for training (not compared, not shown)
TRAINING_ONLY = frozenset(
    {"drop_rate", "attn_drop_rate", "drop_path_rate", "dropout", "use_checkpoint", "use_chk", "fairscale_checkpoint"}
)
#: names spandrel's model classes give the scale and the image channels (shown once, up front)
SCALE_NAMES = frozenset({"scale", "upscale", "up_scale", "upscale_factor", "upscaling_factor", "shuffle_factor"})
CHANNEL_NAMES = frozenset(
    {"in_nc", "out_nc", "num_in_ch", "num_out_ch", "in_chans", "out_chans", "in_ch", "out_ch", "inp_channels"}
    | {"in_channels", "out_channels"}
)


class DetectionStore(Protocol):
    """Where detections are remembered between runs, by a key `detect` makes (merger.cache.memo)."""

    def get_detection(self, key: str) -> Any: ...

    def put_detection(self, key: str, data: Any) -> None: ...


@dataclass(frozen=True)
class ImageModel:
    """An image model: spandrel's architecture id and name, the model class, what it does, and the
    sizes spandrel reads (`resolved` False: the architecture alone, its sizes need tensor values)."""

    arch: str  # spandrel's id, e.g. "Compact"
    name: str  # spandrel's name, e.g. "RealESRGAN Compact"
    model_class: str  # e.g. "SRVGGNetCompact"
    scale: int | None
    in_channels: int | None
    out_channels: int | None
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # plain JSON values
    purpose: str = "SR"  # SR | FaceSR | Restoration | Inpainting
    tags: tuple[str, ...] = ()
    resolved: bool = True
    note: str = ""  # why not resolved
    by: str = "spandrel"  # who detected it: spandrel, or merger's own ESRGAN rules
    min_size: int = 0  # spandrel's size_requirements.minimum: the shortest side an input has unpadded

    @property
    def label(self) -> str:
        """'SRVGGNetCompact (Compact, RealESRGAN Compact)', 'SPAN'."""
        others = [n for n in dict.fromkeys((self.arch, self.name)) if n != self.model_class]
        return f"{self.model_class} ({', '.join(others)})" if others else self.model_class

    @property
    def sizes(self) -> dict[str, Any]:
        """The hyper-parameters that tell models of the architecture apart (not the training-only ones)."""
        return {k: v for k, v in self.hyperparameters.items() if k not in TRAINING_ONLY}

    def describe(self) -> str:
        """'SRVGGNetCompact (Compact, RealESRGAN Compact): 4x, 3->3 channels, num_feat 64, num_conv 32, ...'"""
        if not self.resolved:
            return f"{self.label}: {self.note}"
        shown = [f"{k} {plain_text(v)}" for k, v in self.sizes.items() if k not in SCALE_NAMES | CHANNEL_NAMES]
        head = f"{self.scale}x, {self.in_channels}->{self.out_channels} channels"
        purpose = f" ({self.purpose})" if self.purpose not in ("SR", "Restoration") else ""
        return f"{self.label}: {head}{purpose}" + "".join(f", {s}" for s in shown)


@dataclass(frozen=True)
class Detection:
    """What a spec is: an image model, or None and why not."""

    model: ImageModel | None
    why: str = ""
    needs_values: bool = False  # spandrel's loader for this architecture reads tensor values


def plain_text(value: Any) -> str:
    """A hyper-parameter in words: 64, [6, 6], pixelshuffle, true, none."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value).replace("null", "none")
    return str(value) if not isinstance(value, list | dict) else json.dumps(value).replace('"', "")


def plain(value: Any) -> Any:
    """A hyper-parameter as a plain JSON value (tuples as lists, classes by name)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, type):
        return value.__name__
    return str(value)


_MODEL_FIELDS: dict[str, tuple[type, ...]] = {
    "arch": (str,),
    "name": (str,),
    "model_class": (str,),
    "scale": (int, type(None)),
    "in_channels": (int, type(None)),
    "out_channels": (int, type(None)),
    "hyperparameters": (dict,),
    "purpose": (str,),
    "tags": (list,),
    "resolved": (bool,),
    "note": (str,),
    "by": (str,),
    "min_size": (int,),
}


def detection_data(found: Detection) -> dict[str, Any]:
    """`found` as plain JSON data."""
    model = found.model
    data: dict[str, Any] | None = None
    if model is not None:
        data = {name: getattr(model, name) for name in _MODEL_FIELDS}
        data["tags"] = list(model.tags)
    return {"model": data, "why": found.why, "needs_values": found.needs_values}


def detection_from_data(data: Any) -> Detection | None:
    """The Detection `detection_data` wrote, or None for anything else."""
    if not isinstance(data, dict) or set(data) != {"model", "why", "needs_values"}:
        return None
    why, needs_values, model = data["why"], data["needs_values"], data["model"]
    if type(why) is not str or type(needs_values) is not bool:
        return None
    if model is None:
        return Detection(None, why, needs_values)
    if not isinstance(model, dict) or set(model) != set(_MODEL_FIELDS):
        return None
    for name, types in _MODEL_FIELDS.items():
        value = model[name]
        if type(value) not in types or (types == (int,) and type(value) is bool):
            return None
    if not all(type(t) is str for t in model["tags"]) or plain(model["hyperparameters"]) != model["hyperparameters"]:
        return None
    values = {**model, "tags": tuple(model["tags"])}
    return Detection(ImageModel(**values), why, needs_values)
