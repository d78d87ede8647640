"""The gateway's relay of a worker's event stream: accounting, removal of the injected usage, write coalescing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from deepseek_cne.gateway.config import TenantSpec
from deepseek_cne.gateway.limits import RateLimiter
from deepseek_cne.gateway.metrics import GatewayMetrics
from deepseek_cne.gateway.models import ModelManager
from deepseek_cne.gateway.pool import WorkerPool
from deepseek_cne.gateway.proxy import Exchange, Services, SSEFilter, relay
from deepseek_cne.gateway.scheduler import FairScheduler
from deepseek_cne.gateway.tenancy import UsageBook
from deepseek_core.serving.audit import AuditRecord
from deepseek_core.serving.formatting import SSE_DONE, sse


def _exchange(tmp_path: Path) -> Exchange:
    tenants = {"t": TenantSpec(name="t", key_hashes=("0" * 64,), tokens_per_minute=1000)}
    metrics = GatewayMetrics()
    services = Services(
        scheduler=FairScheduler({"m": 4}, tenants),
        models=ModelManager({}, WorkerPool(0, tmp_path, 1), metrics),
        limiter=RateLimiter(tenants),
        usage=UsageBook(),
        metrics=metrics,
    )
    return Exchange(services, "t", "m", time.perf_counter(), AuditRecord())


def _chunk(text: str, finish: str | None = None, with_usage_field: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "system_fingerprint": None,
    }
    if with_usage_field:
        body["usage"] = None
    return body


def _usage_chunk() -> dict[str, Any]:
    body = _chunk("")
    body["choices"] = []
    body["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return body


def _events(data: bytes) -> list[Any]:
    out = []
    for block in data.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def test_injected_usage_is_accounted_and_removed(tmp_path: Path) -> None:
    exchange = _exchange(tmp_path)
    stream = sse(_chunk("Hel")) + sse(_chunk("lo", finish="length")) + sse(_usage_chunk()) + SSE_DONE
    sse_filter = SSEFilter(exchange, chat=False, strip_usage=True)
    out = b"".join(sse_filter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))  # split anywhere
    events = _events(out)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Hel", "lo"]  # the usage-only chunk is gone
    assert all("usage" not in e for e in events[:-1])
    assert exchange.first_token_at is not None and exchange.finish_reasons == ["length"]
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (3, 2)
    exchange.finish(ok=True)
    assert exchange.services.usage.report("t")["total"]["total_tokens"] == 5
    assert exchange.services.limiter.remaining("t")["tokens"] == 995


def test_asked_for_usage_passes_through_untouched(tmp_path: Path) -> None:
    exchange = _exchange(tmp_path)
    stream = sse(_chunk("a")) + sse(_usage_chunk()) + SSE_DONE
    out = SSEFilter(exchange, chat=False, strip_usage=False).feed(stream)
    assert out == stream
    assert exchange.completion_tokens == 2


class _SlowStream(httpx.AsyncByteStream):
    """Events arriving a millisecond apart, as a fast model produces them."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            await asyncio.sleep(0.001)
            yield event

    async def aclose(self) -> None:
        pass


def test_relay_sends_the_first_token_at_once_and_coalesces_the_rest(tmp_path: Path) -> None:
    events = [
        sse(_chunk(f"t{i}", finish="length" if i == 29 else None, with_usage_field=False)) for i in range(30)
    ]
    events.append(SSE_DONE)

    async def run() -> list[bytes]:
        exchange = _exchange(tmp_path)
        response = httpx.Response(200, stream=_SlowStream(events))
        return [chunk async for chunk in relay(response, SSEFilter(exchange, False, False), coalesce_s=0.05)]

    chunks = asyncio.run(run())
    assert b"".join(chunks) == b"".join(events)  # every byte, in order
    assert _events(chunks[0]) == [json.loads(events[0][6:])]  # the first token went out alone, at once
    assert len(chunks) < len(events) / 2  # the rest went out in batches
