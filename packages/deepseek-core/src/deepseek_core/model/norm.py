"""RMSNorm, computed in float32 like the reference implementations.

Like the model's `Linear` (model/linear.py), an inference engine may reroute RMSNorm calls on its own thread
to a faster kernel that computes the same thing (engine/cpu_norm.py). Elsewhere, bfloat16 inputs on CPU that
need no gradient run the same native kernel (quant/csrc/rms_norm.c: one pass instead of seven ops over the
rows), whose result is bit-identical to the torch ops here; everything else runs the torch ops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from .mlp import wants_grad

# (module, input) -> output, or None to fall back to the torch ops.
NormRouter = Callable[["RMSNorm", torch.Tensor], "torch.Tensor | None"]

_local = threading.local()


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router: NormRouter | None = getattr(_local, "router", None)
        if router is not None:
            routed = router(self, hidden_states)
            if routed is not None:
                return routed
        if hidden_states.dtype == torch.bfloat16 and hidden_states.device.type == "cpu":
            native = _native_bfloat16(self, hidden_states)
            if native is not None:
                return native
        input_dtype = hidden_states.dtype
        hidden_float = hidden_states.float()
        variance = hidden_float.pow(2).mean(-1, keepdim=True)
        normed = hidden_float * torch.rsqrt(variance + self.eps)
        return self.weight * normed.to(input_dtype)


def _native_bfloat16(module: RMSNorm, x: torch.Tensor) -> torch.Tensor | None:
    if module.weight.dtype != torch.bfloat16 or wants_grad(x, module.weight):
        return None
    from ..quant import kernels

    dim = x.shape[-1]
    if x.numel() == 0 or not kernels.rms_norm_takes(x.dtype, dim):
        return None
    return kernels.rms_norm(x.reshape(-1, dim), module.weight, module.eps).view(x.shape)


def swap_norm_router(router: NormRouter | None) -> NormRouter | None:
    """Send every `RMSNorm` call on this thread to `router(module, input)` first (None: the torch ops only);
    returns the previous router, to be put back when done."""
    previous: NormRouter | None = getattr(_local, "router", None)
    _local.router = router
    return previous
