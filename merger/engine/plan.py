"""The Plan: every needed node with its op, parameters, resolved inputs and
output spec, computed from specs alone before any tensor is read.

This is where a shape mismatch, a wrong number of inputs or weights, or a
missing key fails, in about a second even for a 10 GB merge, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from merger.archs import Adaptation, align_layouts, esrgan
from merger.cache.keys import NodeContent
from merger.core.specs import TensorSpec
from merger.engine.catalog import SourceCatalog, SourceHandle
from merger.engine.graph import Graph
from merger.errors import MergerError
from merger.ops.base import AnyOp, InputSpecs, NodeSpec
from merger.ops.params import OpParams, contains_schedule
from merger.ops.registry import OpRegistry
from merger.recipe.model import NodeDef, Recipe
from merger.recipe.schedule import KeyedParams


@dataclass(frozen=True)
class InputRef:
    """One input of a node: a source file (handle) or an upstream node (by name),
    possibly presented under other key names (`adaptation`, e.g. another ESRGAN layout)."""

    name: str
    handle: SourceHandle | None = None  # None: the input is a node
    adaptation: Adaptation | None = None


@dataclass(frozen=True)
class PlannedNode:
    name: str
    op: AnyOp
    params: OpParams
    inputs: tuple[InputRef, ...]
    spec: NodeSpec[Any]
    keyed: KeyedParams  # the parameters key by key (per-layer schedules resolved)
    nonfinite: str = "warn"  # warn | error: NaN or inf in the inputs read or the output

    @property
    def content(self) -> NodeContent:
        """What determines the node's result besides its inputs (for its content key)."""
        return NodeContent(
            self.op.name,
            self.op.version,
            # a reference (base) is an input, by content; a random op's seed in force is a parameter
            self.params.model_dump(mode="json", exclude=set(self.op.references)),
            tuple(ref.adaptation.tag if ref.adaptation else None for ref in self.inputs),
        )

    @property
    def seed(self) -> int | None:
        """The seed in force (random ops only; it is one of their parameters)."""
        return getattr(self.params, "seed", None) if self.op.random else None


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    nodes: dict[str, PlannedNode]  # in execution order
    warnings: tuple[str, ...]


def presented_spec(spec: dict[str, TensorSpec], adaptation: Adaptation | None) -> dict[str, TensorSpec]:
    """An input's spec as its node sees it."""
    if adaptation is None:
        return spec
    return {adaptation.rename[key]: tensor for key, tensor in spec.items()}


def _refs(recipe: Recipe, name: str, catalog: SourceCatalog) -> list[InputRef]:
    if name in recipe.sources:
        return [InputRef(h.name, h) for h in catalog.get(name)]
    return [InputRef(name)]


def _inputs(recipe: Recipe, node: NodeDef, catalog: SourceCatalog) -> tuple[tuple[InputRef, ...], int]:
    """The node's inputs, reference parameters (base) first, and how many come from `inputs`."""
    refs: list[InputRef] = []
    for param, name in node.refs:
        found = _refs(recipe, name, catalog)
        if len(found) != 1:
            raise MergerError(
                f"{param} '{name}' is a glob of {len(found)} models; {param} must name one model",
                where=recipe.where(f"nodes.{node.name}.{param}"),
                fix=f"point {param} at one source or node",
            )
        refs.extend(found)
    models = [ref for name in node.inputs for ref in _refs(recipe, name, catalog)]
    return (*refs, *models), len(models)


def _plan_node(
    recipe: Recipe, node: NodeDef, op: AnyOp, catalog: SourceCatalog, planned: dict[str, PlannedNode]
) -> tuple[PlannedNode, list[str]]:
    inputs, n_models = _inputs(recipe, node, catalog)
    if not op.arity.accepts(n_models):
        raise MergerError(
            f"op '{op.name}' takes {op.arity.describe()} inputs, node '{node.name}' gives {n_models}",
            fix=f"list {op.arity.describe()} names in inputs (a glob source counts as all its files)",
        )
    params = node.params
    if op.random and getattr(params, "seed", None) is None:
        params = params.model_copy(update={"seed": recipe.settings.seed})
    scheduled = contains_schedule(params)
    where = recipe.where(f"nodes.{node.name}")
    if not scheduled:  # one set of numbers: checked now (scheduled: per distinct value, below)
        warnings = op.check(KeyedParams(params, op.resolved_model, [], where).for_key(""), n_models)
    else:
        warnings = []
    stored = [ref.handle.spec() if ref.handle else planned[ref.name].spec.tensors for ref in inputs]
    adaptations = align_layouts(stored)
    inputs = tuple(replace(ref, adaptation=a) for ref, a in zip(inputs, adaptations, strict=True))
    specs = tuple(presented_spec(s, a) for s, a in zip(stored, adaptations, strict=True))
    spec = op.spec(InputSpecs(tuple(ref.name for ref in inputs), specs), params)
    adapted = {ref.name: ref.adaptation.tag for ref in inputs if ref.adaptation}
    if adapted:
        spec.notes["adapted"] = adapted
    keyed = KeyedParams(params, op.resolved_model, list(spec.tensors), where)
    if scheduled:
        for key in spec.tensors:
            keyed.for_key(key, count=True)
        spec.notes["schedules"] = keyed.usage()
        for resolved in keyed.distinct():
            warnings.extend(w for w in op.check(resolved, n_models) if w not in warnings)
    nonfinite = node.nonfinite or recipe.settings.nonfinite
    return PlannedNode(node.name, op, params, inputs, spec, keyed, nonfinite), warnings


def build_plan(recipe: Recipe, graph: Graph, catalog: SourceCatalog, registry: OpRegistry) -> Plan:
    planned: dict[str, PlannedNode] = {}
    warnings: list[str] = []
    for name in graph.order:
        node = recipe.nodes[name]
        where = recipe.where(f"nodes.{name}")
        try:
            planned[name], node_warnings = _plan_node(recipe, node, registry.get(node.op), catalog, planned)
        except MergerError as e:
            raise e if e.where else MergerError(e.what, where=where, fix=e.fix) from None
        warnings.extend(f"node '{name}': {w}" for w in node_warnings)
    warnings.extend(f"node '{n}' is not used by any output, so it does not run" for n in graph.unused)
    for output in recipe.outputs.values():
        if output.layout is not None and esrgan.detect(planned[output.node].spec.tensors) is None:
            raise MergerError(
                f"output '{output.name}' asks for ESRGAN layout '{output.layout}', but node '{output.node}'"
                f" is not an ESRGAN model: {esrgan.explain(planned[output.node].spec.tensors)}",
                where=recipe.where(f"outputs.{output.name}.layout"),
                fix="remove layout: from this output (it only renames ESRGAN keys)",
            )
    return Plan(recipe, planned, tuple(warnings))
