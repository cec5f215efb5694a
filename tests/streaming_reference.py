"""The whole-tensor maths of ties, dare_*, task_arithmetic, slerp and model_stock as they were before
they streamed (merger 1a04352: merger/ops/task_vectors.py, slerp.py, model_stock.py and the numpy
backend's top_k_mask), in numpy: the reference the streamed ops are checked against."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from merger.ops.base import seeded_rng


def top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    flat = values.reshape(-1)
    if k >= flat.size or k <= 0:
        return np.full(values.shape, k > 0, dtype=bool)
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    mask = flat > threshold
    mask[np.flatnonzero(flat == threshold)[: k - int(mask.sum())]] = True
    return mask.reshape(values.shape)


def sparsified(
    key: str, delta: np.ndarray, density: float, index: int, how: str | None, seed: int | None, rescale: str
) -> np.ndarray:
    if how is None or density >= 1.0:
        return delta
    count = math.prod(delta.shape)
    if density <= 0.0 or count == 0:
        return delta * 0.0
    if how == "magnitude":
        mask = top_k_mask(np.abs(delta), max(1, int(density * count)))
        return np.where(mask, delta, 0.0)
    keep = seeded_rng(seed, f"{key}#{index}").random(count, dtype="float32") < density
    kept = np.where(keep.reshape(delta.shape), delta, 0.0)
    if rescale == "inverse_density":
        return kept / density
    if rescale == "l1":
        before, after = float(np.abs(delta).sum()), float(np.abs(kept).sum())
        return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
    return kept


def task_vectors(
    key: str,
    base: np.ndarray,
    models: list[np.ndarray],
    *,
    how: str | None,
    elects: bool,
    weights: list[float],
    densities: list[float],
    normalize: bool,
    scale: float = 1.0,
    consensus: str = "sum",
    seed: int | None = None,
    rescale: str = "inverse_density",
) -> np.ndarray:
    deltas = []
    for i, model in enumerate(models):
        delta = sparsified(key, model - base, densities[i], i, how, seed, rescale)
        deltas.append(delta * weights[i])
    if elects:
        if consensus == "sum":
            total = deltas[0] + 0.0
            for delta in deltas[1:]:
                total += delta
        else:
            total = np.sign(deltas[0])
            for delta in deltas[1:]:
                total += np.sign(delta)
        positive = total >= 0
        mixed = base * 0.0
        divisor = base * 0.0
        for delta, weight in zip(deltas, weights, strict=True):
            agrees = np.where(positive, delta > 0, delta < 0)
            mixed += np.where(agrees, delta, 0.0)
            divisor += np.where(agrees, weight, 0.0)
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = deltas[0] + 0.0
        for delta in deltas[1:]:
            mixed += delta
        total_weight = sum(weights)
        divisor = total_weight if abs(total_weight) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    if scale != 1.0:
        mixed = mixed * scale
    return base + mixed


def slerp(a: np.ndarray, b: np.ndarray, t: float, dot_threshold: float = 0.9995) -> np.ndarray:
    norm_a = math.sqrt(float((a * a).sum()))
    norm_b = math.sqrt(float((b * b).sum()))
    norm_a = norm_a if norm_a > 1e-8 else 1.0
    norm_b = norm_b if norm_b > 1e-8 else 1.0
    dot = max(-1.0, min(1.0, float(((a / norm_a) * (b / norm_b)).sum())))
    if abs(dot) > dot_threshold or math.prod(a.shape) == 0:
        return a * (1.0 - t) + b * t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return a * (math.sin((1.0 - t) * theta) / sin_theta) + b * (math.sin(t * theta) / sin_theta)


def row_sums(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[0], -1).sum(axis=1, keepdims=True)


def model_stock(
    base: np.ndarray, tuned: list[np.ndarray], *, filter_wise: bool, clamp: bool, sums: Any = row_sums
) -> np.ndarray:
    """`sums`: the backend's row sums (numpy's by default; torch's sum the same rows in another order)."""
    shape = base.shape
    rows = filter_wise and len(shape) > 1
    flat = base.reshape(-1, shape[-1]) if rows else base.reshape(1, -1)
    models = [m.reshape(flat.shape) for m in tuned]
    offsets = [m - flat for m in models]
    norms = [sums(o * o) ** 0.5 for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            product = norms[i] * norms[j]
            product = np.where(product < 1e-6, 1e-6, product)
            cosine = sums(offsets[i] * offsets[j]) / product
            cosines.append(np.where(cosine > 1.0, 1.0, np.where(cosine < -1.0, -1.0, cosine)))
    cos = cosines[0] + 0.0
    for extra in cosines[1:]:
        cos += extra
    cos = cos / len(cosines)
    count = len(models)
    denominator = 1.0 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6
    t = np.where(singular, 0.0, count * cos / np.where(singular, 1.0, denominator))
    if clamp:
        t = np.where(t > 1.0, 1.0, np.where(t < 0.0, 0.0, t))
    average = models[0] + 0.0
    for model in models[1:]:
        average += model
    average = average / count
    return (t * average + (1.0 - t) * flat).reshape(shape)
