"""Grouped-query attention through torch's scaled_dot_product_attention (or, for inference on CPUs with
AVX512-BF16, a native causal kernel 2-3x faster: quant/csrc/causal_attention.c)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import Linear
from .native import inference_on_cpu
from .rope import RotaryTables, softmax_scale


def causal_self_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, enable_gqa: bool = False
) -> torch.Tensor:
    """Causal attention of a whole sequence ([B, H, S, D] queries over [B, KVH, S, D] keys): the native kernel
    (float32 or bfloat16) when it takes the tensors and no gradient is wanted, else torch's
    scaled_dot_product_attention."""
    if inference_on_cpu(query, key, value):
        from ..quant import kernels

        if kernels.causal_attention_takes(query, key, value):
            out = kernels.causal_attention(query, key, value, scale)
            if out is not None:
                return out
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=enable_gqa
    )


class KVCacheView(Protocol):
    """What attention layers need from a KV cache (the engine provides it; None means no cache).

    `attend` stores this step's keys/values for layer `layer_idx` and attends over each sequence's history.
    `attend_latent` does the same for MLA, caching the compressed latent instead of expanded keys/values.
    """

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor: ...

    def attend_latent(
        self,
        layer_idx: int,
        attn: Any,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv_latent: torch.Tensor,
        k_pe: torch.Tensor,
        scale: float,
    ) -> torch.Tensor: ...


class Attention(nn.Module):
    """Multi-head attention with fewer key/value heads than query heads (GQA) and rotary positions."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.attn_head_dim
        bias = config.attention_bias
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.scale = softmax_scale(config, self.head_dim)

    def forward(
        self, hidden_states: torch.Tensor, rotary: RotaryTables, cache: KVCacheView | None = None
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query, key = rotary.apply(query), rotary.apply(key)
        if cache is None:
            gqa = self.num_kv_heads != self.num_heads
            if seq > 1:
                out = causal_self_attention(query, key, value, self.scale, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(query, key, value, scale=self.scale, enable_gqa=gqa)
        else:
            out = cache.attend(self.layer_idx, query, key, value, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
