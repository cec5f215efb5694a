"""The op registry: built once, explicitly, from a list of op instances.

No import-time side effects and no global instance: the CLI builds one with
`builtin_registry()` and passes it down; tests may build their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from merger.errors import MergerError, suggestion
from merger.ops.base import AnyOp


class OpRegistry:
    def __init__(self, ops: Iterable[AnyOp]) -> None:
        self._ops: dict[str, AnyOp] = {}
        for op in ops:
            if op.name in self._ops:
                raise ValueError(f"op {op.name!r} is registered twice")
            self._ops[op.name] = op

    def get(self, name: str) -> AnyOp:
        op = self._ops.get(name)
        if op is None:
            raise MergerError(f"unknown op '{name}'", fix=suggestion(name, self._ops, kind="ops"))
        return op

    def names(self) -> list[str]:
        return sorted(self._ops)

    def __iter__(self) -> Iterator[AnyOp]:
        return iter(self._ops.values())
