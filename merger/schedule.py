"""Per-layer values: a numeric op parameter may vary with the tensor key.

Instead of a number, a parameter (or one value of a per-model list) may be

    {default: 0.5, rules: [{match: "mlp", value: 0.2}, {match: "attn", value: 0.8}]}

(the first rule whose regex is found in the key wins; no match: `default`), or

    {blocks: "model\\.layers\\.(\\d+)\\.", values: [0.0, 1.0], default: 0.5}

(a gradient: the regex's first group is a block index; the values are spread
evenly from the lowest block to the highest and interpolated linearly in
between; keys with no block take `default`). Every regex is an unanchored
search (Python's `re.search`): `mlp` matches `model.layers.0.mlp.up_proj.weight`.
The run report counts which rule each key used.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from merger.errors import MergerError, shown


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class Rule(_Strict):
    match: str
    value: float


class Rules(_Strict):
    default: float
    rules: list[Rule] = Field(min_length=1)


class Gradient(_Strict):
    blocks: str
    values: list[float] = Field(min_length=2)
    default: float | None = None


#: the type of a schedulable parameter
Scheduled = float | Rules | Gradient


def number(value: Scheduled) -> float:
    """A parameter's value for one key: the executor resolves schedules before ops see them."""
    if not isinstance(value, int | float):
        raise TypeError(f"unresolved schedule {value!r}")
    return float(value)


def is_schedule(value: Any) -> bool:
    return isinstance(value, Rules | Gradient)


def contains_schedule(params: Any) -> bool:
    """Whether any parameter (or value of a list parameter) is a schedule."""
    for name in type(params).model_fields:
        value = getattr(params, name)
        if is_schedule(value) or (isinstance(value, list) and any(is_schedule(v) for v in value)):
            return True
    return False


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise MergerError(
            f"'{pattern}' is not a valid regular expression: {e}", where=where, fix="fix the regex"
        ) from None


class _Resolved:
    """One schedule, ready to give the value for a key (and the label of the rule used)."""

    def __init__(self, schedule: Rules | Gradient, keys: Iterable[str], where: str) -> None:
        self.schedule = schedule
        if isinstance(schedule, Rules):
            self.patterns = [_compile(rule.match, where) for rule in schedule.rules]
            return
        self.pattern = _compile(schedule.blocks, where)
        if self.pattern.groups < 1:
            raise MergerError(
                f"blocks '{schedule.blocks}' has no group to read the block index from",
                where=where,
                fix=r"capture the index, e.g. blocks: 'layers\.(\d+)\.'",
            )
        indices = {}
        for key in keys:
            found = self.pattern.search(key)
            if found is None:
                continue
            try:
                indices[key] = int(found.group(1))
            except (TypeError, ValueError):
                raise MergerError(
                    f"blocks '{schedule.blocks}' reads '{shown(found.group(1))}' from '{shown(key)}',"
                    " not a block number",
                    where=where,
                    fix=r"make the first group match digits, e.g. (\d+)",
                ) from None
        if not indices:
            raise MergerError(f"blocks '{schedule.blocks}' matches no key", where=where, fix="check the regex")
        unmatched = [k for k in keys if k not in indices]
        if unmatched and schedule.default is None:
            raise MergerError(
                f"{len(unmatched)} keys match no block (e.g. '{shown(unmatched[0])}'), and the gradient has no default",
                where=where,
                fix="add default: <value> for the keys outside the blocks",
            )
        self.indices = indices
        self.low, self.high = min(indices.values()), max(indices.values())

    def value(self, key: str) -> tuple[float, str]:
        schedule = self.schedule
        if isinstance(schedule, Rules):
            for i, pattern in enumerate(self.patterns):
                if pattern.search(key):
                    return schedule.rules[i].value, f"rule {i + 1} ({schedule.rules[i].match})"
            return schedule.default, "default"
        block = self.indices.get(key)
        if block is None:
            assert schedule.default is not None
            return schedule.default, "default"
        values = schedule.values
        position = 0.0 if self.high == self.low else (block - self.low) / (self.high - self.low)
        scaled = position * (len(values) - 1)
        left = min(int(scaled), len(values) - 2)
        fraction = scaled - left
        return values[left] + (values[left + 1] - values[left]) * fraction, f"block {block}"


class KeyedParams:
    """An op's parameters with every schedule resolved, key by key (plain numbers for the op)."""

    def __init__(self, params: Any, keys: list[str], where: str) -> None:
        self.params = params
        self._fields: dict[tuple[str, int | None], _Resolved] = {}
        for name in type(params).model_fields:
            value = getattr(params, name)
            if is_schedule(value):
                self._fields[(name, None)] = _Resolved(value, keys, f"{where}.{name}")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if is_schedule(item):
                        self._fields[(name, i)] = _Resolved(item, keys, f"{where}.{name}[{i}]")
        self._cache: dict[tuple[float, ...], Any] = {}
        self._usage: dict[str, Counter[str]] = {}

    @property
    def scheduled(self) -> bool:
        return bool(self._fields)

    def for_key(self, key: str, *, count: bool = False) -> Any:
        """The parameters for tensor `key` (the same object for the same values)."""
        if not self._fields:
            return self.params
        values = []
        for (name, index), resolved in self._fields.items():
            value, label = resolved.value(key)
            values.append(value)
            if count:
                place = name if index is None else f"{name}[{index}]"
                self._usage.setdefault(place, Counter())[label] += 1
        cached = self._cache.get(tuple(values))
        if cached is None:
            update: dict[str, Any] = {}
            for ((name, index), _), value in zip(self._fields.items(), values, strict=True):
                if index is None:
                    update[name] = value
                else:
                    current = update.get(name, list(getattr(self.params, name)))
                    current[index] = value
                    update[name] = current
            cached = self._cache[tuple(values)] = self.params.model_copy(update=update)
        return cached

    def distinct(self) -> list[Any]:
        """Every distinct resolved parameter set seen so far."""
        return list(self._cache.values()) or [self.params]

    def usage(self) -> dict[str, dict[str, int]]:
        """For the report: per scheduled parameter, how many keys each rule gave a value."""
        return {place: dict(counts) for place, counts in self._usage.items()}
