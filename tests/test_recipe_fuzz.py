"""Property: any mutation of a shipped recipe ends in a whole run or the error block, in bounded time,
with nothing half-written (the recipes' models are built here, so mutations reach deep into the run)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.plugins import Plugins
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from merger.cache.atomic import TMP_MARK
from merger.cli.app import preflight
from merger.cli.job import prepare, run
from merger.cli.job_config import recipe_data
from merger.cli.recipe_source import PACKAGE_LINE, RecipeDirSource
from merger.errors import MergerError
from merger.io.safetensors_header import read_header
from merger.ops import builtin_registry
from merger.report.run_report import RunContext
from tests.conftest import REPO, run_cli
from tests.test_example_recipes import MODELS

SHIPPED = {p.stem: p.read_text() for p in sorted((REPO / "recipes").glob("*.yaml"))}
SHIPPED["demo"] = (REPO / "merger" / "recipes" / "demo.yaml").read_text()
SECONDS_PER_CASE = 20.0

TRICKY_KEYS = [
    "hydra",
    "defaults",
    "_target_",
    "allow_env",
    "cache_dir",
    "cache_max_size",
    "nonfinite",
    "seed",
    "device",
    "preview",
    "keys",
    "include",
    "rest",
    "weights",
    "alpha",
    "t",
    "density",
    "base",
    "inputs",
    "op",
    "node",
    "path",
    "dtype",
    "layout",
    "overwrite",
    "glob",
    "key",
    "scale",
    "p",
    "granularity",
    "()",
]
TRICKY_TEXT = [
    "${alpha}",
    "${oc.env:HOME}",
    "${oc.decode:'1'}",
    "${missing}",
    "${nodes}",
    "../../escape.safetensors",
    "/tmp/abs.safetensors",
    "x.pth",
    "folder",
    "nan",
    "inf",
    "-1e999",
    "a\x00b",
    "\u202e",
    "*",
    "models/*.pth",
    "pkg://merger/demo/psnr.safetensors",
    "pkg://nope/x",
    "cuda:7",
    "error",
    "intersection",
    "copy",
    "drop",
    "(",
    "layers\\.(\\d+)\\.",
    "",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(TRICKY_TEXT),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(TRICKY_KEYS) | st.text(max_size=6), inner, max_size=3),
    ),
    max_leaves=8,
)


def _places(data: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(data, dict):
        for key, value in data.items():
            found.extend(_places(value, (*path, key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.extend(_places(value, (*path, i)))
    return found


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str]:
    """(recipe name, mutated text): structural edits, or a few character edits of the text."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    text = SHIPPED[name]
    if draw(st.integers(0, 9)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            text = (
                text[:at] + draw(st.sampled_from(["", ":", "{", "]", "\t", "&a", "*a", "- ", "\n  x"])) + text[at + 1 :]
            )
        return name, text
    data = yaml.safe_load(text)
    for _ in range(draw(st.integers(1, 2))):
        place = draw(st.sampled_from(_places(data)))
        parent: Any = data
        for part in place[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "insert"]))
        target = parent if not place else parent[place[-1]]
        if action == "insert" and isinstance(target, dict):
            target[draw(st.sampled_from(TRICKY_KEYS) | st.text(min_size=1, max_size=6))] = draw(values)
        elif action == "delete" and place:
            del parent[place[-1]]
        elif place and isinstance(target, (int, float)) and not isinstance(target, bool) and draw(st.booleans()):
            parent[place[-1]] = draw(st.floats(-2, 2) | st.integers(0, 4))  # a plausible edit: more runs go deep
        elif place:
            parent[place[-1]] = draw(values)
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if isinstance(data, dict) else "{}\n"
    return name, f"{PACKAGE_LINE}\n{body}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One launch directory with every shipped recipe's models; the current directory meanwhile
    (merger finds ./recipes there)."""
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    models.mkdir()
    built: set[str] = set()
    for name in sorted(MODELS):
        writer = MODELS[name]
        marker = getattr(writer, "__qualname__", name)
        scratch = root / f"scratch_{name}"
        scratch.mkdir()
        writer(scratch)
        for item in scratch.iterdir():
            if not (models / item.name).exists():
                shutil.move(str(item), models / item.name)
        shutil.rmtree(scratch)
        built.add(marker)
    (root / "recipes").mkdir()
    Plugins.instance().register(RecipeDirSource)
    before = Path.cwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(before)


def run_in_process(root: Path, out: Path) -> None:
    overrides = ["recipe=fuzz", "progress=false"]
    preflight(overrides, root)
    with initialize_config_module(config_module="merger.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    data, label, _ = recipe_data(cfg, "fuzz", root, overrides)
    data["cache_dir"] = str(root / "cache")
    prepared = prepare(data, builtin_registry(), file=label, launch_dir=root, output_dir=out)
    context = RunContext("fuzz", label, None, tuple(overrides), root, out)
    run(prepared, context)


#: mutated recipes run in-process per test run (`pytest -m "not slow"` stays under a minute); run
#: more with MERGER_FUZZ_EXAMPLES=5000 (derandomized: the same cases on every run of one size)
IN_PROCESS_EXAMPLES = int(os.environ.get("MERGER_FUZZ_EXAMPLES", "70"))


def assert_nothing_partial(root: Path) -> None:
    for path in root.rglob("*"):
        assert TMP_MARK not in path.name, path
        if path.suffix == ".safetensors" and path.is_file() and "models" not in path.parts:
            read_header(path)


@settings(max_examples=IN_PROCESS_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=mutated())
def test_mutated_recipes_run_or_fail_cleanly(project: Path, case: tuple[str, str]) -> None:
    _, text = case
    (project / "recipes" / "fuzz.yaml").write_text(text)
    out = project / "out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    try:
        run_in_process(project, out)
        event("ran")
    except MergerError as e:
        assert e.what and "Traceback" not in e.render()
        event(f"refused: {e.what.split(':')[0].split(chr(39))[0][:40]}")
        if os.environ.get("FUZZ_SHOW"):
            print("BLOCK", e.render().replace(chr(10), " | ")[:300])
    assert time.perf_counter() - start < SECONDS_PER_CASE
    assert_nothing_partial(project)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=mutated())
def test_mutated_recipes_from_the_command_line(project: Path, case: tuple[str, str]) -> None:
    _, text = case
    (project / "recipes" / "fuzz.yaml").write_text(text)
    done = run_cli(["recipe=fuzz", f"cache_dir={project / 'cache'}"], project, timeout=60)
    assert done.returncode in (0, 2), done.stderr
    assert "Traceback" not in done.stderr
    if done.returncode == 2:
        assert done.stderr.startswith("merger: error:"), done.stderr
    assert_nothing_partial(project)
