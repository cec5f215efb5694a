"""Merge operations: pure maths on tensors, one module per family."""

from __future__ import annotations

from merger.ops.base import Op
from merger.ops.convert_scale import ConvertScale
from merger.ops.linear import AddDifference, Average, Lerp, WeightedSum
from merger.ops.model_stock import ModelStock
from merger.ops.registry import OpRegistry
from merger.ops.select import Select
from merger.ops.slerp import Slerp
from merger.ops.splice import Splice
from merger.ops.task_vectors import DareLinear, DareTies, TaskArithmetic, Ties


def builtin_ops() -> list[Op]:
    """Every op merger ships, in the order the docs list them."""
    return [
        Lerp(),
        WeightedSum(),
        Average(),
        AddDifference(),
        Slerp(),
        TaskArithmetic(),
        Ties(),
        DareLinear(),
        DareTies(),
        ModelStock(),
        Select(),
        Splice(),
        ConvertScale(),
    ]


def builtin_registry() -> OpRegistry:
    return OpRegistry(builtin_ops())
