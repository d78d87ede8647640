"""The decoder-only Transformer; module names mirror Hugging Face's so tensor names map one to one."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, KVCacheView
from .linear import Linear
from .mla import MLAttention
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm attention block and pre-norm MLP/MoE block, each with a residual."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn: nn.Module = (
            MLAttention(config, layer_idx) if config.is_mla else Attention(config, layer_idx)
        )
        self.mlp: nn.Module = (
            MoE(config)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, rotary, cache: KVCacheView | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), rotary, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCacheView | None = None
    ) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        rotary = self.rotary_emb(positions)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, rotary, cache, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, rotary, cache)
        return self.norm(hidden_states)


class Transformer(nn.Module):
    """A DeepSeek-family causal language model: `logits = model(input_ids)` gives [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as transformers does: normal(0, initializer_range), ones for norms, zero biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module.weight.device.type == "meta":
                    continue
                module.weight.normal_(0.0, std)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.zero_()
            elif isinstance(module, RMSNorm) and module.weight.device.type != "meta":
                module.weight.fill_(1.0)
        for name, param in self.named_parameters():
            if param.device.type != "meta" and (
                name.endswith("experts.gate_up_proj")
                or name.endswith("experts.down_proj")
                or name.endswith("gate.weight")
            ):
                param.normal_(0.0, std)
        for name, buf in self.named_buffers():
            if name.endswith("e_score_correction_bias") and buf.device.type != "meta":
                buf.zero_()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in the backward pass to save memory."""
        self.model.gradient_checkpointing = enabled

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCacheView | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states [batch, seq, hidden] (no vocabulary projection)."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(
                input_ids.shape[0], -1
            )
        return self.model(input_ids, positions, cache)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCacheView | None = None
    ) -> torch.Tensor:
        """input_ids [batch, seq] (or [seq]) -> logits [batch, seq, vocab]."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache))

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the parameters."""
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        """Parameter count of the instantiated module (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())
