"""What an op is: a name, a version, a typed parameter model, an arity, and pure functions over
specs and arrays.

`spec(inputs, params)` gives the output's keys, shapes and dtypes from the inputs' specs alone, and
the op's own plan (what to do for each key); the planner calls it for every node before any tensor
is read. Then, per output key, `piece_mode` says how the key is computed and `needs` which input
tensors it reads (so they can be read ahead): "merge" feeds `combine` flat chunks of the inputs
(per-key maths, `ElementwiseOp`), "tensor" calls `tensor` with whole tensors (`WholeTensorOp`),
"copy" passes the bytes of the one input tensor named, and "stream" calls `stream`, which makes
passes over the inputs' chunks (`ChunkInputs.chunks`: whole-tensor statistics such as a top-k
threshold or a norm in the first passes) and yields the output in chunks, so a whole-tensor
method holds a few chunks, not a few tensors. Maths gets arrays of the backend `xp`
(numpy on the CPU, torch on CUDA; floats in float32 or wider) and parameters resolved for the key
at hand (`R`: numbers, never schedules). Ops never open files, pick devices or cache.

An op is generic in `P` (its parameters as a recipe gives them), `R` (the same with numbers
resolved) and `PlanT` (the plan its `spec` returns and the other functions get back).
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

from merger.core.fused import LinearForm
from merger.core.specs import TensorSpec
from merger.ops.params import OpParams, resolved_model

if TYPE_CHECKING:
    from numpy.random import Generator

    from merger.core.arrays import Array, Backend

#: what an op noted while computing: name -> output key -> value (None: it was not finite)
Noted = Mapping[str, Mapping[str, float | None]]

#: how one output key is computed
PieceMode = Literal["merge", "tensor", "copy", "stream"]

P = TypeVar("P", bound=OpParams)
R = TypeVar("R", bound=OpParams)
PlanT = TypeVar("PlanT")
PlanT_co = TypeVar("PlanT_co", covariant=True)


def seeded_rng(seed: int | None, name: str) -> Generator:
    """Random numbers for one named draw (a tensor key, a layer): the same for a given
    (seed, name) whatever the order, device, threads or cache state. numpy's PCG64 on the CPU."""
    import numpy as np

    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


@dataclass(frozen=True)
class Arity:
    minimum: int
    maximum: int | None  # None: any number

    def accepts(self, n: int) -> bool:
        return n >= self.minimum and (self.maximum is None or n <= self.maximum)

    def describe(self) -> str:
        if self.maximum == self.minimum:
            return f"exactly {self.minimum}"
        if self.maximum is None:
            return f"at least {self.minimum}"
        return f"{self.minimum} to {self.maximum}"


@dataclass(frozen=True)
class InputSpecs:
    """The specs of a node's inputs, with the names they have in the recipe, and for an input that
    is a PEFT adapter folder its `adapter_config.json` (`config(i)`; None for other inputs), which
    is part of that input's content hash, so an op may compute with it."""

    names: tuple[str, ...]
    specs: tuple[dict[str, TensorSpec], ...]
    configs: tuple[Mapping[str, Any] | None, ...] = ()

    def config(self, index: int) -> Mapping[str, Any] | None:
        return self.configs[index] if index < len(self.configs) else None

    def __len__(self) -> int:
        return len(self.specs)


@dataclass(frozen=True)
class NodeSpec(Generic[PlanT]):
    """An op's answer to `spec`: the output tensors (in write order), notes for the run report
    (e.g. how many keys were copied rather than merged), and the op's own plan (worked out once
    from the specs; handed back while computing)."""

    tensors: dict[str, TensorSpec]
    plan: PlanT
    notes: dict[str, Any] = field(default_factory=dict)


class TensorInputs(Protocol[PlanT_co]):
    """How an op reads its inputs while computing one output tensor."""

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]: ...

    @property
    def plan(self) -> PlanT_co:
        """The plan the op's `spec` returned for this node."""
        ...

    def read(self, index: int, key: str) -> Array:
        """Input `index`'s tensor `key` on the compute device (floats as float32 or wider)."""
        ...

    def note(self, name: str, value: float) -> None:
        """Record a number about the output key being computed (e.g. a reconstruction error) for
        the run report. The executor keeps what was noted with the node's cache entry, so a cached
        run reports it too: under the node's notes, as the op's `summarise_notes(noted)` makes
        them (`noted`: name -> output key -> value), else as `{"noted": noted}`."""
        ...


class ChunkInputs(Protocol[PlanT_co]):
    """How an op reads its inputs chunk by chunk while streaming one output tensor."""

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]: ...

    @property
    def plan(self) -> PlanT_co: ...

    def chunks(
        self,
        reads: Sequence[tuple[int, str]],
        *,
        multiple: int = 1,
        span: tuple[int, int] | None = None,
        peek: bool = False,
        stored: bool = False,
        again: bool = True,
    ) -> Iterator[list[Array]]:
        """One pass over the (input index, key) tensors named, which hold the same number of
        elements: per chunk, their flat arrays over the same element range (floats as float32 or
        wider; with `stored`, 16-bit floats may stay as stored, for the backend's loops that widen
        them themselves, and `xp.widen` for the rest), in C order. Each call is a new pass (the
        inputs are read again); the arrays of a chunk are the op's to keep or change. Every chunk
        but the last holds a multiple of `multiple` elements (so that rows of that length stay
        whole); `span` (start, stop) reads those elements only (of tensors that hold at least
        `stop`); `peek`: a look at a few elements before the passes (e.g. a sample), which the
        passes read again (so it is not counted as their reading: non-finite values are counted
        once); `again`: whether another pass over the same chunks may follow (its first chunk is
        then read ahead at this one's end)."""
        ...

    def note(self, name: str, value: float) -> None:
        """As `TensorInputs.note`."""
        ...


class Op(ABC, Generic[P, R, PlanT]):
    """A merge operation. Subclasses set the class attributes and the functions."""

    name: ClassVar[str]
    #: bump when the op's results change: its cache entries are keyed by it (tests/test_op_versions.py)
    version: ClassVar[int] = 1
    #: the parameters a recipe may give (numbers may be schedules: see merger.ops.params)
    params_model: ClassVar[type[OpParams]]
    arity: ClassVar[Arity]
    #: random ops take `RandomParams`: the planner fills in the seed in force (the node's, else the
    #: recipe's), so it is part of the node's key; draws come from `seeded_rng(params.seed, name)`
    random: ClassVar[bool] = False
    #: parameters that name a source or node (e.g. "base"): read as inputs placed before `inputs`
    references: ClassVar[tuple[str, ...]] = ()
    #: a merge of models that should share a parent: warn when they look unrelated
    family_check: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    @functools.cached_property
    def resolved_model(self) -> type[OpParams]:
        """The model of the parameters the maths gets: `params_model` with numbers resolved."""
        return resolved_model(self.params_model)

    def check(self, params: R, n_inputs: int) -> list[str]:
        """Check resolved parameters against the number of inputs; return warnings, raise MergerError."""
        return []

    @abstractmethod
    def spec(self, inputs: InputSpecs, params: P) -> NodeSpec[PlanT]:
        """The output spec and the op's plan; from specs and the non-numeric parameters alone."""

    @abstractmethod
    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: PlanT) -> PieceMode:
        """How output `key` is computed (see the module docstring)."""

    @abstractmethod
    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: PlanT) -> list[tuple[int, str]]:
        """The (input index, key) pairs output `key` reads, so they can be read ahead
        (for "copy", exactly one, of the output's dtype and shape)."""

    def tensor(self, key: str, inputs: TensorInputs[PlanT], params: R, xp: Backend) -> Array:
        """One whole output tensor (piece mode "tensor")."""
        raise NotImplementedError(f"op {self.name} computes no whole tensors")

    def combine(self, values: list[Array], params: R, xp: Backend) -> Array:
        """The merged chunk from the inputs' chunks (piece mode "merge"): elementwise, since a chunk
        may be part of one tensor or several small tensors one after another (one computation for
        a model's many biases and norms: merger.engine.pieces)."""
        raise NotImplementedError(f"op {self.name} has no per-element form")

    def aligned(self, plan: PlanT) -> Container[str] | None:
        """The keys that read themselves from every input (piece mode "merge"), when every other
        output key reads itself from the first input ("copy"): what `piece_mode` and `needs` say key
        by key, given at once so that a model of many keys is planned without a call per key. None:
        ask them key by key."""
        return None

    def linear_form(self, params: R, inputs: int) -> LinearForm | None:
        """`combine` of `inputs` arrays as a `LinearForm`, when it is one (the executor may then run
        it fused)."""
        return None

    def stream(self, key: str, inputs: ChunkInputs[PlanT], params: R, xp: Backend) -> Iterator[Array]:
        """Output `key` as flat chunks in C order, from passes over the inputs' chunks (piece mode
        "stream"); the chunks' sizes add up to the tensor's element count."""
        raise NotImplementedError(f"op {self.name} streams no tensors")

    def summarise_notes(self, noted: Noted) -> dict[str, Any]:
        """The node's report notes from what `tensor` noted (`TensorInputs.note`; name -> output key
        -> value): by default as noted; an op may give totals instead."""
        return {"noted": {name: dict(values) for name, values in noted.items()}}


#: an op of any parameters and plan, as the engine and the registry hold them
AnyOp = Op[Any, Any, Any]
