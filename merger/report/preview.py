"""Previews: each super-resolution output upscales a few images, saved as PNGs beside it.

The run setting `preview` is off by default; `sample` uses a small image
shipped with merger (the demo's held-out photo, box-downscaled by 2); a list
names image files. Whether an output is an image model is decided from its
keys (merger.archs), so a run without previews, or without image models,
never imports spandrel; one that has them needs the `merger[sr]` extra.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.archs import esrgan
from merger.core.limits import MAX_PREVIEW_PIXELS
from merger.errors import MergerError, Where, shown
from merger.io.safetensors_header import read_header
from merger.io.sources import locate, open_source

log = logging.getLogger("merger")

SAMPLE = "sample"
SAMPLE_IMAGE = Path(__file__).parents[1] / "demo" / "eval.png"
SAMPLE_DOWNSCALE = 2


@dataclass(frozen=True)
class PreviewImage:
    """An input image: where it came from, and by how much to box-downscale it first."""

    path: Path
    downscale: int = 1

    @property
    def stem(self) -> str:
        return "sample" if self.downscale > 1 and self.path == SAMPLE_IMAGE else self.path.stem


def preview_images(setting: Any, launch_dir: Path, *, where: Where) -> list[PreviewImage]:
    """The images a `preview` setting names (empty when previews are off)."""
    if setting in (None, False, [], ""):
        return []
    entries = [SAMPLE] if setting is True else [setting] if isinstance(setting, str) else list(setting)
    images = []
    for entry in entries:
        if entry == SAMPLE:
            images.append(PreviewImage(SAMPLE_IMAGE, SAMPLE_DOWNSCALE))
            continue
        path = launch_dir / Path(str(entry)).expanduser()
        if not path.is_file():
            raise MergerError(
                f"preview image not found: '{shown(path)}'",
                where=where,
                fix="list image files (PNG, JPEG, ...) relative to where you run merger, or preview: sample",
            )
        check_image(path, where)
        images.append(PreviewImage(path))
    return images


def check_image(path: Path, where: Where) -> None:
    """A preview image must be an image Pillow reads, of at most MAX_PREVIEW_PIXELS (from its header:
    a small PNG can declare a huge canvas, and every pixel is upscaled by each output)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return  # no previews without merger[sr]: render says so
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise MergerError(
            f"preview image '{shown(path)}' is not an image Pillow can read ({shown(e)})",
            where=where,
            fix="list PNG or JPEG files",
        ) from None
    if width * height > MAX_PREVIEW_PIXELS:
        raise MergerError(
            f"preview image '{shown(path)}' is {width}x{height} pixels, more than the {MAX_PREVIEW_PIXELS} a"
            " preview takes (MAX_PREVIEW_PIXELS)",
            where=where,
            fix="crop it to the region you want to compare (say 512x512)",
        )


def is_image_model(path: Path) -> bool:
    """Whether the model file is one merger knows to be an image (SR) model, from its keys alone."""
    if path.suffix == ".safetensors":
        spec = read_header(path).tensors
    else:
        source = open_source(locate(path, None, where=str(path)), where=str(path))
        spec = source.spec()
        source.close()
    return esrgan.detect(spec) is not None


def load_image(image: PreviewImage) -> Any:
    """The image as a float tensor [1, 3, H, W] in [0, 1], box-downscaled if asked."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    with Image.open(image.path) as opened:
        pixels = np.asarray(opened.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    if image.downscale > 1:
        tensor = F.avg_pool2d(tensor, image.downscale)
    return tensor


def save_image(tensor: Any, path: Path) -> None:
    from PIL import Image

    pixels = (tensor.clamp(0, 1)[0].permute(1, 2, 0) * 255.0).round().byte().cpu().numpy()
    Image.fromarray(pixels).save(path)


def render(outputs: dict[str, Path], images: list[PreviewImage], output_dir: Path) -> list[dict[str, str]]:
    """Upscale every image with every SR output; returns rows for the run report."""
    if not images:
        return []
    models = {name: path for name, path in outputs.items() if is_image_model(path)}
    for name in outputs.keys() - models.keys():
        log.info(f"preview: output '{name}' is not an image model merger knows; skipped")
    if not models:
        return []
    try:
        import torch
        from spandrel import ModelLoader
    except ImportError:
        log.info("preview: skipped, it needs spandrel and Pillow: pip install 'merger[sr]'")
        return []
    rows = []
    for name, path in models.items():
        for image in images:
            png = output_dir / f"{name}__{image.stem}.png"
            try:
                model = ModelLoader().load_from_file(path).eval()
                with torch.no_grad():
                    upscaled = model(load_image(image))
                save_image(upscaled, png)
            except Exception as e:  # a preview is a courtesy: the outputs and the report stand without it
                log.warning(f"preview of output '{name}' on '{shown(image.path)}' failed: {shown(e)}")
                continue
            rows.append({"output": name, "image": str(image.path), "downscale": str(image.downscale), "png": str(png)})
    return rows
