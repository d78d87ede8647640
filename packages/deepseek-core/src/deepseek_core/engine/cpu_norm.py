"""RMSNorm of decode rows through the native kernel (quant/csrc/rms_norm.c), on the engine's thread only.

The model's RMSNorm is seven small torch ops per call; for the few rows of a decode step one native call
computes the same (float32 arithmetic, the same bfloat16 roundings). Larger inputs, other dtypes or a
weight of another dtype keep the torch ops.
"""

from __future__ import annotations

import torch

from ..model.norm import NormRouter, RMSNorm, swap_norm_router
from ..quant import kernels

MAX_ROWS = 4  # decode-sized inputs; prefill rows stay on torch's multi-threaded ops


def _native_rms_norm(module: RMSNorm, x: torch.Tensor) -> torch.Tensor | None:
    dim = x.shape[-1]
    rows = x.numel() // dim if dim else 0
    weight = module.weight
    if (
        not (0 < rows <= MAX_ROWS)
        or x.device.type != "cpu"
        or weight.dtype != x.dtype
        or not kernels.rms_norm_takes(x.dtype, dim)
    ):
        return None
    return kernels.rms_norm(x.reshape(rows, dim), weight, module.eps).view(x.shape)


class NativeNorms:
    """While active (this thread only), decode-sized RMSNorm calls run the native kernel."""

    def __init__(self) -> None:
        self._previous: list[NormRouter | None] = []

    def __enter__(self) -> NativeNorms:
        self._previous.append(swap_norm_router(_native_rms_norm))
        return self

    def __exit__(self, *exc: object) -> None:
        swap_norm_router(self._previous.pop())
