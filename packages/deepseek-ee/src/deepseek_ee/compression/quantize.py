"""compress(): INT8-quantize a model in memory with the core quantized layers."""

from __future__ import annotations

from typing import Any, TypeVar

from deepseek_core import Model, Transformer
from deepseek_core.quant import METHODS, QuantizedTransformer, quantize_model

DTYPES = ("int8",)
GRANULARITIES = ("per-channel", "per-tensor")
M = TypeVar("M", Transformer, Model)


def compress(
    model: M,
    method: str = "dynamic_quantization",
    dtype: str = "int8",
    granularity: str = "per-channel",
    clip_ratio: float = 1.0,
    quantize_embeddings: bool = False,
    quantize_lm_head: bool = True,
    modules_to_not_convert: list[str] | tuple[str, ...] | None = None,
) -> M:
    """Quantize `model` (a Transformer, or a Model facade) to `dtype` with `method`, in place; returns it.

    method: 'dynamic_quantization' (int8 weights, activations quantized per token at run time) or
    'weight_only' (int8 weights, float activations). granularity 'per-channel' (one scale per output
    channel, the default) or 'per-tensor'; clip_ratio in (0, 1] keeps that fraction of each weight range
    and saturates the rest. Per-tensor scales and clipping lose accuracy: they are for deliberate
    trade-offs (and for checking that the accuracy gate catches a bad quantization), not the default.
    Embeddings stay float unless quantize_embeddings; norms and the MoE router always do.
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; use one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; supported: {', '.join(DTYPES)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: unknown {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    options: dict[str, Any] = {
        "per_channel": granularity == "per-channel",
        "clip_ratio": clip_ratio,
        "quantize_embeddings": quantize_embeddings,
        "quantize_lm_head": quantize_lm_head,
        "modules_to_not_convert": modules_to_not_convert,
    }
    if isinstance(model, Model):
        model.module = quantize_model(model.module, method, **options)
        model.reset_engine()
        return model
    if isinstance(model, QuantizedTransformer):
        raise ValueError("model: already quantized (compress a float model)")
    if not isinstance(model, Transformer):
        raise TypeError(f"model: expected a Transformer or a Model, got {type(model).__name__}")
    return quantize_model(model, method, **options)  # type: ignore[return-value]
