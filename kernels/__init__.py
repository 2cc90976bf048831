"""Triton kernels for the DeGLA objective, each beside its eager reference (`*_ref(..., upcast=)`)."""
import torch


def _rows_unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride(0) and need unit stride inside a row; copy only if not."""
    return x if x.stride(-1) == 1 else x.contiguous()
