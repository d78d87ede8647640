"""The paged KV cache: pool sizing, MLA latent-only storage, the block allocator."""

from __future__ import annotations

import pytest
import torch
from deepseek_core import ModelConfig, Transformer
from deepseek_core.engine import LLM, BlockAllocator, KVCache, SamplingParams
from deepseek_core.engine.kv_cache import NoFreeBlocksError

from .hf_tiny import TINY_CONFIGS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3"])
def test_mla_cache_holds_only_the_latent(kind, dtype):
    config = ModelConfig.from_dict(TINY_CONFIGS[kind])
    llm = LLM(Transformer(config).to(dtype), num_kv_blocks=10, block_size=4)
    cache = llm.engine.cache
    size = torch.empty((), dtype=dtype).element_size()
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * size
    assert cache.bytes_per_token == per_token == config.kv_cache_bytes_per_token(str(dtype).split(".")[1])
    assert cache.total_bytes == per_token * 10 * 4
    assert not cache.key and not cache.value
    assert [t.shape for t in cache.latent] == [(40, config.kv_lora_rank + config.qk_rope_head_dim)] * 3
    assert all(t.dtype == dtype for t in cache.latent)
    heads = config.num_attention_heads
    expanded = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    assert per_token * 5 < expanded * config.num_hidden_layers * size  # far below expanded K/V


def test_dense_cache_holds_keys_and_values():
    config = ModelConfig.from_dict(TINY_CONFIGS["llama_gqa"])
    cache = KVCache(config, num_blocks=3, block_size=8)
    assert cache.bytes_per_token == 2 * config.kv_heads * config.attn_head_dim * config.num_hidden_layers * 4
    assert [t.shape for t in cache.key] == [(config.kv_heads, 24, config.attn_head_dim)] * 2
    assert cache.capacity_tokens == 24 and cache.blocks_needed(17) == 3


def test_pool_size_in_bytes_and_context_window():
    config = ModelConfig.from_dict(TINY_CONFIGS["deepseek_v3"])
    per_block = config.kv_cache_bytes_per_token("float32") * 16
    llm = LLM(Transformer(config), kv_cache_bytes=per_block * 7 + 5)
    assert llm.engine.cache.num_blocks == 7
    assert llm.max_model_len == 7 * 16  # the pool (112 tokens) caps the config's 256
    llm = LLM(Transformer(config), max_num_seqs=2)
    assert llm.max_model_len == 256 and llm.engine.cache.num_blocks == 2 * 256 // 16


def test_block_allocator():
    alloc = BlockAllocator(5)
    a = alloc.allocate(3)
    assert a == [0, 1, 2] and alloc.num_free == 2
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate(3)
    assert alloc.num_free == 2  # a failed allocation takes nothing
    alloc.free([1])
    assert alloc.allocate(2) == [1, 3]
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free([0, 0])


def test_allocator_keeps_growing_sequences_consecutive():
    alloc = BlockAllocator(40)
    a, b = object(), object()
    first_a = alloc.allocate(3, owner=a, reserve=10)  # room to grow to 10 blocks
    first_b = alloc.allocate(3, owner=b, reserve=10)
    assert first_a == [0, 1, 2] and first_b == [10, 11, 12]  # b starts past a's reservation
    assert alloc.allocate(2, owner=a, after=2) == [3, 4] and alloc.allocate(1, owner=b, after=12) == [13]
    # A newcomer that finds no unreserved run large enough still gets blocks (reservations are soft).
    c = object()
    assert alloc.allocate(15, owner=c, reserve=30) == list(range(20, 35))
    d = alloc.allocate(8, owner=object(), reserve=8)
    assert len(d) == 8 and alloc.num_free == 40 - 3 - 3 - 2 - 1 - 15 - 8
    alloc.free(first_a + [3, 4], owner=a)
    assert alloc.allocate(5, owner=object(), reserve=5) == [0, 1, 2, 3, 4]  # a's room is free again


@pytest.mark.parametrize("kind", ["llama_gqa", "deepseek_v2"])
def test_unwritten_cache_memory_never_leaks_into_outputs(kind):
    """The pool is allocated uninitialized; blocks are zeroed when first handed out. Poison the whole pool
    with NaN: masked reads of never-written slots (block tails, padding) must still not produce NaN."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(TINY_CONFIGS[kind])).eval()
    clean = LLM(model, max_num_seqs=4, max_num_batched_tokens=8, block_size=8)
    poisoned = LLM(model, max_num_seqs=4, max_num_batched_tokens=8, block_size=8)
    cache = poisoned.engine.cache
    for t in cache.latent + cache.key + cache.value:
        t.fill_(float("nan"))
    cache._fresh = bytearray(b"\x01") * cache.num_blocks
    cache.zero_fresh([0])
    prompts = [[3, 4, 5], list(range(7, 30)), [9] * 12, [11] * 5]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    want, got = clean.generate(prompts, params), poisoned.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(lp.logprob == lp.logprob for o in got for lp in o.logprobs)  # no NaN
