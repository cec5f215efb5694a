"""What the `preview` and `preview_crop` settings name, checked in pre-flight (no tensor is read).

`preview` is `sample` (merger/demo/eval.png, 256x256), an image file, a folder (its images, sorted
by name, at most MAX_PREVIEW_IMAGES), or a list of these; `preview_crop: [x, y, w, h]` is a region
in each image file's own pixels (for the sample: eval.png's). Every image is decoded once here, so
one that Pillow cannot read is an error that names it; so is one whose region an image model gets
is shorter than that model's minimum side (spandrel's size requirements) or would upscale to more
than MAX_PREVIEW_OUTPUT_PIXELS. The sample reaches a model of scale s cropped to a multiple of s
and box-downscaled by s, so its preview is the sample's size at every scale.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from merger.archs.image_models import image_model
from merger.core import limits
from merger.errors import Location, MergerError, shown

if TYPE_CHECKING:
    from merger.engine.plan import Plan

SAMPLE = "sample"
SAMPLE_IMAGE = Path(__file__).parents[1] / "demo" / "eval.png"
#: what a folder given as `preview` contributes (other files in it are left alone)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

Crop = tuple[int, int, int, int]


class RecipeSettings(Protocol):
    """What previews read of a Recipe (merger.recipe, which this room does not import)."""

    @property
    def settings(self) -> Any: ...

    def where(self, place: str) -> Location: ...


@dataclass(frozen=True)
class PreviewImage:
    """An input image: its file, a box-downscale applied to every model (`downscale`), or, for the
    sample, one by each model's scale (`sample`); the `crop` region; the name its PNGs end in."""

    path: Path
    downscale: int = 1
    sample: bool = False
    crop: Crop | None = None
    name: str = ""
    size: tuple[int, int] | None = None  # the file's width and height, as pre-flight read them

    @property
    def stem(self) -> str:
        """What `<node>__<stem>.png` ends in: 'sample', or the file's stem (made unique in a run)."""
        return self.name or ("sample" if self.sample else self.path.stem)

    def factor(self, scale: int) -> int:
        """How much the image is box-downscaled for a model of `scale`."""
        return max(1, scale) if self.sample else self.downscale

    def region(self) -> tuple[int, int]:
        """The width and height of the part of the file that is used (the crop, else the whole)."""
        if self.crop is not None:
            return self.crop[2], self.crop[3]
        if self.size is None:
            raise ValueError(f"the size of {self.path} is not known")
        return self.size

    def input_size(self, scale: int) -> tuple[int, int]:
        """The width and height a model of `scale` gets: the region cropped to a multiple of the
        downscale factor, then divided by it."""
        factor = self.factor(scale)
        width, height = self.region()
        return width // factor, height // factor


def preview_images(recipe: RecipeSettings, launch_dir: Path) -> list[PreviewImage]:
    """The images the recipe's `preview` names, each decoded and checked (empty when previews are off)."""
    setting = recipe.settings.preview
    where = recipe.where("preview")
    crop = crop_setting(recipe.settings.preview_crop, recipe.where("preview_crop"))
    if setting in (None, False, [], ""):
        return []
    entries = [SAMPLE] if setting is True else [setting] if isinstance(setting, str) else list(setting)
    files: list[tuple[Path, bool]] = []
    for entry in entries:
        if entry == SAMPLE:
            files.append((SAMPLE_IMAGE, True))
            continue
        path = launch_dir / Path(str(entry)).expanduser()
        if path.is_dir():
            files.extend((image, False) for image in folder_images(path, where))
        elif path.is_file():
            files.append((path, False))
        else:
            raise MergerError(
                f"preview image not found: '{shown(path)}'",
                where=where,
                fix="name image files (PNG, JPEG, ...) or a folder of them, relative to where you run merger,"
                " or preview: sample",
            )
    if len(files) > limits.MAX_PREVIEW_IMAGES:
        raise MergerError(
            f"preview names {len(files)} images, more than the {limits.MAX_PREVIEW_IMAGES} a run previews"
            " (MAX_PREVIEW_IMAGES: every image-model node upscales each)",
            where=where,
            fix=f"name at most {limits.MAX_PREVIEW_IMAGES} images (a folder of just those you compare)",
        )
    images = []
    taken: set[str] = set()
    for path, sample in files:
        size = check_image(path, where, crop, recipe.where("preview_crop"))
        stem = "sample" if sample else path.stem
        name, n = stem, 1
        while name in taken:  # two folders' photo.png: photo, photo_2
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        images.append(PreviewImage(path, sample=sample, crop=crop, name=name, size=size))
    return images


def folder_images(folder: Path, where: Location, what: str = "preview folder") -> list[Path]:
    """The images of a folder given as `preview` (or `evaluate`'s; `what` names it in errors): by
    suffix, sorted by name, not its subfolders."""
    try:
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise MergerError(f"{what} '{shown(folder)}' cannot be listed ({shown(e)})", where=where) from None
    if not found:
        raise MergerError(
            f"{what} '{shown(folder)}' holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})",
            where=where,
            fix="put the images in it, or name image files",
        )
    return found


def crop_setting(value: Any, where: Location) -> Crop | None:
    """`preview_crop: [x, y, w, h]`: a region of whole pixels, w and h at least 1; None: the whole image."""
    if value is None:
        return None
    fix = "write preview_crop: [x, y, width, height] in the image's pixels, e.g. [64, 32, 128, 128]"
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise MergerError(f"preview_crop must be [x, y, width, height], not {shown(value)}", where=where, fix=fix)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise MergerError(f"preview_crop takes whole pixels, not {shown(value)}", where=where, fix=fix)
    x, y, w, h = (int(v) for v in value)
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise MergerError(
            f"preview_crop {[x, y, w, h]}: x and y must be 0 or more, width and height 1 or more",
            where=where,
            fix=fix,
        )
    return x, y, w, h


_DECODED: dict[tuple[str, int, int], tuple[int, int]] = {}  # (path, size, mtime) -> (width, height)
_DECODED_SIZE = 1024
_LOCK = threading.Lock()


def check_image(
    path: Path, where: Location, crop: Crop | None = None, crop_where: Location | None = None
) -> tuple[int, int]:
    """The image's width and height. It must be one Pillow decodes whole (a truncated file is an error
    here, not in the run), of at most MAX_PREVIEW_PIXELS (read from its header first: a small PNG can
    declare a huge canvas), and hold the crop. Decoded once per process per (path, size, mtime)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return (0, 0)  # no previews without merger[sr]: render says so
    try:
        stat = path.stat()
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        with _LOCK:
            size = _DECODED.get(memo)
        if size is None:
            with Image.open(path) as image:
                size = image.size
                if size[0] * size[1] <= limits.MAX_PREVIEW_PIXELS:
                    image.load()
            with _LOCK:
                if len(_DECODED) >= _DECODED_SIZE:
                    _DECODED.clear()
                _DECODED[memo] = size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise MergerError(
            f"preview image '{shown(path)}' is not an image Pillow can read ({shown(e)})",
            where=where,
            fix="name PNG or JPEG files that open in an image viewer",
        ) from None
    width, height = size
    if width * height > limits.MAX_PREVIEW_PIXELS:
        raise MergerError(
            f"preview image '{shown(path)}' is {width}x{height} pixels, more than the {limits.MAX_PREVIEW_PIXELS} a"
            " preview takes (MAX_PREVIEW_PIXELS)",
            where=where,
            fix="crop the image file to the region you want to compare (say 512x512)",
        )
    if crop is not None and (crop[0] + crop[2] > width or crop[1] + crop[3] > height):
        raise MergerError(
            f"preview_crop {list(crop)} reaches beyond preview image '{shown(path)}', which is {width}x{height} pixels",
            where=crop_where or where,
            fix="give a region inside every preview image: x + width and y + height at most the image's size",
        )
    return width, height


def check_preview_sizes(plan: Plan, images: list[PreviewImage]) -> None:
    """Each image, as each output's image model gets it, must be at least the model's minimum side
    (spandrel pads a smaller one, and the preview would be mostly padding) and upscale to at most
    MAX_PREVIEW_OUTPUT_PIXELS. From the specs alone; a node that is no image model is left out."""
    if not images or images[0].size == (0, 0):
        return
    where = plan.recipe.where("preview")
    for node in dict.fromkeys(output.node for output in plan.recipe.outputs.values()):
        planned = plan.nodes.get(node)
        model = image_model(planned.spec.tensors) if planned is not None else None
        if model is None or model.scale is None:
            continue
        scale, least = model.scale, max(1, model.min_size)
        for image in images:
            width, height = image.input_size(scale)
            how = _how(image, scale)
            if min(width, height) < least:
                raise MergerError(
                    f"preview image '{shown(image.path)}'{how} is {width}x{height} pixels, smaller than the"
                    f" {least} pixels a side that node '{node}' ({model.label}, {scale}x) takes",
                    where=where,
                    fix=f"give an image (or a preview_crop) at least {least * image.factor(scale)} pixels a side",
                )
            if width * height * scale * scale > limits.MAX_PREVIEW_OUTPUT_PIXELS:
                raise MergerError(
                    f"preview image '{shown(image.path)}'{how} would be {width * scale}x{height * scale} pixels"
                    f" once node '{node}' upscales it {scale}x, more than the {limits.MAX_PREVIEW_OUTPUT_PIXELS}"
                    " a preview makes (MAX_PREVIEW_OUTPUT_PIXELS)",
                    where=where,
                    fix="set preview_crop: [x, y, width, height] to the region you compare, or name a smaller image",
                )


def _how(image: PreviewImage, scale: int) -> str:
    """' (preview_crop [..], box-downscaled by 4)': what was done to the file before the model gets it."""
    done = [f"preview_crop {list(image.crop)}"] if image.crop is not None else []
    if image.factor(scale) > 1:
        done.append(f"box-downscaled by {image.factor(scale)}")
    return f" ({', '.join(done)})" if done else ""
