"""`recipe=path/to/best.yaml`: a recipe file given by its path, on the command line.

Hydra picks a config group option by name, so before Hydra sees its arguments a path (a value
with a `/`, or one that ends in `.yaml`; relative to the launch directory) becomes `recipe=<stem>`
and the file's folder goes first on the search path, ahead of `./recipes` and the built-in
recipes (which stay, so that a copied recipe whose defaults list names built-in recipes still
composes): `hydra.searchpath=['merger-recipes://<folder>',...]`, as `merger.run(path)` composes a
file (merger.cli.api). A sweep over files (`-m recipe=a.yaml,b/c.yaml`) is a sweep over their
stems, which must then be distinct. A job finds its recipe file again on its search path, as
Hydra did (`recipe_file`), so that its report names the file that was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

from merger.cli.recipe_source import BUILTIN, BUILTIN_DIR, find_recipe
from merger.errors import MergerError, shown

SCHEME = "merger-recipes://"
CONFIG_FILE = Path(__file__).parents[1] / "conf" / "config.yaml"
NAME_FIX = "give the path of a recipe .yaml file, or recipe=NAME for ./recipes/NAME.yaml or a built-in recipe"


def is_recipe_path(value: str) -> bool:
    """Whether a `recipe=` value names a file rather than a recipe (a name has no `/` nor `.yaml`)."""
    return "/" in value or value.endswith(".yaml")


@cache
def default_searchpath() -> tuple[str, ...]:
    """The search path of merger's primary config (./recipes, the built-in recipes), read from it."""
    import yaml

    config = yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))
    return tuple(str(entry) for entry in config["hydra"]["searchpath"])


def recipe_choices(value: str) -> list[str] | None:
    """The recipes a `recipe=` value names: one, or the choices of a sweep (None: not a sweep Hydra parses)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        (override,) = OverridesParser.create().parse_overrides([f"recipe={value}"])
        parsed = override.value()
    except (HydraException, ValueError):
        return None
    if isinstance(parsed, ChoiceSweep):
        items = list(parsed.list)
        return [str(item) for item in items] if all(isinstance(i, str) for i in items) else None
    return [parsed] if isinstance(parsed, str) else None


def _checked_file(value: str, launch_dir: Path) -> Path:
    from merger.cli.api import _RECIPE_NAME

    path = Path(value).expanduser()
    path = path if path.is_absolute() else launch_dir / path
    if not path.is_file():
        raise MergerError(f"recipe file not found: '{shown(value)}'", where=f"recipe={shown(value)}", fix=NAME_FIX)
    folder = str(path.parent.resolve())
    if path.suffix != ".yaml" or not _RECIPE_NAME.fullmatch(path.stem) or "$" in folder:
        raise MergerError(
            f"cannot run '{shown(value)}' as a recipe: its name must be NAME.yaml (letters, digits, _ . -)"
            " in a folder whose path has no '$'",
            where=f"recipe={shown(value)}",
            fix="rename the file, or copy it to such a place",
        )
    return path


def _check_unshadowed(items: list[str], launch_dir: Path, folders: list[str]) -> None:
    """Each file of a sweep over recipe files is the one its name finds on the search path: no folder
    before its own holds a recipe of that name, and no named recipe is in one of the files' folders."""
    for item in items:
        if is_recipe_path(item):
            path = _checked_file(item, launch_dir)
            before = folders[: folders.index(str(path.parent.resolve()))]
            found = [f for f in before if (Path(f) / path.name).is_file()]
        else:
            found = [f for f in folders if (Path(f) / f"{item}.yaml").is_file()]
        if found:
            name = path.name if is_recipe_path(item) else f"{item}.yaml"
            raise MergerError(
                f"the sweep over recipe files would run '{shown(Path(found[0]) / name)}' for '{shown(item)}'"
                " (both are found by the name Hydra looks up)",
                where="the command line",
                fix="give recipes of distinct names (rename one), or run them in separate sweeps",
            )


def rewrite_recipe_args(args: Sequence[str], launch_dir: Path) -> list[str]:
    """The arguments with every `recipe=PATH` made `recipe=STEM` plus the search path that finds it;
    raises MergerError for a file that is not there or cannot be a recipe's name."""
    from merger.cli.api import _quoted

    out: list[str] = []
    folders: list[str] = []
    for arg in args:
        if not arg.startswith("recipe=") or not is_recipe_path(arg[len("recipe=") :]):
            out.append(arg)
            continue
        value = arg[len("recipe=") :]
        items = recipe_choices(value) or [value]
        stems: list[str] = []
        for item in items:
            if not is_recipe_path(item):
                stems.append(item)  # a name, in a sweep of names and files
                continue
            path = _checked_file(item, launch_dir)
            stems.append(path.stem)
            folder = str(path.parent.resolve())
            if folder not in folders:
                folders.append(folder)
        repeated = sorted({s for s in stems if stems.count(s) > 1})
        if repeated:
            raise MergerError(
                f"the sweep '{shown(arg)}' names two recipes called '{repeated[0]}'",
                where="the command line",
                fix="a sweep over recipe files needs distinct file names: rename one, or run two sweeps",
            )
        _check_unshadowed(items, launch_dir, folders)
        out.append(f"recipe={','.join(stems)}")
    if folders:
        entries = [f"{SCHEME}{folder}" for folder in folders] + list(default_searchpath())
        out.append(f"hydra.searchpath=[{','.join(_quoted(entry) for entry in entries)}]")
    return out


def recipe_file(searchpath: Sequence[str] | None, choice: str, launch_dir: Path) -> Path | None:
    """The file `recipe=choice` chose: the first `<folder>/<choice>.yaml` along the job's search path
    (merger's entries, as merger.cli.recipe_source serves them), else as `find_recipe` finds it."""
    if not searchpath:
        return find_recipe(choice, launch_dir)
    for entry in searchpath:
        if not str(entry).startswith(SCHEME):
            continue
        where = str(entry)[len(SCHEME) :]
        root = BUILTIN_DIR if where == BUILTIN else launch_dir / where
        candidate = root / f"{choice}.yaml"
        if candidate.is_file():
            return candidate
    return None
