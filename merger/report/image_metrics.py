"""Super-resolution metrics of an output image against its reference, as papers report them.

Numbers in SR papers are BasicSR's (`basicsr/metrics/psnr_ssim.py`): PSNR and SSIM on the Y channel
of ITU-R BT.601 (16–235) after a border of `border` pixels (usually the scale) is cropped from every
side, SSIM with an 11×11 Gaussian window (sigma 1.5) over the positions where the window lies wholly
inside the image. This module computes the same figures in plain numpy, in float64, so that a
merge can be compared with the published ones; `sharpness` (the variance of the Laplacian) tells a
sharp output from a smooth one where PSNR prefers the smooth one.

Images are numpy arrays of shape (H, W, C), C 1 (grey) or 3 (RGB), dtype uint8 unless said. The
functions here are pure maths: a bad argument is a programming error and raises ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

IMAGE_METRICS = ("psnr", "ssim", "psnr_rgb", "sharpness")
DEGRADATIONS = ("box", "bicubic")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"{name} must have shape (H, W, C) with C 1 or 3, not {tuple(image.shape)}")


def quantise(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as 8 bits, as BasicSR's `tensor2img`: clipped, ×255, rounded."""
    import numpy as np

    scaled: np.ndarray = np.round(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0)
    return scaled.astype(np.uint8)


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """`image` cropped from the top-left to a height and width that are multiples of `scale`."""
    if scale < 1:
        raise ValueError(f"scale must be at least 1, not {scale}")
    height, width = image.shape[0] - image.shape[0] % scale, image.shape[1] - image.shape[1] % scale
    return image[:height, :width]


def degrade(hr: np.ndarray, scale: int, how: str) -> np.ndarray:
    """The low-resolution input of a uint8 high-resolution image, `scale` times smaller.

    The image is first cropped to a multiple of `scale` (`mod_crop`). `box`: the mean of each
    scale×scale block, rounded. `bicubic`: Pillow's bicubic resize, which widens its kernel by the
    factor when it downscales (antialiased, as MATLAB's `imresize` that SR benchmarks were made with;
    the figures are close to, not equal to, MATLAB's).
    """
    import numpy as np

    _check_image(hr, "hr")
    if how not in DEGRADATIONS:
        raise ValueError(f"how must be one of {DEGRADATIONS}, not {how!r}")
    cropped = mod_crop(hr, scale)
    if scale == 1:
        return cropped
    height, width, channels = cropped.shape
    if height == 0 or width == 0:
        raise ValueError(f"an image of {hr.shape[1]}x{hr.shape[0]} is smaller than the scale {scale}")
    if how == "box":
        blocks = cropped.astype(np.float64).reshape(height // scale, scale, width // scale, scale, channels)
        means: np.ndarray = np.round(blocks.mean(axis=(1, 3)))
        return means.astype(np.uint8)
    from PIL import Image

    if channels == 1:
        picture = Image.fromarray(np.ascontiguousarray(cropped[:, :, 0]), mode="L")
    else:
        picture = Image.fromarray(np.ascontiguousarray(cropped), mode="RGB")
    small = np.asarray(picture.resize((width // scale, height // scale), Image.Resampling.BICUBIC))
    return small.reshape(height // scale, width // scale, channels)


def y_channel(image: np.ndarray) -> np.ndarray:
    """The (H, W) float64 Y of ITU-R BT.601 (16–235) of an RGB image, as BasicSR's `to_y_channel`;
    a grey image's channel as it is."""
    import numpy as np

    _check_image(image)
    pixels = image.astype(np.float64)
    if image.shape[2] == 1:
        return pixels[:, :, 0]
    return 16.0 + (65.481 * pixels[:, :, 0] + 128.553 * pixels[:, :, 1] + 24.966 * pixels[:, :, 2]) / 255.0


def grey(image: np.ndarray) -> np.ndarray:
    """The (H, W) float64 grey (0.299 R + 0.587 G + 0.114 B, 0..255) of an image; a grey one's channel."""
    import numpy as np

    _check_image(image)
    pixels = image.astype(np.float64)
    if image.shape[2] == 1:
        return pixels[:, :, 0]
    return 0.299 * pixels[:, :, 0] + 0.587 * pixels[:, :, 1] + 0.114 * pixels[:, :, 2]


def _crop_border(image: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"border must be at least 0, not {border}")
    if image.shape[0] <= 2 * border or image.shape[1] <= 2 * border:
        raise ValueError(f"a border of {border} leaves nothing of an image of {image.shape[1]}x{image.shape[0]}")
    return image[border : image.shape[0] - border, border : image.shape[1] - border] if border else image


def _pair(output: np.ndarray, reference: np.ndarray) -> None:
    _check_image(output, "output")
    _check_image(reference, "reference")
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} and reference {tuple(reference.shape)} differ in shape")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def psnr(output: np.ndarray, reference: np.ndarray, *, border: int) -> float:
    """PSNR in dB on the Y channel, `border` pixels cropped from every side; inf when equal."""
    _pair(output, reference)
    return _psnr(_crop_border(y_channel(output), border), _crop_border(y_channel(reference), border))


def psnr_rgb(output: np.ndarray, reference: np.ndarray, *, border: int) -> float:
    """PSNR in dB over all channels (RGB, or the one grey channel), `border` pixels cropped."""
    import numpy as np

    _pair(output, reference)
    a, b = (_crop_border(image.astype(np.float64), border) for image in (output, reference))
    return _psnr(a, b)


def _gaussian_kernel() -> np.ndarray:
    """OpenCV's `getGaussianKernel(11, 1.5)`: the sampled Gaussian, summing to 1."""
    import numpy as np

    offsets = np.arange(SSIM_WINDOW, dtype=np.float64) - (SSIM_WINDOW - 1) / 2
    kernel: np.ndarray = np.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return kernel / float(kernel.sum())


def _filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The separable 2-D filtering of `image` by `kernel` ⊗ `kernel`, where the window fits wholly."""
    from numpy.lib.stride_tricks import sliding_window_view

    size = len(kernel)
    rows = sliding_window_view(image, size, axis=0) @ kernel
    return sliding_window_view(rows, size, axis=1) @ kernel  # type: ignore[no-any-return]


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    kernel = _gaussian_kernel()
    mu_a, mu_b = _filter_valid(a, kernel), _filter_valid(b, kernel)
    var_a = _filter_valid(a * a, kernel) - mu_a * mu_a
    var_b = _filter_valid(b * b, kernel) - mu_b * mu_b
    covariance = _filter_valid(a * b, kernel) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + _C1) * (2 * covariance + _C2)
    denominator = (mu_a * mu_a + mu_b * mu_b + _C1) * (var_a + var_b + _C2)
    return float((numerator / denominator).mean())


def ssim(output: np.ndarray, reference: np.ndarray, *, border: int) -> float:
    """BasicSR's SSIM on the Y channel, `border` pixels cropped from every side first: an 11×11
    Gaussian window (sigma 1.5), the mean of the SSIM map over the window's wholly-inside positions.
    The image must be at least 11×11 after the crop."""
    _pair(output, reference)
    a, b = (_crop_border(y_channel(image), border) for image in (output, reference))
    if a.shape[0] < SSIM_WINDOW or a.shape[1] < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after a border of {border}, "
            f"and an image of {output.shape[1]}x{output.shape[0]} leaves {a.shape[1]}x{a.shape[0]}"
        )
    return _ssim(a, b)


def sharpness(output: np.ndarray, *, border: int = 0) -> float:
    """The variance (ddof 1) of the 4-neighbour Laplacian of the grey image in 8-bit units, over the
    positions where the 3×3 stencil fits, `border` pixels cropped first; higher is sharper."""
    image = _crop_border(grey(output), border)
    laplacian = image[:-2, 1:-1] + image[2:, 1:-1] + image[1:-1, :-2] + image[1:-1, 2:] - 4.0 * image[1:-1, 1:-1]
    if laplacian.size < 2:
        raise ValueError(
            f"sharpness needs an image of at least 3x4 pixels, and a border of {border} leaves "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    return float(laplacian.var(ddof=1))


def image_metrics(
    output: np.ndarray, reference: np.ndarray, *, border: int, names: Sequence[str] = IMAGE_METRICS
) -> dict[str, float]:
    """The named metrics (of IMAGE_METRICS) of `output` against `reference`; sharpness is the output's."""
    _pair(output, reference)
    unknown = [name for name in names if name not in IMAGE_METRICS]
    if unknown:
        raise ValueError(f"unknown image metrics {unknown}: the metrics are {list(IMAGE_METRICS)}")
    pairwise: dict[str, Callable[..., float]] = {"psnr": psnr, "ssim": ssim, "psnr_rgb": psnr_rgb}
    results: dict[str, float] = {}
    for name in names:
        if name == "sharpness":
            results[name] = sharpness(output, border=border)
        else:
            results[name] = pairwise[name](output, reference, border=border)
    return results
