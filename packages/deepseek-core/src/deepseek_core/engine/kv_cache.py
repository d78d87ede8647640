"""The paged KV cache: a preallocated pool of fixed-size blocks, handed out to sequences by a block allocator.

Each layer owns one contiguous tensor of `num_blocks * block_size` token slots; a sequence's block table
lists which blocks hold its tokens, so token `p` of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Dense (GQA) models cache keys and values, [kv_heads, slots, head_dim] each (head-major, so a gathered
sequence is a stack of contiguous [tokens, head_dim] matrices, what batched matmuls want). MLA models cache the compressed
latent and the rotated shared rope key side by side, [slots, kv_lora_rank + qk_rope_head_dim]: the per-head
keys and values are never stored.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than were asked for."""


class BlockAllocator:
    """Hands out block ids, keeping each sequence's blocks consecutive when it can.

    A sequence that starts gets its first blocks at the start of a free run long enough for its expected
    final length, and that run is soft-reserved for it: later sequences start elsewhere while they can, so
    its next blocks usually follow its last one. Consecutive blocks let decode attention read the cache
    through a view instead of gathering a copy. Reservations are only preferences: when free space runs
    short, any free block is handed out (lowest ids first).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._used = bytearray(num_blocks)  # 1: held by a sequence
        self._claimed = bytearray(num_blocks)  # 1: held, or inside a live reservation
        self._num_free = num_blocks
        self._reservations: dict[object, tuple[int, int]] = {}  # owner -> [start, end)

    @property
    def num_free(self) -> int:
        """Blocks available now."""
        return self._num_free

    def _take(self, blocks: list[int]) -> list[int]:
        for b in blocks:
            self._used[b] = 1
            self._claimed[b] = 1
        self._num_free -= len(blocks)
        return blocks

    def _scattered(self, count: int) -> list[int]:
        """Lowest unclaimed free blocks first, then free blocks inside other sequences' reservations."""
        blocks: list[int] = []
        seen: set[int] = set()
        for table in (self._claimed, self._used):
            pos = table.find(0)
            while pos >= 0 and len(blocks) < count:
                if not self._used[pos] and pos not in seen:
                    blocks.append(pos)
                    seen.add(pos)
                pos = table.find(0, pos + 1)
            if len(blocks) == count:
                break
        return blocks

    def allocate(
        self, count: int, owner: object = None, reserve: int = 0, after: int | None = None
    ) -> list[int]:
        """`count` free block ids; raises NoFreeBlocksError (allocating nothing) when there are fewer.

        owner + reserve: a sequence's first blocks, placed in a free run of `reserve` blocks that stays
        reserved for it. after: the sequence's last block, so the new ones follow it when they are free.
        """
        if count > self._num_free:
            raise NoFreeBlocksError(f"asked for {count} blocks, {self._num_free} free")
        if count == 0:
            return []
        if after is not None:
            nxt = range(after + 1, after + 1 + count)
            own = self._reservations.get(owner, (0, 0))
            if nxt.stop <= self.num_blocks and all(
                not self._used[b] and (not self._claimed[b] or own[0] <= b < own[1]) for b in nxt
            ):
                return self._take(list(nxt))
        elif owner is not None:
            for run in (max(reserve, count), count):
                start = self._claimed.find(bytes(run))
                if start >= 0:
                    if run > count:
                        self._reservations[owner] = (start, start + run)
                        self._claimed[start : start + run] = b"\x01" * run
                    return self._take(list(range(start, start + count)))
        return self._take(self._scattered(count))

    def free(self, blocks: list[int], owner: object = None) -> None:
        """Return blocks to the pool and drop `owner`'s reservation (a block freed twice raises)."""
        if len(set(blocks)) != len(blocks) or not all(self._used[b] for b in blocks):
            twice = next(b for i, b in enumerate(blocks) if not self._used[b] or b in blocks[:i])
            raise RuntimeError(f"block {twice} freed twice")
        for b in blocks:
            self._used[b] = 0
            self._claimed[b] = 0
        self._num_free += len(blocks)
        reserved = self._reservations.pop(owner, None) if owner is not None else None
        if reserved is not None:
            start, end = reserved
            self._claimed[start:end] = self._used[start:end]


def cache_entry_shape(config: ModelConfig) -> tuple[int, ...]:
    """Per-token, per-layer shape of one cached tensor (MLA: the latent+rope row; dense: one of K or V)."""
    if config.is_mla:
        assert config.kv_lora_rank is not None and config.qk_rope_head_dim is not None
        return (config.kv_lora_rank + config.qk_rope_head_dim,)
    return (config.kv_heads, config.attn_head_dim)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes across all layers."""
    numel = 1
    for d in cache_entry_shape(config):
        numel *= d
    tensors_per_layer = 1 if config.is_mla else 2
    return numel * tensors_per_layer * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_bytes(config: ModelConfig, num_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks of `block_size` tokens fit in `num_bytes`."""
    return int(num_bytes) // (bytes_per_token(config, dtype) * block_size)


class KVCache:
    """The preallocated per-layer cache tensors plus the block allocator that manages their slots."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {num_blocks}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_mla = config.is_mla
        self.allocator = BlockAllocator(num_blocks)
        slots = num_blocks * block_size
        entry = cache_entry_shape(config)
        shape = (slots, *entry) if self.is_mla else (entry[0], slots, entry[1])
        layers = config.num_hidden_layers
        # latent: MLA's [slots, kv_lora_rank + rope] per layer; key/value: dense [kv_heads, slots, head_dim].
        self.latent: list[torch.Tensor] = []
        self.key: list[torch.Tensor] = []
        self.value: list[torch.Tensor] = []
        # Uninitialized memory: pages are committed as blocks get used, not all up front. A block is zeroed
        # the first time it is handed out (zero_fresh), because masked attention still multiplies the
        # values it skips by 0, and 0 * NaN-garbage would be NaN.
        if self.is_mla:
            self.latent = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        else:
            self.key = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(layers)]
            self.value = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self._fresh = bytearray(b"\x01") * num_blocks

    def zero_fresh(self, blocks: list[int]) -> None:
        """Zero the blocks among `blocks` that were never zeroed (call when handing blocks out)."""
        fresh = [b for b in blocks if self._fresh[b]]
        if not fresh:
            return
        index = torch.tensor(fresh, dtype=torch.long, device=self.device)
        bs = self.block_size
        for t in self.latent:
            t.view(-1, bs, t.shape[-1]).index_fill_(0, index, 0)
        for t in self.key + self.value:
            t.view(t.shape[0], -1, bs, t.shape[-1]).index_fill_(1, index, 0)
        for b in fresh:
            self._fresh[b] = 0

    def mark_dirty(self, blocks: list[int]) -> None:
        """Have `blocks` zeroed again by the next zero_fresh that hands them out (they may hold NaN/inf)."""
        for b in blocks:
            self._fresh[b] = 1

    @property
    def capacity_tokens(self) -> int:
        """Token slots in the pool."""
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.allocator.num_free / self.num_blocks

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes across all layers, computed from the allocated tensors."""
        tensors = self.latent + self.key + self.value
        return sum(t.element_size() * t.numel() for t in tensors) // self.capacity_tokens

    @property
    def total_bytes(self) -> int:
        """Bytes held by the pool's tensors."""
        return sum(t.element_size() * t.numel() for t in self.latent + self.key + self.value)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)
