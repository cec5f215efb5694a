"""The Plan: every needed node with its op, parameters, resolved inputs and
output spec, computed from specs alone before any tensor is read.

This is where a shape mismatch, a wrong number of inputs or weights, or a
missing key fails, in about a second even for a 10 GB merge, naming the node.
Language models get two checks of their own (see merger.archs.embeddings):
inputs whose vocabularies differ (token embeddings / LM heads with other row
counts) fail unless the node says `vocab: first` (then its op is wrapped, see
merger.ops.vocab), and a model that ties its LM head to its input embedding
does not merge with one that does not. Merges of image models are checked by
architecture and size, and a merge that merges no key, or too little of an image
model, fails (merger.engine.image_checks).

A node that feeds other nodes (an input or a reference, such as `base`, of another) keeps its
float16 / bfloat16 tensors at float32 in its cache entry (`PlannedNode.promoted`; its key says so),
so a chain rounds once, at its outputs; `spec` stays the op's answer, whose dtypes the node's own
outputs get under `dtype: keep` and its consumers' specs are planned from. A node that feeds none
is exactly as the op gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from merger.archs import Adaptation, align_layouts, embeddings, esrgan
from merger.cache.keys import NodeContent
from merger.core.specs import FLOAT_DTYPES, TensorSpec
from merger.engine import image_checks
from merger.engine.catalog import SourceCatalog, SourceHandle
from merger.engine.graph import Graph
from merger.errors import MergerError, shown
from merger.io.folder_config import MODEL_CONFIG
from merger.ops.base import AnyOp, InputSpecs, NodeSpec
from merger.ops.params import OpParams, contains_schedule
from merger.ops.registry import OpRegistry
from merger.ops.vocab import vocab_first
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
    #: "first" when `vocab: first` changes the result (the inputs' vocabularies differ, `op` is
    #: wrapped: merger.ops.vocab); None otherwise
    vocab: str | None = None
    #: with `vocab: first`: the input (its name in the recipe; `name[i]` for a glob's files) whose
    #: vocabulary the output has, so the tokenizer that fits it: the first model of `inputs:`
    vocab_from: str | None = None
    #: a node that feeds other nodes: its entry's tensors, float ones at the maths precision (float32,
    #: float64 where an input of the key is) where the op gives narrower ones (`spec.tensors`, which
    #: its outputs are cast back to under `dtype: keep`); None: the entry holds `spec.tensors`
    promoted: dict[str, TensorSpec] | None = None

    @property
    def stored(self) -> dict[str, TensorSpec]:
        """The tensors of the node's cache entry, as its consumers read them."""
        return self.promoted if self.promoted is not None else self.spec.tensors

    @property
    def natural(self) -> dict[str, str]:
        """Tensor -> the dtype the op gives it, for the tensors whose entry dtype differs (promoted)."""
        if self.promoted is None:
            return {}
        return {k: t.dtype for k, t in self.spec.tensors.items() if self.promoted[k].dtype != t.dtype}

    @property
    def content(self) -> NodeContent:
        """What determines the node's result besides its inputs (for its content key)."""
        # a reference (base) is an input, by content; a random op's seed in force is a parameter
        params = self.params.model_dump(mode="json", exclude=set(self.op.references))
        if self.vocab is not None:  # beside the op's own (no op has a `vocab`); nodes without it keep their keys
            params["vocab"] = self.vocab
        return NodeContent(
            self.op.name,
            self.op.version,
            params,
            tuple(ref.adaptation.tag if ref.adaptation else None for ref in self.inputs),
            MATHS_PRECISION if self.promoted is not None else None,
        )

    @property
    def seed(self) -> int | None:
        """The seed in force (random ops only; it is one of their parameters)."""
        return getattr(self.params, "seed", None) if self.op.random else None


#: the precision a node that feeds other nodes is kept at (its key says so): float32, float64 stays
MATHS_PRECISION = "float32"
#: float dtypes narrower than the maths (merger.core.specs.compute_code): kept wider between nodes
NARROW_FLOATS = frozenset(FLOAT_DTYPES - {"F32", "F64"})


def promote(node: PlannedNode, planned: dict[str, PlannedNode]) -> PlannedNode:
    """`node`, which feeds other nodes, with its narrow float tensors kept at the maths precision:
    float64 where an input the key reads is float64 (as the maths is), else float32. Its consumers
    read them as they are, so a chain rounds once, at its outputs. Unchanged when nothing is narrow."""
    seen = _input_specs(node, planned, stored=False)  # as the op was planned with them
    read = _input_specs(node, planned, stored=True)  # as their entries hold them
    tensors: dict[str, TensorSpec] = {}
    for key, spec in node.spec.tensors.items():
        if spec.dtype in NARROW_FLOATS:
            wide = any(read[i].get(k, spec).dtype == "F64" for i, k in node.op.needs(key, seen, node.spec.plan))
            spec = TensorSpec("F64" if wide else "F32", spec.shape)
        tensors[key] = spec
    if tensors == node.spec.tensors:
        return node
    return replace(node, promoted=tensors)


def _input_specs(
    node: PlannedNode, planned: dict[str, PlannedNode], *, stored: bool
) -> tuple[dict[str, TensorSpec], ...]:
    """The node's inputs' specs as it sees them: the ops' dtypes, or (`stored`) its entries' dtypes."""
    specs = []
    for ref in node.inputs:
        if ref.handle is not None:
            spec = ref.handle.spec()
        else:
            spec = planned[ref.name].stored if stored else planned[ref.name].spec.tensors
        specs.append(presented_spec(spec, ref.adaptation))
    return tuple(specs)


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
    adapter = next((r.name for r in inputs if r.handle is None and "peft" in planned[r.name].spec.notes), None)
    if adapter is not None:
        raise MergerError(
            f"input '{adapter}' is a LoRA adapter (its A and B factors, from extract_lora), not a model:"
            f" op '{op.name}' would merge the factors, which is not merging what they add to the base",
            fix=f"write '{adapter}' as a folder output (a PEFT adapter), or extract from a merged fine-tune",
        )
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
    configs = tuple(ref.handle.adapter_config if ref.handle else None for ref in inputs)
    described = InputSpecs(tuple(ref.name for ref in inputs), specs, configs)
    # a merge of image models: one architecture and size, and most of the parameters merged
    merging = image_checks.merges(op, len(inputs))
    found = image_checks.detections([ref.handle for ref in inputs], stored, catalog.memo) if merging else []
    if merging:
        image_error = image_checks.image_error(node.name, described.names, found, specs, params)
        if image_error is not None:
            raise image_error
        if image_checks.spandrel_note(found):
            warnings.append(image_checks.SPANDREL_NOTE)
    used, spec, vocab_from = _spec(node, op, inputs, described, params, warnings)
    coverage_error = image_checks.coverage_error(described.names, found, specs, params) if merging else None
    if coverage_error is not None:
        raise coverage_error
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
    vocab = "first" if used is not op else None
    return PlannedNode(node.name, used, params, inputs, spec, keyed, nonfinite, vocab, vocab_from), warnings


def _spec(
    node: NodeDef, op: AnyOp, inputs: tuple[InputRef, ...], described: InputSpecs, params: OpParams, warnings: list[str]
) -> tuple[AnyOp, NodeSpec[Any], str | None]:
    """The op the node runs (with `vocab: first`, wrapped when the vocabularies differ), its spec,
    and the input whose vocabulary the output has (`vocab: first` only); language models' tied
    heads and vocabularies checked first, their failures explained."""
    specs = described.specs
    if op.family_check:  # a merge of one family's models, key by key: tied and untied ones do not mix
        tie_error = _tie_error(inputs, specs)
        if tie_error is not None:
            raise tie_error
    first = len(node.refs)  # the first model of `inputs:`, after the references (base: one model each)
    mismatches = embeddings.vocab_mismatches(specs)
    used, vocab_from = op, None
    if node.vocab == "first":
        vocab_from = described.names[first]
        if mismatches:
            used = vocab_first(op, first)
        else:
            warnings.append(
                "vocab: first, but no token embedding or LM head differs in rows between the inputs:"
                f" the node merges as it would without it (the tokenizer that fits it is still that of '{vocab_from}')"
            )
    try:
        spec = used.spec(described, params)
    except MergerError:
        explained = _tie_error(inputs, specs) or (
            _vocab_error(node, op, described, params, mismatches, first) if mismatches and used is op else None
        )
        if explained is None:
            raise
        raise explained from None
    if mismatches and used is op and op.family_check:  # e.g. keys: intersection: those keys come from one input
        warnings.append(
            f"the inputs' vocabularies differ ({_rows(mismatches[0], described.names)}), so the token"
            f" embeddings and LM heads are not merged but taken from '{described.names[0]}'; set vocab: first"
            " to merge the rows every input has"
        )
    return used, spec, vocab_from


MAX_VOCAB_LISTED = 10


def _rows(mismatch: embeddings.VocabMismatch, names: tuple[str, ...]) -> str:
    """'model.embed_tokens.weight' has 100 rows in 'a' but 103 in 'b'"""
    first = mismatch.rows[0]
    others = ", ".join(f"{r} in '{n}'" for r, n in zip(mismatch.rows[1:], names[1:], strict=True) if r != first)
    return f"'{shown(mismatch.key)}' has {first} rows in '{names[0]}' but {others}"


def _vocab_error(
    node: NodeDef,
    op: AnyOp,
    described: InputSpecs,
    params: OpParams,
    mismatches: list[embeddings.VocabMismatch],
    first: int,
) -> MergerError:
    """The inputs' vocabularies differ and the node does not say `vocab: first`."""
    lines = [f"  {_rows(m, described.names)}" for m in mismatches[:MAX_VOCAB_LISTED]]
    if len(mismatches) > MAX_VOCAB_LISTED:
        lines.append(f"  ... and {len(mismatches) - MAX_VOCAB_LISTED} more")
    what = "the inputs' vocabularies differ (tokens added to one of them?):\n" + "\n".join(lines)
    try:  # what else differs, once the token rows are cut to those every input has
        vocab_first(op, first).spec(described, params)
    except MergerError as e:
        what += f"\nbesides, with only the token rows they share: {e.what}"
    return MergerError(
        what,
        fix=f"set `vocab: first` on node '{node.name}': the token rows every input has are merged and the"
        f" output gets the vocabulary of '{described.names[first]}' (the first of inputs:), its other rows"
        " as they are (rows only other inputs have are dropped); or merge models that share one tokenizer",
    )


def _tie_error(inputs: tuple[InputRef, ...], specs: tuple[dict[str, TensorSpec], ...]) -> MergerError | None:
    """An input that ties its LM head to its input embedding beside one with a head of its own."""

    def config(index: int) -> dict[str, Any] | None:
        handle = inputs[index].handle
        return handle.folder_config(MODEL_CONFIG) if handle is not None else None

    conflict = embeddings.tie_conflict(specs, config)
    if conflict is None:
        return None
    tied, untied, head = inputs[conflict.tied].name, inputs[conflict.untied].name, shown(conflict.head)
    return MergerError(
        f"'{tied}' ties its LM head to its input embeddings ({shown(conflict.tied_why)}), but '{untied}' is"
        f" untied: it has its own '{head}' {specs[conflict.untied][conflict.head].describe()}; a tied and an"
        " untied model do not merge key by key",
        fix=f"untie '{tied}': load it with transformers, give it a head of its own"
        " (model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.clone())),"
        f" set model.config.tie_word_embeddings = False and save_pretrained it again, so that its '{head}'"
        " is written; or merge models that tie alike",
    )


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
        warnings.extend(f"node '{name}': {w}" for w in node_warnings if w != image_checks.SPANDREL_NOTE)
        if image_checks.SPANDREL_NOTE in node_warnings and image_checks.SPANDREL_NOTE not in warnings:
            warnings.append(image_checks.SPANDREL_NOTE)  # said once
    consumed = {ref.name for node in planned.values() for ref in node.inputs if ref.handle is None}
    for name in list(planned):  # in execution order: a node's inputs are promoted before it reads their dtypes
        if name in consumed:
            planned[name] = promote(planned[name], planned)
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
