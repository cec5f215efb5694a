"""The op registry: built once, explicitly, from op instances and, for ops that load on first use,
from named loaders.

No import-time side effects and no global instance: the CLI builds one with `builtin_registry()` and
passes it down; tests may build their own. A loader runs the first time its op is asked for (`get`),
so a run imports only the op modules its recipe names; listing the names loads nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from merger.errors import MergerError, suggestion
from merger.ops.base import AnyOp


class OpRegistry:
    def __init__(self, ops: Iterable[AnyOp] = (), *, loaders: Mapping[str, Callable[[], AnyOp]] | None = None) -> None:
        self._ops: dict[str, AnyOp] = {}
        self._loaders: dict[str, Callable[[], AnyOp]] = {}
        self._order: list[str] = []
        for op in ops:
            self._add(op.name)
            self._ops[op.name] = op
        for name, loader in (loaders or {}).items():
            self._add(name)
            self._loaders[name] = loader

    def _add(self, name: str) -> None:
        if name in self._order:
            raise ValueError(f"op {name!r} is registered twice")
        self._order.append(name)

    def get(self, name: str) -> AnyOp:
        op = self._ops.get(name)
        if op is not None:
            return op
        loader = self._loaders.get(name)
        if loader is None:
            raise MergerError(f"unknown op '{name}'", fix=suggestion(name, self._order, kind="ops"))
        op = loader()
        if op.name != name:
            raise ValueError(f"the loader of op {name!r} gave op {op.name!r}")
        self._ops[name] = op
        return op

    def names(self) -> list[str]:
        return sorted(self._order)

    def __iter__(self) -> Iterator[AnyOp]:
        """Every op, in the order registered (loading the ones not loaded yet)."""
        return iter([self.get(name) for name in self._order])
