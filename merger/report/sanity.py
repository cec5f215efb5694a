"""The sanity check of a merge's result: a merged image model upscales a flat grey image and the sample.

chaiNNer runs such a check before it accepts an interpolation. After a merge node (an op with a
family check: lerp, weighted_sum, task_arithmetic, ...; or any node that sets `sanity:` itself) whose
output is an image model (known from its keys, as previews know it: a language model never imports
spandrel or torch here), spandrel loads the node's cache entry and the model runs on a GREY_SIDE x
GREY_SIDE image of 0.5 and on the sample image (merger/demo/eval.png, box-downscaled by the model's
scale, and further so that no side is over SAMPLE_SIDE pixels), on the CPU, or on the run's CUDA
device. What it measures goes to the report (`nodes.<name>.sanity`); an output that is

- not finite (NaN or inf): the model may be broken;
- black (every value under BLACK_MAX, on either image), or constant (a standard deviation under
  CONSTANT_STD, on the sample: a flat grey input rightly gives a flat output): the inputs may not
  share a parent (their weights cancelled or scrambled), or the model may be broken;

is a warning (`sanity: warn`, the default) or the run's error (`sanity: error`; the node's setting,
else the run's), raised before any output is placed. A model spandrel does not load is skipped with a
note; one that fails while it runs (out of memory, channels) is a warning for its node, never an error.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.engine.executor import NodeResult
from merger.engine.plan import Plan
from merger.engine.progress import human_size
from merger.errors import MergerError, shown
from merger.report.preview import SAMPLE_IMAGE, PreviewImage, is_image_model, load_image

log = logging.getLogger("merger")

GREY_SIDE = 32
GREY_VALUE = 0.5
SAMPLE_SIDE = 64  # the sample, box-downscaled until no side is longer: 64x64 from the 256 px sample
CONSTANT_STD = 1 / 1024  # a quarter of an 8-bit level: one flat colour to the eye
BLACK_MAX = 1 / 512  # rounds to 0 in 8 bits
MAX_MODEL_BYTES = 2 * 1024**3  # a larger entry is skipped (image models are far smaller)

CONSTANT, BLACK, NONFINITE = "constant", "black", "not finite"
PARENT = "the inputs may not share a parent (their weights cancel out), or the model may be broken"
BROKEN = "the model may be broken (NaN or inf in its weights, or an overflow)"


@dataclass(frozen=True)
class Measure:
    """The model's output on one image: its values as spandrel gives them (clamped to [0, 1]), and how
    many of the model's raw outputs were NaN or inf."""

    image: str  # grey | sample
    size: tuple[int, int]  # the input's height and width
    output: tuple[int, int]  # the output's height and width
    minimum: float
    maximum: float
    mean: float
    std: float
    nonfinite: int
    found: tuple[str, ...]  # CONSTANT, BLACK, NONFINITE

    def describe(self) -> str:
        """'constant and black on the sample (std 0, max 0)'"""
        figures = {
            CONSTANT: f"std {self.std:.3g}",
            BLACK: f"max {self.maximum:.3g}",
            NONFINITE: f"{self.nonfinite} NaN or inf",
        }
        where = "the sample" if self.image == "sample" else f"a flat grey ({GREY_VALUE}) image"
        found = " and ".join(self.found)
        return f"{found} on {where} ({', '.join(figures[problem] for problem in self.found)})"

    def as_report(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "output": list(self.output),
            **{k: _rounded(v) for k, v in (("min", self.minimum), ("max", self.maximum), ("mean", self.mean))},
            "std": _rounded(self.std),
            "nonfinite": self.nonfinite,
            "found": list(self.found),
        }


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


@dataclass(frozen=True)
class Sanity:
    """One node's check: ok, warned (a measure found something), failed (the model did not run), or
    skipped (not a model spandrel loads, no spandrel); with what was measured."""

    node: str
    status: str  # ok | warned | failed | skipped
    seconds: float = 0.0
    device: str | None = None
    model: str | None = None  # what spandrel loaded: "ESRGAN 4x, 3 -> 3 channels"
    measures: tuple[Measure, ...] = ()
    note: str | None = None  # why it was skipped, or what failed

    @property
    def problem(self) -> str | None:
        """What the warning (or the error) says, when there is one."""
        if self.status == "failed":
            return f"the sanity check could not run the merged model on {self.device} ({self.note}): it may be broken"
        found = [m for m in self.measures if m.found]
        if not found:
            return None
        meaning = BROKEN if any(NONFINITE in m.found for m in found) else PARENT
        return f"the merged model's output is {'; '.join(m.describe() for m in found)}: {meaning}"

    @property
    def warning(self) -> str | None:
        problem = self.problem
        return f"node '{self.node}': {problem}" if problem else None

    def error(self, plan: Plan) -> MergerError:
        own = plan.recipe.nodes[self.node].sanity is not None
        return MergerError(
            f"{self.problem} (sanity: error)",
            where=plan.recipe.where(f"nodes.{self.node}"),
            fix="merge fine-tunes of one parent (merger-inspect A B compares them), and see that no weight is"
            f" NaN or inf; to keep the output anyway, set {'sanity: warn on the node' if own else 'sanity=warn'}",
        )

    def as_report(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "seconds": round(self.seconds, 4),
            **({"device": self.device} if self.device else {}),
            **({"model": self.model} if self.model else {}),
            **({"images": {m.image: m.as_report() for m in self.measures}} if self.measures else {}),
            **({"note": self.note} if self.note else {}),
            **({"warning": self.warning} if self.warning else {}),
        }


def policy_of(plan: Plan, name: str) -> str:
    """warn | error | off for node `name`: its own `sanity:`; else the run's, for merge nodes; else off."""
    own = plan.recipe.nodes[name].sanity if name in plan.recipe.nodes else None
    if own is not None:
        return own
    return plan.recipe.settings.sanity if plan.nodes[name].op.family_check else "off"


def check_nodes(plan: Plan, results: Mapping[str, NodeResult], *, device: str | None) -> dict[str, Sanity]:
    """Check every node the policy names whose output is an image model, on `device` (where the run
    computed; None: nothing was, see run_device); a failed check under `sanity: error` raises (the
    caller places no output then), otherwise it is logged as a warning."""
    checks: dict[str, Sanity] = {}
    for name in plan.nodes:
        policy = policy_of(plan, name)
        if policy == "off" or name not in results or not _image_model(results[name].entry.path):
            continue
        found = check(name, results[name].entry.path, device=device or run_device(plan))
        if found.status == "warned" and policy == "error":
            raise found.error(plan)
        if found.warning:
            log.warning(found.warning)
        elif found.status == "skipped":
            log.info(f"sanity: node '{name}' skipped, {found.note}")
        checks[name] = found
    return checks


def _image_model(path: Path) -> bool:
    try:
        return is_image_model(path)
    except (OSError, MergerError):
        return False


def run_device(plan: Plan) -> str:
    """Where the check runs when nothing was computed: the run's CUDA device, else the CPU."""
    setting = plan.recipe.settings.device
    if setting.startswith("cuda"):
        return setting
    if setting == "auto":
        from merger.core.arrays import cuda_possible

        if cuda_possible():
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def check(node: str, path: Path, *, device: str = "cpu") -> Sanity:
    """Load the image model at `path` with spandrel and run it on grey and on the sample."""
    start = time.perf_counter()

    def skipped(note: str) -> Sanity:
        return Sanity(node, "skipped", time.perf_counter() - start, note=note)

    try:
        import torch
        from spandrel import ImageModelDescriptor, ModelLoader
    except ImportError:
        return skipped("it needs spandrel: pip install 'merger[sr]'")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        return skipped(f"the model is {human_size(size)}, more than the {human_size(MAX_MODEL_BYTES)} it loads")
    try:
        descriptor = ModelLoader().load_from_file(path)
    except Exception as e:  # spandrel's UnsupportedModelError, or its architectures' own failures
        return skipped(f"not a model spandrel loads ({_said(e)})")
    if not isinstance(descriptor, ImageModelDescriptor):
        return skipped(f"spandrel loads it as {descriptor.architecture.name}, which needs a mask as well")
    model = (
        f"{descriptor.architecture.name} {descriptor.scale}x,"
        f" {descriptor.input_channels} -> {descriptor.output_channels} channels"
    )
    measures: list[Measure] = []
    try:
        descriptor.to(torch.device(device)).eval()
        channels = descriptor.input_channels
        grey = torch.full((1, channels, GREY_SIDE, GREY_SIDE), GREY_VALUE)
        measures.append(_measure(descriptor, "grey", grey, device))
        sample = _sample(channels, descriptor.scale)
        if sample is not None:
            measures.append(_measure(descriptor, "sample", sample, device))
    except Exception as e:  # out of memory, channels, a shape the model refuses: said for the node, the run goes on
        return Sanity(node, "failed", time.perf_counter() - start, device, model, tuple(measures), _said(e))
    finally:
        del descriptor
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    status = "warned" if any(m.found for m in measures) else "ok"
    return Sanity(node, status, time.perf_counter() - start, device, model, tuple(measures))


MAX_NOTE = 200


def _said(error: Exception) -> str:
    """An exception in one short line (torch's load errors list every key)."""
    lines = str(error).strip().splitlines()
    text = shown(lines[0].rstrip(":")) if lines else type(error).__name__
    return text if len(text) <= MAX_NOTE else text[: MAX_NOTE - 3] + "..."


def _sample(channels: int, scale: int) -> Any:
    """The sample image [1, channels, H, W], box-downscaled by the model's scale and further, so that
    no side is over SAMPLE_SIDE; None without Pillow."""
    try:
        import torch
        import torch.nn.functional as F

        image = load_image(PreviewImage(SAMPLE_IMAGE))
    except ImportError:
        return None
    factor = max(scale, math.ceil(max(image.shape[-2:]) / SAMPLE_SIDE))
    if factor > 1:
        image = F.avg_pool2d(image, factor)
    if channels == 3:
        return image
    grey = image.mean(dim=1, keepdim=True)
    if channels == 4:  # RGBA: opaque
        return torch.cat([image, torch.ones_like(grey)], dim=1)
    return grey.repeat(1, channels, 1, 1)


def _measure(descriptor: Any, name: str, image: Any, device: str) -> Measure:
    import torch

    raw_nonfinite: list[int] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):  # before spandrel clamps it to [0, 1] (which hides inf)
            raw_nonfinite.append(int((~torch.isfinite(output)).sum()))

    handle = descriptor.model.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = descriptor(image.to(torch.device(device))).double()
    finally:
        handle.remove()
    finite = out[torch.isfinite(out)]
    nonfinite = max(out.numel() - finite.numel(), sum(raw_nonfinite))
    stats = (float("nan"),) * 4
    if finite.numel():
        stats = (float(finite.min()), float(finite.max()), float(finite.mean()), float(finite.std(correction=0)))
    found = []
    if nonfinite:
        found.append(NONFINITE)
    if finite.numel():
        if name == "sample" and stats[3] < CONSTANT_STD:
            found.append(CONSTANT)
        if stats[1] < BLACK_MAX:
            found.append(BLACK)
    return Measure(
        name,
        (int(image.shape[-2]), int(image.shape[-1])),
        (int(out.shape[-2]), int(out.shape[-1])),
        *stats,
        nonfinite,
        tuple(found),
    )
