"""AsyncLLM: the engine for asyncio callers (the HTTP server), stepping in a background thread.

    llm = AsyncLLM("checkpoint-dir")
    async for out in llm.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.text_delta, end="")
    llm.abort("r1")        # frees the request's KV-cache blocks before returning
    llm.stats()            # EngineStats: running, waiting, kv_cache_usage, ...
    llm.shutdown()

`step_priority="idle"` runs the stepping thread at the CPU's idle priority (Linux), so that on a busy CPU
server the event loop's request handling always goes first (see engine/priority.py).

Each item of `generate` is one step's delta plus the cumulative fields; the last has finished=True.
Bad input raises ValueError (naming the parameter) when the iteration starts; nothing else is affected.
A request that fails while running (NaN/inf logits, a failing detokenizer) raises RequestFailedError from its
iterator, after the outputs it produced; the other requests and the engine carry on.
Leaving the `async for` early (break, cancellation, a closed client) aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from ..model.transformer import Transformer
from .engine import EngineCore, PromptType
from .errors import RequestFailedError
from .llm import build_engine
from .outputs import EngineStats, RequestOutput
from .params import SamplingParams
from .priority import apply_step_priority, check_step_priority

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or failed); no request can run."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's event loop is already closed
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    """On the streams' event loop: one step's outputs into their queues."""
    for stream, item in items:
        stream.queue.put_nowait(item)


def _put_step(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    """Hand one step's outputs to their streams with one wake-up per event loop, not one per stream: each
    wake-up is a write to the loop's self-pipe and a pass of its loop (a tenth of a busy worker's time)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | BaseException]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that event loop is already closed
            loop.call_soon_threadsafe(_deliver, batch)


class AsyncLLM:
    """Asynchronous engine API over a background stepping thread; same constructor arguments as LLM."""

    def __init__(
        self,
        model_or_dir: Transformer | str | os.PathLike[str],
        tokenizer: Any = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_model_len: int | None = None,
        cuda_graphs: bool = False,
        cpu_prepack: bool | None = None,
        step_priority: str = "normal",
    ) -> None:
        self.step_priority = check_step_priority(step_priority)
        self.engine: EngineCore = build_engine(
            model_or_dir,
            tokenizer,
            dtype,
            device,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            num_kv_blocks=num_kv_blocks,
            kv_cache_bytes=kv_cache_bytes,
            block_size=block_size,
            max_model_len=max_model_len,
            cuda_graphs=cuda_graphs,
            cpu_prepack=cpu_prepack,
            # A server answers at once: its first requests run the model's own path while the weights pack.
            cpu_prepack_in_background=True,
        )
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="deepseek-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        """The Tokenizer, or None."""
        return self.engine.tokenizer

    @property
    def config(self) -> Any:
        """The model's ModelConfig."""
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) a request may reach."""
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        """True while the engine loop serves requests."""
        return self._thread.is_alive() and not self._stopping

    # ------------------------------------------------------------------ requests
    async def generate(
        self, prompt: PromptType, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs (deltas plus cumulative fields) until it finishes.

        Raises ValueError for bad input (before any output) and RequestFailedError if the request fails.
        """
        if not self.is_running:
            raise EngineDeadError("engine: not running (shut down or failed)") from self._error
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            request_id = self.engine.add_request(prompt, params, request_id)
            self._streams[request_id] = stream
        with self._wakeup:
            self._wakeup.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                with contextlib.suppress(ValueError):
                    self.engine.abort_request(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a waiting or running request now (its blocks are free when this returns).

        Its stream ends with an output whose finish_reason is "abort". Unknown (or finished) ids raise
        ValueError.
        """
        output = self.engine.abort_request(request_id)
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(output)

    def stats(self) -> EngineStats:
        """Queue lengths, KV-cache usage and counters."""
        return self.engine.stats()

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine loop is not running."""
        if not self.is_running:
            raise EngineDeadError("engine: not running (shut down or failed)") from self._error

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; unfinished requests end with finish_reason "abort"."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with self._streams_lock:
            pending = list(self._streams.items())
        for request_id, stream in pending:
            try:
                stream.put(self.engine.abort_request(request_id))
            except ValueError:
                stream.put(EngineDeadError("engine: shut down"))

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        apply_step_priority(self.step_priority)
        while True:
            with self._wakeup:
                while not self._stopping and not self.engine.has_unfinished_requests():
                    self._wakeup.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step must not take the server down
                log.exception("engine step failed; aborting the requests it held")
                self._fail_in_flight(exc)
                continue
            if outputs:
                with self._streams_lock:
                    targets = [(self._streams.get(o.request_id), o) for o in outputs]
                _put_step(
                    [
                        # A request that failed alone hands its consumer the error.
                        (
                            stream,
                            output
                            if output.error is None
                            else RequestFailedError(output.request_id, output.error),
                        )
                        for stream, output in targets
                        if stream is not None
                    ]
                )

    def _fail_in_flight(self, exc: Exception) -> None:
        """Abort every running request and hand the error to its stream."""
        for request_id in self.engine.running_request_ids():
            with contextlib.suppress(ValueError):
                self.engine.abort_request(request_id)
            with self._streams_lock:
                stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(RuntimeError(f"engine step failed: {exc}"))
