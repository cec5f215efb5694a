"""The parameters ops take: one strict model per op, and numbers that may vary with the tensor key.

A numeric parameter declared with the type variable `N` takes, in a recipe, a number or a per-layer
schedule (`Scheduled`): a rule list or a block gradient (see merger.recipe.schedule, which resolves
them). An op's `params_model` is its model with `N = Scheduled`, what a recipe is validated against;
the maths gets the same model with `N = float` (`Op.resolved_model`), validated again with the value
for the key at hand, so a schedule can never reach the maths as an object.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import Field

from merger.core.strict_model import StrictModel


class OpParams(StrictModel):
    """Parameters of an op: frozen, typed, unknown keys rejected."""


class RandomParams(OpParams):
    """Parameters of a random op: `seed` on the node, else the recipe's (filled in by the planner)."""

    seed: int | None = None


class Rule(StrictModel):
    match: str
    value: float


class Rules(StrictModel):
    """`{default: 0.5, rules: [{match: <regex>, value: 0.2}]}`: the first rule whose regex the key matches."""

    default: float
    rules: list[Rule] = Field(min_length=1)


class Gradient(StrictModel):
    """`{blocks: <regex with (\\d+)>, values: [0.0, 1.0], default: 0.5}`: interpolated over block indices."""

    blocks: str
    values: list[float] = Field(min_length=2)
    default: float | None = None


Schedule = Rules | Gradient
#: a numeric parameter as a recipe gives it: a number, or a schedule
Scheduled = float | Schedule
#: the type variable of a schedulable number: `Scheduled` in a recipe, `float` in the maths
N = TypeVar("N")


def is_schedule(value: Any) -> bool:
    return isinstance(value, Rules | Gradient)


def contains_schedule(params: OpParams) -> bool:
    """Whether any parameter (or value of a list parameter) is a schedule."""
    for name in type(params).model_fields:
        value = getattr(params, name)
        if is_schedule(value) or (isinstance(value, list) and any(is_schedule(v) for v in value)):
            return True
    return False


def resolved_model(model: type[OpParams]) -> type[OpParams]:
    """The model the maths gets: a params model generic in N, with N = float (others as they are)."""
    origin: Any = model.__pydantic_generic_metadata__["origin"]
    resolved: type[OpParams] = origin[float] if origin is not None else model
    return resolved
