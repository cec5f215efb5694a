"""Super-resolution outputs load where their users load them.

Reference RRDBNets are written here from ESRGAN's description (a dense block of five convs whose
j-th sees the input and every earlier output; three of them, residual-scaled by 0.2, make an RRDB;
a trunk of RRDBs and a conv under a long skip; nearest-neighbour 2x upsampling, each followed by a
conv and a LeakyReLU; an HR conv and a last conv), once with the original ESRGAN repository's
module tree (`model.<i>`, so indices count the parameter-free Upsample and LeakyReLU modules too)
and once with the flat names of ESRGAN's later code and of BasicSR / Real-ESRGAN. merger's outputs
go through `torch.load(weights_only=True)` and `load_state_dict(strict=True)` into them, through
spandrel's loader, and through the loaders of BasicSR and Real-ESRGAN (mimicked here), and must
compute what the reference network with torch.lerp of the inputs computes.

Strict loading checks names and shapes only: the trunk, upsampling and HR convs all have one shape,
so a swapped role would still load; forward passes compared across layouts catch that.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from tests.conftest import RunRecipe, StateDict, fine_tune, run_cli
from tests.esrgan_models import to_layout

FILTERS, GROWTH, BLOCKS, STAGES = 8, 4, 2, 2  # nf, gc, nb, upsampling stages (4x)
SPANDREL_GROWTH = 32  # spandrel builds every RRDB with gc=32 (ESRGAN's own value): it reads no growth from keys


def conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class DenseBlock(nn.Module):
    """Residual dense block: conv j (1..5) sees the input and convs 1..j-1's outputs; x + 0.2 * conv5.

    `wrapped` (the original tree): conv j is Sequential(conv, LeakyReLU), conv5 Sequential(conv), so
    its keys are `convj.0.*`; otherwise conv j is a bare conv and the activation is functional."""

    def __init__(self, nf: int, gc: int, wrapped: bool) -> None:
        super().__init__()
        self.wrapped = wrapped
        for j in range(1, 6):
            layer = conv(nf + (j - 1) * gc, gc if j < 5 else nf)
            act = [nn.LeakyReLU(0.2)] if j < 5 else []
            self.add_module(f"conv{j}", nn.Sequential(layer, *act) if wrapped else layer)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for j in range(1, 6):
            out = self.get_submodule(f"conv{j}")(torch.cat(features, 1))
            features.append(out if self.wrapped or j == 5 else F.leaky_relu(out, 0.2))
        return x + 0.2 * features[-1]


class RRDB(nn.Module):
    """Three dense blocks named `<name>1..3`, residual-scaled by 0.2."""

    def __init__(self, nf: int, gc: int, name: str, wrapped: bool) -> None:
        super().__init__()
        for k in (1, 2, 3):
            self.add_module(f"{name}{k}", DenseBlock(nf, gc, wrapped))

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for block in self.children():
            out = block(out)
        return x + 0.2 * out


class Shortcut(nn.Module):
    """x + sub(x): the long skip over the trunk (the original tree's `model.1.sub`)."""

    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.sub(x)
        return out


class OldRRDBNet(nn.Module):
    """The original ESRGAN tree: `model` = [first conv, Shortcut(RRDBs..., trunk conv),
    (Upsample, conv, LeakyReLU) per stage, HR conv, LeakyReLU, last conv]."""

    def __init__(self, nf: int = FILTERS, gc: int = GROWTH, nb: int = BLOCKS, stages: int = STAGES) -> None:
        super().__init__()
        trunk = nn.Sequential(*(RRDB(nf, gc, "RDB", wrapped=True) for _ in range(nb)), conv(nf, nf))
        up = [
            m
            for _ in range(stages)
            for m in (nn.Upsample(scale_factor=2, mode="nearest"), conv(nf, nf), nn.LeakyReLU(0.2))
        ]
        self.model = nn.Sequential(conv(3, nf), Shortcut(trunk), *up, conv(nf, nf), nn.LeakyReLU(0.2), conv(nf, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # type: ignore[no-any-return]


#: the flat layouts' names: trunk container, dense-block prefix, trunk conv, upsampling conv prefix, HR conv
FLAT_NAMES = {
    "new": ("RRDB_trunk", "RDB", "trunk_conv", "upconv", "HRconv"),  # xinntao/ESRGAN's RRDBNet_arch.py
    "basicsr": ("body", "rdb", "conv_body", "conv_up", "conv_hr"),  # BasicSR's rrdbnet_arch.py (Real-ESRGAN)
}


class FlatRRDBNet(nn.Module):
    """The same network with flat names: conv_first, <trunk>.N.<rdb>K.convJ, <trunk conv>, <up>1..,
    <hr>, conv_last; activations functional."""

    def __init__(
        self, layout: str, nf: int = FILTERS, gc: int = GROWTH, nb: int = BLOCKS, stages: int = STAGES
    ) -> None:
        super().__init__()
        self.trunk, rdb, self.trunk_conv_name, self.up, self.hr = FLAT_NAMES[layout]
        self.stages = stages
        self.conv_first = conv(3, nf)
        self.add_module(self.trunk, nn.Sequential(*(RRDB(nf, gc, rdb, wrapped=False) for _ in range(nb))))
        self.add_module(self.trunk_conv_name, conv(nf, nf))
        for m in range(1, stages + 1):
            self.add_module(f"{self.up}{m}", conv(nf, nf))
        self.add_module(self.hr, conv(nf, nf))
        self.conv_last = conv(nf, 3)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv_first(x)
        feat = feat + self.get_submodule(self.trunk_conv_name)(self.get_submodule(self.trunk)(feat))
        for m in range(1, self.stages + 1):
            up = self.get_submodule(f"{self.up}{m}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.get_submodule(self.hr)(feat), 0.2))  # type: ignore[no-any-return]


def loaded(net: nn.Module, state: StateDict) -> nn.Module:
    net.load_state_dict(state, strict=True)
    return net.eval()


def image(seed: int = 7) -> Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def upscale(net: nn.Module, x: Tensor) -> Tensor:
    out: Tensor = net(x)
    return out


Family = tuple[StateDict, StateDict, StateDict]  # a, b (a fine-tune of a), and lerp(a, b, 0.5)


def write_family(root: Path, gc: int) -> Family:
    """A seeded random old-layout 4x ESRGAN `a` (as the reference net's state dict) and a fine-tune
    `b`, saved as bare .pth files under models/ (as ESRGAN's releases are); and torch.lerp of them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a = {k: v.detach().clone() for k, v in OldRRDBNet(gc=gc).state_dict().items()}
    b = fine_tune(a, seed=1, scale=0.02)
    (root / "models").mkdir()
    torch.save(a, root / "models" / "a.pth")
    torch.save(b, root / "models" / "b.pth")
    return a, b, {k: torch.lerp(a[k], b[k], 0.5) for k in a}


@pytest.fixture
def family(launch_dir: Path) -> Family:
    return write_family(launch_dir, GROWTH)


def blend(**outputs: dict[str, Any]) -> dict[str, Any]:
    """The recipe: lerp of a and b at 0.5, written as each of `outputs` (name -> output settings)."""
    return {
        "sources": {"a": "models/a.pth", "b": "models/b.pth"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": {name: {"node": "blend", **spec} for name, spec in outputs.items()},
    }


def written(report: dict[str, Any], name: str) -> Path:
    return Path(report["outputs"][name]["path"])


def assert_close(
    got: Tensor, expected: Tensor, what: str = "", *, atol: float | None = None, rtol: float | None = None
) -> None:
    """torch.testing.assert_close (default tolerances unless both are given), its message naming `what`."""

    def message(m: str) -> str:
        return f"{what}: {m}"

    torch.testing.assert_close(got, expected, msg=message, atol=atol, rtol=rtol)


def assert_values(got: StateDict, expected: StateDict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert_close(got[key], value, key)


# --- 1. the original ESRGAN tree -----------------------------------------------------------------


def test_reference_net_has_the_old_layout_indices() -> None:
    """The reference tree puts the upsampling convs at 3 and 6, the HR conv at 8, the last at 10."""
    keys = list(OldRRDBNet().state_dict())
    assert keys[:2] == ["model.0.weight", "model.0.bias"]
    assert "model.1.sub.0.RDB1.conv1.0.weight" in keys and "model.1.sub.1.RDB3.conv5.0.bias" in keys
    tail = [k for k in keys if not k.startswith(("model.0.", "model.1."))]
    assert tail == [f"model.{i}.{s}" for i in (3, 6, 8, 10) for s in ("weight", "bias")]
    assert [k for k in keys if k.startswith("model.1.sub.2.")] == ["model.1.sub.2.weight", "model.1.sub.2.bias"]


def test_old_layout_pth_loads_into_the_original_rrdbnet(family: Family, run_recipe: RunRecipe) -> None:
    a, b, expected = family
    report = run_recipe(blend(blend={"path": "blend.pth"}))
    path = written(report, "blend")
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and list(state) == list(a)  # bare, in the network's own order
    assert_values(state, expected)
    net = loaded(OldRRDBNet(), state)
    out = upscale(net, image())
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # the merge is not a no-op: the output differs from both parents' outputs
    for parent in (a, b):
        assert not torch.allclose(out, upscale(loaded(OldRRDBNet(), parent), image()))
    # the .pth is the tensors and a little pickle, not one copy of the whole entry per tensor
    assert path.stat().st_size < sum(t.nbytes for t in expected.values()) + 64 * 1024
    assert json.loads(path.with_suffix(".json").read_text())  # its provenance beside it


# --- 2. spandrel --------------------------------------------------------------------------------

SPANDREL_CASES = {
    "bare_pth": {"path": "blend.pth"},
    "safetensors": {"path": "blend.safetensors"},
    "new_safetensors": {"path": "blend_new.safetensors", "layout": "new"},
    "basicsr_pth_params_ema": {"path": "blend_basicsr.pth", "layout": "basicsr", "wrap": "params_ema"},
}


def test_spandrel_loads_each_output_as_the_esrgan_it_is(launch_dir: Path, run_recipe: RunRecipe) -> None:
    spandrel = pytest.importorskip("spandrel")
    _, _, expected = write_family(launch_dir, SPANDREL_GROWTH)
    report = run_recipe(blend(**SPANDREL_CASES))
    x = image()
    want = upscale(loaded(OldRRDBNet(gc=SPANDREL_GROWTH), expected), x)
    for name in SPANDREL_CASES:
        path = written(report, name)
        descriptor = spandrel.ModelLoader().load_from_file(path)
        assert descriptor.architecture.id == "ESRGAN", name
        assert (descriptor.scale, descriptor.input_channels, descriptor.output_channels) == (4, 3, 3), name
        got = upscale(descriptor.model.eval(), x)
        assert_close(got, want, name, atol=1e-5, rtol=0)
        with torch.no_grad():  # spandrel's own call clamps to the image range
            assert_close(descriptor(x), want.clamp(0, 1), f"{name} (clamped)", atol=1e-5, rtol=0)


# --- 3. BasicSR and Real-ESRGAN --------------------------------------------------------------------


def realesrganer_load(model: nn.Module, path: Path) -> None:
    """What Real-ESRGAN's RealESRGANer does with `model_path`."""
    loadnet = torch.load(path, map_location="cpu", weights_only=True)
    keyname = "params_ema" if "params_ema" in loadnet else "params"
    model.load_state_dict(loadnet[keyname], strict=True)


def basicsr_load(model: nn.Module, path: Path, param_key: str = "params_ema") -> None:
    """What BasicSR's BaseModel.load_network does (its test configs ask for params_ema)."""
    load_net = torch.load(path, map_location="cpu", weights_only=True)
    if param_key not in load_net and "params" in load_net:
        param_key = "params"
    load_net = load_net[param_key]
    load_net = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in load_net.items()}
    model.load_state_dict(load_net, strict=True)


LOADERS: dict[str, Callable[[nn.Module, Path], None]] = {"realesrganer": realesrganer_load, "basicsr": basicsr_load}


#: .pth outputs of the one node, differing only in `wrap` (and one in dtype)
WRAPPED = {
    "bare": {"path": "bare.pth", "layout": "basicsr"},
    "ema": {"path": "ema.pth", "layout": "basicsr", "wrap": "params_ema"},
    "params": {"path": "params.pth", "layout": "basicsr", "wrap": "params"},
    "half": {"path": "half.pth", "layout": "basicsr", "wrap": "params_ema", "dtype": "float16"},
}


def test_basicsr_layout_wrapped_loads_into_basicsr_rrdbnet(family: Family, run_recipe: RunRecipe) -> None:
    """Each output of one run is its own file: the wrap is part of the cached artifact's identity."""
    _, _, expected = family
    report = run_recipe(blend(**WRAPPED))
    files = {name: torch.load(written(report, name), weights_only=True) for name in WRAPPED}
    assert [list(files[name]) for name in ("ema", "params", "half")] == [["params_ema"], ["params"], ["params_ema"]]
    want = to_layout(expected, "basicsr")
    x = image()
    reference = upscale(loaded(OldRRDBNet(), expected), x)
    for state in (files["bare"], files["ema"]["params_ema"], files["params"]["params"]):
        assert_values(state, want)
        assert_close(upscale(loaded(FlatRRDBNet("basicsr"), state), x), reference)
    half = files["half"]["params_ema"]
    assert all(t.dtype == torch.float16 for t in half.values())
    assert_values({k: t.float() for k, t in half.items()}, {k: t.half().float() for k, t in want.items()})


def test_wrapped_outputs_load_in_realesrgan_and_basicsr_and_bare_ones_do_not(
    family: Family, run_recipe: RunRecipe
) -> None:
    """Both loaders take `params_ema` and `params`; a bare state dict (whose weights are fine) fails
    them with a KeyError, which is why `wrap` exists."""
    _, _, expected = family
    report = run_recipe(blend(**{name: WRAPPED[name] for name in ("bare", "ema", "params")}))
    x = image()
    reference = upscale(loaded(OldRRDBNet(), expected), x)
    for loader_name, loader in LOADERS.items():
        for name in ("ema", "params"):
            net = FlatRRDBNet("basicsr")
            loader(net, written(report, name))
            assert_close(upscale(net.eval(), x), reference, f"{loader_name} loading {name}")
        with pytest.raises(KeyError, match={"realesrganer": "'params'", "basicsr": "'params_ema'"}[loader_name]):
            loader(FlatRRDBNet("basicsr"), written(report, "bare"))
    FlatRRDBNet("basicsr").load_state_dict(torch.load(written(report, "bare"), weights_only=True), strict=True)


def test_wrap_applies_only_to_pth_outputs(family: Family, run_recipe: RunRecipe) -> None:
    from tests.conftest import expect_error

    error = expect_error(lambda: run_recipe(blend(blend={"path": "blend.safetensors", "wrap": "params_ema"})))
    assert "sets wrap, which applies only to a .pth output" in error.what
    assert error.where == "test.yaml, outputs.blend.wrap"


# --- 4. the new layout ----------------------------------------------------------------------------


def test_new_layout_loads_into_the_new_rrdbnet(family: Family, run_recipe: RunRecipe) -> None:
    _, _, expected = family
    report = run_recipe(
        blend(pth={"path": "new.pth", "layout": "new"}, st={"path": "new.safetensors", "layout": "new"})
    )
    x = image()
    want = upscale(loaded(OldRRDBNet(), expected), x)
    for state in (torch.load(written(report, "pth"), weights_only=True), load_file(written(report, "st"))):
        assert set(state) == set(FlatRRDBNet("new").state_dict())
        assert_values(state, to_layout(expected, "new"))
        assert_close(upscale(loaded(FlatRRDBNet("new"), state), x), want)


# --- 5. from the command line ---------------------------------------------------------------------

RECIPE = """# @package _global_
sources:
  a: models/a.pth
  b: models/b.pth
nodes:
  blend: {op: lerp, inputs: [a, b], alpha: 0.5}
outputs:
  blend: {path: RealESRGAN_blend_x4.pth, layout: basicsr, wrap: params_ema}
"""


def test_command_line_writes_a_realesrgan_checkpoint(launch_dir: Path, family: Family) -> None:
    _, _, expected = family
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "x.yaml").write_text(RECIPE)
    done = run_cli(["recipe=x", "progress=false"], launch_dir)
    assert done.returncode == 0, done.stderr
    (report_file,) = (launch_dir / "outputs").glob("*/*/merge_report.json")
    path = report_file.parent / "RealESRGAN_blend_x4.pth"
    assert json.loads(report_file.read_text())["outputs"]["blend"]["path"] == str(path)
    net = FlatRRDBNet("basicsr")
    realesrganer_load(net, path)
    x = image()
    assert_close(upscale(net.eval(), x), upscale(loaded(OldRRDBNet(), expected), x))
