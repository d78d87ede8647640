"""Multi-head Latent Attention (DeepSeek-V2/V3): keys and values come from a small shared latent.

Per token the model projects hidden_states to a latent `kv_latent` [kv_lora_rank] plus one shared rotary key
`k_pe` [qk_rope_head_dim]; the per-head keys (no-position part) and values are expanded from the latent by
kv_b_proj. A KV cache therefore only needs (kv_lora_rank + qk_rope_head_dim) numbers per token and layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import KVCacheView, causal_self_attention
from .linear import Linear
from .norm import RMSNorm
from .rope import RotaryTables, softmax_scale


class MLAttention(nn.Module):
    """MLA with an optional low-rank query (q_lora_rank)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        assert (
            config.kv_lora_rank and config.qk_rope_head_dim and config.qk_nope_head_dim and config.v_head_dim
        )
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        h, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(h, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = Linear(self.num_heads * self.v_head_dim, h, bias=bias)
        self.scale = softmax_scale(config, self.qk_head_dim)

    def project_query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] -> [batch, heads, seq, qk_head_dim]."""
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        else:
            q = self.q_proj(hidden_states)
        batch, seq, _ = hidden_states.shape
        return q.view(batch, seq, self.num_heads, self.qk_head_dim).transpose(1, 2)

    def project_latent(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token cache entries: normalized kv_latent [b, s, kv_lora_rank], k_pe [b, 1, s, rope_dim]."""
        compressed = self.kv_a_proj_with_mqa(hidden_states)
        kv_latent, k_pe = torch.split(compressed, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(kv_latent), k_pe.unsqueeze(1)

    def expand_kv(self, kv_latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent [b, s, r] and rotated k_pe [b, 1, s, rope] -> keys [b, h, s, qk] and values [b, h, s, v]."""
        batch, seq, _ = kv_latent.shape
        kv = self.kv_b_proj(kv_latent).view(
            batch, seq, self.num_heads, self.qk_nope_head_dim + self.v_head_dim
        )
        k_nope, value = torch.split(kv.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return key, value

    def forward(
        self, hidden_states: torch.Tensor, rotary: RotaryTables, cache: KVCacheView | None = None
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        query = self.project_query(hidden_states)
        q_nope, q_pe = torch.split(query, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_latent, k_pe = self.project_latent(hidden_states)
        q_pe, k_pe = rotary.apply(q_pe), rotary.apply(k_pe)
        if cache is None:
            key, value = self.expand_kv(kv_latent, k_pe)
            query = torch.cat((q_nope, q_pe), dim=-1)
            if seq > 1:
                out = causal_self_attention(query, key, value, self.scale)
            else:
                out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        else:
            out = cache.attend_latent(self.layer_idx, self, q_nope, q_pe, kv_latent, k_pe, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
