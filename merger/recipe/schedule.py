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

from merger.core.patterns import compile_regex
from merger.errors import MergerError, Where, at, shown
from merger.ops.params import Gradient, OpParams, Rules, is_schedule


class _Resolved:
    """One schedule, ready to give the value for a key (and the label of the rule used)."""

    def __init__(self, schedule: Rules | Gradient, keys: Iterable[str], where: Where) -> None:
        self.schedule = schedule
        if isinstance(schedule, Rules):
            self.patterns: list[re.Pattern[str]] = [
                compile_regex(rule.match, "match", where=where) for rule in schedule.rules
            ]
            return
        self.pattern = compile_regex(schedule.blocks, "blocks", where=where)
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
    """An op's parameters with every schedule resolved, key by key: instances of the op's
    `resolved_model` (numbers only), validated, so a schedule never reaches the maths."""

    def __init__(self, params: OpParams, resolved_model: type[OpParams], keys: list[str], where: Where) -> None:
        self.params = params
        self._model = resolved_model
        self._fields: dict[tuple[str, int | None], _Resolved] = {}
        for name in type(params).model_fields:
            value = getattr(params, name)
            if is_schedule(value):
                self._fields[(name, None)] = _Resolved(value, keys, at(where, name))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if is_schedule(item):
                        self._fields[(name, i)] = _Resolved(item, keys, at(where, f"{name}[{i}]"))
        self._cache: dict[tuple[float, ...], OpParams] = {}
        self._usage: dict[str, Counter[str]] = {}

    @property
    def scheduled(self) -> bool:
        return bool(self._fields)

    def for_key(self, key: str, *, count: bool = False) -> OpParams:
        """The parameters for tensor `key` (the same object for the same values)."""
        values = []
        for (name, index), resolved in self._fields.items():
            value, label = resolved.value(key)
            values.append(value)
            if count:
                place = name if index is None else f"{name}[{index}]"
                self._usage.setdefault(place, Counter())[label] += 1
        cached = self._cache.get(tuple(values))
        if cached is None:
            data = self.params.model_dump()
            for ((name, index), _), value in zip(self._fields.items(), values, strict=True):
                if index is None:
                    data[name] = value
                else:
                    data[name][index] = value
            cached = self._cache[tuple(values)] = self._model.model_validate(data)
        return cached

    def distinct(self) -> list[OpParams]:
        """Every distinct resolved parameter set seen so far (at least the one of a node without schedules)."""
        return list(self._cache.values()) or [self.for_key("")]

    def usage(self) -> dict[str, dict[str, int]]:
        """For the report: per scheduled parameter, how many keys each rule gave a value."""
        return {place: dict(counts) for place, counts in self._usage.items()}
