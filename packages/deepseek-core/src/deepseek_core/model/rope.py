"""Rotary position embeddings: default, linear and YaRN scaling as DeepSeek uses them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from .native import inference_on_cpu


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context-extension factor `scale`."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim // 2] and the cos/sin magnitude factor for `config`."""
    dim, base = config.rope_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    rope_type = config.rope_type
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    # YaRN: interpolate low frequencies, keep high ones, ramp in between.
    original_max = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low: float = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def softmax_scale(config: ModelConfig, head_dim: int) -> float:
    """Attention softmax scale; MLA with YaRN multiplies it by mscale(factor, mscale_all_dim)^2."""
    scale = head_dim**-0.5
    if config.is_mla and config.rope_type == "yarn":
        scaling = config.rope_scaling or {}
        mscale_all_dim = scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            m = yarn_mscale(float(scaling["factor"]), mscale_all_dim)
            scale *= m * m
    return scale


@dataclass
class RotaryTables:
    """cos and sin for the positions of one forward pass, each [batch, seq, rope_dim // 2]."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool
    # dtype -> ([cos, cos], [-sin, sin]) shaped [batch, 1, seq, rope_dim]: built once per forward pass, not
    # once per layer and projection.
    _tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def _for(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables.get(dtype)
        if tables is None:
            cos, sin = self.cos.unsqueeze(1).to(dtype), self.sin.unsqueeze(1).to(dtype)
            tables = (torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1))
            self._tables[dtype] = tables
        return tables

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [batch, heads, seq, rope_dim]; interleaved inputs come out split in halves.

        Query and key go through the same permutation, so their dot products are unchanged. Computes
        (x1 * cos - x2 * sin, x2 * cos + x1 * sin) for the halves x1, x2, rounding exactly as written so.
        """
        cos, signed_sin = self._for(x.dtype)
        if not self.interleaved and inference_on_cpu(x):
            from ..quant import kernels

            fused = kernels.rope(x, cos, signed_sin)  # bit-identical, one pass instead of four ops
            if fused is not None:
                return fused
        half = x.shape[-1] // 2
        if self.interleaved:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return x * cos + swapped * signed_sin


class RotaryEmbedding(torch.nn.Module):
    """Computes RotaryTables for arbitrary positions (no length limit, nothing cached per length)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = config.uses_interleaved_rope

    def forward(self, positions: torch.Tensor) -> RotaryTables:
        """positions: [batch, seq] integer positions."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(positions.device)
        return RotaryTables(
            cos=freqs.cos() * self.attention_factor,
            sin=freqs.sin() * self.attention_factor,
            interleaved=self.interleaved,
        )
