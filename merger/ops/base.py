"""What an op is: a name, a version, a typed parameter model, an arity, and two
pure functions over specs and arrays.

`spec(inputs, params)` gives the output's keys, shapes and dtypes from the
inputs' specs alone; the planner calls it for every node before any tensor is
read. `tensor(key, inputs, params, xp)` computes one output tensor,
reading input tensors through `inputs.read(i, key)`, which the executor
serves from files on the compute device, as arrays of the backend `xp`
(numpy on the CPU, torch on CUDA; floats in float32 or wider). Per-key ops
(`ElementwiseOp`) instead give `combine`, which the executor feeds in chunks.
Ops never open files, pick devices or cache.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from merger.specs import TensorSpec

if TYPE_CHECKING:
    from numpy.random import Generator

    from merger.arrays import Array, Backend


class OpParams(BaseModel):
    """Parameters of an op: frozen, typed, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class RandomParams(OpParams):
    """Parameters of a random op: `seed` on the node, else the recipe's (filled in by the planner)."""

    seed: int | None = None


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
    """The specs of a node's inputs, with the names they have in the recipe."""

    names: tuple[str, ...]
    specs: tuple[dict[str, TensorSpec], ...]

    def __len__(self) -> int:
        return len(self.specs)


@dataclass(frozen=True)
class NodeSpec:
    """An op's answer to `spec`: the output tensors (in write order), notes for
    the run report (e.g. how many keys were copied rather than merged), and the
    op's own plan (worked out once from the specs; handed back while computing)."""

    tensors: dict[str, TensorSpec]
    notes: dict[str, Any] = field(default_factory=dict)
    plan: Any = None


class TensorInputs(Protocol):
    """How an op reads its inputs while computing one output tensor."""

    @property
    def specs(self) -> tuple[dict[str, TensorSpec], ...]: ...

    @property
    def plan(self) -> Any:
        """The plan the op's `spec` returned for this node."""
        ...

    def read(self, index: int, key: str) -> Array:
        """Input `index`'s tensor `key` on the compute device (floats as float32 or wider)."""
        ...


class Op(ABC):
    """A merge operation. Subclasses set the class attributes and the two functions."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
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

    def check(self, params: Any, n_inputs: int) -> list[str]:
        """Check parameters against the number of inputs; return warnings, raise MergerError."""
        return []

    @abstractmethod
    def spec(self, inputs: InputSpecs, params: Any) -> NodeSpec: ...

    def piece_mode(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Any) -> str:
        """How output `key` is computed: "tensor" (whole, by `tensor`), "merge" (in chunks,
        by `combine`) or "copy" (in chunks, the bytes of the one tensor `needs` names)."""
        return "tensor"

    def needs(self, key: str, specs: tuple[dict[str, TensorSpec], ...], plan: Any) -> list[tuple[int, str]]:
        """The (input index, key) pairs output `key` reads, so they can be read ahead
        (for "copy", exactly one, of the output's dtype and shape)."""
        return []

    @abstractmethod
    def tensor(self, key: str, inputs: TensorInputs, params: Any, xp: Backend) -> Array: ...

    def combine(self, values: list[Array], params: Any, xp: Backend) -> Array:
        """The merged chunk from the inputs' chunks (per-key ops only)."""
        raise NotImplementedError(f"op {self.name} has no per-element form")
