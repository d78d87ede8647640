"""Prepacked bfloat16 linear layers for CPU decoding (oneDNN).

On CPU, torch's generic bfloat16 matmul path is slow for the skinny matrices of decoding (a few rows times a
large weight): it runs well below memory bandwidth, slower than float32. oneDNN's linear over a weight
reordered once into its blocked layout reads the weight at close to bandwidth (tools/bench/decode.py). The
engine keeps such packed copies of the model's bfloat16 nn.Linear weights and routes F.linear to them, only
inside its own forward passes, through a thread-local TorchFunctionMode: the model itself is not modified.
A weight changed in place (its version counter moves) or replaced is repacked before its next use.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def prepack_available() -> bool:
    """True when this torch build has oneDNN bfloat16 linear kernels usable on this CPU."""
    mkldnn = torch.ops.mkldnn
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")
            and bool(mkldnn._is_mkldnn_bf16_supported())
        )
    except (AttributeError, RuntimeError):
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=1)


class PackedLinears(TorchFunctionMode):
    """Routes F.linear on the registered weights to oneDNN with prepacked weights while active."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # id(weight) -> (weight, version when packed, packed weight)
        self._packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, nn.Linear)
                and isinstance(weight, torch.Tensor)
                and weight.dtype == torch.bfloat16
                and weight.device.type == "cpu"
            ):
                self._packed[id(weight)] = (weight, weight._version, _pack(weight))

    @property
    def num_packed(self) -> int:
        """Number of weights with a packed copy."""
        return len(self._packed)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed copies (about the size of the model's linear weights)."""
        return sum(w.numel() * w.element_size() for w, _, _ in self._packed.values())

    def _lookup(self, weight: Any) -> torch.Tensor | None:
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] is not weight:
            return None
        if entry[1] != weight._version:  # modified in place since packing
            entry = (weight, weight._version, _pack(weight))
            self._packed[id(weight)] = entry
        return entry[2]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            packed = self._lookup(weight) if x.dtype == torch.bfloat16 else None
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
        return func(*args, **kwargs)
