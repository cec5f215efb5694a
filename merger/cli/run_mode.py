"""Hydra's run mode without a compose of its own, when nothing of the launch can set it.

Before a run, Hydra composes the whole config once only to read `hydra.mode` (`Hydra.get_mode`),
then composes it again for the run itself: a twelfth of a cache hit's time here. merger's primary
config leaves the mode unset, so that the command line's `-m` decides, unless the launch sets it:
an override of `hydra.mode` (or all of `hydra`), a flag other than `-m` (another primary config or
config directory, `--config-name`, `--config-path`, `--config-dir`, or any other), another search
path, a config file chosen into a package (`group@package=`), or a recipe file with a defaults list
(which may bring in other files) or a `hydra.mode` (which merger refuses, after Hydra's compose).
Other overrides set their own key only: the config groups are the recipe and Hydra's own
(`hydra/...`). `mode_is_unset` says when none of these is so; `unset_mode`
(merger.cli.hydra_private) then answers Hydra's question (unset, None) for the run, without
composing. Any doubt leaves Hydra's own answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from merger.cli.recipe_path import is_recipe_path, recipe_choices
from merger.cli.recipe_source import find_recipe
from merger.core.limits import MAX_RECIPE_BYTES

#: the flags a run may have and still be known unset: multirun's (argparse also takes a long flag's
#: unambiguous beginning, `--config-d` for `--config-dir`, so any other flag keeps Hydra's own answer)
RUN_FLAGS = ("-m", "--multirun")


def mode_is_unset(args: Sequence[str], launch_dir: Path) -> bool:
    """Whether the composed config of a launch with these arguments (the command line's, before
    merger rewrites a recipe path) leaves `hydra.mode` unset, known without composing it."""
    recipes = ["demo"]  # merger/conf/config.yaml's default
    for arg in args:
        if arg.startswith("-"):
            if arg not in RUN_FLAGS and not (len(arg) > 3 and "--multirun".startswith(arg)):
                return False  # another primary config, a config directory, or a flag merger does not know
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key == "recipe":
            recipes = recipe_choices(value) or []
            if not recipes:
                return False
        elif _may_set_mode(key):
            return False
    return all(_plain_recipe(name, launch_dir) for name in recipes)


def _may_set_mode(key: str) -> bool:
    """Whether an override of `key` (not `recipe`) may set `hydra.mode`: it, all of `hydra`, the
    search path, a config chosen into a package, or a config group other than Hydra's own."""
    if key in ("hydra", "hydra.mode", "hydra.searchpath") or "@" in key:
        return True
    return "/" in key and not key.startswith("hydra/")


def _plain_recipe(name: str, launch_dir: Path) -> bool:
    """Whether the recipe `name` (or path) is a YAML file of a mapping without a defaults list, whose
    `hydra` (if any) is a mapping without `mode`."""
    import yaml

    file = (launch_dir / name) if is_recipe_path(name) else find_recipe(name, launch_dir)
    if file is None or not file.is_file() or file.stat().st_size > MAX_RECIPE_BYTES:
        return False
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):  # Hydra's compose tells what is wrong
        return False
    if data is None:
        return True
    if not isinstance(data, dict) or "defaults" in data:
        return False
    hydra = data.get("hydra", {})
    return isinstance(hydra, dict) and "mode" not in hydra
