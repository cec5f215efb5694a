"""scripts/train_demo_models.py --quick: the demo pair's training runs and writes loadable models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from merger.archs import describe
from merger.io.safetensors_header import read_header
from tests.conftest import REPO

pytest.importorskip("skimage")


def test_quick_training_writes_the_demo_pair(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_demo_models.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "alpha" in done.stdout and "bicubic" in done.stdout
    for name in ("psnr", "sharp"):
        header = read_header(tmp_path / f"{name}.safetensors")
        assert {spec.dtype for spec in header.tensors.values()} == {"F16"}
        assert describe(header.tensors) == "ESRGAN (RRDBNet), layout old, scale 2x, 2 blocks, 24 filters, in 3, out 3"
    assert (tmp_path / "eval.png").stat().st_size > 10_000
