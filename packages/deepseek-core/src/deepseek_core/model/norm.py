"""RMSNorm, computed in float32 like the reference implementations.

On CPU, float32 and bfloat16 inputs that need no gradient (inference, the engine) run a native kernel
(quant/csrc/rms_norm.c: one pass over the rows instead of seven torch ops): bit-identical to the torch ops
below in bfloat16, equal to rounding in float32. Everything else runs the torch ops.
"""

from __future__ import annotations

import torch
from torch import nn

from .native import inference_on_cpu


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        native = _native(self, hidden_states)
        if native is not None:
            return native
        input_dtype = hidden_states.dtype
        hidden_float = hidden_states.float()
        variance = hidden_float.pow(2).mean(-1, keepdim=True)
        normed = hidden_float * torch.rsqrt(variance + self.eps)
        return self.weight * normed.to(input_dtype)


def _native(module: RMSNorm, x: torch.Tensor) -> torch.Tensor | None:
    if module.weight.dtype != x.dtype or not inference_on_cpu(x, module.weight):
        return None
    from ..quant import kernels

    dim = x.shape[-1]
    if x.numel() == 0 or not kernels.rms_norm_takes(x.dtype, dim):
        return None
    return kernels.rms_norm(x.reshape(-1, dim), module.weight, module.eps).view(x.shape)
