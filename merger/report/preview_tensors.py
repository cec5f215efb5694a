"""The tensor side of previews: an image as a model gets it, upscaled tile by tile, saved as a PNG.

An image whose height or width is over TILE_SIDE pixels (as the model gets it) is cut into tiles of
TILE_SIDE with TILE_OVERLAP pixels shared between neighbours; each tile is upscaled on the device,
brought back to the CPU, and only its part up to the middle of each overlap is kept. So device
memory is bounded by one tile whatever the image, and a convolutional model that sees at most
TILE_OVERLAP / 2 pixels around each pixel (Compact, ESRGAN, SPAN, ... of usual depths see more, so
their seams differ by a little) gives what it gives untiled. A model that tiles itself
(spandrel's `ModelTiling.INTERNAL`) gets the image whole. torch, numpy and Pillow are imported here
only when a preview is made.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merger.report.preview_images import Crop, PreviewImage

#: images longer than this on a side (as the model gets them) are upscaled in tiles of this side
TILE_SIDE = 256
#: pixels neighbouring tiles share; half of it is context each side of a seam
TILE_OVERLAP = 32


def load_image(image: PreviewImage) -> Any:
    """The image as a float tensor [1, 3, H, W] in [0, 1], cropped and box-downscaled as it says
    (its own `downscale`: the sample is not downscaled by a model's scale here)."""
    return model_input(image.path, image.crop, image.downscale, 3)


def model_input(path: Path, crop: Crop | None, downscale: int, channels: int) -> Any:
    """What a model of `channels` input channels gets of the image at `path`: the `crop` region,
    cropped (from its top left) to a multiple of `downscale` and box-downscaled by it, as a float
    tensor [1, channels, H, W] in [0, 1]: grey for 1 channel, RGB for 3, RGB and an opaque alpha
    for 4, grey repeated for any other count."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    with Image.open(path) as opened:
        region = opened.crop((crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3])) if crop else opened
        mode = "L" if channels not in (3, 4) else "RGB"
        pixels = np.asarray(region.convert(mode), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels.copy())
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    tensor = tensor.unsqueeze(0)
    if downscale > 1:
        height, width = tensor.shape[-2:]
        tensor = tensor[..., : height - height % downscale, : width - width % downscale]
        tensor = F.avg_pool2d(tensor, downscale)
    if channels == 4:
        tensor = torch.cat([tensor, torch.ones_like(tensor[:, :1])], dim=1)
    elif channels not in (1, 3):
        tensor = tensor.repeat(1, channels, 1, 1)
    return tensor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` pixels start along a side of `length`: every tile whole, neighbours
    sharing at least `overlap` pixels, the last one ending at the side's end."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    return [*range(0, length - tile, step), length - tile]


def _cuts(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """The part of the side each tile's output keeps: from the middle of the overlap with the tile
    before to the middle of the overlap with the tile after."""
    bounds = [0, *((b + a + tile) // 2 for a, b in itertools.pairwise(starts)), length]
    return list(itertools.pairwise(bounds))


def upscale(
    call: Callable[[Any], Any],
    image: Any,
    *,
    device: str = "cpu",
    tile: int | None = TILE_SIDE,
    overlap: int = TILE_OVERLAP,
) -> tuple[Any, int]:
    """`call` (a model on `device`) applied to `image` [1, C, H, W] on the CPU, in tiles when a side is
    over `tile` (None: whole); returns the output on the CPU and the number of tiles."""
    import torch

    _, _, height, width = image.shape
    target = torch.device(device)
    with torch.inference_mode():
        if tile is None or (height <= tile and width <= tile):
            return call(image.to(target)).float().cpu(), 1
        ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        out: Any = None
        scale = 0
        for y0, (ky0, ky1) in zip(ys, _cuts(ys, tile, height), strict=True):
            for x0, (kx0, kx1) in zip(xs, _cuts(xs, tile, width), strict=True):
                piece = image[..., y0 : y0 + min(tile, height), x0 : x0 + min(tile, width)]
                got = call(piece.to(target)).float().cpu()
                if out is None:
                    scale = got.shape[-1] // piece.shape[-1]
                    out = torch.empty((1, got.shape[1], height * scale, width * scale), dtype=torch.float32)
                if got.shape[-2:] != (piece.shape[-2] * scale, piece.shape[-1] * scale):
                    raise ValueError(
                        f"the model gave {tuple(got.shape[-2:])} pixels for a tile of {tuple(piece.shape[-2:])}"
                    )
                out[..., ky0 * scale : ky1 * scale, kx0 * scale : kx1 * scale] = got[
                    ..., (ky0 - y0) * scale : (ky1 - y0) * scale, (kx0 - x0) * scale : (kx1 - x0) * scale
                ]
        return out, len(ys) * len(xs)


def save_image(tensor: Any, path: Path) -> tuple[int, int]:
    """A [1, C, H, W] tensor in [0, 1] as a PNG (grey for 1 channel, RGB for 3, RGBA for 4); returns
    its width and height. Any other channel count is an error (it makes no image)."""
    from PIL import Image

    channels = int(tensor.shape[1])
    if channels not in (1, 3, 4):
        raise ValueError(f"the model gives {channels} channels, which make no image (1, 3 or 4 do)")
    pixels = (tensor.clamp(0, 1)[0].permute(1, 2, 0) * 255.0).round().byte().cpu().numpy()
    picture = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    picture.save(path)
    return picture.size
