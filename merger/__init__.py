"""merger: declarative, recipe-driven merging of neural-network weights.

The front door (`__all__`): `run` and what it returns, the error type, and what adding an op needs.
Names load on first use, so `import merger` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from merger.core.version import VERSION as __version__
from merger.errors import MergerError

if TYPE_CHECKING:
    from merger.cli.api import NodeRun, OutputRun, RunResult, run
    from merger.ops import builtin_registry
    from merger.ops.base import Op
    from merger.ops.elementwise import ElementwiseOp, MergeParams, WholeTensorOp
    from merger.ops.params import OpParams, RandomParams
    from merger.ops.registry import OpRegistry

__all__ = [
    "ElementwiseOp",
    "MergeParams",
    "MergerError",
    "NodeRun",
    "Op",
    "OpParams",
    "OpRegistry",
    "OutputRun",
    "RandomParams",
    "RunResult",
    "WholeTensorOp",
    "__version__",
    "builtin_registry",
    "run",
]

_LAZY = {
    "run": "merger.cli.api",
    "RunResult": "merger.cli.api",
    "NodeRun": "merger.cli.api",
    "OutputRun": "merger.cli.api",
    "Op": "merger.ops.base",
    "OpParams": "merger.ops.params",
    "RandomParams": "merger.ops.params",
    "MergeParams": "merger.ops.elementwise",
    "ElementwiseOp": "merger.ops.elementwise",
    "WholeTensorOp": "merger.ops.elementwise",
    "OpRegistry": "merger.ops.registry",
    "builtin_registry": "merger.ops",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'merger' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
