"""quantize_model: swap a Transformer's float weights for INT8 modules, in place.

What is converted (each can be kept float by name with `modules_to_not_convert`):
  every nn.Linear (attention and MLP projections, shared experts, lm_head unless quantize_lm_head=False),
  MoE routed experts (stacked 3D weights, quantized per expert and output channel),
  the token embedding only with quantize_embeddings=True (row-wise int8; off by default: embeddings stay
  float, as do norms, biases and the MoE router, which is not an nn.Linear).
MLA's kv_b_proj always stays float: the engine's decode path absorbs it into the query (it multiplies by the
weight matrix itself rather than calling the layer), and it is a small share of an MLA layer.
A tied lm_head/embedding pair is untied when either is converted (config.tie_word_embeddings -> False).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.moe import RoutedExperts
from ..model.transformer import Transformer
from .layers import Int8Embedding, Int8Linear, Int8RoutedExperts, check_method

QUANT_METHOD = "deepseek-int8"
FORMAT_VERSION = 1
EMBEDDING = "model.embed_tokens"
# Used as a raw matrix by the MLA decode path (weight absorption), so never converted.
ALWAYS_FLOAT = ("kv_b_proj",)


class QuantizedTransformer(Transformer):
    """A Transformer with INT8 modules; `quantization_config` says how (it goes into config.json).

    dtype and device come from the final norm, which always stays float, since lm_head may be int8.
    """

    quantization_config: dict[str, Any]

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype activations are computed in."""
        return self.model.norm.weight.dtype


def _eligible(model: Transformer, quantize_embeddings: bool) -> dict[str, nn.Module]:
    """Modules quantize_model may convert, by qualified name."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, RoutedExperts)):
            out[name] = module
    if quantize_embeddings:
        out[EMBEDDING] = model.model.embed_tokens
    return out


def _excluded(name: str, patterns: set[str]) -> bool:
    """`name` or one of its parents ('model.layers.0') is listed."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in patterns for i in range(1, len(parts) + 1))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantize_model(
    model: Transformer,
    method: str,
    per_channel: bool = True,
    clip_ratio: float = 1.0,
    quantize_lm_head: bool = True,
    quantize_embeddings: bool = False,
    modules_to_not_convert: list[str] | tuple[str, ...] | None = None,
) -> QuantizedTransformer:
    """Convert `model` in place to INT8 (`method` 'weight_only' or 'dynamic_quantization') and return it.

    per_channel=False quantizes with one scale per weight matrix; clip_ratio < 1 clips each range to that
    fraction of its absolute maximum. Both lose accuracy and exist to trade it knowingly (or to test the
    accuracy gate); the defaults (per channel, no clipping) are what compression should use.
    """
    check_method(method)
    if isinstance(model, QuantizedTransformer):
        raise ValueError("model: already quantized")
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a deepseek_core Transformer, got {type(model).__name__}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio: must be in (0, 1], got {clip_ratio}")
    skip = set(modules_to_not_convert or ())
    if not quantize_lm_head:
        skip.add("lm_head")
    eligible = _eligible(model, quantize_embeddings)
    unknown = sorted(s for s in skip if not any(n == s or n.startswith(s + ".") for n in eligible))
    if unknown:
        raise ValueError(f"modules_to_not_convert: no quantizable module named {unknown}")
    converted: list[str] = []
    not_converted: list[str] = [] if quantize_embeddings else [EMBEDDING]
    with torch.no_grad():
        for name, module in eligible.items():
            if _excluded(name, skip) or name.rpartition(".")[2] in ALWAYS_FLOAT:
                not_converted.append(name)
                continue
            new: nn.Module
            if isinstance(module, RoutedExperts):
                new = Int8RoutedExperts.from_experts(module, method, per_channel, clip_ratio)
            elif isinstance(module, nn.Embedding):
                new = Int8Embedding.from_embedding(module, per_channel, clip_ratio)
            else:
                assert isinstance(module, nn.Linear)
                new = Int8Linear.from_linear(module, method, per_channel, clip_ratio)
            _set_module(model, name, new)
            converted.append(name)
    if model.config.tie_word_embeddings and ("lm_head" in converted or EMBEDDING in converted):
        model.config = model.config.replace(tie_word_embeddings=False)
    model.__class__ = QuantizedTransformer
    assert isinstance(model, QuantizedTransformer)
    model.quantization_config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": method,
        "bits": 8,
        "granularity": "per_channel" if per_channel else "per_tensor",
        "clip_ratio": clip_ratio,
        "modules_not_converted": sorted(not_converted),
    }
    return model.eval()
