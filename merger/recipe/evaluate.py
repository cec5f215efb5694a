"""The `evaluate` block and the `objective` key of a recipe: what each output is measured on, and the
number a job returns to Hydra's sweeper.

```yaml
evaluate:
  images: data/val_hr/*.png     # references (a glob, a folder, files, or `sample`); LR made by `degrade`
  degrade: bicubic              # box | bicubic, at the model's scale
  metrics: [psnr, ssim, sharpness]
objective: psnr                 # or {metric: psnr, output: blend, direction: maximize}, or a list of those
```

`pairs: {lr: DIR, hr: DIR}` takes low-resolution inputs as they are, matched to references by file
name; `text: FILE` (with `max_tokens`, `window`, `stride`) is what `perplexity` reads. Validated here
from the recipe alone; which outputs are image models or language models, and the files, are checked
in pre-flight (merger.report.evaluation_inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError

from merger.core.strict_model import StrictModel
from merger.errors import Location, MergerError, did_you_mean, shown

#: each metric and the direction in which it is better
METRICS: dict[str, Literal["maximize", "minimize"]] = {
    "psnr": "maximize",
    "ssim": "maximize",
    "psnr_rgb": "maximize",
    "sharpness": "maximize",
    "perplexity": "minimize",
}
IMAGE_METRICS = ("psnr", "ssim", "psnr_rgb", "sharpness")
TEXT_METRICS = ("perplexity",)
DEFAULT_MAX_TOKENS = 4096
MAX_TOKENS_LIMIT = 1_000_000


class PairsModel(StrictModel):
    lr: str
    hr: str


class EvaluateModel(StrictModel):
    metrics: list[str]
    images: str | list[str] | None = None
    degrade: Literal["box", "bicubic"] = "bicubic"
    pairs: PairsModel | None = None
    border: int | None = Field(default=None, ge=0)  # pixels cropped at each side (default: the model's scale)
    text: str | None = None
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=2, le=MAX_TOKENS_LIMIT)
    window: int | None = Field(default=None, ge=2)  # tokens per forward pass (default: the model's, at most 1024)
    stride: int | None = Field(default=None, ge=1)  # tokens each window after the first predicts (window // 2)
    outputs: list[str] | None = None  # the outputs measured (default: every one)


class ObjectiveModel(StrictModel):
    metric: str
    output: str | None = None
    direction: Literal["maximize", "minimize"] | None = None


@dataclass(frozen=True)
class Evaluation:
    metrics: tuple[str, ...]
    images: tuple[str, ...] = ()
    degrade: str = "bicubic"
    pairs: tuple[str, str] | None = None  # (lr, hr) folders
    border: int | None = None
    text: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    window: int | None = None
    stride: int | None = None
    outputs: tuple[str, ...] | None = None

    @property
    def image_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in IMAGE_METRICS)

    @property
    def text_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in TEXT_METRICS)

    def settings(self) -> dict[str, Any]:
        """What the evaluation computes, as plain data (part of a metric record's key, with the data's hashes)."""
        return {
            "metrics": list(self.metrics),
            "degrade": self.degrade if self.pairs is None else "pairs",
            "border": self.border,
            "max_tokens": self.max_tokens,
            "window": self.window,
            "stride": self.stride,
        }


@dataclass(frozen=True)
class Objective:
    metric: str
    output: str | None
    direction: Literal["maximize", "minimize"]

    @property
    def label(self) -> str:
        return f"{self.output}.{self.metric}" if self.output else self.metric


def _metric_error(name: object, where: Location) -> MergerError:
    close = did_you_mean(str(name), list(METRICS))
    hint = f"did you mean '{close}'? " if close else ""
    return MergerError(f"unknown metric '{shown(name)}'", where=where, fix=f"{hint}metrics: {', '.join(METRICS)}")


def build_evaluation(raw: Any, outputs: Mapping[str, object], where: Location) -> Evaluation | None:
    """The `evaluate` block, checked against the recipe's outputs; None when there is none."""
    from merger.recipe.model import validation_error

    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise MergerError(
            f"evaluate must be a mapping, not {shown(raw)}",
            where=where,
            fix="write evaluate: {images: data/val_hr, degrade: bicubic, metrics: [psnr, ssim]}",
        )
    try:
        model = EvaluateModel.model_validate(dict(raw))
    except ValidationError as e:
        raise validation_error(e, EvaluateModel, where=where, what="evaluate") from None
    if not model.metrics:
        raise MergerError("evaluate names no metrics", where=where.at("metrics"), fix=f"metrics: {', '.join(METRICS)}")
    for index, name in enumerate(model.metrics):
        if name not in METRICS:
            raise _metric_error(name, where.at(f"metrics.{index}"))
    metrics = tuple(dict.fromkeys(model.metrics))
    images = (model.images,) if isinstance(model.images, str) else tuple(model.images or ())
    image_metrics = [m for m in metrics if m in IMAGE_METRICS]
    if images and model.pairs is not None:
        raise MergerError(
            "evaluate names both images and pairs",
            where=where,
            fix="give images (references, degraded to make the inputs) or pairs: {lr: DIR, hr: DIR}, not both",
        )
    if image_metrics and not images and model.pairs is None:
        raise MergerError(
            f"evaluate computes {', '.join(image_metrics)} but names no images",
            where=where,
            fix="add images: <reference images, a folder or a glob> (or sample), or pairs: {lr: DIR, hr: DIR}",
        )
    if (images or model.pairs is not None) and not image_metrics:
        raise MergerError(
            "evaluate names images but no image metric",
            where=where.at("metrics"),
            fix=f"add metrics among {', '.join(IMAGE_METRICS)}, or remove images",
        )
    if "perplexity" in metrics and not model.text:
        raise MergerError(
            "evaluate computes perplexity but names no text",
            where=where,
            fix="add text: <a UTF-8 text file> (max_tokens bounds how much of it is read)",
        )
    if model.text and "perplexity" not in metrics:
        raise MergerError("evaluate names a text but not perplexity", where=where.at("metrics"), fix="add perplexity")
    if model.window is not None and model.stride is not None and model.stride > model.window:
        raise MergerError(
            f"evaluate's stride {model.stride} is more than its window {model.window}",
            where=where.at("stride"),
            fix="give a stride of at most the window (window // 2 when not given)",
        )
    for index, name in enumerate(model.outputs or ()):
        if name not in outputs:
            close = did_you_mean(name, list(outputs))
            raise MergerError(
                f"evaluate names output '{name}', which the recipe does not have",
                where=where.at(f"outputs.{index}"),
                fix=(f"did you mean '{close}'? " if close else "") + f"outputs: {', '.join(outputs)}",
            )
    return Evaluation(
        metrics,
        images,
        model.degrade,
        (model.pairs.lr, model.pairs.hr) if model.pairs else None,
        model.border,
        model.text,
        model.max_tokens,
        model.window,
        model.stride,
        tuple(model.outputs) if model.outputs is not None else None,
    )


def build_objectives(
    raw: Any, evaluation: Evaluation | None, outputs: Mapping[str, object], where: Location
) -> tuple[Objective, ...]:
    """The `objective`: one or more metrics the evaluation computes (a name, or {metric, output, direction})."""
    from merger.recipe.model import validation_error

    if raw is None:
        return ()
    entries = list(raw) if isinstance(raw, list | tuple) else [raw]
    if not entries:
        return ()
    if evaluation is None:
        raise MergerError(
            "the recipe has an objective but no evaluate block, so there is nothing to score",
            where=where,
            fix="add evaluate: {images: ..., metrics: [psnr]} (or text: and perplexity)",
        )
    objectives = []
    for index, entry in enumerate(entries):
        place = where.at(str(index)) if len(entries) > 1 or isinstance(raw, list | tuple) else where
        if isinstance(entry, str):
            entry = {"metric": entry}
        if not isinstance(entry, Mapping):
            raise MergerError(
                f"objective must be a metric name or {{metric, output, direction}}, not {shown(entry)}",
                where=place,
                fix="write objective: psnr, or objective: {metric: psnr, output: blend, direction: maximize}",
            )
        try:
            model = ObjectiveModel.model_validate(dict(entry))
        except ValidationError as e:
            raise validation_error(e, ObjectiveModel, where=place, what="an objective") from None
        if model.metric not in METRICS:
            raise _metric_error(model.metric, place)
        if model.metric not in evaluation.metrics:
            raise MergerError(
                f"objective '{model.metric}' is not among the metrics evaluate computes"
                f" ({', '.join(evaluation.metrics)})",
                where=place,
                fix=f"add {model.metric} to evaluate.metrics, or choose one of those",
            )
        if model.output is not None and model.output not in outputs:
            close = did_you_mean(model.output, list(outputs))
            raise MergerError(
                f"objective names output '{model.output}', which the recipe does not have",
                where=place,
                fix=(f"did you mean '{close}'? " if close else "") + f"outputs: {', '.join(outputs)}",
            )
        if model.output is not None and evaluation.outputs is not None and model.output not in evaluation.outputs:
            raise MergerError(
                f"objective names output '{model.output}', which evaluate does not measure",
                where=place,
                fix=f"add it to evaluate.outputs ({', '.join(evaluation.outputs)})",
            )
        objectives.append(Objective(model.metric, model.output, model.direction or METRICS[model.metric]))
    labels = [o.label for o in objectives]
    if len(set(labels)) != len(labels):
        raise MergerError(f"objective names {labels} with a repeat", where=where, fix="name each objective once")
    return tuple(objectives)
