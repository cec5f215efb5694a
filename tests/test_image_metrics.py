"""merger.report.image_metrics against independent computations: scikit-image's PSNR and SSIM,
Pillow's resize, torch's average pooling and convolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from merger.report.image_metrics import (
    IMAGE_METRICS,
    degrade,
    grey,
    image_metrics,
    mod_crop,
    psnr,
    psnr_rgb,
    quantise,
    sharpness,
    ssim,
    y_channel,
)


def smooth_image(seed: int, height: int = 40, width: int = 36, channels: int = 3) -> np.ndarray:
    """A random image that is smooth (noise, upsampled and blurred), as uint8."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, channels, height // 4 + 1, width // 4 + 1)))
    fine = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return quantise(fine[0].permute(1, 2, 0).numpy())


def degraded(image: np.ndarray, seed: int) -> np.ndarray:
    """`image` blurred a little and with noise added: a realistic model output."""
    rng = np.random.default_rng(seed)
    tensor = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
    blurred = F.avg_pool2d(F.pad(tensor, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0].permute(1, 2, 0).numpy()
    noisy = blurred + rng.normal(0.0, 6.0, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def independent_y(image: np.ndarray) -> np.ndarray:
    """The BT.601 Y (16–235) of skimage's rgb2ycbcr: the same formula as BasicSR's for RGB input
    (skimage scales to [0, 1] and multiplies by 65.481, 128.553, 24.966, then adds 16)."""
    if image.shape[2] == 1:
        return image[:, :, 0].astype(np.float64)
    y = rgb2ycbcr(image)[..., 0]
    rgb = image.astype(np.float64)
    formula = 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255
    np.testing.assert_allclose(y, formula, rtol=0, atol=1e-9)
    return y  # type: ignore[no-any-return]


def crop(image: np.ndarray, border: int) -> np.ndarray:
    return image[border : image.shape[0] - border, border : image.shape[1] - border] if border else image


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("border", [0, 2, 4])
def test_psnr_and_ssim_equal_scikit_image_on_y(channels: int, border: int) -> None:
    reference = smooth_image(1, channels=channels)
    output = degraded(reference, 2)
    y_ref, y_out = (crop(independent_y(image), border) for image in (reference, output))
    expected_psnr = peak_signal_noise_ratio(y_ref, y_out, data_range=255)
    expected_ssim = structural_similarity(
        y_ref, y_out, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert psnr(output, reference, border=border) == pytest.approx(expected_psnr, rel=1e-6)
    assert ssim(output, reference, border=border) == pytest.approx(expected_ssim, abs=1e-6)
    assert 0.0 < expected_ssim < 0.99  # a realistic pair, not a trivial one


@pytest.mark.parametrize("channels", [1, 3])
def test_psnr_rgb_equals_scikit_image_over_all_channels(channels: int) -> None:
    reference = smooth_image(3, channels=channels)
    output = degraded(reference, 4)
    expected = peak_signal_noise_ratio(crop(reference, 3), crop(output, 3), data_range=255)
    assert psnr_rgb(output, reference, border=3) == pytest.approx(expected, rel=1e-6)


def test_identical_images() -> None:
    image = smooth_image(5)
    assert psnr(image, image, border=2) == math.inf
    assert psnr_rgb(image, image, border=0) == math.inf
    assert ssim(image, image, border=2) == pytest.approx(1.0, abs=1e-12)


def test_y_channel_and_grey_of_a_grey_image_are_its_channel() -> None:
    image = smooth_image(6, channels=1)
    np.testing.assert_array_equal(y_channel(image), image[:, :, 0].astype(np.float64))
    np.testing.assert_array_equal(grey(image), image[:, :, 0].astype(np.float64))


def torch_sharpness(image: np.ndarray) -> float:
    """benchmarks/bench_dni.py's sharpness, on 8-bit values."""
    rgb = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    grey_image = (rgb * weights).sum(1, keepdim=True)
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return F.conv2d(grey_image, laplacian.view(1, 1, 3, 3)).var().item()


def test_sharpness_equals_torch_and_falls_with_blur() -> None:
    image = smooth_image(7)
    noisy = degraded(image, 8)
    assert sharpness(noisy) == pytest.approx(torch_sharpness(noisy), rel=1e-9)
    assert sharpness(noisy, border=3) == pytest.approx(torch_sharpness(crop(noisy, 3)), rel=1e-9)
    smoothed = F.avg_pool2d(torch.from_numpy(noisy.astype(np.float64)).permute(2, 0, 1)[None], 3, stride=1)
    smooth = np.round(smoothed[0].permute(1, 2, 0).numpy()).astype(np.uint8)
    assert sharpness(smooth) < sharpness(noisy[1:-1, 1:-1])


def test_mod_crop_crops_from_the_top_left() -> None:
    image = np.arange(7 * 10 * 1, dtype=np.uint8).reshape(7, 10, 1)
    np.testing.assert_array_equal(mod_crop(image, 3), image[:6, :9])
    np.testing.assert_array_equal(mod_crop(image, 1), image)


def test_box_of_constant_blocks_gives_the_block_values() -> None:
    blocks = np.random.default_rng(9).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
    extra = np.pad(image, ((0, 3), (0, 2), (0, 0)), constant_values=255)  # cut by mod_crop
    np.testing.assert_array_equal(degrade(extra, 4, "box"), blocks)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_box_equals_average_pooling_rounded(channels: int, scale: int) -> None:
    image = np.random.default_rng(scale).integers(0, 256, (26, 31, channels), dtype=np.uint8)
    small = degrade(image, scale, "box")
    assert small.shape == (26 // scale, 31 // scale, channels)
    assert small.dtype == np.uint8
    pooled = F.avg_pool2d(torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None], scale)
    np.testing.assert_array_equal(small, np.round(pooled[0].permute(1, 2, 0).numpy()).astype(np.uint8))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_equals_pillow(channels: int, scale: int) -> None:
    image = smooth_image(10, 27, 34, channels)
    small = degrade(image, scale, "bicubic")
    height, width = 27 - 27 % scale, 34 - 34 % scale
    source = Image.fromarray(image[:height, :width].squeeze(2) if channels == 1 else image[:height, :width])
    expected = np.asarray(source.resize((width // scale, height // scale), Image.Resampling.BICUBIC))
    assert small.shape == (height // scale, width // scale, channels)
    np.testing.assert_array_equal(small, expected.reshape(small.shape))


def test_scale_one_is_the_image() -> None:
    image = smooth_image(11)
    np.testing.assert_array_equal(degrade(image, 1, "bicubic"), image)


def test_quantise_rounds_and_clips() -> None:
    values = np.array([-0.1, 0.0, 0.4 / 255, 0.6 / 255, 1.5 / 255, 100.4 / 255, 1.0, 1.2], dtype=np.float32)
    expected = np.array([0, 0, 0, 1, 2, 100, 255, 255], dtype=np.uint8)
    np.testing.assert_array_equal(quantise(values.reshape(1, -1, 1)), expected.reshape(1, -1, 1))
    assert quantise(values).dtype == np.uint8


def test_image_metrics_computes_the_named_ones() -> None:
    reference = smooth_image(12)
    output = degraded(reference, 13)
    results = image_metrics(output, reference, border=2, names=IMAGE_METRICS)
    assert list(results) == list(IMAGE_METRICS)
    assert results["psnr"] == psnr(output, reference, border=2)
    assert results["ssim"] == ssim(output, reference, border=2)
    assert results["psnr_rgb"] == psnr_rgb(output, reference, border=2)
    assert results["sharpness"] == sharpness(output, border=2)
    assert list(image_metrics(output, reference, border=0, names=["ssim"])) == ["ssim"]


def test_bad_inputs_raise() -> None:
    image = smooth_image(14)
    with pytest.raises(ValueError, match=r"\(40, 36, 3\) and reference \(40, 36, 1\)"):
        psnr(image, image[:, :, :1], border=0)
    with pytest.raises(ValueError, match="differ in shape"):
        image_metrics(image, image[:-1], border=0, names=["psnr"])
    with pytest.raises(ValueError, match="SSIM needs at least 11x11"):
        ssim(image, image, border=13)
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(image, image, border=18)
    with pytest.raises(ValueError, match="unknown image metrics"):
        image_metrics(image, image, border=0, names=["lpips"])
    with pytest.raises(ValueError, match="shape"):
        psnr(image[:, :, 0], image[:, :, 0], border=0)
    with pytest.raises(ValueError, match="how must be one of"):
        degrade(image, 2, "nearest")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), sigma=st.floats(1.0, 20.0))
def test_psnr_is_symmetric_and_falls_with_more_noise(seed: int, sigma: float) -> None:
    rng = np.random.default_rng(seed)
    reference = rng.integers(40, 216, (16, 16, 3)).astype(np.uint8)
    noise = rng.normal(0.0, sigma, reference.shape)
    less = np.clip(np.round(reference + noise), 0, 255).astype(np.uint8)
    more = np.clip(np.round(reference + 3 * noise), 0, 255).astype(np.uint8)
    assert psnr(less, reference, border=1) == psnr(reference, less, border=1)
    assert ssim(less, reference, border=0) == pytest.approx(ssim(reference, less, border=0), abs=1e-12)
    assert psnr_rgb(more, reference, border=0) <= psnr_rgb(less, reference, border=0)
