"""Model building blocks."""

from .attention import Attention, KVCacheView
from .mla import MLAttention
from .mlp import MLP
from .moe import MoE, RoutedExperts, Router
from .norm import RMSNorm
from .rope import RotaryEmbedding, RotaryTables
from .transformer import DecoderLayer, Transformer

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "KVCacheView",
    "MLAttention",
    "MoE",
    "RMSNorm",
    "RotaryEmbedding",
    "RotaryTables",
    "RoutedExperts",
    "Router",
    "Transformer",
]
