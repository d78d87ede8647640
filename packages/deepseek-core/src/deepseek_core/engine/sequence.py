"""Sequence: one request's tokens, cache blocks, sampling state and streamed text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from .outputs import RequestMetrics, TokenLogprob
from .params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds cache blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request inside the engine.

    `token_ids` is prompt + output. `num_computed` tokens of it have their keys/values in the cache (in
    `block_table`); the engine computes the rest, a chunk per step, and samples a new token each time the
    last token has been computed.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # engine-wide order of arrival: lower is older
    generator: torch.Generator
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_contiguous_blocks: int = 0  # leading blocks of block_table that are consecutive ids
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why the engine aborted it (it failed on its own)
    logprobs: list[TokenLogprob] | None = None
    # text: all decoded text; num_emitted_chars of it went out (the rest is held back: it may start a stop
    # string); num_emitted_tokens/logprobs likewise for the token deltas.
    decoder: Any = None
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    output_counts: dict[int, int] = field(default_factory=dict)  # for presence/frequency penalties

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens."""
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        """Generated token count."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        """True once finished (stopped, hit a limit, or aborted)."""
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Record a newly sampled token."""
        self.token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
