"""The torch backend (merger.core.arrays.Backend): maths on a torch device (CUDA, or the CPU for
dtypes numpy lacks); bytes cross through pinned host buffers, onto the device asynchronously, and
back. torch is imported only when one is made and used."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from merger.core import magnitudes
from merger.core.fused import LinearForm
from merger.core.magnitudes import Counting, Elected
from merger.core.specs import FLOAT_DTYPES, compute_code

if TYPE_CHECKING:
    import numpy as np
    import torch


class TorchBackend:
    """Maths on a torch device; bytes cross through pinned host buffers."""

    name = "torch"
    block_elements: int | None = None

    def __init__(self, device: str) -> None:
        from merger.core.tensor_bytes import TORCH_DTYPES

        self.device = device
        self._dtypes = TORCH_DTYPES
        self._pin = device.startswith("cuda")

    def load(self, data: Any, code: str, shape: tuple[int, ...], *, widen: bool = True) -> torch.Tensor:
        import torch

        dtype = self._dtypes[code]
        host = torch.frombuffer(data, dtype=dtype) if len(data) else torch.empty(0, dtype=dtype)
        tensor = host.reshape(shape).to(self.device, non_blocking=self._pin)
        if code in FLOAT_DTYPES:
            tensor = tensor.to(self._dtypes[compute_code(code)])
        return tensor

    def store(self, array: torch.Tensor, code: str) -> memoryview:
        import torch

        tensor = array.to(self._dtypes[code]).contiguous()
        if tensor.device.type != "cpu":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pin)
            host.copy_(tensor, non_blocking=self._pin)
            torch.cuda.current_stream(tensor.device).synchronize()
            tensor = host
        from merger.core.tensor_bytes import tensor_memoryview

        return tensor_memoryview(tensor)

    def store_into(self, array: torch.Tensor, code: str, out: memoryview) -> None:
        stored = self.store(array, code)
        if len(stored) != len(out):
            raise ValueError(f"{len(stored)} bytes for a buffer of {len(out)}")
        out[:] = stored

    def widen(self, array: torch.Tensor) -> torch.Tensor:
        return array

    def copy(self, array: torch.Tensor) -> torch.Tensor:
        return array.clone()

    def asarray(self, values: np.ndarray) -> torch.Tensor:
        import numpy as np
        import torch

        host = torch.from_numpy(np.ascontiguousarray(values).reshape(values.shape))  # keep a 0-d array 0-d
        return host.to(self.device)

    def repeat(self, array: torch.Tensor, repeats: int, axis: int) -> torch.Tensor:
        return array.repeat_interleave(repeats, dim=axis)

    def abs(self, array: torch.Tensor) -> torch.Tensor:
        return array.abs()

    def sign(self, array: torch.Tensor) -> torch.Tensor:
        return array.sign()

    def where(self, condition: torch.Tensor, a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
        import torch

        return torch.where(condition, a, b)

    def total(self, array: torch.Tensor) -> float:
        return float(array.sum().item())

    def row_sums(self, array: torch.Tensor) -> torch.Tensor:
        return array.reshape(array.shape[0], -1).sum(dim=1, keepdim=True)

    def keep(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return values.where(mask, 0.0)

    def row_dots(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        import torch

        return (a * b).sum(dim=1).to(torch.float64).cpu().numpy()

    def magnitude_histogram(self, values: torch.Tensor, counts: np.ndarray, counting: Counting) -> None:
        magnitudes.torch_histogram(values, counts, counting)

    def cut_mask(self, values: torch.Tensor, cut: int, ties: int) -> tuple[torch.Tensor, int]:
        return magnitudes.torch_cut_mask(values, cut, ties)

    def elect(
        self, base: torch.Tensor, models: Sequence[Elected], consensus: int, normalize: bool, scale: float
    ) -> None:
        return None

    def combine_linear(
        self, inputs: Sequence[tuple[Any, str]], form: LinearForm, out_code: str, count: int, *, nonfinite: bool = False
    ) -> None:
        return None
