"""Forwarding one admitted request to its model's worker, and accounting for it.

The worker runs deepseek-core's OpenAI-compatible app, so bodies, errors and server-sent events are core's.
The gateway reads what it needs on the way through: the usage (for token limits and /v1/usage), the first
token's arrival (time to first token per tenant) and the finish reasons (audit log). A streaming request
always asks the worker for the final usage chunk; when the client did not ask for it, the gateway takes it
out again (and the `usage: null` field of every chunk), so the client sees exactly what it asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import httpx
from deepseek_core.serving.audit import AuditRecord
from deepseek_core.serving.errors import error_body
from deepseek_core.serving.formatting import SSE_DONE, sse

from .limits import RateLimiter
from .metrics import GatewayMetrics
from .models import ModelManager
from .scheduler import FairScheduler, Ticket
from .tenancy import UsageBook

log = logging.getLogger(__name__)

_EVENT_END = b"\n\n"
_DATA = b"data: "
_NULL_USAGE = b',"usage":null}'  # how core's formatting (compact separators) ends a chunk without usage
COALESCE_S = 0.01


@dataclass
class Services:
    """The gateway's shared services an exchange reports to."""

    scheduler: FairScheduler
    models: ModelManager
    limiter: RateLimiter
    usage: UsageBook
    metrics: GatewayMetrics


@dataclass(eq=False)
class Exchange:
    """One request forwarded to a worker: what it used, when its first token came, and its release."""

    services: Services
    tenant: str
    model: str
    arrival: float
    record: AuditRecord
    ticket: Ticket | None = None
    holds_model: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    content_chunks: int = 0
    usage_seen: bool = False
    first_token_at: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    finished: bool = False

    def note_usage(self, usage: Any) -> None:
        """Take token counts from an OpenAI usage object."""
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            self.usage_seen = True

    def note_choices(self, choices: Any, chat: bool) -> None:
        """Note the first token and finish reasons of a chunk's choices."""
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text or choice.get("logprobs"):
                self.content_chunks += 1
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.services.metrics.time_to_first_token.labels(self.tenant, self.model).observe(
                        self.first_token_at - self.arrival
                    )
            reason = choice.get("finish_reason")
            if reason:
                self.finish_reasons.append(str(reason))

    def finish(self, ok: bool, disconnected: bool = False) -> None:
        """Release the model and the fair-queue slot, and account for the request (idempotent)."""
        if self.finished:
            return
        self.finished = True
        s = self.services
        if self.ticket is not None:
            s.scheduler.release(self.ticket)
        if self.holds_model:
            s.models.release(self.model)
        if not self.usage_seen and disconnected:
            self.completion_tokens = self.content_chunks  # an abandoned stream: bill what was delivered
        s.usage.record(self.tenant, self.model, ok, self.prompt_tokens, self.completion_tokens)
        s.limiter.charge_tokens(self.tenant, self.prompt_tokens + self.completion_tokens)
        s.metrics.prompt_tokens.labels(self.tenant, self.model).inc(self.prompt_tokens)
        s.metrics.generation_tokens.labels(self.tenant, self.model).inc(self.completion_tokens)
        if ok and not disconnected:
            s.metrics.e2e_latency.labels(self.tenant, self.model).observe(time.perf_counter() - self.arrival)
        self.record.prompt_tokens = self.prompt_tokens
        self.record.completion_tokens = self.completion_tokens
        self.record.finish_reasons = self.finish_reasons
        if disconnected:
            self.record.client_disconnected = True


class SSEFilter:
    """Splits the worker's event stream into events, accounts for them, and drops injected usage.

    Most events are relayed as bytes: only the first token's event, events that finish a choice, carry usage
    or an error are parsed. Everything that one read of the upstream socket delivered is forwarded as one
    chunk, so a gateway that falls behind batches more instead of queueing more sends.
    """

    def __init__(self, exchange: Exchange, chat: bool, strip_usage: bool) -> None:
        self.exchange = exchange
        self.chat = chat
        self.strip_usage = strip_usage
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        """The complete events (to forward, as one chunk) in the next bytes of the upstream stream."""
        self._buffer += data
        out: list[bytes] = []
        while True:
            end = self._buffer.find(_EVENT_END)
            if end < 0:
                return b"".join(out)
            event, self._buffer = self._buffer[:end], self._buffer[end + len(_EVENT_END) :]
            forwarded = self._event(event)
            if forwarded is not None:
                out.append(forwarded)

    def flush(self) -> bytes:
        """Whatever trails the last complete event (normally nothing)."""
        rest, self._buffer = self._buffer, b""
        return rest if rest.strip() else b""

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(_DATA):
            return event + _EVENT_END
        payload = event[len(_DATA) :]
        if payload == b"[DONE]":
            return SSE_DONE
        exchange = self.exchange
        if (
            exchange.first_token_at is not None
            and b'"finish_reason":"' not in payload
            and b'"usage":{' not in payload
            and not payload.startswith(b'{"error"')
        ):
            # An ordinary token chunk: count it and pass it on untouched (but for the injected usage field).
            exchange.content_chunks += 1
            if self.strip_usage and payload.endswith(_NULL_USAGE):
                payload = payload[: -len(_NULL_USAGE)] + b"}"
            return _DATA + payload + _EVENT_END
        return self._parsed(event, payload)

    def _parsed(self, event: bytes, payload: bytes) -> bytes | None:
        try:
            obj = json.loads(payload)
        except ValueError:
            return event + _EVENT_END
        if not isinstance(obj, dict):
            return event + _EVENT_END
        if "error" in obj:
            message = (obj.get("error") or {}).get("message") if isinstance(obj.get("error"), dict) else None
            self.exchange.record.error = str(message or "error event in the stream")
            return event + _EVENT_END
        choices = obj.get("choices")
        self.exchange.note_choices(choices, self.chat)
        usage = obj.get("usage")
        if usage is not None:
            self.exchange.note_usage(usage)
        if not self.strip_usage:
            return event + _EVENT_END
        if usage is not None and not choices:
            return None  # the usage chunk the gateway asked for on its own account
        obj.pop("usage", None)
        return sse(obj)


def upstream_error_event(exc: Exception) -> bytes:
    """The error event that ends a stream whose worker went away mid-way."""
    return sse(
        error_body(502, f"the model worker failed mid-stream ({type(exc).__name__})", code="upstream_error")
    )


async def relay(
    response: httpx.Response, sse_filter: SSEFilter, on_error: Any = None, coalesce_s: float = COALESCE_S
) -> AsyncGenerator[bytes, None]:
    """Forward the worker's events; closing the generator closes the upstream request.

    Once tokens flow, a stream sends at most once per `coalesce_s`: the events that arrive meanwhile go out
    together. A fast stream then costs a few socket writes instead of one per token (the first token is
    never held back), which keeps the gateway light when a tenant floods it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for data in response.aiter_raw():
                queue.put_nowait(data)
            queue.put_nowait(None)
        except httpx.TransportError as exc:
            queue.put_nowait(exc)

    reader = loop.create_task(read())
    next_send = 0.0
    try:
        finished = False
        while not finished:
            items = [await queue.get()]
            if sse_filter.exchange.first_token_at is not None and loop.time() < next_send:
                await asyncio.sleep(next_send - loop.time())
            while not queue.empty():
                items.append(queue.get_nowait())
            parts = []
            for item in items:
                if item is None:
                    finished = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    parts.append(item)
            chunk = sse_filter.feed(b"".join(parts))
            if finished:
                chunk += sse_filter.flush()
            if chunk:
                yield chunk
                next_send = loop.time() + coalesce_s
    except httpx.TransportError as exc:
        log.error("worker stream failed: %s", exc)
        sse_filter.exchange.record.error = f"upstream: {type(exc).__name__}: {exc}"
        if on_error is not None:
            on_error()
        yield upstream_error_event(exc)
        yield SSE_DONE
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await response.aclose()
