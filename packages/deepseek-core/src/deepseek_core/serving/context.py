"""State one app shares across requests: the engine, names, limits, metrics, audit log, drain flag."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditLog
from .auth import APIKeyChecker
from .engine_client import Engine
from .errors import OpenAIError
from .formatting import TokenText
from .metrics import ServerMetrics


@dataclass
class ServingContext:
    """Everything the handlers need; one per app."""

    engine: Engine
    served_model_name: str
    metrics: ServerMetrics
    auth: APIKeyChecker
    sampling_params_cls: Any
    max_model_len: int
    vocab_size: int
    max_waiting: int | None = None
    capacity: int | None = None  # sequences the engine runs at once; the rest wait
    drain_timeout: float = 30.0
    audit: AuditLog | None = None
    retry_after_s: int = 1
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight_seqs: int = 0
    token_text: TokenText = field(init=False)
    _idle: asyncio.Event | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.engine.tokenizer)

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer."""
        return self.engine.tokenizer

    def check_model(self, model: str) -> None:
        """404 unless `model` is the served model's name."""
        if model != self.served_model_name:
            raise OpenAIError(
                404,
                f"model: {model!r} does not exist; this server serves {self.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    def waiting_estimate(self, extra: int = 0) -> int:
        """Sequences that would be waiting for the engine with `extra` more admitted.

        The server's own count (in flight beyond the engine's max_num_seqs) is exact and immediate; the
        engine's waiting queue adds the cases where the KV cache, not max_num_seqs, is the limit: while
        anything waits there, new sequences wait too.
        """
        own = self.inflight_seqs + extra - self.capacity if self.capacity is not None else 0
        try:
            engine_waiting = int(getattr(self.engine.stats(), "waiting", 0))
        except Exception:  # stats are advisory here
            engine_waiting = 0
        return max(own, engine_waiting + extra) if engine_waiting > 0 else own

    def admit(self, num_seqs: int) -> None:
        """Reserve `num_seqs` sequences, or raise 429 (with Retry-After) when the waiting queue is full."""
        if self.draining:
            raise draining_error()
        if getattr(self.engine, "is_running", True) is False:
            raise OpenAIError(
                503, "the engine is not running", code="engine_unavailable", headers={"Retry-After": "5"}
            )
        if (
            self.max_waiting is not None
            and self.capacity is not None
            and num_seqs > self.capacity + self.max_waiting
        ):
            raise OpenAIError(
                400,
                f"n: this request needs {num_seqs} sequences, more than this server admits at once "
                f"({self.capacity} running + {self.max_waiting} waiting)",
                param="n",
                code="invalid_value",
            )
        if self.max_waiting is not None and self.waiting_estimate(num_seqs) > self.max_waiting:
            raise OpenAIError(
                429,
                f"the server is busy: more than {self.max_waiting} sequences would be waiting; retry later",
                code="server_busy",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.inflight_seqs += num_seqs
        if self._idle is not None:
            self._idle.clear()

    def release(self, num_seqs: int) -> None:
        """Give back sequences reserved by admit()."""
        self.inflight_seqs = max(0, self.inflight_seqs - num_seqs)
        if self.inflight_seqs == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting; wait until no sequence is in flight (or `timeout`). True when drained."""
        self.draining = True
        if self.inflight_seqs == 0:
            return True
        self._idle = asyncio.Event()
        if self.inflight_seqs == 0:
            return True
        try:
            await asyncio.wait_for(
                self._idle.wait(), timeout=self.drain_timeout if timeout is None else timeout
            )
            return True
        except asyncio.TimeoutError:
            return False


def draining_error() -> OpenAIError:
    """503 while the server drains."""
    return OpenAIError(
        503,
        "the server is shutting down and accepts no new requests",
        code="shutting_down",
        headers={"Retry-After": "5", "Connection": "close"},
    )
