"""PyTorch checkpoints (.pth/.pt/.ckpt), loaded without running pickled code.

`torch.load(..., weights_only=True)` unpickles only tensors, containers and
primitives: a checkpoint whose pickle names any other global (a pickled model
class, `os.system`) is refused before anything in it runs. Zip checkpoints are
memory-mapped, so tensors are paged in only when read.

Unwrapping, when no `key:` is given: while the object is a dict holding one of
WRAPPER_KEYS whose value is a dict, descend into the first present, in that
order (`params_ema` before `params`, as BasicSR/traiNNer save the EMA weights
there); then keep the tensor values and strip a `module.` prefix that every
key shares (DataParallel). `key: a.b` picks the nested dict explicitly.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merger.errors import MergerError

if TYPE_CHECKING:
    import torch

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
PTH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
DATAPARALLEL_PREFIX = "module."


def load_state_dict(path: Path, key: str | None) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint: safe load, unwrap, prefix strip."""
    return unwrap(safe_load(path), key, path)


def safe_load(path: Path) -> Any:
    import pickle

    import torch

    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise _unreadable(path, e) from None
        culprit = f" ({found.group(1)})"
        raise MergerError(
            f"refused to load '{path}': its pickle holds Python objects{culprit}, not only tensors;"
            " loading it could run code",
            where=str(path),
            fix="if you trust the file, re-save just the weights in Python:\n"
            "torch.save(model.state_dict(), 'weights.pth') or save_file(sd, 'weights.safetensors')",
        ) from None
    except Exception as e:  # a damaged or foreign file: torch's loader raises many kinds
        raise _unreadable(path, e) from None


def _unreadable(path: Path, error: Exception) -> MergerError:
    lines = str(error).strip().splitlines()
    detail = lines[0] if lines else type(error).__name__
    return MergerError(
        f"cannot read '{path}' as a PyTorch checkpoint: {detail}",
        where=str(path),
        fix="check that the file is a complete torch.save() checkpoint",
    )


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _describe_keys(obj: dict[Any, Any], limit: int = 12) -> str:
    parts = [f"{k} ({type(v).__name__})" for k, v in list(obj.items())[:limit]]
    more = f", ... {len(obj) - limit} more" if len(obj) > limit else ""
    return ", ".join(parts) + more


def unwrap(obj: Any, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                available = _describe_keys(obj) if isinstance(obj, dict) else type(obj).__name__
                raise MergerError(
                    f"'{path}' has no entry '{part}' (of key: {key})",
                    where=str(path),
                    fix=f"choose the state dict with key: one of {available}",
                )
            obj = obj[part]
    else:
        while isinstance(obj, dict):
            wrapper = next((w for w in WRAPPER_KEYS if isinstance(obj.get(w), dict)), None)
            if wrapper is None:
                break
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise MergerError(
            f"'{path}' holds a {type(obj).__name__}, not a state dict",
            where=str(path),
            fix="save a dict of tensors (model.state_dict())",
        )
    tensors = {str(k): v for k, v in obj.items() if _is_tensor(v)}
    if not tensors:
        raise MergerError(
            f"'{path}' holds no tensors at this level: {_describe_keys(obj)}",
            where=str(path),
            fix="name the dict that holds the weights with key: (e.g. key: generator)",
        )
    if all(k.startswith(DATAPARALLEL_PREFIX) for k in tensors):
        tensors = {k[len(DATAPARALLEL_PREFIX) :]: v for k, v in tensors.items()}
    return tensors
