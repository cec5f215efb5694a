"""Train merger's built-in demo models: a tiny 2x ESRGAN (RRDBNet) "psnr" / "sharp" pair.

The two models share one architecture and the original ("old") ESRGAN state-dict layout
(``model.0.weight``, ``model.1.sub.0.RDB1.conv1.0.weight``, ...), so they load in spandrel and
are a realistic, small stand-in for network interpolation (DNI) between a PSNR-oriented model
and a perceptual/sharp one.

* Data: colour images bundled with scikit-image (public domain). One image (``chelsea``, the
  cat) is held out; a 256x256 crop of it is written as ``eval.png`` and never trained on.
* Degradation: box downscaling (``F.avg_pool2d``) by the model's scale.
* ``psnr``: trained from scratch with L1 loss, Adam and a cosine learning-rate decay.
* ``sharp``: fine-tuned from ``psnr`` with L1 plus a loss pulling the output's Laplacian
  towards ``--sharp-gain`` times the target's Laplacian (sharper, lower PSNR).

Finally it prints PSNR against bicubic, and a DNI table for alpha = 0, 0.1, ..., 1 of
``(1 - alpha) * psnr + alpha * sharp`` (from the saved float16 weights) that must show PSNR
falling and sharpness (variance of the Laplacian) rising monotonically.

Training-time-only dependencies (not needed by merger itself): ``scikit-image`` (and numpy,
which it pulls in). Optional check: if ``spandrel`` is installed, the saved files are loaded
with it and compared with this script's own model.

Usage (from the repository root; single-threaded, ~30 minutes by default)::

    python scripts/train_demo_models.py                  # writes merger/demo/
    python scripts/train_demo_models.py --quick --out /tmp/demo
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
NF, NB, GC, SCALE = 24, 2, 32, 2
SEED = 1234
HR_PATCH, BATCH = 96, 16
TRAIN_IMAGES = ("astronaut", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
EVAL_IMAGE, EVAL_CROP = "chelsea", (22, 100, 256)  # top, left, size; also excludes skimage "cat"
ALPHAS = [i / 10 for i in range(11)]
Row = tuple[float, float, float]  # alpha, PSNR (dB), Laplacian variance
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


# --------------------------------------------------------------------------- model
def conv(cin: int, cout: int, act: bool) -> nn.Sequential:
    """3x3 conv, optionally followed by LeakyReLU(0.2), wrapped so keys read ``convN.0.*``."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, 1, 1)]
    if act:
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = conv(nf, gc, True)
        self.conv2 = conv(nf + gc, gc, True)
        self.conv3 = conv(nf + 2 * gc, gc, True)
        self.conv4 = conv(nf + 3 * gc, gc, True)
        self.conv5 = conv(nf + 4 * gc, nf, False)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.conv1(x)
        x2 = self.conv2(torch.cat((x, x1), 1))
        x3 = self.conv3(torch.cat((x, x1, x2), 1))
        x4 = self.conv4(torch.cat((x, x1, x2, x3), 1))
        x5: Tensor = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.RDB3(self.RDB2(self.RDB1(x)))
        return out * 0.2 + x


class ShortcutBlock(nn.Module):
    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.sub(x)
        return x + out


class RRDBNet(nn.Module):
    """ESRGAN generator in the original layout: ``model.{0, 1.sub.*, 3, 5, 7}`` for 2x."""

    def __init__(self, nf: int = NF, nb: int = NB, gc: int = GC, scale: int = SCALE) -> None:
        super().__init__()
        n_up = int(math.log2(scale))
        assert 2**n_up == scale, "scale must be a power of two"
        trunk = [RRDB(nf, gc) for _ in range(nb)] + [nn.Conv2d(nf, nf, 3, 1, 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, nf, 3, 1, 1), ShortcutBlock(nn.Sequential(*trunk))]
        for _ in range(n_up):  # model.2-4, 5-7, ...: Upsample, upconv, LeakyReLU
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(nf, nf, 3, 1, 1), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(nf, 3, 3, 1, 1)]
        self.model = nn.Sequential(*layers)
        for m in self.modules():  # ESRGAN-style init: small Kaiming weights, zero biases
            if isinstance(m, nn.Conv2d):
                assert m.bias is not None
                nn.init.kaiming_normal_(m.weight, a=0.2)
                m.weight.data *= 0.1
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x)
        return out


@torch.no_grad()
def bilinear_start(net: RRDBNet) -> None:
    """Make the untrained net pass its input through channels 0-2 as a bilinear upscale.

    conv_first, HR conv and conv_last carry the RGB channels unchanged (LeakyReLU is the
    identity on non-negative values) and each upconv smooths the nearest-neighbour upsample
    with a [1, 2, 1]/4 kernel, which is exactly bilinear (align_corners=False) 2x upscaling.
    Training then only has to learn the residual detail, which saves thousands of steps.
    """
    convs = [m for m in net.model if isinstance(m, nn.Conv2d)]  # first, upconvs..., HR, last
    smooth = torch.tensor([1.0, 2.0, 1.0])
    for i, m in enumerate(convs):
        kernel = torch.outer(smooth, smooth) / 16 if 0 < i < len(convs) - 2 else None
        assert m.bias is not None
        m.weight[:3, :3] = 0  # other channels keep their small random weights
        m.bias[:3] = 0
        for c in range(3):
            if kernel is None:
                m.weight[c, c, 1, 1] = 1
            else:
                m.weight[c, c] = kernel


# --------------------------------------------------------------------------- data & metrics
def load_rgb(name: str) -> Tensor:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo pairs: keep the left image
        img = img[0]
    return torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255


def eval_image() -> Tensor:
    top, left, size = EVAL_CROP
    return load_rgb(EVAL_IMAGE)[:, top : top + size, left : left + size]


def downscale(hr: Tensor) -> Tensor:
    return F.avg_pool2d(hr, SCALE)


def sample_batch(images: list[Tensor], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random HR patches (area-weighted image choice, flips/rot90) and their box-LR versions."""
    areas = torch.tensor([float(im.shape[1] * im.shape[2]) for im in images])
    picks = torch.multinomial(areas, BATCH, replacement=True, generator=gen).tolist()
    patches = []
    for i in picks:
        im = images[i]
        top = int(torch.randint(im.shape[1] - HR_PATCH + 1, (1,), generator=gen))
        left = int(torch.randint(im.shape[2] - HR_PATCH + 1, (1,), generator=gen))
        p = im[:, top : top + HR_PATCH, left : left + HR_PATCH]
        rot, flip = torch.randint(4, (2,), generator=gen).tolist()
        p = torch.rot90(p, rot, (1, 2))
        patches.append(p.flip(2) if flip % 2 else p)
    hr = torch.stack(patches)
    return downscale(hr), hr


def psnr(out: Tensor, ref: Tensor) -> float:
    mse = F.mse_loss(out.clamp(0, 1), ref).item()
    return 10 * math.log10(1 / mse)


def laplacian(x: Tensor) -> Tensor:
    kernel = LAPLACIAN.to(x).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x, kernel, groups=x.shape[1])


def sharpness(out: Tensor) -> float:
    """Variance of the Laplacian of the grey (BT.601 luma) output, in 8-bit units squared."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    grey = (out.clamp(0, 1) * weights).sum(1, keepdim=True) * 255
    return laplacian(grey).var().item()


@torch.no_grad()
def evaluate(model: nn.Module, hr: Tensor) -> tuple[float, float]:
    model.eval()
    out = model(downscale(hr)[None])
    model.train()
    return psnr(out, hr[None]), sharpness(out)


def bicubic(hr: Tensor) -> Tensor:
    lr = downscale(hr)[None]
    return F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------- training
LossFn = Callable[[Tensor, Tensor], Tensor]


def train(
    model: nn.Module,
    loss_fn: LossFn,
    seconds: float,
    lr: float,
    images: list[Tensor],
    eval_hr: Tensor,
    tag: str,
    seed: int,
) -> int:
    """Adam, 5% linear warm-up then cosine decay over a wall-clock budget; returns the steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = last_log = time.monotonic()
    step = 0
    while (elapsed := time.monotonic() - start) < seconds:
        frac = elapsed / seconds
        warmup = min(1.0, frac / 0.05 + 0.01)
        for group in opt.param_groups:
            group["lr"] = lr * warmup * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))
        lr_img, hr = sample_batch(images, gen)
        loss = loss_fn(model(lr_img), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if time.monotonic() - last_log >= max(10.0, seconds / 20):
            last_log = time.monotonic()
            p, s = evaluate(model, eval_hr)
            stats = f"loss {loss.item():.4f}, eval PSNR {p:.3f} dB, lapvar {s:.1f}"
            print(f"[{tag}] {elapsed:5.0f}s step {step:5d}: {stats}", flush=True)
    return step


def sharp_loss(gain: float, weight: float) -> LossFn:
    def loss_fn(out: Tensor, hr: Tensor) -> Tensor:
        return F.l1_loss(out, hr) + weight * F.l1_loss(laplacian(out), gain * laplacian(hr))

    return loss_fn


# --------------------------------------------------------------------------- files & checks
def save_fp16(model: nn.Module, path: Path, meta: dict[str, str]) -> None:
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    path.chmod(0o644)


def load_fp32(path: Path) -> dict[str, Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def metadata(loss: str, seconds: float, steps: int) -> dict[str, str]:
    desc = {
        "architecture": "ESRGAN RRDBNet (old layout)",
        "nf": NF,
        "nb": NB,
        "gc": GC,
        "scale": SCALE,
        "degradation": "box (avg_pool2d)",
        "loss": loss,
        "train_seconds": round(seconds),
        "train_steps": steps,
        "seed": SEED,
    }
    return {"description": json.dumps(desc), "format": "pt"}


def dni_table(psnr_path: Path, sharp_path: Path, eval_hr: Tensor) -> list[Row]:
    a, b = load_fp32(psnr_path), load_fp32(sharp_path)
    model, rows = RRDBNet(), []
    for alpha in ALPHAS:
        model.load_state_dict({k: (1 - alpha) * a[k] + alpha * b[k] for k in a})
        rows.append((alpha, *evaluate(model, eval_hr)))
    return rows


def check_spandrel(path: Path, eval_hr: Tensor) -> None:
    try:
        import spandrel
    except ImportError:
        print("spandrel not installed: skipping the spandrel check")
        return
    desc = spandrel.ModelLoader().load_from_file(str(path))
    assert desc.architecture.id == "ESRGAN" and desc.scale == SCALE, (desc.architecture, desc.scale)
    ours = RRDBNet()
    ours.load_state_dict(load_fp32(path))
    lr_img = downscale(eval_hr)[None]
    with torch.no_grad():
        theirs, mine = desc.model.float().eval()(lr_img), ours.eval()(lr_img)
    assert theirs.shape[-2:] == tuple(2 * s for s in lr_img.shape[-2:]), theirs.shape
    diff = (theirs - mine).abs().max().item()
    assert diff < 1e-4, diff
    print(
        f"spandrel: {path.name}: {desc.architecture.id} scale={desc.scale} tags={desc.tags} "
        f"{tuple(lr_img.shape[-2:])} -> {tuple(theirs.shape[-2:])}, max |diff| {diff:.1e}"
    )


def is_monotonic(rows: list[Row]) -> bool:
    """PSNR strictly falls and sharpness strictly rises from each alpha to the next."""
    return all(r1[1] < r0[1] and r1[2] > r0[2] for r0, r1 in itertools.pairwise(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "merger" / "demo")
    ap.add_argument("--psnr-seconds", type=float, default=1500.0)
    ap.add_argument("--sharp-seconds", type=float, default=180.0)
    ap.add_argument("--psnr-lr", type=float, default=2e-3)
    ap.add_argument("--sharp-lr", type=float, default=2e-4)
    ap.add_argument("--sharp-gain", type=float, default=2.0, help="target Laplacian gain")
    ap.add_argument("--sharp-weight", type=float, default=2.0, help="Laplacian loss weight")
    ap.add_argument("--psnr-from", type=Path, help="reuse this psnr model; fine-tune only")
    ap.add_argument("--quick", action="store_true", help="a few seconds each (for tests)")
    args = ap.parse_args()
    if args.quick:
        args.psnr_seconds, args.sharp_seconds = 4.0, 2.0

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    images = [load_rgb(name) for name in TRAIN_IMAGES]
    eval_hr = eval_image()
    from PIL import Image  # ships with scikit-image

    eval_u8 = (eval_hr * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(eval_u8).save(args.out / "eval.png", optimize=True)
    eval_hr = torch.from_numpy(eval_u8).permute(2, 0, 1).float() / 255  # exactly what's shipped

    psnr_path, sharp_path = args.out / "psnr.safetensors", args.out / "sharp.safetensors"
    model = RRDBNet()
    bilinear_start(model)
    if args.psnr_from:
        model.load_state_dict(load_fp32(args.psnr_from))
        if args.psnr_from.resolve() != psnr_path.resolve():
            psnr_path.write_bytes(args.psnr_from.read_bytes())
    else:
        seconds, lr = args.psnr_seconds, args.psnr_lr
        steps = train(model, F.l1_loss, seconds, lr, images, eval_hr, "psnr", SEED)
        save_fp16(model, psnr_path, metadata("L1", args.psnr_seconds, steps))
        model.load_state_dict(load_fp32(psnr_path))  # fine-tune from what was shipped

    loss_fn, seconds = sharp_loss(args.sharp_gain, args.sharp_weight), args.sharp_seconds
    steps = train(model, loss_fn, seconds, args.sharp_lr, images, eval_hr, "sharp", SEED + 1)
    loss = f"psnr fine-tuned: L1 + {args.sharp_weight:g}*L1(lap(out), {args.sharp_gain:g}*lap(hr))"
    save_fp16(model, sharp_path, metadata(loss, seconds, steps))

    hr = eval_hr[None]
    print(f"\nheld-out {EVAL_IMAGE} crop {tuple(eval_hr.shape[1:])}, box-downscaled x{SCALE}")
    print(
        f"  bicubic   PSNR {psnr(bicubic(eval_hr), hr):.3f} dB  "
        f"lapvar {sharpness(bicubic(eval_hr)):.1f}  (HR lapvar {sharpness(hr):.1f})"
    )
    rows = dni_table(psnr_path, sharp_path, eval_hr)
    print(f"  psnr      PSNR {rows[0][1]:.3f} dB  lapvar {rows[0][2]:.1f}")
    print(f"  sharp     PSNR {rows[-1][1]:.3f} dB  lapvar {rows[-1][2]:.1f}")
    print("\n  alpha   PSNR (dB)   Laplacian var")
    for alpha, p, s in rows:
        print(f"  {alpha:4.1f}   {p:9.3f}   {s:13.1f}")
    monotonic = is_monotonic(rows)
    print(f"monotonic: {monotonic}")
    for path in (psnr_path, sharp_path):
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")
        check_spandrel(path, eval_hr)
    if not args.quick:
        assert rows[0][1] > psnr(bicubic(eval_hr), hr), "psnr model does not beat bicubic"
        assert monotonic, "DNI table is not monotonic: adjust the fine-tune (--psnr-from ...)"


if __name__ == "__main__":
    main()
