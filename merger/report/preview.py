"""Previews: every image model a run writes upscales a few images, saved as PNGs beside it.

The run setting `preview` is off by default; what it may name, and the pre-flight checks of those
images, are in merger.report.preview_images; the tensor work (tiling) in merger.report.preview_tensors.
Previews are made once per node: the first of a node's outputs (a `.safetensors` one where there is
one) is loaded by spandrel, run on the run's device on every image, and saved as
`<node>__<image>.png`; every output of the node is reported with those PNGs. Whether an output is an
image model is decided from its keys first (merger.archs.image_models), so a run without image
models never imports spandrel or torch. What cannot be previewed is a note in the report, never a
traceback: a model spandrel does not know or load is skipped ("not a model spandrel knows"), and
one that fails while it runs (out of memory, channels) is a warning for its outputs while the
other nodes' previews are made.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from merger.archs.image_models import detect, spandrel_available
from merger.errors import MergerError, shown
from merger.io.safetensors_header import read_header
from merger.io.sources import locate, open_source
from merger.report import preview_tensors as tensors
from merger.report.preview_images import (
    SAMPLE,
    SAMPLE_IMAGE,
    PreviewImage,
    check_preview_sizes,
    preview_images,
)
from merger.report.preview_tensors import load_image

__all__ = [
    "SAMPLE",
    "SAMPLE_IMAGE",
    "PreviewImage",
    "Previews",
    "check_preview_sizes",
    "is_image_model",
    "load_image",
    "preview_images",
    "render",
]

log = logging.getLogger("merger")

#: why a node has no preview: the notes' `why`, and what the end of a sweep says when no job has one
UNKNOWN, NO_SPANDREL, MASKED, FAILED = "unknown", "no_spandrel", "masked", "failed"
NOT_KNOWN = "not a model spandrel knows"
MAX_NOTE = 200


class Placed(Protocol):
    """What previews read of a placed output (merger.engine.placement.OutputResult)."""

    @property
    def node(self) -> str: ...

    @property
    def model_file(self) -> Path: ...


@dataclass
class Previews:
    """What `render` made: a row per (output, image) with its PNG, and a note per output (and image)
    that got none."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.notes)


def model_spec(path: Path) -> Mapping[str, Any]:
    """The spec of a model file or folder, from its header (safetensors) or merger's own loader."""
    if path.suffix == ".safetensors":
        return read_header(path).tensors
    source = open_source(locate(path, None, where=str(path)), where=str(path))
    try:
        return source.spec()
    finally:
        source.close()


def is_image_model(path: Path) -> bool:
    """Whether the model file is an image model merger knows (spandrel's, or ESRGAN without it), from its keys."""
    return detect(model_spec(path)).model is not None


def _said(error: BaseException) -> str:
    """An exception in one short line (torch's load errors list every key)."""
    lines = str(error).strip().splitlines()
    text = shown(lines[0].rstrip(":")) if lines else type(error).__name__
    text = text if text.startswith(type(error).__name__) else f"{type(error).__name__}: {text}"
    return text if len(text) <= MAX_NOTE else text[: MAX_NOTE - 3] + "..."


def _skipped(why: str, note: str) -> dict[str, Any]:
    return {"status": "skipped", "why": why, "note": f"skipped: {note}"}


def render(
    outputs: Mapping[str, Placed],
    images: list[PreviewImage],
    output_dir: Path,
    *,
    device: str | Callable[[], str] = "cpu",
) -> Previews:
    """Upscale every image with every node's image model, once per node, on `device` (a function:
    asked only once an image model is found, so a run without one imports no torch)."""
    done = Previews()
    if not images:
        return done
    device = functools.cache(device) if callable(device) else functools.partial(str, device)
    by_node: dict[str, list[str]] = {}
    for name, placed in outputs.items():
        by_node.setdefault(placed.node, []).append(name)
    for node, names in by_node.items():
        files = [outputs[name].model_file for name in names]
        path = next((f for f in files if f.suffix == ".safetensors"), files[0])
        rows, notes = node_previews(node, path, images, output_dir, device)
        for name in names:
            done.rows.extend({"output": name, "node": node, **row} for row in rows)
            for note in notes:
                done.notes.append({"output": name, "node": node, **note})
                if note["status"] == "failed":
                    log.warning(f"preview of output '{name}' on '{shown(note['image'])}' {note['note']}")
                else:
                    log.info(f"preview: output '{name}' {note['note']}")
    return done


def node_previews(
    node: str, path: Path, images: list[PreviewImage], output_dir: Path, where: Callable[[], str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows and notes of one node whose model is the file at `path`, made on the device `where()` names."""
    try:
        found = detect(model_spec(path))
    except (OSError, MergerError, ValueError) as e:
        return [], [_skipped(UNKNOWN, f"{NOT_KNOWN} (its file cannot be read: {_said(e)})")]
    if found.model is None:
        return [], [_skipped(UNKNOWN, f"{NOT_KNOWN} ({found.why})")]
    if not spandrel_available():
        return [], [_skipped(NO_SPANDREL, "spandrel is not installed (pip install 'merger[sr]')")]
    try:
        import PIL.Image  # noqa: F401 - the PNGs
        import torch
        from spandrel import ImageModelDescriptor
    except ImportError as e:
        return [], [_skipped(NO_SPANDREL, f"spandrel, torch or Pillow cannot be imported ({_said(e)})")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descriptor = load_model(path)
    except Exception as e:  # spandrel's UnsupportedModelError, or its architectures' own failures
        return [], [_skipped(UNKNOWN, f"{NOT_KNOWN} (spandrel cannot load it: {_said(e)})")]
    if not isinstance(descriptor, ImageModelDescriptor):
        name = descriptor.architecture.name
        return [], [_skipped(MASKED, f"spandrel loads it as {name}, an inpainting model (it takes a mask as well)")]
    rows: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    scale, channels = int(descriptor.scale), int(descriptor.input_channels)
    device = where()
    internal = str(getattr(descriptor, "tiling", "")).endswith("INTERNAL")  # the model tiles itself
    try:
        descriptor.to(torch.device(device)).eval()
        for image in images:
            start = time.perf_counter()
            factor = image.factor(scale)
            png = output_dir / f"{node}__{image.stem}.png"
            try:
                tensor = tensors.model_input(image.path, image.crop, factor, channels)
                tile = None if internal else tensors.TILE_SIDE
                upscaled, tiles = tensors.upscale(descriptor, tensor, device=device, tile=tile)
                width, height = tensors.save_image(upscaled, png)
            except Exception as e:  # out of memory, channels: said for the node's outputs, the others go on
                notes.append({"status": "failed", "why": FAILED, "image": str(image.path), "note": _failed(e, device)})
                continue
            rows.append(
                {
                    "image": str(image.path),
                    "downscale": factor,
                    **({"crop": list(image.crop)} if image.crop is not None else {}),
                    "channels": channels,
                    "scale": scale,
                    "size": [width, height],
                    "tiles": tiles,
                    "device": device,
                    "seconds": round(time.perf_counter() - start, 4),
                    "png": str(png),
                }
            )
    except Exception as e:  # the model does not move to the device (out of memory)
        notes.extend(
            {"status": "failed", "why": FAILED, "image": str(image.path), "note": _failed(e, device)}
            for image in images
            if not any(row["image"] == str(image.path) for row in rows)
        )
    finally:
        del descriptor
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows, notes


def _failed(error: BaseException, device: str) -> str:
    return f"failed on {device}: {_said(error)}"


def load_model(path: Path) -> Any:
    """spandrel's model of the file (on the CPU)."""
    from spandrel import ModelLoader

    return ModelLoader().load_from_file(path)
