"""Every private name of Hydra and OmegaConf merger uses, in one place (tests/test_hydra_private.py
fails with a clear message when one of them changes in a new Hydra or OmegaConf).

- `BasicSweeper` (hydra._internal): merger's sweeper is Hydra's basic sweeper that checks first;
- `ConfigSource._normalize_file_name`, `ConfigSource._list_add_result`: what a ConfigSource plugin
  (merger's recipe directories) needs to answer Hydra as its own sources do;
- `omegaconf._utils.get_yaml_loader`: OmegaConf's own YAML loader, so that a recipe file is parsed
  once and its node graph checked before anything is built from it;
- `Hydra.get_mode` (hydra._internal): answered without a compose of its own where the launch cannot
  set `hydra.mode` (merger.cli.run_mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigSource
from omegaconf._utils import get_yaml_loader

__all__ = ["BasicSweeper", "list_add_result", "normalize_file_name", "split_jobs", "unset_mode", "yaml_loader"]

#: (owner, attribute) of every private name used here, for the test that they still exist
PRIVATE_NAMES: tuple[tuple[Any, str], ...] = (
    (BasicSweeper, "split_arguments"),
    (ConfigSource, "_normalize_file_name"),
    (ConfigSource, "_list_add_result"),
    (Hydra, "get_mode"),
)


def split_jobs(overrides: list[Any]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper lists them (parsed overrides in, one batch)."""
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for job in jobs]


def normalize_file_name(source: ConfigSource, path: str) -> str:
    return str(source._normalize_file_name(path))


def list_add_result(
    source: ConfigSource, files: list[str], file_path: str, file_name: str, results_filter: ObjectType | None
) -> None:
    source._list_add_result(files, file_path, file_name, results_filter)


def yaml_loader() -> Any:
    """OmegaConf's YAML loader class."""
    return get_yaml_loader()


@contextmanager
def unset_mode() -> Iterator[None]:
    """While this lasts, Hydra's `get_mode` (a whole compose of the config, to read `hydra.mode`)
    answers None, unset, as that compose would where merger.cli.run_mode.mode_is_unset holds."""
    composed = Hydra.get_mode

    def get_mode(self: Hydra, config_name: str | None, overrides: list[str]) -> None:
        return None

    Hydra.get_mode = get_mode  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = composed  # type: ignore[method-assign]
