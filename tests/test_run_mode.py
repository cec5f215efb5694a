"""A run composes its config once where nothing of the launch can set `hydra.mode` (merger.cli.run_mode):
Hydra's `get_mode` compose is skipped then, and kept wherever an override, another config or a recipe
file may set the mode, so that `hydra.mode=MULTIRUN` on the command line still sweeps."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from merger.cli.run_mode import mode_is_unset
from tests.conftest import run_script_json

RECIPES = {
    "plain": "# @package _global_\nnodes: {}\nhydra: {job: {chdir: false}}\n# the models' mode of merging\n",
    "other": "# @package _global_\ndescription: modes and models\n",
    "moded": "# @package _global_\nhydra: {mode: MULTIRUN}\n",
    "composed": "# @package _global_\ndefaults: [plain]\n",
    "listed": "- a\n- b\n",
    "broken": "# @package _global_\nnodes: [\n",
    "deep": "# @package _global_\nnodes: " + "[" * 3000 + "]" * 3000 + "\n",
}


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    (tmp_path / "recipes").mkdir()
    for name, text in RECIPES.items():
        (tmp_path / "recipes" / f"{name}.yaml").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "unset"),
    [
        ([], True),  # the built-in demo
        (["recipe=plain", "progress=false", "sources.model=m.safetensors"], True),
        (["-m", "recipe=plain,other", "alpha=0,0.5", "hydra/sweeper=optuna", "+extra=1", "~seed"], True),
        (["recipe=recipes/plain.yaml"], True),
        (["recipe=moded"], False),
        (["recipe=plain,moded"], False),
        (["recipe=composed"], False),
        (["recipe=listed"], False),
        (["recipe=broken"], False),
        (["recipe=deep"], False),
        (["recipe=missing"], False),
        (["recipe=glob(*)"], False),
        (["recipe=plain", "hydra.mode=MULTIRUN"], False),
        (["recipe=plain", "++hydra.mode=RUN"], False),
        (["recipe=plain", "hydra={mode: MULTIRUN}"], False),
        (["recipe=plain", "hydra.searchpath=[file:///elsewhere]"], False),
        (["recipe=plain", "+group/option=x"], False),
        (["recipe@other=plain"], False),
        (["recipe=plain", "--config-name=other"], False),
        (["recipe=plain", "-cd", "conf"], False),
        (["--config-d=conf", "recipe=plain"], False),  # argparse takes a long flag's beginning
        (["--config-p", "/elsewhere", "recipe=plain"], False),
        (["--multi", "recipe=plain"], True),
        (["--experimental-rerun", "config.pickle"], False),
    ],
)
def test_the_mode_is_known_unset_only_where_nothing_can_set_it(recipes: Path, args: list[str], unset: bool) -> None:
    assert mode_is_unset(args, recipes) is unset


@settings(max_examples=60, deadline=None)
@given(
    before=st.lists(st.sampled_from(["recipe=plain", "progress=false", "-m", "alpha=0,1", "hydra/sweeper=basic"])),
    setting=st.sampled_from(["hydra.mode=MULTIRUN", "+hydra.mode=RUN", "hydra={}", "--config-dir=x", "recipe=moded"]),
    after=st.lists(st.sampled_from(["progress=true", "seed=1", "-m"])),
)
def test_any_launch_that_may_set_the_mode_keeps_hydras_compose(
    tmp_path_factory: pytest.TempPathFactory, before: list[str], setting: str, after: list[str]
) -> None:
    root = tmp_path_factory.getbasetemp() / "run_mode_recipes"
    if not root.exists():
        (root / "recipes").mkdir(parents=True)
        for name, text in RECIPES.items():
            (root / "recipes" / f"{name}.yaml").write_text(text)
    assert not mode_is_unset([*before, setting, *after], root)


#: runs `merger` in this process, counting Hydra's composes of the config, and prints the exit status
COUNTING = textwrap.dedent(
    """
    import json, sys
    from hydra._internal.hydra import Hydra
    from merger.cli.command import merger
    composes = []
    compose_config = Hydra.compose_config
    Hydra.compose_config = lambda self, *a, **k: composes.append(1) or compose_config(self, *a, **k)
    sys.argv = ["merger", *sys.argv[1:]]
    try:
        merger()
    except SystemExit as e:
        status = e.code
    print(json.dumps({"status": status, "composes": len(composes)}))
    """
)


def counted(launch_dir: Path, *args: str) -> dict[str, Any]:
    return run_script_json(COUNTING, launch_dir, *args)


def test_a_run_composes_once_and_a_mode_set_on_the_command_line_still_sweeps(tmp_path: Path) -> None:
    import numpy as np

    for name, value in (("a", 1.0), ("b", 3.0)):
        save_file({"w": np.full(4, value, np.float32)}, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "recipes").mkdir()
    body = (
        "sources: {a: a.safetensors, b: b.safetensors}\n"
        "alpha: 0.5\n"
        "nodes: {m: {op: lerp, inputs: [a, b], alpha: '${alpha}'}}\n"
        "outputs: {m: {path: 'm_${alpha}.safetensors'}}\n"
    )
    (tmp_path / "recipes" / "one.yaml").write_text("# @package _global_\n" + body)
    settings = ["progress=false", "family=off", "sanity=off", "cache_dir=cache"]
    assert counted(tmp_path, "recipe=one", *settings)["composes"] == 1
    assert len(list((tmp_path / "outputs").glob("*/*/m_0.5.safetensors"))) == 1
    assert counted(tmp_path, "recipe=one", *settings)["composes"] == 1  # a full cache hit too
    swept = counted(tmp_path, "recipe=one", "hydra.mode=MULTIRUN", "alpha=0.25,0.75", *settings)
    assert swept["composes"] > 1  # Hydra's own get_mode, which finds the MULTIRUN and sweeps without -m
    jobs = sorted(p.name for p in (tmp_path / "outputs" / "multirun").glob("*/*/*/m_*.safetensors"))
    assert jobs == ["m_0.25.safetensors", "m_0.75.safetensors"]
