"""INT8 quantization math: symmetric weight quantization and the two INT8 matmuls.

Weights: symmetric, zero point 0, q = round(w / scale) clamped to [-127, 127], scale = clip_ratio *
absmax / 127, per output channel (one scale per row of [out, in]) or per tensor (one for the matrix, stored
repeated per row so every kernel sees [out] scales). clip_ratio < 1 clips outliers (values beyond the range
saturate), a real trade-off for some weight distributions; 1.0 (the default) never clips.

Matmuls:
  weight-only  activations stay float; y = x @ (q * scale)^T. CPU: the native kernel (kernels.py), float32
               arithmetic; elsewhere (or without a C compiler): dequantize then F.linear.
  dynamic      activations quantized per token at run time (absmax/127 per row), int8 x int8 -> int32,
               rescaled by (token scale * channel scale): on AVX512-VNNI CPUs a native kernel for < 16 rows
               (decode), else torch._int_mm (oneDNN on x86 CPUs) between native quantize/rescale steps.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import kernels

QMAX = 127
# Below this many rows the VNNI kernel (one pass over each weight row) beats torch._int_mm (measured: about
# 2x at 1-8 rows, even at 16, on AMD Zen 4); above it oneDNN's blocked GEMM wins.
VNNI_MAX_ROWS = 16


def quantize_weight(
    weight: torch.Tensor, per_channel: bool = True, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [..., out, in] -> (int8 [..., out, in], float32 scale [..., out]).

    Leading dimensions (stacked experts) are quantized independently: per tensor means per [out, in]
    matrix.
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio: must be in (0, 1], got {clip_ratio}")
    if weight.dim() < 2:
        raise ValueError(f"weight: expected at least 2 dimensions [out, in], got shape {list(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if per_channel:
        absmax = w.abs().amax(dim=-1)
    else:
        absmax = w.abs().amax(dim=(-2, -1), keepdim=False).unsqueeze(-1).expand(w.shape[:-1])
    scale = absmax * clip_ratio / QMAX
    # An all-zero row quantizes to zeros whatever the scale; 1.0 avoids dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """int8 [..., out, in] and scale [..., out] -> float weight of `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [M, K] -> (int8 [M, K], float32 per-row scale [M, 1]), symmetric absmax per token."""
    x = x.to(torch.float32)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12) / QMAX
    q = torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def weight_only_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ (q * scale)^T + bias with x float [..., K], q int8 [N, K]; returns x.dtype [..., N]."""
    n, k = q.shape
    x2 = x.reshape(-1, k)
    if x.device.type == "cpu" and kernels.native_library() is not None:
        # bfloat16/float16 inputs go through the float32 kernel too: converting M x K activations is cheap,
        # and aten._weight_int8pack_mm crashed here (torch 2.13) on some memory-mapped weights and shapes.
        out = kernels.weight_only_gemm(x2, q, scale, bias)
    else:
        out = F.linear(
            x2, dequantize_weight(q, scale, x.dtype), bias.to(x.dtype) if bias is not None else None
        )
    if out.dtype is not x.dtype:
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], n)


@functools.cache
def _int_mm_ok(device_type: str) -> bool:
    """Whether torch._int_mm runs on this device type (checked once with a tiny product)."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones((32, 32), dtype=torch.int8, device=device_type)
        return bool(torch._int_mm(a, a).eq(32).all())
    except (RuntimeError, NotImplementedError):
        return False


def dynamic_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dynamic INT8: quantize x per token, int8 x int8 -> int32, rescale; returns x.dtype [..., N]."""
    n, k = q.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    on_cpu = x.device.type == "cpu"
    native = on_cpu and kernels.native_library() is not None
    if native and m < VNNI_MAX_ROWS and kernels.has_vnni():
        out = kernels.dynamic_gemm(x2, q, scale, bias)
        return (out if out.dtype is x.dtype else out.to(x.dtype)).view(*x.shape[:-1], n)
    xq, xscale = kernels.quantize_rows(x2) if native else quantize_activations(x2)
    # CUDA's _int_mm wants M > 16 and K, N multiples of 8; the CPU one (oneDNN) takes any shape.
    if (on_cpu or (m > 16 and k % 8 == 0 and n % 8 == 0)) and _int_mm_ok(x.device.type):
        acc = torch._int_mm(xq, q.t())
    else:
        # Exact for |sum| < 2**24, close otherwise; only off the fast path.
        acc = (xq.to(torch.float32) @ q.to(torch.float32).t()).round_().to(torch.int32)
    if native and acc.dtype is torch.int32:
        out = kernels.rescale(acc, xscale, scale, bias)
    else:
        out = acc.to(torch.float32).mul_(xscale).mul_(scale.to(torch.float32))
        if bias is not None:
            out = out.add_(bias.to(torch.float32))
    if out.dtype is not x.dtype:
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], n)
