"""Prepacked float32 and bfloat16 linear layers for CPU inference (oneDNN).

On CPU, torch's default F.linear is slow for the skinny matrices of decoding (a few rows times a large
weight): about 12 GB/s of weight reads in float32 on a 2-core EPYC whose memory reads 33 GB/s. oneDNN's
linear over a weight reordered once into its blocked layout reads it about twice as fast, and is also
faster for prefill-sized inputs (1.3x at 512 rows, 1.1x at 2048). For up to 4 rows a small native GEMV
over the unpacked weight (quant/csrc/gemv.c, AVX-512) reads it about 1.5x faster still (24-29 GB/s). The engine keeps
packed copies of the model's `Linear` weights and routes those layers to them, only inside its own forward
passes and only on its own thread (model/linear.py): the model itself is not modified. A weight changed in
place (its version counter moves) is repacked before its next packed use; a replaced one runs F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.linear import Linear, LinearRouter, swap_linear_router
from ..quant import kernels

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def prepack_available(dtype: torch.dtype) -> bool:
    """True when this torch build has oneDNN linear kernels for `dtype` usable on this CPU."""
    if dtype not in PACKABLE_DTYPES:
        return False
    mkldnn = torch.ops.mkldnn
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")
            and (dtype != torch.bfloat16 or bool(mkldnn._is_mkldnn_bf16_supported()))
        )
    except (AttributeError, RuntimeError):
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=1)


@dataclass
class _Entry:
    weight: torch.Tensor
    version: int  # the weight's version counter when packed
    packed: torch.Tensor
    gemv: bool  # the native GEMV takes this weight (decided once: dtype, CPU support, shape)


class PackedLinears:
    """Routes the model's `Linear` calls to oneDNN with prepacked weights while active (this thread only)."""

    def __init__(self, model: nn.Module) -> None:
        self._packed: dict[int, _Entry] = {}  # by id(weight)
        self._previous: list[LinearRouter | None] = []  # routers to restore, one per active `with`
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, Linear)
                and isinstance(weight, torch.Tensor)
                and weight.dtype in PACKABLE_DTYPES
                and weight.device.type == "cpu"
            ):
                self._packed[id(weight)] = _Entry(
                    weight, weight._version, _pack(weight), kernels.gemv_takes(weight)
                )

    @property
    def num_packed(self) -> int:
        """Number of weights with a packed copy."""
        return len(self._packed)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed copies (about the size of the model's linear weights)."""
        return sum(e.weight.numel() * e.weight.element_size() for e in self._packed.values())

    def linear(self, module: Linear, x: torch.Tensor) -> torch.Tensor:
        """The module's output: the native GEMV for a few rows, else its packed weight (for x's dtype)."""
        weight = module.weight
        entry = self._packed.get(id(weight))
        if (
            entry is None or entry.weight is not weight or x.dtype != weight.dtype
        ):  # replaced, or another dtype
            return F.linear(x, weight, module.bias)
        rows = x.numel() // x.shape[-1]
        if entry.gemv and rows <= kernels.GEMV_MAX_ROWS:  # reads the weight itself: nothing to repack
            return kernels.float_gemv(x.reshape(rows, x.shape[-1]), weight, module.bias).view(
                *x.shape[:-1], weight.shape[0]
            )
        if entry.version != weight._version:  # modified in place since packing
            entry.version, entry.packed = weight._version, _pack(weight)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), entry.packed, module.bias, "none", [], "")

    def __enter__(self) -> PackedLinears:
        self._previous.append(swap_linear_router(self.linear))
        return self

    def __exit__(self, *exc: object) -> None:
        swap_linear_router(self._previous.pop())
