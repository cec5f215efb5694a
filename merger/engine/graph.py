"""The recipe as a DAG: references resolved, cycles refused, nodes in order.

Only the nodes that some output needs are kept; they come in a topological
order that follows the recipe's own order where it is free to.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from merger.errors import MergerError, suggestion
from merger.recipe.model import Recipe


@dataclass(frozen=True)
class Graph:
    """The needed nodes in execution order, and the nodes no output needs."""

    order: tuple[str, ...]
    unused: tuple[str, ...]


def _check_references(recipe: Recipe) -> None:
    names = [*recipe.sources, *recipe.nodes]
    for node in recipe.nodes.values():
        places = [f"nodes.{node.name}.{param}" for param, _ in node.refs]
        places += [f"nodes.{node.name}.inputs[{i}]" for i in range(len(node.inputs))]
        for place, ref in zip(places, node.references, strict=True):
            if ref not in recipe.sources and ref not in recipe.nodes:
                raise MergerError(
                    f"node '{node.name}' reads '{ref}', which is neither a source nor a node",
                    where=recipe.where(place),
                    fix=suggestion(ref, names, kind="sources and nodes"),
                )
    for output in recipe.outputs.values():
        if output.node in recipe.nodes:
            continue
        if output.node in recipe.sources:
            raise MergerError(
                f"output '{output.name}' names source '{output.node}'; outputs take nodes",
                where=recipe.where(f"outputs.{output.name}.node"),
                fix=f"to copy or convert a source, add a node: {{op: average, inputs: [{output.node}]}}",
            )
        raise MergerError(
            f"output '{output.name}' names node '{output.node}', which the recipe does not define",
            where=recipe.where(f"outputs.{output.name}.node"),
            fix=suggestion(output.node, recipe.nodes, kind="nodes"),
        )


def _visit(recipe: Recipe, name: str, state: dict[str, int], stack: list[str]) -> None:
    """Depth-first search for cycles: state 1 = on the stack, 2 = done."""
    if state.get(name) == 2:
        return
    if state.get(name) == 1:
        cycle = [*stack[stack.index(name) :], name]
        raise MergerError(
            f"the nodes form a cycle: {' -> '.join(cycle)}",
            where=recipe.where(f"nodes.{name}.inputs"),
            fix="a node cannot depend on itself, even through other nodes: break the cycle",
        )
    state[name] = 1
    stack.append(name)
    for ref in recipe.nodes[name].references:
        if ref in recipe.nodes:
            _visit(recipe, ref, state, stack)
    stack.pop()
    state[name] = 2


def _needed(recipe: Recipe) -> set[str]:
    needed: set[str] = set()
    pending = [o.node for o in recipe.outputs.values()]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(ref for ref in recipe.nodes[name].references if ref in recipe.nodes)
    return needed


def build_graph(recipe: Recipe) -> Graph:
    _check_references(recipe)
    state: dict[str, int] = {}
    for name in recipe.nodes:  # every node, so that a cycle anywhere is reported
        _visit(recipe, name, state, [])
    needed = _needed(recipe)
    position = {name: i for i, name in enumerate(recipe.nodes)}
    waiting = {n: {r for r in recipe.nodes[n].references if r in recipe.nodes} for n in needed}
    ready = [(position[n], n) for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:  # Kahn's algorithm, taking ready nodes in recipe order
        _, name = heapq.heappop(ready)
        order.append(name)
        for other, deps in waiting.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    heapq.heappush(ready, (position[other], other))
    return Graph(order=tuple(order), unused=tuple(n for n in recipe.nodes if n not in needed))
