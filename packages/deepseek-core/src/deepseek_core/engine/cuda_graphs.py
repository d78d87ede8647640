"""Fixed-shape decode steps, replayed as CUDA graphs (optional: EngineCore(cuda_graphs=True)).

A decode-only step of B sequences is padded to a batch bucket Bp and its longest context to a length bucket
Lp (a power of two), so every step with the same (Bp, Lp) runs the same kernels on the same buffers: one
CUDA graph per key, captured on first use, replays without Python or launch overhead. Padding rows write to
a reserved scratch block and read only it. Without capture (capture=False) the same fixed-shape path runs
eagerly, which is how the CPU tests check it.

Models with DeepSeekMoE are not captured: routing sizes depend on the data (bincount), which a graph cannot
hold; their decode steps run eagerly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..model.transformer import Transformer
from .kv_cache import KVCache
from .scheduler import ScheduledChunk

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_LENGTH_BUCKET = 128


@dataclass
class StaticDecodeInputs:
    """One decode step's inputs, padded to a graph key (host tensors)."""

    key: tuple[int, int]  # (padded batch, padded context length)
    batch: int
    input_ids: torch.Tensor  # [Bp]
    positions: torch.Tensor  # [Bp]
    slot_mapping: torch.Tensor  # [Bp]
    decode_blocks: torch.Tensor  # [Bp * Lp / block_size]
    decode_valid: torch.Tensor  # [Bp, Lp]


class _Graph:
    """Device buffers of one key, and its captured graph."""

    def __init__(
        self, batch: int, length: int, scratch_block: int, block_size: int, device: torch.device
    ) -> None:
        def full(shape: tuple[int, ...], value: int) -> torch.Tensor:
            return torch.full(shape, value, dtype=torch.long, device=device)

        self.input_ids = full((batch,), 0)
        self.positions = full((batch,), 0)
        self.slot_mapping = full((batch,), scratch_block * block_size)
        self.decode_blocks = full((batch * length // block_size,), scratch_block)
        self.decode_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def load(self, inputs: StaticDecodeInputs) -> None:
        for name in ("input_ids", "positions", "slot_mapping", "decode_blocks", "decode_valid"):
            getattr(self, name).copy_(getattr(inputs, name), non_blocking=True)


class StaticDecode:
    """Runs decode-only steps with fixed shapes, as CUDA graphs when `capture`."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        scratch_block: int,
        max_batch: int,
        max_model_len: int,
        decode_backend: str = "auto",
        capture: bool = True,
    ) -> None:
        if capture and cache.device.type != "cuda":
            raise ValueError("cuda_graphs: needs a CUDA device")
        self.model = model
        self.cache = cache
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.max_length = -(-max_model_len // cache.block_size) * cache.block_size
        self.decode_backend = decode_backend
        self.capture = capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        """True for a decode-only step this runner can take."""
        return 0 < len(chunks) <= self.batch_buckets[-1] and all(c.length == 1 and c.samples for c in chunks)

    def _length_bucket(self, length: int) -> int:
        bucket = max(MIN_LENGTH_BUCKET, 1 << (length - 1).bit_length())
        bucket = -(-bucket // self.cache.block_size) * self.cache.block_size
        return min(bucket, self.max_length)

    def prepare(self, chunks: list[ScheduledChunk]) -> StaticDecodeInputs:
        """Pad a decode-only step to its key (reads sequence state; call under the engine lock)."""
        batch = len(chunks)
        padded = self.batch_buckets[bisect.bisect_left(self.batch_buckets, batch)]
        lengths = [c.start + 1 for c in chunks]
        length = self._length_bucket(max(lengths))
        bs = self.cache.block_size
        n_blocks = length // bs
        tables = [c.seq.block_table[:n_blocks] for c in chunks]
        tables = [t + [t[-1]] * (n_blocks - len(t)) for t in tables]  # own blocks: see runner.for_chunks
        tables += [[self.scratch_block] * n_blocks] * (padded - batch)
        lens = torch.tensor(lengths + [1] * (padded - batch))
        positions = [c.start for c in chunks] + [0] * (padded - batch)
        new_slots = [c.seq.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, positions)]
        return StaticDecodeInputs(
            key=(padded, length),
            batch=batch,
            input_ids=torch.tensor([c.seq.token_ids[c.start] for c in chunks] + [0] * (padded - batch)),
            positions=torch.tensor(positions),
            slot_mapping=torch.tensor(new_slots + [self.scratch_slot] * (padded - batch)),
            decode_blocks=torch.tensor(tables, dtype=torch.long).view(-1),
            decode_valid=torch.arange(length).unsqueeze(0) < lens.unsqueeze(1),
        )

    def _forward(self, g: _Graph) -> torch.Tensor:
        from .runner import PagedAttention

        view = PagedAttention.static_decode(
            self.cache, g.slot_mapping, g.decode_blocks, g.decode_valid, self.decode_backend
        )
        hidden = self.model.hidden_states(g.input_ids.view(1, -1), g.positions.view(1, -1), cache=view)
        return self.model.lm_head(hidden[0])

    def _build(self, key: tuple[int, int]) -> _Graph:
        g = _Graph(key[0], key[1], self.scratch_block, self.cache.block_size, self.cache.device)
        if self.capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (allocator, kernel selection)
                    self._forward(g)
            torch.cuda.current_stream().wait_stream(stream)
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, pool=self._pool):
                g.output = self._forward(g)
        self._graphs[key] = g
        return g

    @torch.inference_mode()
    def run(self, inputs: StaticDecodeInputs) -> torch.Tensor:
        """Logits [batch, vocab] of the step."""
        g = self._graphs.get(inputs.key) or self._build(inputs.key)
        g.load(inputs)
        if g.graph is not None:
            g.graph.replay()
            assert g.output is not None
            logits = g.output
        else:
            logits = self._forward(g)
        return logits[: inputs.batch].clone()

    @property
    def num_graphs(self) -> int:
        """Keys built so far."""
        return len(self._graphs)
