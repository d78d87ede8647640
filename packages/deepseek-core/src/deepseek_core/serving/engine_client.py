"""The engine interface the HTTP layer relies on, and how it runs several sequences of one request.

The server never touches model internals: it tokenizes with `engine.tokenizer`, submits token ids with
`engine.generate(prompt_ids, SamplingParams, request_id)`, reads `RequestOutput` deltas, and calls
`engine.abort(request_id)` when a client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import OpenAIError, bad_request
from .metrics import ServerMetrics

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the server needs from deepseek_core.engine.AsyncLLM."""

    tokenizer: Any
    config: Any
    max_model_len: int

    def generate(self, prompt: Any, params: Any, request_id: str | None = None) -> AsyncIterator[Any]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> Any: ...


@dataclass
class SequenceJob:
    """One engine request: the `index`-th choice of an HTTP request."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: Any
    prompt_index: int = 0


@dataclass
class SequenceState:
    """What the server has seen of one sequence so far."""

    job: SequenceJob
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    finished: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None


class SequenceRunner:
    """Runs the sequences of one HTTP request, yields (state, output) for each engine delta, records metrics.

    Closing the iterator early (a client disconnect, a cancelled task) aborts every unfinished sequence, so
    the engine frees their KV-cache blocks at once.
    """

    def __init__(
        self, engine: Engine, jobs: Sequence[SequenceJob], metrics: ServerMetrics, arrival: float
    ) -> None:
        self.engine = engine
        self.states = [SequenceState(job) for job in jobs]
        self.metrics = metrics
        self.arrival = arrival

    async def stream(self) -> AsyncGenerator[tuple[SequenceState, Any], None]:
        """Yield (state, output) for every engine delta of every sequence; close it to abort the rest."""
        for state in self.states:
            self.metrics.prompt_tokens.inc(len(state.job.prompt_ids))
        try:
            if len(self.states) == 1:
                state = self.states[0]
                stream = self.engine.generate(
                    state.job.prompt_ids, state.job.params, request_id=state.job.request_id
                )
                try:
                    async for output in _engine_errors(stream, state):
                        self._observe(state, output)
                        yield state, output
                finally:
                    await _aclose(stream)
            else:
                async for item in self._merged():
                    yield item
        finally:
            self.abort_unfinished()

    async def _merged(self) -> AsyncGenerator[tuple[SequenceState, Any], None]:
        """Interleave the sequences' streams in arrival order."""
        queue: asyncio.Queue[tuple[SequenceState, Any, BaseException | None]] = asyncio.Queue()
        done_marker = object()

        async def pump(state: SequenceState) -> None:
            stream = self.engine.generate(
                state.job.prompt_ids, state.job.params, request_id=state.job.request_id
            )
            try:
                async for output in _engine_errors(stream, state):
                    queue.put_nowait((state, output, None))
                queue.put_nowait((state, done_marker, None))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                queue.put_nowait((state, done_marker, exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                await _aclose(stream)

        tasks = [asyncio.create_task(pump(s)) for s in self.states]
        remaining = len(tasks)
        try:
            while remaining:
                state, output, error = await queue.get()
                if output is done_marker:
                    remaining -= 1
                    if error is not None and not isinstance(error, asyncio.CancelledError):
                        raise error
                    continue
                self._observe(state, output)
                yield state, output
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, state: SequenceState, output: Any) -> None:
        now = time.perf_counter()
        new_ids = list(getattr(output, "token_ids_delta", None) or [])
        k = len(new_ids)
        if k:
            if state.first_token_at is None:
                state.first_token_at = now
                self.metrics.time_to_first_token.observe(now - self.arrival)
                queue_time = _queue_time(output)
                if queue_time is not None:
                    self.metrics.queue_time.observe(queue_time)
                if k > 1 and state.last_token_at is None:
                    for _ in range(k - 1):
                        self.metrics.inter_token_latency.observe(0.0)
            else:
                gap = (now - (state.last_token_at or now)) / k
                for _ in range(k):
                    self.metrics.inter_token_latency.observe(gap)
            state.last_token_at = now
            self.metrics.last_token_time = now
            self.metrics.generation_tokens.inc(k)
            state.token_ids.extend(new_ids)
        state.text += getattr(output, "text_delta", "") or ""
        delta_logprobs = getattr(output, "logprobs_delta", None)
        if delta_logprobs:
            state.logprobs.extend(delta_logprobs)
        if getattr(output, "finished", False):
            state.finished = True
            state.finish_reason = getattr(output, "finish_reason", None) or "stop"
            self.metrics.finished(state.finish_reason)

    def abort_unfinished(self) -> None:
        """Abort every sequence the engine has not finished (idempotent)."""
        for state in self.states:
            if state.finished:
                continue
            state.finished = True
            state.finish_reason = "abort"
            with contextlib.suppress(
                ValueError, KeyError
            ):  # already finished or never started inside the engine
                self.engine.abort(state.job.request_id)
            self.metrics.finished("abort")


def _queue_time(output: Any) -> float | None:
    """Seconds the sequence waited for its first schedule, when the engine reports it."""
    for name in ("queue_time", "queue_time_s"):
        value = getattr(output, name, None)
        if isinstance(value, int | float):
            return float(value)
    metrics = getattr(output, "metrics", None)
    if metrics is not None:
        value = getattr(metrics, "queue_time", None)
        if isinstance(value, int | float):
            return float(value)
        arrival, scheduled = (
            getattr(metrics, "arrival_time", None),
            getattr(metrics, "first_scheduled_time", None),
        )
        if isinstance(arrival, int | float) and isinstance(scheduled, int | float):
            return max(0.0, float(scheduled) - float(arrival))
    return None


async def _engine_errors(stream: AsyncIterator[Any], state: SequenceState) -> AsyncIterator[Any]:
    """Engine errors in the OpenAI shape.

    The engine refuses bad input with a ValueError naming the parameter when a request is submitted: that is
    the client's error (400). A request the engine had to end on its own (RequestFailedError: NaN logits, a
    failing detokenizer) is a 500 naming the reason; the other requests are not affected.
    """
    received = False
    try:
        async for output in stream:
            received = True
            yield output
    except ValueError as exc:
        if received:
            raise
        raise bad_request(str(exc), None) from None
    except RuntimeError as exc:
        from ..engine.errors import RequestFailedError  # the engine is loaded: it raised this

        if not isinstance(exc, RequestFailedError):
            raise
        log.warning("request %s failed: %s", state.job.request_id, exc.reason)
        raise OpenAIError(500, f"generation failed: {exc.reason}", code="generation_failed") from exc


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
