"""What an `evaluate` block reads, checked in pre-flight (no tensor is read): the reference images
(and low-resolution inputs, for pairs), the text, which outputs each metric applies to, and the
objective's output.

Images: `sample` (merger/demo/eval.png), files, folders (their images, sorted), globs; at most
MAX_EVAL_IMAGES, each one Pillow decodes whole, of at most MAX_PREVIEW_PIXELS. Pairs: the images of
the `lr` and `hr` folders matched by file name (`0801x2.png` matches `0801.png` too, as DIV2K names
them); each HR must be the LR times the model's scale (an HR up to scale-1 pixels larger is cropped).
Every image, as each image model gets it, must be at least the model's minimum side, and the output
minus its border at least SSIM's 11-pixel window. The text must be UTF-8, not empty, at most
MAX_TEXT_BYTES. The data's sha256 is part of each metric record's key (merger.report.evaluate).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from merger.archs.image_models import image_model
from merger.core import limits
from merger.core.regular_file import read_bounded
from merger.engine.globbing import bounded_glob
from merger.errors import Location, MergerError, shown
from merger.recipe.evaluate import IMAGE_METRICS, Evaluation, Objective
from merger.report.preview_images import SAMPLE, SAMPLE_IMAGE, folder_images

if TYPE_CHECKING:
    from merger.engine.folder_facts import FolderFacts
    from merger.engine.plan import Plan

MAX_EVAL_IMAGES = 256
MAX_TEXT_BYTES = 64 * 1024 * 1024
MAX_IMAGE_BYTES = 256 * 1024 * 1024
SSIM_WINDOW = 11
#: Pillow modes of more than 8 bits a channel (Pillow's convert to RGB clips them: refused)
WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "RGB;16", "RGBA;16"})
_SCALE_SUFFIX = re.compile(r"^(.*?)x\d+$")

Kind = Literal["image", "text", "skipped"]


@dataclass(frozen=True)
class EvalImage:
    """A reference image, and its low-resolution input when given (pairs); sizes are (width, height)."""

    name: str
    hr: Path
    size: tuple[int, int]
    lr: Path | None = None
    lr_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Target:
    """An output to measure: what kind of model it is (or why it is skipped), and an image model's scale."""

    kind: Kind
    scale: int = 1
    min_size: int = 0  # an image model's shortest input side (spandrel's size requirements)
    note: str = ""  # the model, or why it is skipped


@dataclass(frozen=True)
class EvaluationPlan:
    evaluation: Evaluation
    images: tuple[EvalImage, ...]
    text: str | None
    data_hash: str  # sha256 of the images' and the text's bytes, with their names
    targets: dict[str, Target]  # output -> what is measured
    objectives: tuple[Objective, ...] = ()  # with every output filled in
    notes: tuple[str, ...] = field(default_factory=tuple)  # said once, before the run

    def border(self, scale: int) -> int:
        return self.evaluation.border if self.evaluation.border is not None else scale


def _image_size(path: Path, where: Location, digest: hashlib._Hash) -> tuple[int, int]:
    """The image's (width, height), decoded whole; its bytes go into `digest`."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MergerError(
            "evaluating image models needs Pillow and spandrel", where=where, fix="pip install -e '.[sr]'"
        ) from None
    try:
        data, size = read_bounded(path, MAX_IMAGE_BYTES)
        if not data and size:
            raise ValueError(f"{size} bytes, more than {MAX_IMAGE_BYTES}")
        import io

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.MAX_PREVIEW_PIXELS:
                raise MergerError(
                    f"evaluation image '{shown(path)}' is {width}x{height} pixels, more than the"
                    f" {limits.MAX_PREVIEW_PIXELS} an evaluation takes (MAX_PREVIEW_PIXELS)",
                    where=where,
                    fix="crop the images to regions of at most 1024x1024",
                )
            if image.mode in WIDE_MODES:
                raise MergerError(
                    f"evaluation image '{shown(path)}' has {image.mode} pixels (16-bit or floating point), which"
                    " 8-bit metrics would misread",
                    where=where,
                    fix="convert the image to 8 bits per channel (e.g. PNG RGB)",
                )
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise MergerError(
            f"evaluation image '{shown(path)}' is not an image Pillow can read ({shown(e)})",
            where=where,
            fix="name PNG or JPEG files that open in an image viewer",
        ) from None
    digest.update(json.dumps([path.name, len(data)]).encode())
    digest.update(data)
    return width, height


def _folder_images(folder: Path, where: Location) -> list[Path]:
    return folder_images(folder, where, "evaluation folder")


def _image_files(entries: tuple[str, ...], launch_dir: Path, where: Location) -> list[Path]:
    files: list[Path] = []
    for entry in entries:
        if entry == SAMPLE:
            files.append(SAMPLE_IMAGE)
            continue
        path = launch_dir / entry  # no ~: a recipe does not read $HOME
        if any(c in entry for c in "*?["):
            matched = [p for p in bounded_glob(path, where=where, shown_as=entry) if p.is_file()]
            if not matched:
                raise MergerError(f"evaluation images '{shown(entry)}' match no file", where=where, fix=_IMAGES_FIX)
            files.extend(matched)
        elif path.is_dir():
            files.extend(_folder_images(path, where))
        elif path.is_file():
            files.append(path)
        else:
            raise MergerError(f"evaluation image not found: '{shown(path)}'", where=where, fix=_IMAGES_FIX)
        if len(files) > MAX_EVAL_IMAGES:
            raise MergerError(
                f"evaluate names more than {MAX_EVAL_IMAGES} images (MAX_EVAL_IMAGES)",
                where=where,
                fix="evaluate on a validation set of at most that many images",
            )
    return list(dict.fromkeys(files))


_IMAGES_FIX = "name image files, a folder or a glob of them, relative to where you run merger (or sample)"


def _unique(stem: str, taken: set[str]) -> str:
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


def _references(evaluation: Evaluation, launch_dir: Path, where: Location, digest: hashlib._Hash) -> list[EvalImage]:
    taken: set[str] = set()
    if evaluation.pairs is None:
        files = _image_files(evaluation.images, launch_dir, where.at("images"))
        return [
            EvalImage(_unique("sample" if f == SAMPLE_IMAGE else f.stem, taken), f, _image_size(f, where, digest))
            for f in files
        ]
    lr_dir, hr_dir = (launch_dir / p for p in evaluation.pairs)
    for folder, side in ((lr_dir, "lr"), (hr_dir, "hr")):
        if not folder.is_dir():
            raise MergerError(
                f"pairs.{side} is not a folder: '{shown(folder)}'",
                where=where.at(f"pairs.{side}"),
                fix="name the folders of low-resolution inputs and of their references",
            )
    lows = _folder_images(lr_dir, where.at("pairs.lr"))
    highs: dict[str, Path] = {}
    for reference in _folder_images(hr_dir, where.at("pairs.hr")):
        if reference.stem in highs:
            raise MergerError(
                f"pairs.hr holds '{shown(highs[reference.stem].name)}' and '{shown(reference.name)}':"
                " which is the reference?",
                where=where.at("pairs.hr"),
                fix="keep one image of each name in the folder",
            )
        highs[reference.stem] = reference
    if len(lows) > MAX_EVAL_IMAGES:
        raise MergerError(f"pairs.lr holds more than {MAX_EVAL_IMAGES} images", where=where.at("pairs.lr"))
    matched: list[tuple[Path, Path]] = []
    unmatched: list[str] = []
    for low in lows:
        suffix = _SCALE_SUFFIX.match(low.stem)
        high = highs.pop(low.stem, None) or (highs.pop(suffix.group(1), None) if suffix else None)
        if high is None:
            unmatched.append(f"{low.name} (lr)")
        else:
            matched.append((low, high))
    unmatched.extend(f"{p.name} (hr)" for p in highs.values())
    if unmatched:
        raise MergerError(
            f"evaluate's pairs do not match: {', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}"
            " has no image of the same name in the other folder",
            where=where.at("pairs"),
            fix="give each low-resolution image a reference of the same name (0801.png, or 0801x2.png and 0801.png)",
        )
    return [
        EvalImage(
            _unique(high.stem, taken),
            high,
            _image_size(high, where, digest),
            low,
            _image_size(low, where, digest),
        )
        for low, high in matched
    ]


def _text(evaluation: Evaluation, launch_dir: Path, where: Location, digest: hashlib._Hash) -> str | None:
    if evaluation.text is None:
        return None
    path = launch_dir / evaluation.text
    fix = "name a UTF-8 text file (a held-out sample of what the model should read)"
    try:
        data, size = read_bounded(path, MAX_TEXT_BYTES)
    except OSError as e:
        raise MergerError(
            f"evaluate's text '{shown(path)}' cannot be read ({shown(e)})", where=where, fix=fix
        ) from None
    if size > MAX_TEXT_BYTES:
        raise MergerError(
            f"evaluate's text '{shown(path)}' is {size} bytes, more than {MAX_TEXT_BYTES} (MAX_TEXT_BYTES)",
            where=where,
            fix="cut it: max_tokens reads only the start anyway",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergerError(
            f"evaluate's text '{shown(path)}' is not UTF-8 (byte {e.start})", where=where, fix=fix
        ) from None
    if not text.strip():
        raise MergerError(f"evaluate's text '{shown(path)}' is empty", where=where, fix=fix)
    digest.update(json.dumps(["text", len(data)]).encode())
    digest.update(data)
    return text


def _is_causal_lm(facts: FolderFacts | None) -> bool:
    """Whether a folder output's config.json says it is a causal language model (…ForCausalLM)."""
    if facts is None or facts.config_dir is None:
        return False
    try:
        data, _ = read_bounded(facts.config_dir / "config.json", 4 * 1024 * 1024)
        config = json.loads(data) if data else {}
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and any(
        isinstance(a, str) and (a.endswith("ForCausalLM") or a.endswith("LMHeadModel")) for a in architectures
    )


def _targets(plan: Plan, evaluation: Evaluation, folders: dict[str, FolderFacts]) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    names = evaluation.outputs if evaluation.outputs is not None else tuple(plan.recipe.outputs)
    for name in names:
        output = plan.recipe.outputs[name]
        planned = plan.nodes.get(output.node)
        model = image_model(planned.spec.tensors) if planned is not None else None
        if model is not None and evaluation.image_metrics:
            targets[name] = Target("image", model.scale or 1, model.min_size, model.label)
        elif evaluation.text_metrics and output.format == "folder" and _is_causal_lm(folders.get(name)):
            targets[name] = Target("text")
        else:
            wanted = "an image model" if evaluation.image_metrics else ""
            wanted += (" or " if wanted and evaluation.text_metrics else "") + (
                "a causal language model folder" if evaluation.text_metrics else ""
            )
            targets[name] = Target("skipped", note=f"not {wanted}")
    return targets


def _check_sizes(plan: Plan, images: list[EvalImage], targets: dict[str, Target], where: Location) -> None:
    border_setting = plan.recipe.evaluation.border if plan.recipe.evaluation else None
    metrics = plan.recipe.evaluation.metrics if plan.recipe.evaluation else ()
    for name, target in targets.items():
        if target.kind != "image":
            continue
        scale, least = target.scale, max(1, target.min_size)
        border = border_setting if border_setting is not None else scale
        for image in images:
            width, height = image.size
            if image.lr_size is not None:
                low_w, low_h = image.lr_size
                if not (low_w * scale <= width < (low_w + 1) * scale and low_h * scale <= height < (low_h + 1) * scale):
                    raise MergerError(
                        f"evaluation pair '{image.name}': the reference is {width}x{height} pixels, not its"
                        f" {low_w}x{low_h} input times output '{name}''s scale {scale}",
                        where=where.at("pairs"),
                        fix=f"pair each input with its reference at {scale}x (or evaluate a model of the pairs' scale)",
                    )
            else:
                low_w, low_h = width // scale, height // scale
            if min(low_w, low_h) < least:
                raise MergerError(
                    f"evaluation image '{shown(image.hr)}' gives output '{name}' ({scale}x) an input of"
                    f" {low_w}x{low_h} pixels, smaller than the {least} pixels a side the model takes",
                    where=where,
                    fix=f"evaluate on images at least {least * scale} pixels a side",
                )
            least_side = SSIM_WINDOW if "ssim" in metrics else 4  # sharpness: a 3x3 Laplacian, twice
            if min(low_w, low_h) * scale - 2 * border < least_side:
                raise MergerError(
                    f"evaluation image '{shown(image.hr)}' is too small for output '{name}': {low_w * scale}x"
                    f"{low_h * scale} pixels less a border of {border} leaves less than"
                    + (f" SSIM's {SSIM_WINDOW}" if least_side == SSIM_WINDOW else f" {least_side} pixels a side"),
                    where=where,
                    fix=f"evaluate on images at least {2 * border + least_side} pixels a side (or set border)",
                )
            if low_w * low_h * scale * scale > limits.MAX_PREVIEW_OUTPUT_PIXELS:
                raise MergerError(
                    f"evaluation image '{shown(image.hr)}' would be more than {limits.MAX_PREVIEW_OUTPUT_PIXELS}"
                    f" pixels once output '{name}' upscales it",
                    where=where,
                    fix="evaluate on smaller crops",
                )


def _bind(objectives: tuple[Objective, ...], targets: dict[str, Target], where: Location) -> tuple[Objective, ...]:
    """Each objective with its output: the one it names, else the only measured output with its metric."""
    bound = []
    for objective in objectives:
        kind = "image" if objective.metric in IMAGE_METRICS else "text"
        having = [name for name, t in targets.items() if t.kind == kind]
        if objective.output is not None:
            if objective.output not in having:
                raise MergerError(
                    f"objective '{objective.label}': output '{objective.output}' has no {objective.metric}"
                    f" ({targets[objective.output].note if objective.output in targets else 'not measured'})",
                    where=where,
                    fix=f"name an output that has it: {', '.join(having) or '(none)'}",
                )
            bound.append(objective)
        elif len(having) == 1:
            bound.append(Objective(objective.metric, having[0], objective.direction))
        else:
            raise MergerError(
                f"objective '{objective.metric}': "
                + (f"outputs {', '.join(having)} all have it" if having else "no output of the recipe has it")
                + (
                    ""
                    if having
                    else f" ({'no image model' if kind == 'image' else 'no causal language model folder'} among them)"
                ),
                where=where,
                fix=f"write objective: {{metric: {objective.metric}, output: {having[0]}}}"
                if having
                else "evaluate an output that has this metric, or choose another",
            )
    return tuple(bound)


def evaluation_plan(plan: Plan, folders: dict[str, FolderFacts], launch_dir: Path) -> EvaluationPlan | None:
    """The recipe's evaluation, checked against its outputs and its files; None when it has none."""
    evaluation = plan.recipe.evaluation
    if evaluation is None:
        return None
    where = plan.recipe.where("evaluate")
    targets = _targets(plan, evaluation, folders)
    digest = hashlib.sha256()
    measured = {t.kind for t in targets.values()}
    images = _references(evaluation, launch_dir, where, digest) if evaluation.image_metrics else []
    text = _text(evaluation, launch_dir, where.at("text"), digest) if evaluation.text_metrics else None
    _check_sizes(plan, images, targets, where)
    objectives = _bind(plan.recipe.objectives, targets, plan.recipe.where("objective"))
    notes = []
    for kind, metrics in (("image", evaluation.image_metrics), ("text", evaluation.text_metrics)):
        if metrics and kind not in measured:
            what = "an image model" if kind == "image" else "a causal language model folder"
            notes.append(f"evaluate: no output is {what}, so {', '.join(metrics)} is not measured")
    return EvaluationPlan(evaluation, tuple(images), text, digest.hexdigest(), targets, objectives, tuple(notes))
