"""Merge operations: pure maths on arrays, one module per family; the op contract (base), the typed
parameters they take (params), and the explicit registry of built-in ops.

An op's module is imported when a recipe first names the op (`builtin_registry`'s loaders), so a run
of a lerp does not pay for TIES, LoRA or the image architectures.

May import: merger.core, merger.archs.
"""

from __future__ import annotations

import functools
import importlib

from merger.ops.base import AnyOp
from merger.ops.registry import OpRegistry

#: every op merger ships, in the order the docs list them: (name, module, class)
BUILTIN_OPS: tuple[tuple[str, str, str], ...] = (
    ("lerp", "merger.ops.linear", "Lerp"),
    ("weighted_sum", "merger.ops.linear", "WeightedSum"),
    ("average", "merger.ops.linear", "Average"),
    ("add_difference", "merger.ops.linear", "AddDifference"),
    ("slerp", "merger.ops.slerp", "Slerp"),
    ("task_arithmetic", "merger.ops.task_vectors", "TaskArithmetic"),
    ("ties", "merger.ops.task_vectors", "Ties"),
    ("dare_linear", "merger.ops.task_vectors", "DareLinear"),
    ("dare_ties", "merger.ops.task_vectors", "DareTies"),
    ("model_stock", "merger.ops.model_stock", "ModelStock"),
    ("select", "merger.ops.select", "Select"),
    ("splice", "merger.ops.splice", "Splice"),
    ("convert_scale", "merger.ops.convert_scale", "ConvertScale"),
    ("apply_lora", "merger.ops.lora", "ApplyLora"),
    ("extract_lora", "merger.ops.lora_extract", "ExtractLora"),
)


def _load(module: str, cls: str) -> AnyOp:
    op: AnyOp = getattr(importlib.import_module(module), cls)()
    return op


def builtin_ops() -> list[AnyOp]:
    """Every op merger ships, in the order the docs list them (importing every op module)."""
    return [_load(module, cls) for _, module, cls in BUILTIN_OPS]


def builtin_registry() -> OpRegistry:
    """The built-in ops, each loaded the first time it is asked for."""
    return OpRegistry(loaders={name: functools.partial(_load, module, cls) for name, module, cls in BUILTIN_OPS})
