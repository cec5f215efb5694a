"""ESRGAN detection from keys and shapes, and exact layout conversions."""

from __future__ import annotations

import pytest
import torch

from merger.archs import describe, esrgan
from merger.core.specs import TensorSpec
from tests.conftest import spec_of
from tests.esrgan_models import old_layout, to_layout


@pytest.mark.parametrize("layout", ["old", "new", "basicsr"])
@pytest.mark.parametrize(
    ("stages", "shuffle", "scale"), [(0, 1, 1), (1, 1, 2), (2, 1, 4), (3, 1, 8), (4, 1, 16), (2, 2, 2), (2, 4, 1)]
)
def test_detects_layout_scale_and_sizes(layout: str, stages: int, shuffle: int, scale: int) -> None:
    sd = to_layout(old_layout(scale_stages=stages, filters=8, blocks=3, growth=4, shuffle=shuffle), layout)
    found = esrgan.detect(spec_of(sd))
    assert found is not None
    assert (found.layout, found.scale, found.upsamples, found.shuffle) == (layout, scale, stages, shuffle)
    assert (found.filters, found.blocks, found.growth, found.in_channels, found.out_channels) == (8, 3, 4, 3, 3)
    assert not found.plus


def test_describe_line_and_plus_and_channels() -> None:
    sd = old_layout(scale_stages=2, filters=16, blocks=5, in_channels=1, out_channels=1, plus=True)
    assert describe(spec_of(sd)) == (
        "ESRGAN (RRDBNet), layout old, scale 4x, 5 blocks, 16 filters, in 1, out 1, ESRGAN+"
    )
    shuffled = old_layout(scale_stages=2, shuffle=2)
    assert describe(spec_of(to_layout(shuffled, "basicsr"))) == (
        "ESRGAN (RRDBNet), layout basicsr, scale 2x, 2 blocks, 8 filters, in 3, out 3, pixel-unshuffle 2"
    )


@pytest.mark.parametrize("source", ["old", "new", "basicsr"])
@pytest.mark.parametrize("target", ["old", "new", "basicsr"])
def test_layout_conversion_matches_reference_and_round_trips(source: str, target: str) -> None:
    base = old_layout(scale_stages=3, blocks=2, plus=source == "old")
    sd = to_layout(base, source)
    found = esrgan.detect(spec_of(sd))
    assert found is not None
    renamed = {found.rename(target)[k]: v for k, v in sd.items()}
    if source == "old":
        assert renamed.keys() == to_layout(base, target).keys()
    back = esrgan.detect(spec_of(renamed))
    assert back is not None and back.layout == target
    restored = {back.rename(source)[k]: v for k, v in renamed.items()}
    assert restored.keys() == sd.keys()
    assert all(torch.equal(restored[k], sd[k]) for k in sd)


def test_not_esrgan_is_explained() -> None:
    assert esrgan.detect({"conv.weight": TensorSpec("F32", (3, 3, 3, 3))}) is None
    assert "none of the ESRGAN key layouts" in esrgan.explain({"conv.weight": TensorSpec("F32", (3, 3, 3, 3))})
    sd = old_layout()
    sd["model.1.sub.0.extra.weight"] = torch.zeros(1)
    assert esrgan.detect(spec_of(sd)) is None
    assert "'model.1.sub.0.extra.weight'" in esrgan.explain(spec_of(sd))


def test_demo_models_are_2x_old_layout() -> None:
    from pathlib import Path

    from merger.io.safetensors_header import read_header

    demo = Path(__file__).resolve().parents[1] / "merger" / "demo" / "psnr.safetensors"
    assert describe(read_header(demo).tensors) == (
        "ESRGAN (RRDBNet), layout old, scale 2x, 2 blocks, 24 filters, in 3, out 3"
    )
