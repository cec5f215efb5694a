"""Between torch tensors and raw bytes, without copies where possible.

Imported only on paths that touch tensor data: a run answered wholly from the
cache never imports torch.
"""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}

DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"tensor dtype {dtype} has no safetensors code") from None


def tensor_from_buffer(buffer: bytearray | memoryview, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing `buffer` (no copy); the buffer must outlive the tensor."""
    dtype = TORCH_DTYPES[code]
    if len(buffer) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def tensor_memoryview(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a memoryview that shares its memory
    (and keeps the tensor alive)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_memoryview needs a contiguous CPU tensor")
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy().data).cast("B")
