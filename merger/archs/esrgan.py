"""ESRGAN (RRDBNet) from its state dict alone: layout, scale and sizes, and key conversions.

Three key layouts name the same network:

| role | old (ESRGAN, traiNNer) | new (ESRGAN repo) | basicsr (BasicSR, Real-ESRGAN) |
|---|---|---|---|
| first conv | model.0 | conv_first | conv_first |
| dense conv j of RDB k of block i | model.1.sub.i.RDBk.convj.0 | RRDB_trunk.i.RDBk.convj | body.i.rdbk.convj |
| ESRGAN+ 1x1 conv | model.1.sub.i.RDBk.conv1x1 | RRDB_trunk.i.RDBk.conv1x1 | body.i.rdbk.conv1x1 |
| trunk conv | model.1.sub.<nb> | trunk_conv | conv_body |
| upsampling conv m (1..n) | model.<3m> | upconv<m> | conv_up<m> |
| HR conv | model.<3n+2> | HRconv | conv_hr |
| last conv | model.<3n+4> | conv_last | conv_last |

Each conv has `.weight` and (but the 1x1) `.bias`. A model with n upsampling
stages upscales its input by 2**n; Real-ESRGAN's 2x and 1x models first
pixel-unshuffle the input by 2 or 4 (the first conv then takes 4 or 16 times
the image channels), so their scale is 2**n / that factor. Everything here is
read from key names and shapes: any block count, any scale, no defaults.
Converting between layouts renames keys and nothing else, so a round trip is
bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from merger.core.specs import TensorSpec

LAYOUTS = ("old", "new", "basicsr")


class Role(NamedTuple):
    """Where a tensor sits in the network: `first`, `trunk`, `hr`, `last`; `up` stage `number`;
    or `block` `number`, dense block `dense`, conv `conv` (conv1..conv5, or conv1x1 in ESRGAN+)."""

    kind: str
    number: int = 0
    dense: int = 0
    conv: str = ""


class Placed(NamedTuple):
    """A key's role and whether it is the weight or the bias."""

    role: Role
    suffix: str


_PATTERNS: dict[str, list[tuple[re.Pattern[str], str]]] = {
    "old": [
        (re.compile(r"model\.0\.(weight|bias)"), "first"),
        (re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.(conv\d)\.0\.(weight|bias)"), "block"),
        (re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.(conv1x1)\.(weight)"), "block"),
        (re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)"), "trunk"),
        (re.compile(r"model\.(\d+)\.(weight|bias)"), "tail"),
    ],
    "new": [
        (re.compile(r"conv_first\.(weight|bias)"), "first"),
        (re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.(conv\d|conv1x1)\.(weight|bias)"), "block"),
        (re.compile(r"trunk_conv\.(weight|bias)"), "trunk"),
        (re.compile(r"upconv(\d+)\.(weight|bias)"), "up"),
        (re.compile(r"HRconv\.(weight|bias)"), "hr"),
        (re.compile(r"conv_last\.(weight|bias)"), "last"),
    ],
    "basicsr": [
        (re.compile(r"conv_first\.(weight|bias)"), "first"),
        (re.compile(r"body\.(\d+)\.rdb(\d)\.(conv\d|conv1x1)\.(weight|bias)"), "block"),
        (re.compile(r"conv_body\.(weight|bias)"), "trunk"),
        (re.compile(r"conv_up(\d+)\.(weight|bias)"), "up"),
        (re.compile(r"conv_hr\.(weight|bias)"), "hr"),
        (re.compile(r"conv_last\.(weight|bias)"), "last"),
    ],
}
_SIGNATURES = {
    "old": ("model.0.weight", "model.1.sub.0.RDB1."),
    "new": ("conv_first.weight", "RRDB_trunk.0.RDB1."),
    "basicsr": ("conv_first.weight", "body.0.rdb1."),
}


@dataclass(frozen=True)
class Esrgan:
    """What an ESRGAN state dict is, and where each of its keys sits in the network."""

    layout: str
    scale: int  # the model's upscaling factor, after any pixel-unshuffle
    upsamples: int  # number of upsampling stages (each 2x)
    shuffle: int  # pixel-unshuffle factor of the input (1: none)
    filters: int
    blocks: int
    growth: int
    in_channels: int  # image channels (the first conv takes in_channels * shuffle**2)
    out_channels: int
    plus: bool  # ESRGAN+ (1x1 convs in the dense blocks)
    roles: dict[str, Placed]  # key -> (role, "weight"|"bias")

    def describe(self) -> str:
        extras = f", pixel-unshuffle {self.shuffle}" if self.shuffle > 1 else ""
        extras += ", ESRGAN+" if self.plus else ""
        return (
            f"ESRGAN (RRDBNet), layout {self.layout}, scale {self.scale}x, {self.blocks} blocks,"
            f" {self.filters} filters, in {self.in_channels}, out {self.out_channels}{extras}"
        )

    def key(self, role: Role, suffix: str, layout: str | None = None, upsamples: int | None = None) -> str:
        """The key of `role` in `layout` (default: this model's) for a model with `upsamples` stages."""
        return role_key(
            role, suffix, layout or self.layout, self.upsamples if upsamples is None else upsamples, self.blocks
        )

    def rename(self, layout: str) -> dict[str, str]:
        """This model's keys -> the same tensors' keys in `layout`."""
        return {key: self.key(role, suffix, layout) for key, (role, suffix) in self.roles.items()}


def role_key(role: Role, suffix: str, layout: str, upsamples: int, blocks: int) -> str:
    kind, i, k, conv = role
    if layout == "old":
        return {
            "first": f"model.0.{suffix}",
            "block": f"model.1.sub.{i}.RDB{k}.{conv}" + (".0" if conv != "conv1x1" else "") + f".{suffix}",
            "trunk": f"model.1.sub.{blocks}.{suffix}",
            "up": f"model.{3 * i}.{suffix}",
            "hr": f"model.{3 * upsamples + 2}.{suffix}",
            "last": f"model.{3 * upsamples + 4}.{suffix}",
        }[kind]
    names = {
        "new": ("conv_first", "RRDB_trunk.{i}.RDB{k}.{conv}", "trunk_conv", "upconv{i}", "HRconv"),
        "basicsr": ("conv_first", "body.{i}.rdb{k}.{conv}", "conv_body", "conv_up{i}", "conv_hr"),
    }[layout]
    template = {"first": names[0], "block": names[1], "trunk": names[2], "up": names[3], "hr": names[4]}
    name = template.get(kind, "conv_last").format(i=i, k=k, conv=conv)
    return f"{name}.{suffix}"


def _roles(spec: Mapping[str, TensorSpec], layout: str) -> dict[str, Placed] | None:
    """Every key's role in `layout`, or None when some key has none."""
    roles: dict[str, Placed] = {}
    tail: dict[int, list[str]] = {}
    block_indices: set[int] = set()
    for key in spec:
        for pattern, kind in _PATTERNS[layout]:
            found = pattern.fullmatch(key)
            if not found:
                continue
            groups = found.groups()
            if kind == "block":
                block_indices.add(int(groups[0]))
                roles[key] = Placed(Role("block", int(groups[0]), int(groups[1]), groups[2]), groups[3])
            elif kind == "trunk" and layout == "old":
                roles[key] = Placed(Role("trunk?", int(groups[0]), 0, ""), groups[1])
            elif kind == "tail":
                tail.setdefault(int(groups[0]), []).append(key)
                roles[key] = Placed(Role("tail", int(groups[0]), 0, ""), groups[1])
            elif kind == "up":
                roles[key] = Placed(Role("up", int(groups[0]), 0, ""), groups[1])
            else:
                roles[key] = Placed(Role(kind), groups[0])
            break
        else:
            return None
    if layout == "old":  # the trunk is the sub-module after the last block; the tail holds up, hr, last
        blocks = len(block_indices)
        for key, ((kind, index, _, _), suffix) in list(roles.items()):
            if kind == "trunk?":
                if index != blocks:
                    return None
                roles[key] = Placed(Role("trunk", 0, 0, ""), suffix)
        if not tail:
            return None
        last = max(tail)
        upsamples, remainder = divmod(last - 4, 3)
        if remainder or upsamples < 0:
            return None
        for key, ((kind, index, _, _), suffix) in list(roles.items()):
            if kind != "tail":
                continue
            if index == last:
                roles[key] = Placed(Role("last", 0, 0, ""), suffix)
            elif index == last - 2:
                roles[key] = Placed(Role("hr", 0, 0, ""), suffix)
            elif index % 3 == 0 and 1 <= index // 3 <= upsamples:
                roles[key] = Placed(Role("up", index // 3, 0, ""), suffix)
            else:
                return None
    return roles


def _shape(spec: Mapping[str, TensorSpec], roles: dict[str, Placed], kind: str) -> tuple[int, ...] | None:
    for key, (role, suffix) in roles.items():
        if role[0] == kind and suffix == "weight":
            return spec[key].shape
    return None


def detect(spec: Mapping[str, TensorSpec]) -> Esrgan | None:
    """The ESRGAN a state dict holds, or None when it is not one (see `explain`)."""
    layout = next((name for name, sig in _SIGNATURES.items() if _has(spec, sig)), None)
    if layout is None:
        return None
    roles = _roles(spec, layout)
    if roles is None:
        return None
    first, last = _shape(spec, roles, "first"), _shape(spec, roles, "last")
    if first is None or last is None or len(first) != 4 or len(last) != 4:
        return None
    blocks = {role[1] for role, _ in roles.values() if role[0] == "block"}
    ups = sorted({role[1] for role, _ in roles.values() if role[0] == "up"})
    if blocks != set(range(len(blocks))) or ups != list(range(1, len(ups) + 1)):
        return None
    growth = next(
        (
            spec[k].shape[0]
            for k, (role, s) in roles.items()
            if role[0] == "block" and role[3] == "conv1" and s == "weight"
        ),
        None,
    )
    filters, raw_in, out = first[0], first[1], last[0]
    shuffle = next((f for f in (2, 4) if raw_in == out * f * f), 1)
    if growth is None or 2 ** len(ups) < shuffle:
        return None
    return Esrgan(
        layout=layout,
        scale=2 ** len(ups) // shuffle,
        upsamples=len(ups),
        shuffle=shuffle,
        filters=filters,
        blocks=len(blocks),
        growth=growth,
        in_channels=raw_in // (shuffle * shuffle),
        out_channels=out,
        plus=any(role[3] == "conv1x1" for role, _ in roles.values()),
        roles=roles,
    )


def _has(spec: Mapping[str, TensorSpec], signature: tuple[str, str]) -> bool:
    exact, prefix = signature
    return exact in spec and any(key.startswith(prefix) for key in spec)


def explain(spec: Mapping[str, TensorSpec]) -> str:
    """Why `spec` is not an ESRGAN that merger understands (for error messages)."""
    layout = next((name for name, sig in _SIGNATURES.items() if _has(spec, sig)), None)
    if layout is None:
        wanted = " or ".join(f"{a} with {b}*" for a, b in _SIGNATURES.values())
        return f"none of the ESRGAN key layouts matches (looked for {wanted})"
    unknown = [key for key in spec if not any(p.fullmatch(key) for p, _ in _PATTERNS[layout])]
    if unknown:
        return f"it looks like the {layout} ESRGAN layout, but has keys that layout lacks, e.g. '{unknown[0]}'"
    return f"its {layout}-layout keys do not form a complete RRDBNet (missing blocks, stages or last conv)"
