"""Merge operations: pure maths on arrays, one module per family; the op contract (base), the typed
parameters they take (params), and the explicit registry of built-in ops.

May import: merger.core, merger.archs.
"""

from __future__ import annotations

from merger.ops.base import AnyOp
from merger.ops.convert_scale import ConvertScale
from merger.ops.linear import AddDifference, Average, Lerp, WeightedSum
from merger.ops.lora import ApplyLora
from merger.ops.lora_extract import ExtractLora
from merger.ops.model_stock import ModelStock
from merger.ops.registry import OpRegistry
from merger.ops.select import Select
from merger.ops.slerp import Slerp
from merger.ops.splice import Splice
from merger.ops.task_vectors import DareLinear, DareTies, TaskArithmetic, Ties


def builtin_ops() -> list[AnyOp]:
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
        ApplyLora(),
        ExtractLora(),
    ]


def builtin_registry() -> OpRegistry:
    return OpRegistry(builtin_ops())
