"""Tiny ESRGAN (RRDBNet) state dicts for tests, written out key by key (no model code).

Layout conversions here are spelled out independently of merger.archs, so tests
compare the two.
"""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]


def old_layout(
    *,
    scale_stages: int = 2,
    filters: int = 8,
    blocks: int = 2,
    growth: int = 4,
    in_channels: int = 3,
    out_channels: int = 3,
    shuffle: int = 1,
    plus: bool = False,
    seed: int = 0,
) -> StateDict:
    """An old-layout RRDBNet with `scale_stages` upsampling stages (scale 2**stages / shuffle)."""
    g = torch.Generator().manual_seed(seed)

    def conv(cout: int, cin: int, k: int = 3) -> torch.Tensor:
        return torch.randn(cout, cin, k, k, generator=g) * 0.1

    def bias(c: int) -> torch.Tensor:
        return torch.randn(c, generator=g) * 0.01

    sd: StateDict = {"model.0.weight": conv(filters, in_channels * shuffle * shuffle), "model.0.bias": bias(filters)}
    for i in range(blocks):
        for k in (1, 2, 3):
            for j in range(1, 6):
                cin = filters + (j - 1) * growth
                cout = growth if j < 5 else filters
                prefix = f"model.1.sub.{i}.RDB{k}.conv{j}.0"
                sd[f"{prefix}.weight"] = conv(cout, cin)
                sd[f"{prefix}.bias"] = bias(cout)
            if plus:
                sd[f"model.1.sub.{i}.RDB{k}.conv1x1.weight"] = conv(growth, filters, 1)
    sd[f"model.1.sub.{blocks}.weight"] = conv(filters, filters)
    sd[f"model.1.sub.{blocks}.bias"] = bias(filters)
    for m in range(1, scale_stages + 1):
        sd[f"model.{3 * m}.weight"] = conv(filters, filters)
        sd[f"model.{3 * m}.bias"] = bias(filters)
    n = scale_stages
    sd[f"model.{3 * n + 2}.weight"] = conv(filters, filters)
    sd[f"model.{3 * n + 2}.bias"] = bias(filters)
    sd[f"model.{3 * n + 4}.weight"] = conv(out_channels, filters)
    sd[f"model.{3 * n + 4}.bias"] = bias(out_channels)
    return sd


def to_layout(sd: StateDict, layout: str) -> StateDict:
    """`sd` (old layout) renamed to the 'new' or 'basicsr' layout, as spandrel reads them."""
    if layout == "old":
        return dict(sd)
    ups = sorted(int(k.split(".")[1]) for k in sd if k.split(".")[1].isdigit() and int(k.split(".")[1]) >= 3)
    last = max(ups)
    blocks = max(int(k.split(".")[3]) for k in sd if k.startswith("model.1.sub."))
    names = {
        "new": ("RRDB_trunk", "RDB", "trunk_conv", "upconv", "HRconv"),
        "basicsr": ("body", "rdb", "conv_body", "conv_up", "conv_hr"),
    }[layout]
    out: StateDict = {}
    for key, value in sd.items():
        parts = key.split(".")
        suffix = parts[-1]
        if key.startswith("model.0."):
            name = "conv_first"
        elif key.startswith("model.1.sub.") and parts[3] == str(blocks):
            name = names[2]
        elif key.startswith("model.1.sub."):
            conv = parts[5]
            name = f"{names[0]}.{parts[3]}.{names[1]}{parts[4][3:]}.{conv}"
        elif int(parts[1]) == last:
            name = "conv_last"
        elif int(parts[1]) == last - 2:
            name = names[4]
        else:
            name = f"{names[3]}{int(parts[1]) // 3}"
        out[f"{name}.{suffix}"] = value
    return out
