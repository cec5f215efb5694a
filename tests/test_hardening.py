"""Bad input and odd situations found in review: each a clear error or a safe outcome."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from merger.cache.store import Cache
from tests.conftest import RunRecipe, expect_error, run_cli


def blend(**outputs: object) -> dict[str, object]:
    return {
        "sources": {"a": "models/a.safetensors", "b": "models/b.safetensors"},
        "nodes": {"blend": {"op": "lerp", "inputs": ["a", "b"], "alpha": 0.5}},
        "outputs": outputs or {"blend": {}},
    }


def test_code_in_an_included_recipe_file_is_refused(launch_dir: Path, models: dict[str, Path]) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "nice.yaml").write_text(
        "# @package _global_\ndefaults:\n  - part\n  - _self_\nsources:\n  a: models/a.safetensors\n"
        "nodes:\n  x: {op: average, inputs: [a]}\noutputs:\n  x: {}\n"
    )
    (launch_dir / "recipes" / "part.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    pwn: {_target_: shutil.copyfile, _args_: [a, b]}\n"
    )
    done = run_cli(["recipe=nice"], launch_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recipes may not name code to run, but 'hydra.callbacks.pwn._target_' does" in done.stderr
    assert "part.yaml" in done.stderr


def test_unwritable_output_path_is_a_user_error(launch_dir: Path, models: dict[str, Path]) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "afile").write_text("not a directory")
    (launch_dir / "recipes" / "r.yaml").write_text(
        "# @package _global_\nsources:\n  a: models/a.safetensors\nnodes:\n  x: {op: average, inputs: [a]}\n"
        f"outputs:\n  x: {{path: {launch_dir / 'afile' / 'x.safetensors'}}}\n"
    )
    done = run_cli(["recipe=r"], launch_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot write output 'x'" in done.stderr


def test_unsupported_pth_dtype_is_a_user_error(launch_dir: Path, run_recipe: RunRecipe) -> None:
    torch.save({"w": torch.zeros(2, dtype=torch.complex64)}, launch_dir / "c.pth")
    error = expect_error(
        lambda: run_recipe(
            {"sources": {"c": "c.pth"}, "nodes": {"x": {"op": "average", "inputs": ["c"]}}, "outputs": {"x": {}}}
        )
    )
    assert "tensor 'w'" in error.what and "complex64" in error.what


@pytest.mark.parametrize(
    ("outputs", "clash"),
    [
        (
            {
                "one": {"node": "blend", "path": "same.safetensors"},
                "two": {"node": "blend", "path": "same.safetensors"},
            },
            "output 'one'",
        ),
        (
            {"one": {"node": "blend", "path": "x/../a.safetensors"}, "two": {"node": "blend", "path": "a.safetensors"}},
            "output 'one'",
        ),
        ({"one": {"node": "blend", "path": "merge_report.pth"}}, "merger's own run files"),  # its .json sidecar
    ],
)
def test_outputs_may_not_share_a_file(
    models: dict[str, Path], run_recipe: RunRecipe, outputs: dict[str, object], clash: str
) -> None:
    error = expect_error(lambda: run_recipe(blend(**outputs)))
    assert f"which {clash} already writes" in error.what


def test_cache_lock_excludes_threads_of_one_process(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    events: list[str] = []

    def hold(name: str) -> None:
        with cache.lock("node"):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")

    threads = [threading.Thread(target=hold, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_memo_is_written_only_once_the_node_is_committed(
    models: dict[str, Path], run_recipe: RunRecipe, launch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Otherwise a concurrent run could learn the real key, miss the entry and compute it again."""
    from merger.cache.store import Cache as RealCache

    memo_dir = launch_dir / "cache" / "memo"
    seen: list[bool] = []
    original = RealCache.commit

    def commit(self: RealCache, *args: object, **kwargs: object) -> object:
        seen.append(any(memo_dir.rglob("*.json")))
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RealCache, "commit", commit)
    run_recipe(blend())
    assert seen == [False]
    assert len(list(memo_dir.rglob("*.json"))) == 2


def test_cache_hits_import_neither_torch_nor_numpy(launch_dir: Path, models: dict[str, Path]) -> None:
    (launch_dir / "recipes").mkdir()
    (launch_dir / "recipes" / "r.yaml").write_text(
        "# @package _global_\nsources:\n  a: models/a.safetensors\n  b: models/b.pth\n"
        "nodes:\n  x: {op: lerp, inputs: [a, b], alpha: 0.3}\n"
        "outputs:\n  x: {}\n  half: {node: x, dtype: float16, path: half.pth}\n"
    )
    assert run_cli(["recipe=r"], launch_dir).returncode == 0
    code = (
        "import runpy, sys\nsys.argv = ['merger', 'recipe=r']\n"
        "try:\n    runpy.run_module('merger', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('MODULES', 'torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=launch_dir, capture_output=True, text=True, check=True)
    assert "cached" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "MODULES False False"
