"""The one strict pydantic base of every model merger validates (recipes, schedules, op parameters):
frozen, typed, unknown keys rejected, no NaN or infinity. An int is accepted where a float is
expected (a sweep `alpha=0,0.5,1` passes ints). A model's validator is built when it first validates
(`defer_build`), so a run pays only for the models its recipe uses (every op's parameter models are
declared, and two generic ones per op, at import)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False, defer_build=True)
