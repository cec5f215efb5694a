"""The `recipe` config group: `./recipes/NAME.yaml`, then the built-in recipes.

A Hydra ConfigSource (public plugin API, registered explicitly with
`Plugins.instance().register`) that serves a plain directory of recipe files
as the group `recipe`, so that `recipe=NAME` needs no `recipe/` sub-folder.
The primary config lists two of them on its search path: `recipes` (relative
to the directory merger runs in) and `builtin` (the package's own). A missing
`./recipes` is simply empty: no warning.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from merger.cli.hydra_private import list_add_result, normalize_file_name, yaml_loader
from merger.core.limits import MAX_RECIPE_BYTES
from merger.core.regular_file import open_regular
from merger.errors import MergerError, shown
from merger.recipe.file_rules import check_header, check_recipe_data, check_size, check_yaml_shape

GROUP = "recipe"
BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).parents[1] / "recipes"
LOCAL_DIR = "recipes"
PACKAGE_LINE = "# @package _global_"


def recipe_dirs(launch_dir: Path) -> list[Path]:
    """Where recipe=NAME is looked up, in order."""
    return [launch_dir / LOCAL_DIR, BUILTIN_DIR]


def find_recipe(name: str, launch_dir: Path) -> Path | None:
    for directory in recipe_dirs(launch_dir):
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def available_recipes(launch_dir: Path) -> list[str]:
    names: set[str] = set()
    for directory in recipe_dirs(launch_dir):
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.yaml"))
    return sorted(names)


class RecipeFileError(ConfigLoadError):
    """A recipe file broke a rule of `merger.recipe_file`; carries the MergerError to show."""

    def __init__(self, error: MergerError) -> None:
        super().__init__(error.what)
        self.error = error


def _checked_yaml(text: str, label: str) -> Any:
    """The YAML document, parsed once with OmegaConf's loader, its node graph checked before it is built."""
    stream = io.StringIO(text)
    stream.name = label  # YAML errors name the file
    loader = yaml_loader()(stream)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise MergerError("the recipe's YAML is nested too deeply", where=label, fix="flatten it") from None
        check_yaml_shape(root, label)
        data = loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()
    if data is not None and not isinstance(data, dict):
        raise MergerError(
            f"the recipe file holds a {type(data).__name__}, not a mapping of keys",
            where=label,
            fix="write the recipe as key: value lines (sources:, nodes:, outputs:)",
        )
    return data


def load_recipe_file(file: Path) -> tuple[Any, dict[str, str | None]]:
    """The checked config of one recipe file, and its header (see merger.recipe.file_rules)."""
    label = str(file)
    with open_regular(file) as f:
        check_size(os.fstat(f.fileno()).st_size, label)
        raw = f.read(MAX_RECIPE_BYTES + 1)
    check_size(len(raw), label)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergerError(
            f"the recipe file is not UTF-8 text (byte {e.start})", where=label, fix="save it as UTF-8"
        ) from None
    header = check_header(text, label)
    try:
        config = OmegaConf.create(_checked_yaml(text, label) or {})
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergerError(
            f"the recipe holds a value merger cannot take: {shown(detail)}",
            where=label,
            fix="write plain numbers, strings, lists and mappings (no YAML tags such as !!timestamp or !!set)",
        ) from None
    check_recipe_data(OmegaConf.to_container(config, resolve=False), label)
    return config, header


class RecipeDirSource(ConfigSource):
    @staticmethod
    def scheme() -> str:
        return "merger-recipes"

    def _root(self) -> Path:
        if self.path == BUILTIN:
            return BUILTIN_DIR
        return Path(os.path.abspath(self.path))

    def _in_group(self, config_path: str) -> str | None:
        """The path inside the recipe directory, or None outside the group."""
        parts = config_path.strip("/").split("/", 1)
        if parts[0] != GROUP:
            return None
        return parts[1] if len(parts) > 1 else ""

    def load_config(self, config_path: str) -> ConfigResult:
        inner = self._in_group(normalize_file_name(self, config_path))
        file = self._root() / inner if inner else None
        if file is None or not file.is_file():
            raise ConfigLoadError(f"Config not found : {config_path}")
        try:
            config, header = load_recipe_file(file)
        except MergerError as e:
            raise RecipeFileError(e) from None
        return ConfigResult(
            config=config,
            path=f"{self.scheme()}://{self.path}",
            provider=self.provider,
            header=header,
        )

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return True
        inner = self._in_group(config_path)
        return inner is not None and (self._root() / inner).is_dir()

    def is_config(self, config_path: str) -> bool:
        inner = self._in_group(normalize_file_name(self, config_path))
        return bool(inner) and (self._root() / str(inner)).is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path.strip("/") == "":
            wants_groups = results_filter in (None, ObjectType.GROUP)
            return [GROUP] if wants_groups and self._root().is_dir() else []
        inner = self._in_group(config_path)
        directory = self._root() / inner if inner is not None else None
        if directory is None or not directory.is_dir():
            return []
        found: list[str] = []
        for entry in sorted(os.listdir(directory)):
            if entry.endswith(".yaml") or (directory / entry).is_dir():
                list_add_result(self, found, f"{config_path}/{entry}", entry, results_filter)
        return sorted(set(found))
