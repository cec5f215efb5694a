"""Faults from outside: a run killed at any point, a full disk, a file-size limit, a read-only cache,
too many open files, eight runs of one recipe at once. Each ends in a whole result or the error block,
with nothing half-written at an output path and nothing wrong in the cache."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merger.cache.atomic import TMP_MARK
from merger.cache.record import read_record
from merger.io.safetensors_file import file_sha256
from merger.io.safetensors_header import read_header

pytestmark = pytest.mark.slow

MERGER = str(Path(sys.executable).parent / "merger")
RECIPE = """# @package _global_
alpha: 0.3
sources:
  a: models/a.safetensors
  b: models/b.safetensors
  c: models/c.safetensors
nodes:
  avg: {op: average, inputs: [a, b]}
  mix: {op: lerp, inputs: [avg, c], alpha: '${alpha}'}
outputs:
  mix: {path: mix.safetensors}
  half: {node: mix, path: half.safetensors, dtype: float16}
  legacy: {node: mix, path: legacy.pth}
"""


def write_project(root: Path, *, million_params: int = 1) -> None:
    (root / "models").mkdir(parents=True)
    (root / "recipes").mkdir()
    (root / "recipes" / "r.yaml").write_text(RECIPE)
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(1000, 250 * million_params, generator=g) for i in range(4)}
    for n, name in enumerate("abc"):
        save_file({k: v + 0.01 * (n + 1) for k, v in base.items()}, root / "models" / f"{name}.safetensors")


def env_for(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MERGER_", "HYDRA_"))}
    env["MERGER_CACHE_DIR"] = str(cache)
    return env


def check_outputs_and_cache(root: Path, cache: Path, *, killed: bool = False) -> None:
    """Every output file is whole; every cache object has a record and its sha256 matches (after
    SIGKILL, an object may lack its record: such an object is never served, see test_cache)."""
    for path in root.glob("outputs/**/*"):
        assert TMP_MARK not in path.name, f"a temporary file was left at {path}"
        if path.suffix == ".safetensors":
            read_header(path)  # whole, or it would not parse
    for obj in cache.glob("objects/*/*"):
        if obj.suffix == ".json":
            continue
        record = read_record(obj)
        if record is None and killed:
            continue
        assert record is not None, f"{obj} has no record"
        assert file_sha256(obj) == record.sha256, f"{obj} does not match its record"


def data_digest(path: Path) -> str:
    """The sha256 of a file's tensors: a safetensors file's data (its header holds the source paths)."""
    import hashlib

    start = read_header(path).data_start if path.suffix == ".safetensors" else 0
    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read()).hexdigest()


def output_digests(report: dict[str, dict[str, dict[str, str]]]) -> dict[str, str]:
    return {n: data_digest(Path(o["path"])) for n, o in report["outputs"].items()}


def finish_and_compare(root: Path, cache: Path, expected: dict[str, str]) -> None:
    done = subprocess.run([MERGER, "recipe=r"], cwd=root, env=env_for(cache), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list((cache / "tmp").glob("*")), "a rerun removes what a killed run left"
    report = json.loads(sorted(root.glob("outputs/*/*/merge_report.json"))[-1].read_text())
    assert output_digests(report) == expected
    for output in report["outputs"].values():
        assert file_sha256(Path(output["path"])) == output["sha256"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], float]:
    """The outputs' sha256 of an uninterrupted run, and how long it took."""
    root = tmp_path_factory.mktemp("reference")
    write_project(root)
    start = time.perf_counter()
    done = subprocess.run([MERGER, "recipe=r"], cwd=root, env=env_for(root / "cache"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    seconds = time.perf_counter() - start
    report = json.loads(next(root.glob("outputs/*/*/merge_report.json")).read_text())
    return output_digests(report), seconds


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_at_many_points(tmp_path: Path, reference: tuple[dict[str, str], float], signum: signal.Signals) -> None:
    expected, seconds = reference
    write_project(tmp_path)
    cache = tmp_path / "cache"
    for fraction in (0.2, 0.4, 0.6, 0.8, 0.95):
        process = subprocess.Popen(
            [MERGER, "recipe=r", "progress=false"],
            cwd=tmp_path,
            env=env_for(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(seconds * fraction)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert "Traceback" not in stderr, stderr
        if process.returncode == -signum and signum != signal.SIGKILL:  # stopped before merger's own start
            assert not list((cache / "tmp").glob("*"))
        elif process.returncode not in (0, -signal.SIGKILL):
            assert process.returncode in (130, 143), (process.returncode, stderr)
            assert "no partial output or cache entry was kept" in stderr
            assert not list((cache / "tmp").glob("*")), "an orderly stop removes its temporary files"
        check_outputs_and_cache(tmp_path, cache, killed=signum == signal.SIGKILL)
    finish_and_compare(tmp_path, cache, expected)


@contextlib.contextmanager
def tiny_disk(path: Path, size: str) -> Iterator[bool]:
    """A small tmpfs at `path`, if this machine lets us mount one (False: it does not)."""
    path.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def assert_block(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.startswith("merger: error:"), done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def test_a_full_disk_is_the_error_block(tmp_path: Path) -> None:
    write_project(tmp_path)
    with tiny_disk(tmp_path / "small", "2m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (see test_a_file_size_limit_is_the_error_block)")
        cache = tmp_path / "small" / "cache"
        done = subprocess.run([MERGER, "recipe=r"], cwd=tmp_path, env=env_for(cache), capture_output=True, text=True)
        assert_block(done, "No space left on device", "merger-cache gc")
        assert not list(cache.glob("tmp/*")), "the failed commit's temporary file is removed at once"
        assert not list(tmp_path.glob("outputs/*/*/*.safetensors"))


def test_a_file_size_limit_is_the_error_block(tmp_path: Path) -> None:
    write_project(tmp_path)
    cache = tmp_path / "cache"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    done = subprocess.run(
        [MERGER, "recipe=r"], cwd=tmp_path, env=env_for(cache), capture_output=True, text=True, preexec_fn=limit
    )
    assert_block(done, "File too large", "ulimit -f")
    assert not list(cache.glob("tmp/*"))


def test_a_read_only_cache_serves_hits_and_refuses_new_work_clearly(tmp_path: Path) -> None:
    write_project(tmp_path)
    with tiny_disk(tmp_path / "ro", "200m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here")
        cache = tmp_path / "ro" / "cache"
        first = subprocess.run([MERGER, "recipe=r"], cwd=tmp_path, env=env_for(cache), capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], check=True)
        hit = subprocess.run([MERGER, "recipe=r"], cwd=tmp_path, env=env_for(cache), capture_output=True, text=True)
        assert hit.returncode == 0, hit.stderr
        assert "cached" in hit.stdout
        new = subprocess.run(
            [MERGER, "recipe=r", "alpha=0.9"], cwd=tmp_path, env=env_for(cache), capture_output=True, text=True
        )
        assert_block(new, "Read-only file system", "cache_dir")


def test_too_many_open_files_is_the_error_block(tmp_path: Path) -> None:
    (tmp_path / "zoo").mkdir()
    for i in range(80):
        save_file({"w": torch.full((4,), float(i))}, tmp_path / "zoo" / f"m{i:02d}.safetensors")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "zoo.yaml").write_text(
        "# @package _global_\nsources:\n  zoo: {glob: 'zoo/*.safetensors'}\n"
        "nodes:\n  mean: {op: average, inputs: [zoo]}\noutputs:\n  mean: {}\n"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    done = subprocess.run(
        [MERGER, "recipe=zoo"],
        cwd=tmp_path,
        env=env_for(tmp_path / "cache"),
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert_block(done, "Too many open files", "ulimit -n")


def test_eight_runs_at_once_compute_each_node_once(tmp_path: Path) -> None:
    write_project(tmp_path)
    cache = tmp_path / "cache"
    processes = [
        subprocess.Popen(
            [MERGER, "recipe=r"],
            cwd=tmp_path,
            env=env_for(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    reports = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/*/*/merge_report.json")]
    assert len(reports) == 8
    for node in ("avg", "mix"):
        assert [r["nodes"][node]["status"] for r in reports].count("computed") == 1, node
    for name in ("mix", "half", "legacy"):
        assert len({r["outputs"][name]["sha256"] for r in reports}) == 1, name
        for r in reports:
            assert file_sha256(Path(r["outputs"][name]["path"])) == r["outputs"][name]["sha256"]
    check_outputs_and_cache(tmp_path, cache)


def test_a_stop_signal_where_python_cannot_raise_still_stops_the_run(tmp_path: Path) -> None:
    """SIGTERM landing in a weakref callback (as inside an import) is swallowed by Python, which
    prints a traceback and goes on: merger sends it again, and the run stops with its message."""
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, signal, time, weakref
        from merger.cli.failure import command
        def body(argv):
            class Thing: pass
            thing = Thing()
            ref = weakref.ref(thing, lambda r: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(0.01))
            del thing
            time.sleep(2)
            print("not stopped")
        command(body, ["merger"])
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 143 and "not stopped" not in done.stdout
    assert "Traceback" not in done.stderr and "merger: terminated" in done.stderr


@pytest.mark.parametrize(("signum", "status", "said"), [(15, 143, "terminated"), (2, 130, "interrupted")])
def test_a_stop_a_library_turns_into_another_error_still_ends_as_the_stop(
    tmp_path: Path, signum: int, status: int, said: str
) -> None:
    """A stop landing inside code that catches it and raises something else (as omegaconf does when
    SIGTERM interrupts a composition: an AttributeError, which merger would tell as a bad recipe
    value) ends as the stop: its message and exit status, not the other error's block."""
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import os, signal, time
        from merger.cli.failure import command
        from merger.errors import MergerError
        def body(argv):
            try:
                os.kill(os.getpid(), {signum})
                time.sleep(2)
            except BaseException:
                raise MergerError("the recipe holds a value merger cannot take") from None
            print("not stopped")
        command(body, ["merger"])
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == status and "not stopped" not in done.stdout, done.stderr
    assert f"merger: {said}" in done.stderr and "cannot take" not in done.stderr


def test_a_stop_during_the_exit_after_the_run_is_ignored(tmp_path: Path) -> None:
    """A stop that lands once the run's outcome is decided (in the interpreter's exit: a library's clean-up
    code, as torch's, which aborted the process when the stop was raised inside it) is ignored: the run
    exits with its own status, no traceback, no abort."""
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import atexit, os, signal, time
        from merger.cli.failure import command
        def stopped_while_exiting():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("cleaned up")
        atexit.register(stopped_while_exiting)
        command(lambda argv: print("done"), ["merger"])
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["done", "cleaned", "up"] and "Traceback" not in done.stderr
