"""Measuring a run's outputs: the metrics of the recipe's `evaluate` block, per output.

An image model (an output whose keys are one spandrel knows) upscales each evaluation image's
low-resolution input (the reference degraded by `box` or `bicubic` at the model's scale, rounded to
8 bits as a dataset's files are, or the pair's LR file) in tiles as previews do
(merger.report.preview_tensors), on the run's device; the output, rounded to 8 bits, is compared
with the reference cropped to a multiple of the scale (merger.report.image_metrics: BasicSR's
conventions). A causal language model folder gets `perplexity` on the text
(merger.report.perplexity). Each output's figures are averaged over the images, and kept per image.

What an output measured is kept in the cache (merger.cache.metric_records) under a key of the
output's bytes (its sha256, and a folder's files'), the evaluation's settings and the data's sha256:
a re-run, or a sweep job whose output is unchanged, measures nothing and imports no torch. A
measurement that fails (out of memory, a model spandrel cannot load) is recorded as failed for that
output, with the reason, and said as a warning; the run's outputs and report are written as usual.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from merger.cache.hashing import digest_json
from merger.cache.metric_records import MetricRecords
from merger.errors import shown
from merger.report.evaluation_inputs import EvalImage, EvaluationPlan, Target

log = logging.getLogger("merger")

#: bump when what a metric measures changes (a record made before is then measured again)
METRICS_VERSION = 1
MAX_REASON = 300
#: the PSNR of an output equal to its reference (infinite) is reported as this: more than any finite
#: PSNR of 8-bit images of at most MAX_PREVIEW_PIXELS (one Y step of 0.098 in a million pixels: 158 dB)
MAX_PSNR = 1000.0
PSNRS = ("psnr", "psnr_rgb")
#: what a metric record may hold, and the range of each metric's values (a record outside them is absent)
METRIC_RANGES = {
    "psnr": (0.0, MAX_PSNR),
    "psnr_rgb": (0.0, MAX_PSNR),
    "ssim": (-1.0, 1.0),
    "sharpness": (0.0, 255.0**2 * 20),
    "perplexity": (1.0, math.inf),
}


class Measurable(Protocol):
    """What evaluation reads of a placed output (merger.engine.placement.OutputResult)."""

    @property
    def path(self) -> Path: ...

    @property
    def sha256(self) -> str: ...

    @property
    def files(self) -> dict[str, str]: ...

    @property
    def model_file(self) -> Path: ...


@dataclass
class Measured:
    """The report's `metrics` (output -> figures), and the objectives' values (None: no objective)."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    objective: list[float] | None = None


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {shown(lines[0])}" if lines else type(error).__name__
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def record_key(plan: EvaluationPlan, output: Measurable, target: Target) -> str:
    """What a metric record is kept under: the output's bytes, the evaluation and its data."""
    return digest_json(
        {
            "version": METRICS_VERSION,
            "output": output.sha256,
            "files": dict(sorted(output.files.items())),
            "kind": target.kind,
            "evaluation": plan.evaluation.settings(),
            "border": plan.border(target.scale) if target.kind == "image" else None,
            "data": plan.data_hash,
        }
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def measure_image_model(path: Path, plan: EvaluationPlan, device: str) -> dict[str, Any]:
    """The image metrics of the model file at `path` over the plan's images."""
    import numpy as np
    import torch
    from PIL import Image
    from spandrel import ImageModelDescriptor

    from merger.report import preview_tensors as tensors
    from merger.report.image_metrics import degrade, image_metrics, mod_crop, quantise
    from merger.report.preview import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        descriptor = load_model(path)
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ValueError(f"spandrel loads it as {descriptor.architecture.name}, which takes a mask as well")
    scale, channels = int(descriptor.scale), int(descriptor.input_channels)
    border = plan.border(scale)
    names = plan.evaluation.image_metrics
    internal = str(getattr(descriptor, "tiling", "")).endswith("INTERNAL")
    mode = "L" if channels == 1 else "RGB"
    per_image: dict[str, dict[str, float | None]] = {}
    values: dict[str, list[float]] = {name: [] for name in names}
    try:
        descriptor.to(torch.device(device)).eval()
        for image in plan.images:
            hr, lr = _pair(image, scale, mode, plan.evaluation.degrade, degrade, mod_crop, Image, np)
            tensor = torch.from_numpy(lr.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
            if channels == 4:
                tensor = torch.cat([tensor, torch.ones_like(tensor[:, :1])], dim=1)
            elif channels not in (1, 3):
                tensor = tensor.mean(dim=1, keepdim=True).repeat(1, channels, 1, 1)
            upscaled, _ = tensors.upscale(
                descriptor, tensor, device=device, tile=None if internal else tensors.TILE_SIDE
            )
            kept = 1 if hr.shape[2] == 1 else 3
            if upscaled.shape[1] < kept:
                upscaled = upscaled[:, :1].repeat(1, kept, 1, 1)
            bad = int((~torch.isfinite(upscaled)).sum())
            if bad:
                raise ValueError(f"the model's output on {image.name} holds {bad} NaN or infinite values")
            out = quantise(upscaled[0, :kept].permute(1, 2, 0).numpy())
            if out.shape != hr.shape:
                raise ValueError(
                    f"the model gave {out.shape[1]}x{out.shape[0]} pixels for {image.name}, not "
                    f"{hr.shape[1]}x{hr.shape[0]}"
                )
            figures = image_metrics(out, hr, border=border, names=names)
            figures = {name: min(value, MAX_PSNR) if name in PSNRS else value for name, value in figures.items()}
            per_image[image.name] = {name: _finite(figures[name]) for name in names}
            for name in names:
                values[name].append(figures[name])
    finally:
        del descriptor
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {
        **{name: _finite(_mean(values[name])) for name in names},
        "per_image": per_image,
        "scale": scale,
        "border": border,
    }


def _pair(
    image: EvalImage, scale: int, mode: str, how: str, degrade: Any, mod_crop: Any, pil: Any, np: Any
) -> tuple[Any, Any]:
    """The reference (H, W, C uint8) cropped to what the model makes of its input, and that input
    (the pair's file, or the reference degraded `how`)."""

    def read(path: Path) -> Any:
        with pil.open(path) as opened:
            pixels = np.asarray(opened.convert(mode), dtype=np.uint8)
        return pixels[..., None] if pixels.ndim == 2 else pixels

    hr = mod_crop(read(image.hr), scale)
    if image.lr is None:
        return hr, degrade(hr, scale, how)
    lr = read(image.lr)
    return hr[: lr.shape[0] * scale, : lr.shape[1] * scale], lr


def measure_language_model(folder: Path, plan: EvaluationPlan, device: str) -> dict[str, Any]:
    from merger.report.perplexity import perplexity

    assert plan.text is not None
    evaluation = plan.evaluation
    found = perplexity(
        folder,
        plan.text,
        max_tokens=evaluation.max_tokens,
        window=evaluation.window,
        stride=evaluation.stride,
        device=device,
    )
    return {
        "perplexity": _finite(found.value),
        "tokens": found.tokens,
        "predicted": found.predicted,
        "window": found.window,
        "stride": found.stride,
    }


def _measure(output: Measurable, target: Target, plan: EvaluationPlan, device: str) -> dict[str, Any]:
    if target.kind == "image":
        return measure_image_model(output.model_file, plan, device)
    return measure_language_model(output.path, plan, device)


def measure(
    plan: EvaluationPlan,
    outputs: Mapping[str, Measurable],
    records: MetricRecords,
    *,
    device: str | Callable[[], str] = "cpu",
) -> Measured:
    """Every output's metrics (from its record when the cache has one), and the objectives' values
    (NaN for one whose metric failed). `device` may be a function: asked only when something is
    measured, so a run whose figures are all recorded imports no torch."""
    where = functools.cache(device) if callable(device) else functools.partial(str, device)
    done = Measured()
    for name, output in outputs.items():
        target = plan.targets.get(name)
        if target is None:
            continue
        if target.kind == "skipped":
            done.metrics[name] = {"skipped": target.note}
            log.info(f"evaluate: output '{name}' skipped: {target.note}")
            continue
        key = record_key(plan, output, target)
        record = records.get(key)
        if record is not None and not valid_record(record["metrics"], target, plan):
            record = None  # not what merger writes: measured again
        if record is not None:
            done.metrics[name] = {**record["metrics"], "seconds": 0.0, "cached": True}
            continue
        start = time.perf_counter()
        wanted = plan.evaluation.image_metrics if target.kind == "image" else plan.evaluation.text_metrics
        try:
            figures = _measure(output, target, plan, where())
        except Exception as e:  # out of memory, a model that does not load or run: this output's metrics failed
            reason = _reason(e)
            done.metrics[name] = {"failed": dict.fromkeys(wanted, reason), "seconds": _seconds(start)}
            log.warning(f"evaluate: output '{name}': {', '.join(wanted)} failed: {reason}")
            continue
        records.put(key, figures)
        done.metrics[name] = {**figures, "seconds": _seconds(start), "cached": False}
    if plan.objectives:
        done.objective = [_value(done.metrics.get(o.output or ""), o.metric) for o in plan.objectives]
    return done


def _in_range(metric: str, value: Any) -> bool:
    if value is None:
        return True
    low, high = METRIC_RANGES[metric]
    return isinstance(value, float | int) and not isinstance(value, bool) and low <= value <= high


def valid_record(figures: Mapping[str, Any], target: Target, plan: EvaluationPlan) -> bool:
    """Whether a metric record holds what this evaluation writes: its metrics in their ranges, per image too."""
    evaluation = plan.evaluation
    wanted = evaluation.image_metrics if target.kind == "image" else evaluation.text_metrics
    facts = ("per_image", "scale", "border") if target.kind == "image" else ("tokens", "predicted", "window", "stride")
    if set(figures) != {*wanted, *facts}:
        return False
    if not all(name in figures and _in_range(name, figures[name]) for name in wanted):
        return False
    if target.kind == "text":
        return all(isinstance(figures.get(k), int) for k in ("tokens", "predicted", "window", "stride"))
    per_image = figures.get("per_image")
    if not isinstance(per_image, dict) or set(per_image) != {image.name for image in plan.images}:
        return False
    return all(
        isinstance(row, dict) and all(name in row and _in_range(name, row[name]) for name in wanted)
        for row in per_image.values()
    ) and all(isinstance(figures.get(k), int) for k in ("scale", "border"))


def _seconds(start: float) -> float:
    return round(time.perf_counter() - start, 4)


def _value(figures: Mapping[str, Any] | None, metric: str) -> float:
    value = (figures or {}).get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def metric_line(name: str, figures: Mapping[str, Any]) -> str:
    """An output's figures in the run's summary: 'psnr 32.24 dB, ssim 0.9123, sharpness 163.8 (0.41 s)'."""
    if "skipped" in figures:
        return f"skipped: {shown(figures['skipped'])}"
    if "failed" in figures:
        reasons = dict(figures["failed"])
        return f"failed: {shown(next(iter(reasons.values()), ''))}"
    shown_figures = []
    for metric, unit, digits in (
        ("psnr", " dB", 3),
        ("ssim", "", 4),
        ("psnr_rgb", " dB", 3),
        ("sharpness", "", 1),
        ("perplexity", "", 3),
    ):
        if metric in figures:
            value = figures[metric]
            shown_figures.append(
                f"{metric} {value:.{digits}f}{unit}" if isinstance(value, float | int) else f"{metric} -"
            )
    when = "cached" if figures.get("cached") else f"{float(figures.get('seconds', 0)):.2f} s"
    images = len(figures.get("per_image", {}))
    over = f" over {images} image{'s' if images != 1 else ''}" if images else ""
    return f"{', '.join(shown_figures)}{over} ({when})"
