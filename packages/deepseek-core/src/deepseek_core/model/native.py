"""When the model's layers may hand an op to a native CPU kernel (quant/csrc): those kernels have no backward."""

from __future__ import annotations

import torch


def inference_on_cpu(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on the CPU and autograd would not record an op on them (inference_mode,
    no_grad, or nothing that requires a gradient)."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
