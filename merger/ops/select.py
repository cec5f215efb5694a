"""select: a model made of chosen keys of several inputs (mergekit's passthrough).

Two forms:

    take: [{input: b, match: "layers\\.(1[0-9])\\."}]      # key by key: the first rule
                                                            # whose regex finds the key picks
                                                            # the input; others: the first input
    slices: [{input: a, layers: [0, 16]}, {input: b, layers: [8, 24]}]
                                                            # layer ranges, stacked and renumbered
                                                            # (a's 0-15, then b's 8-23 as 16-31);
                                                            # keys outside layers: the first input

`layers` is the regex that finds a key's layer number (its first group).
Tensors are copied unchanged, in chunks.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from pydantic import Field

from merger.core.patterns import compile_regex
from merger.core.specs import TensorSpec
from merger.errors import MergerError, shown
from merger.ops.base import Arity, InputSpecs, NodeSpec, Op, PieceMode, TensorInputs
from merger.ops.params import OpParams

if TYPE_CHECKING:
    from merger.core.arrays import Array, Backend

DEFAULT_LAYERS = r"(?:^|\.)layers\.(\d+)\."


class Take(OpParams):
    input: str
    match: str


class Slice(OpParams):
    input: str
    layers: list[int] = Field(min_length=2, max_length=2)


class SelectParams(OpParams):
    take: list[Take] | None = None
    slices: list[Slice] | None = None
    layers: str = DEFAULT_LAYERS


def _index(inputs: InputSpecs, name: str) -> int:
    if name not in inputs.names:
        raise MergerError(
            f"'{name}' is not one of this node's inputs ({', '.join(inputs.names)})",
            fix="name an input of the node (a glob source's files are name[0], name[1], ...)",
        )
    return inputs.names.index(name)


#: the plan of a select: output key -> (input index, input key)
Picked = dict[str, tuple[int, str]]


class Select(Op[SelectParams, SelectParams, Picked]):
    """Keys (or layer ranges) picked from several inputs, unchanged."""

    name = "select"
    params_model = SelectParams
    arity = Arity(1, None)
    summary = "keys or layer ranges picked from the inputs (passthrough)"

    def check(self, params: SelectParams, n_inputs: int) -> list[str]:
        if (params.take is None) == (params.slices is None):
            raise MergerError("select takes either take: (key rules) or slices: (layer ranges)", fix="give one of them")
        return []

    def spec(self, inputs: InputSpecs, params: SelectParams) -> NodeSpec[Picked]:
        plan = self._take(inputs, params) if params.take is not None else self._slices(inputs, params)
        tensors = {key: inputs.specs[i][source] for key, (i, source) in plan.items()}
        counts: dict[str, int] = {}
        for i, _ in plan.values():
            counts[inputs.names[i]] = counts.get(inputs.names[i], 0) + 1
        return NodeSpec(tensors=tensors, notes={"keys_from": counts}, plan=plan)

    def _take(self, inputs: InputSpecs, params: SelectParams) -> Picked:
        assert params.take is not None
        rules = [(_index(inputs, rule.input), compile_regex(rule.match, "match")) for rule in params.take]
        plan: Picked = {}
        for key in inputs.specs[0]:
            index = next((i for i, pattern in rules if pattern.search(key)), 0)
            if key not in inputs.specs[index]:
                raise MergerError(
                    f"a take rule picks '{shown(key)}' from '{inputs.names[index]}', which has no such key",
                    fix="narrow the rule's match, or pick the key from an input that has it",
                )
            plan[key] = (index, key)
        return plan

    def _slices(self, inputs: InputSpecs, params: SelectParams) -> Picked:
        assert params.slices is not None
        pattern = compile_regex(params.layers, "layers")
        layered: list[tuple[int, int, str]] = []  # (slice, input, key): a layer may be used twice
        for number, piece in enumerate(params.slices):
            index = _index(inputs, piece.input)
            start, stop = piece.layers
            by_layer: dict[int, list[str]] = {}
            for key in inputs.specs[index]:
                found = pattern.search(key)
                if found and found.group(1) and found.group(1).isdigit():
                    by_layer.setdefault(int(found.group(1)), []).append(key)
            # the first few missing layers, found lazily: a range far past the last layer ends the search early
            missing = list(itertools.islice((layer for layer in range(start, stop) if layer not in by_layer), 3))
            if missing or stop <= start:
                raise MergerError(
                    f"slice [{start}, {stop}) of '{piece.input}' asks for layers it lacks (e.g. {missing[:3]})"
                    if missing
                    else f"slice [{start}, {stop}) is empty",
                    fix=f"'{piece.input}' has layers {min(by_layer, default=0)}..{max(by_layer, default=-1)}",
                )
            layered.extend((number, index, key) for layer in range(start, stop) for key in by_layer[layer])
        stack: dict[str, tuple[int, str]] = {}
        running: dict[tuple[int, int], int] = {}
        for number, index, source in layered:
            found = pattern.search(source)
            assert found is not None
            new = running.setdefault((number, int(found.group(1))), len(running))
            stack[source[: found.start(1)] + str(new) + source[found.end(1) :]] = (index, source)
        plan: Picked = {}
        placed = False
        for key in inputs.specs[0]:  # the first input's other keys, the stack where its layers were
            if not pattern.search(key):
                plan[key] = (0, key)
            elif not placed:
                plan.update(stack)
                placed = True
        if not placed:  # the first input has no layers: the stack goes last
            plan.update(stack)
        return plan

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Picked) -> PieceMode:
        return "copy"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Picked) -> list[tuple[int, str]]:
        return [plan[key]]

    def tensor(self, key: str, inputs: TensorInputs[Picked], params: SelectParams, xp: Backend) -> Array:
        index, source = inputs.plan[key]
        return inputs.read(index, source)
