"""Continuous-batching scheduler: which sequences run this step, how many tokens each, and who waits.

Every step, in order:
  1. running sequences that decode (one token each), oldest first;
  2. running sequences still prefilling get the next chunk of their prompt, oldest first (chunked prefill,
     so a long prompt never stalls the decoding ones);
  3. waiting sequences join, oldest first, while there are free sequence slots, token budget and cache
     blocks for their whole prompt.
When a running sequence needs a block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the waiting queue, to be recomputed (prompt + output so far) later.
The oldest sequence can therefore always progress, and a pool that holds one max-length sequence never
deadlocks.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from .kv_cache import KVCache
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + length) of `seq` this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the end of the sequence, so a new token is sampled after it."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's work: single-token chunks first, then multi-token (prefill) chunks."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens computed this step."""
        return sum(c.length for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to compute."""
        return not self.chunks


class Scheduler:
    """Holds the waiting and running queues (both ordered by arrival) and plans each step."""

    def __init__(
        self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int | None = None
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {max_num_batched_tokens}")
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len or cache.capacity_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def remove(self, seq: Sequence, scrub: bool = False) -> None:
        """Take a sequence out of the queues and free its blocks at once (finish or abort).

        scrub: zero the blocks before they are handed out again (they may hold NaN/inf).
        """
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free_blocks(seq, scrub)

    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ planning
    def schedule(self) -> SchedulerOutput:
        """Plan one step (allocates the blocks the planned chunks need)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        planned: dict[int, ScheduledChunk] = {}  # id(seq) -> chunk

        def plan(seq: Sequence) -> None:
            nonlocal budget
            if seq.status is not SequenceStatus.RUNNING or budget <= 0:
                return
            length = min(seq.num_tokens - seq.num_computed, budget)
            while not self._ensure_blocks(seq, seq.num_computed + length):
                victim = self.running[-1]  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                dropped = planned.pop(id(victim), None)
                if dropped is not None:
                    budget += dropped.length
                if victim is seq:
                    return
            chunk = ScheduledChunk(seq, seq.num_computed, length)
            planned[id(seq)] = chunk
            budget -= length

        for seq in [s for s in self.running if s.num_tokens - s.num_computed == 1]:
            plan(seq)
        for seq in [s for s in self.running if s.num_tokens - s.num_computed > 1]:
            plan(seq)
        if not out.preempted:  # a pool under pressure admits no one new
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                # Reserve blocks for everything to (re)compute, so its prefill cannot stall half-way.
                if not self._ensure_blocks(seq, seq.num_tokens):
                    break
                self.waiting.pop(0)
                seq.status = SequenceStatus.RUNNING
                if seq.metrics.first_scheduled_time is None:
                    seq.metrics.first_scheduled_time = time.monotonic()
                bisect.insort(self.running, seq, key=lambda s: s.arrival)
                length = min(seq.num_tokens - seq.num_computed, budget)
                planned[id(seq)] = ScheduledChunk(seq, seq.num_computed, length)
                budget -= length
        chunks = list(planned.values())
        out.chunks = [c for c in chunks if c.length == 1] + [c for c in chunks if c.length > 1]
        return out

    # ------------------------------------------------------------------ blocks
    def _ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        table = seq.block_table
        need = self.cache.blocks_needed(num_tokens) - len(table)
        if need <= 0:
            return True
        allocator = self.cache.allocator
        if need > allocator.num_free:
            return False
        if table:
            new = allocator.allocate(need, owner=seq, after=table[-1])
        else:  # first blocks: reserve room for the expected final length, so growth stays consecutive
            final = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
            new = allocator.allocate(need, owner=seq, reserve=self.cache.blocks_needed(final))
        if seq.num_contiguous_blocks == len(table):
            run, prev = len(table), (table[-1] if table else new[0] - 1)
            for b in new:
                if b != prev + 1:
                    break
                run, prev = run + 1, b
            seq.num_contiguous_blocks = run
        self.cache.zero_fresh(new)
        table.extend(new)
        return True

    def _free_blocks(self, seq: Sequence, scrub: bool = False) -> None:
        if seq.block_table:
            if scrub:
                self.cache.mark_dirty(seq.block_table)
            self.cache.allocator.free(seq.block_table, owner=seq)
            seq.block_table = []
        seq.num_contiguous_blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and queue it for recomputation (it keeps its output tokens)."""
        self.running.remove(seq)
        # Scrubbed: a prefill chunk that samples nothing is never checked for NaN/inf before this.
        self._free_blocks(seq, scrub=True)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)
        self.num_preemptions += 1
