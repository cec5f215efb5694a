"""Glob sources: the meaning of Python's glob, with the walk bounded."""

from __future__ import annotations

import glob
import time
from pathlib import Path

import pytest

from merger.core.limits import MAX_GLOB_ENTRIES
from merger.engine.globbing import bounded_glob
from merger.errors import MergerError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in [
        "zoo/a.pth",
        "zoo/b.pth",
        "zoo/c.safetensors",
        "zoo/.hidden.pth",
        "zoo/deep/d.pth",
        "zoo/deep/er/e.pth",
        "zoo/m1.pth",
        "zoo/m2.pth",
        "zoo/mx.pth",
        "other/f.pth",
        ".dot/g.pth",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    return tmp_path


@pytest.mark.parametrize(
    "pattern",
    [
        "zoo/*.pth",
        "zoo/**/*.pth",
        "**/*.pth",
        "zoo/m?.pth",
        "zoo/[ab]*.pth",
        "zoo/.*.pth",
        "*/*.pth",
        "zoo/*/*.pth",
        "zoo/deep",
        "zoo/nothing*",
        "zoo/**/e.pth",
        "*/deep/**/*.pth",
    ],
)
def test_same_matches_as_python_glob(tree: Path, pattern: str) -> None:
    expected = sorted(Path(p) for p in glob.glob(str(tree / pattern), recursive=True))
    assert bounded_glob(tree / pattern, where="w", shown_as=pattern) == expected


def test_a_folder_that_links_to_itself_ends_in_the_error(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name in "abc":
        (zoo / name).symlink_to(zoo, target_is_directory=True)
    start = time.perf_counter()
    with pytest.raises(MergerError, match=f"looks at more than {MAX_GLOB_ENTRIES} files and folders"):
        bounded_glob(zoo / "**" / "*.pth", where="sources.zoo", shown_as="zoo/**/*.pth")
    assert time.perf_counter() - start < 30
