"""The inference engine: paged KV cache, continuous batching, sampling, streaming (sync LLM and AsyncLLM)."""

from .async_llm import AsyncLLM, EngineDeadError
from .engine import EngineCore
from .errors import RequestFailedError
from .kv_cache import BlockAllocator, KVCache
from .llm import LLM
from .outputs import EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from .params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "EngineDeadError",
    "BlockAllocator",
    "EngineCore",
    "EngineStats",
    "KVCache",
    "RequestMetrics",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
