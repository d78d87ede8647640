"""SIGTERM drains: in-flight streams complete, new requests are refused, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.integration


def test_sigterm_finishes_in_flight_streams_and_exits_0(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--drain-timeout", "120")
    started = threading.Event()
    first_chunks = 0
    lock = threading.Lock()

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        nonlocal first_chunks
        body = {
            "model": "tiny",
            "prompt": "metrics count them all",
            "max_tokens": 160,
            "ignore_eos": True,
            "seed": i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        out: dict = {"done": False, "usage": None, "text": ""}
        async with client.stream("POST", server.url + "/v1/completions", json=body) as response:
            out["status"] = response.status_code
            counted = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if not counted:
                    counted = True
                    with lock:
                        first_chunks += 1
                        if first_chunks == 20:
                            started.set()
                data = line[6:]
                if data == "[DONE]":
                    out["done"] = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    out["usage"] = chunk["usage"]
                for c in chunk["choices"]:
                    out["text"] += c["text"]
                    out["finish_reason"] = c["finish_reason"] or out.get("finish_reason")
        return out

    async def clients() -> list[dict]:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(20))), timeout=240)

    results: list[dict] = []
    runner = threading.Thread(target=lambda: results.extend(asyncio.run(clients())), daemon=True)
    runner.start()
    assert started.wait(timeout=120), "the 20 streams did not start"
    server.signal(signal.SIGTERM)
    # New work is refused while draining: 503 from the app, or no connection once the socket is closed.
    refused = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(refused) < 3:
        try:
            r = httpx.post(
                server.url + "/v1/completions",
                json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                timeout=10,
            )
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "shutting_down"
            refused.append(503)
        except httpx.TransportError:  # connection refused / reset: the listener is closed
            refused.append("refused")
        time.sleep(0.05)
    assert refused
    runner.join(timeout=240)
    assert not runner.is_alive()
    assert len(results) == 20
    for r in results:
        assert r["status"] == 200 and r["done"], r
        assert r["usage"]["completion_tokens"] == 160 and r["finish_reason"] == "length"
    assert server.proc.wait(timeout=60) == 0, server.log()[-3000:]
