"""What the engine hands back: per-request outputs (cumulative fields plus this step's delta) and stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token under the model, and the `top` N alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to first being scheduled."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """State of one request after an engine step.

    `text`, `token_ids` and `logprobs` are cumulative; `text_delta`, `token_ids_delta` and `logprobs_delta`
    are what this output adds to the previous one of the same request (the concatenation of all deltas equals
    the cumulative fields). `finished` is True on the last output; `finish_reason` is then "stop", "length"
    or "abort". A request the engine had to end on its own (non-finite logits, a failing detokenizer)
    finishes with "abort" and `error` saying why; the other requests of its batch are not affected.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    finished: bool
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the request
    metrics: RequestMetrics | None = None
    error: str | None = None  # why the engine aborted this request (finish_reason "abort"), when it failed

    @property
    def prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        """Number of generated tokens so far."""
        return len(self.token_ids)


@dataclass
class EngineStats:
    """A snapshot of the engine for monitoring (gauges and counters)."""

    running: int
    waiting: int
    kv_cache_usage: float  # used blocks / all blocks, 0..1
    num_free_blocks: int
    num_blocks: int
    block_size: int
    max_model_len: int
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    steps_total: int = 0
    requests_failed_total: int = (
        0  # requests the engine aborted because they failed (see RequestOutput.error)
    )
