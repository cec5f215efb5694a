"""convert_scale: an ESRGAN of one scale made into another (1x, 2x, 4x, 8x, 16x).

- `method: upconv` (traiNNer's way): the trunk and the upsampling stages both
  scales share are kept; stages are dropped, or added after the last one, and
  the HR and last convs move to their new places. A new stage starts as a
  copy of the nearest existing one (`init: copy`), or as an identity kernel
  (`init: identity`). Such a model is a starting point: fine-tune it (the
  traiNNer authors trained for about 1k iterations).
- `method: unshuffle` (Real-ESRGAN's way, to a smaller scale): the input is
  pixel-unshuffled by f = old scale / new scale (2 or 4) and the first conv
  takes f*f times the channels, its weights spread evenly over each pixel's
  f*f sub-pixels: conv(x) on the box-downscaled image equals the wider conv on
  the unshuffled one, so f_new(x) = f_old(avgpool_f(x)) exactly. No training.
  A model that already pixel-unshuffles its input by s (RealESRGAN_x2plus: a
  4x body behind unshuffle 2) becomes one that unshuffles by s*f: new input
  channel (c, p, q) of the s*f grid takes old channel (c, p // f, q // f),
  divided by f*f. Real-ESRGAN's RRDBNet unshuffles by 2 or 4, so s*f is one
  of those.

The result keeps the input's key layout and loads in spandrel with the new scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from merger.archs import esrgan
from merger.archs.esrgan import Role
from merger.core.specs import TensorSpec
from merger.errors import MergerError
from merger.ops.base import Arity, InputSpecs, NodeSpec, Op, PieceMode, TensorInputs
from merger.ops.params import OpParams

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend


class ConvertScaleParams(OpParams):
    scale: Literal[1, 2, 4, 8, 16]
    method: Literal["upconv", "unshuffle"] = "upconv"
    init: Literal["copy", "identity"] = "copy"


@dataclass(frozen=True)
class Making:
    """How one output key is made: `copy` the source key; `spread` it over `factor`**2 input channels
    (pixel-unshuffle); or a new `identity` stage of `factor` filters (`source` is "weight" or "bias")."""

    how: Literal["copy", "spread", "identity"]
    source: str
    factor: int = 0
    shuffle: int = 1  # spread: the pixel-unshuffle the source model already has


#: the plan of a scale conversion: output key -> how it is made
Conversion = dict[str, Making]
#: by how much unshuffle shrinks a model's scale, and the total input unshuffles Real-ESRGAN's RRDBNet has
UNSHUFFLE_FACTORS = (2, 4)
UNSHUFFLED = (2, 4)


def _unshuffles(found: esrgan.Esrgan, factor: int) -> bool:
    """Whether unshuffle by `factor` makes a model of this one: a whole scale, a known total unshuffle."""
    return found.scale % factor == 0 and found.shuffle * factor in UNSHUFFLED


def spread_channels(channels: int, shuffle: int, factor: int) -> list[int]:
    """For each input channel of the first conv after unshuffle by `shuffle * factor`, the old channel
    (of unshuffle by `shuffle`) it takes: (c, p, q) -> (c, p // factor, q // factor)."""
    old, new = shuffle, shuffle * factor
    colours = channels // (old * old)
    return [
        c * old * old + (p // factor) * old + (q // factor)
        for c in range(colours)
        for p in range(new)
        for q in range(new)
    ]


def _plan(spec: dict[str, TensorSpec], params: ConvertScaleParams) -> tuple[esrgan.Esrgan, Conversion]:
    found = esrgan.detect(spec)
    if found is None:
        raise MergerError(
            f"convert_scale needs an ESRGAN (RRDBNet) model, and this input is not one: {esrgan.explain(spec)}",
            fix="give convert_scale an ESRGAN model in the old, new or basicsr layout",
        )
    plan: Conversion = {}
    if params.method == "unshuffle":
        factor = found.scale // params.scale if found.scale % params.scale == 0 else 0
        possible = [found.scale // f for f in UNSHUFFLE_FACTORS if _unshuffles(found, f)]
        if factor not in UNSHUFFLE_FACTORS or not _unshuffles(found, factor):
            model = f"this {found.scale}x model" + (f" (pixel-unshuffle {found.shuffle})" if found.shuffle > 1 else "")
            can = " or ".join(f"{s}x" for s in possible)
            raise MergerError(
                f"method unshuffle makes {model} into {can}, not {params.scale}x"
                if possible
                else f"method unshuffle cannot make {model} smaller: its input would be pixel-unshuffled by more"
                f" than {max(UNSHUFFLED)}",
                fix="use method: upconv for larger scales"
                + (f", or scale: {possible[0]}" if possible else "; the model is as small as unshuffle makes it"),
            )
        first = found.key(Role("first", 0), "weight")
        for key in spec:
            plan[key] = Making("spread", key, factor, found.shuffle) if key == first else Making("copy", key)
        return found, plan
    stages = math.log2(params.scale * found.shuffle)
    if not stages.is_integer() or stages < 0:
        raise MergerError(
            f"a model with pixel-unshuffle {found.shuffle} cannot be made {params.scale}x by upconv stages",
            fix="choose a scale that is a power of 2 times the unshuffle factor",
        )
    target = int(stages)
    for key, (role, _) in found.roles.items():
        if role[0] not in ("up", "hr", "last"):
            plan[key] = Making("copy", key)
    for m in range(1, target + 1):
        for suffix in ("weight", "bias"):
            new_key = found.key(Role("up", m), suffix, upsamples=target)
            if m <= found.upsamples:
                plan[new_key] = Making("copy", found.key(Role("up", m), suffix))
            elif params.init == "copy" and found.upsamples > 0:
                plan[new_key] = Making("copy", found.key(Role("up", found.upsamples), suffix))
            else:
                plan[new_key] = Making("identity", suffix, found.filters)
    for kind in ("hr", "last"):
        for suffix in ("weight", "bias"):
            plan[found.key(Role(kind), suffix, upsamples=target)] = Making("copy", found.key(Role(kind), suffix))
    return found, plan


class ConvertScale(Op[ConvertScaleParams, ConvertScaleParams, Conversion]):
    """Change an ESRGAN's scale by upconv stages (needs fine-tuning) or by pixel-unshuffle (exact)."""

    name = "convert_scale"
    params_model = ConvertScaleParams
    arity = Arity(1, 1)
    summary = "an ESRGAN made 1x/2x/4x/8x/16x (upconv stages or pixel-unshuffle)"

    def spec(self, inputs: InputSpecs, params: ConvertScaleParams) -> NodeSpec[Conversion]:
        source = inputs.specs[0]
        found, plan = _plan(source, params)
        dtype = source[found.key(Role("first", 0), "weight")].dtype
        tensors: dict[str, TensorSpec] = {}
        for key, making in plan.items():
            how, origin, extra = making.how, making.source, making.factor
            if how == "copy":
                tensors[key] = source[origin]
            elif how == "spread":
                out, cin, kh, kw = source[origin].shape
                tensors[key] = TensorSpec(source[origin].dtype, (out, cin * extra * extra, kh, kw))
            else:
                shape = (extra, extra, 3, 3) if origin == "weight" else (extra,)
                tensors[key] = TensorSpec(dtype, shape)
        notes: dict[str, Any] = {"from_scale": found.scale, "to_scale": params.scale, "method": params.method}
        if params.method == "upconv":
            target = int(math.log2(params.scale * found.shuffle))
            notes["stages_added"] = max(0, target - found.upsamples)
            notes["stages_dropped"] = max(0, found.upsamples - target)
        return NodeSpec(tensors=tensors, notes=notes, plan=plan)

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Conversion) -> PieceMode:
        return "copy" if plan[key].how == "copy" else "tensor"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Conversion) -> list[tuple[int, str]]:
        making = plan[key]
        return [(0, making.source)] if making.how in ("copy", "spread") else []

    def tensor(self, key: str, inputs: TensorInputs[Conversion], params: ConvertScaleParams, xp: Backend) -> Array:
        making = inputs.plan[key]
        how, origin, extra = making.how, making.source, making.factor
        import numpy as np

        if how == "copy":
            return inputs.read(0, origin)
        if how == "spread":
            weight = inputs.read(0, origin)
            columns = spread_channels(inputs.specs[0][origin].shape[1], making.shuffle, extra)
            return weight[:, columns] / (extra * extra)
        if origin == "bias":
            return xp.asarray(np.zeros(extra, dtype=np.float32))
        kernel = np.zeros((extra, extra, 3, 3), dtype=np.float32)
        kernel[np.arange(extra), np.arange(extra), 1, 1] = 1.0
        return xp.asarray(kernel)
