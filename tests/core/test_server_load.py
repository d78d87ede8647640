"""Load on loopback, bounded: many concurrent streams, admission control (429), disconnects free the cache."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.integration

BODY = {
    "model": "tiny",
    "prompt": "prompts come in , completions go out",
    "temperature": 1.0,
    "stream": True,
    "stream_options": {"include_usage": True},
    "ignore_eos": True,
}
AUTH = {"Authorization": "Bearer test-key"}


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    headers: dict | None = None,
    stop_after_chunks: int | None = None,
) -> dict:
    """One streaming completion; returns status, the text, usage and whether [DONE] arrived."""
    result: dict = {"status": None, "text": "", "usage": None, "done": False, "chunks": 0, "headers": {}}
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
        result["status"] = response.status_code
        result["headers"] = dict(response.headers)
        if response.status_code != 200:
            result["error"] = json.loads(await response.aread())
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                result["done"] = True
                break
            chunk = json.loads(data)
            result["chunks"] += 1
            if chunk.get("usage"):
                result["usage"] = chunk["usage"]
            for choice in chunk["choices"]:
                result["text"] += choice["text"]
                result["finish_reason"] = choice.get("finish_reason") or result.get("finish_reason")
            if stop_after_chunks is not None and result["chunks"] >= stop_after_chunks:
                return result  # leaving the context manager closes the connection mid-stream
    return result


def _metric(url: str, name: str, labels: str = 'model="tiny"') -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_metric(
    url: str, name: str, want: float, timeout: float = 10.0, labels: str = 'model="tiny"'
) -> float:
    deadline = time.monotonic() + timeout
    value = _metric(url, name, labels)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.05)
        value = _metric(url, name, labels)
    return value


def test_200_concurrent_streams_all_complete(live_server) -> None:  # type: ignore[no-untyped-def]
    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
            tasks = [
                _stream(client, live_server.url, {**BODY, "max_tokens": 8 + i % 9, "seed": i}, AUTH)
                for i in range(200)
            ]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)

    results = asyncio.run(main())
    assert [r["status"] for r in results] == [200] * 200
    assert all(r["done"] for r in results), "a stream ended without [DONE]"
    assert [r["usage"]["completion_tokens"] for r in results] == [8 + i % 9 for i in range(200)]
    assert all(r["finish_reason"] == "length" for r in results)
    assert _wait_metric(live_server.url, "deepseek_requests_running", 0.0) == 0.0


def test_max_waiting_refuses_the_excess_with_429(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--max-num-seqs", "4", "--max-waiting", "4")

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
            tasks = [_stream(client, server.url, {**BODY, "max_tokens": 120, "seed": i}) for i in range(40)]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)

    results = asyncio.run(main())
    admitted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert len(admitted) + len(refused) == 40
    assert len(admitted) >= 8 and refused, (len(admitted), len(refused))
    for r in refused:
        assert r["headers"]["retry-after"] == "1"
        assert r["error"]["error"]["type"] == "rate_limit_error"
    for r in admitted:  # every admitted request runs to completion
        assert r["done"] and r["usage"]["completion_tokens"] == 120 and r["finish_reason"] == "length"
    errors = _metric(server.url, "deepseek_request_errors_total", 'code="429",model="tiny"')
    assert errors == len(refused)


@pytest.fixture(scope="module")
def abort_server(tmp_path_factory, serving_model_dir):  # type: ignore[no-untyped-def]
    """A server of its own, so the abort counts below are this module's alone."""
    from .conftest import ServerProcess

    tmp = tmp_path_factory.mktemp("abort-server")
    server = ServerProcess(
        [
            "--model",
            str(serving_model_dir),
            "--served-model-name",
            "tiny",
            "--max-num-seqs",
            "64",
            "--log-level",
            "warning",
        ],
        tmp / "server.log",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_disconnected_streams_free_the_kv_cache(abort_server) -> None:  # type: ignore[no-untyped-def]
    server = abort_server
    aborted_before = _metric(
        server.url, "deepseek_requests_finished_total", 'finish_reason="abort",model="tiny"'
    )
    generated_before = _metric(server.url, "deepseek_generation_tokens_total")

    async def main() -> tuple[list[dict], list[dict]]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
            # Long generations (480 tokens) that the clients abandon after two chunks...
            leavers = [
                _stream(client, server.url, {**BODY, "max_tokens": 480, "seed": i}, stop_after_chunks=2)
                for i in range(50)
            ]
            # ...next to short ones that run to completion.
            stayers = [
                _stream(client, server.url, {**BODY, "max_tokens": 24, "seed": 1000 + i}) for i in range(20)
            ]
            gone, done = await asyncio.wait_for(
                asyncio.gather(asyncio.gather(*leavers), asyncio.gather(*stayers)), timeout=300
            )
            return gone, done

    gone, done = asyncio.run(main())
    assert all(r["status"] == 200 and r["chunks"] == 2 and not r["done"] for r in gone)
    assert all(r["done"] and r["usage"]["completion_tokens"] == 24 for r in done)
    # The 50 abandoned requests were aborted (not run to 480 tokens) and their blocks are free again.
    assert _wait_metric(server.url, "deepseek_kv_cache_usage_ratio", 0.0, timeout=5) == 0.0
    assert _metric(server.url, "deepseek_requests_running") == 0.0
    aborted = _wait_metric(
        server.url,
        "deepseek_requests_finished_total",
        aborted_before + 50,
        timeout=5,
        labels='finish_reason="abort",model="tiny"',
    )
    assert aborted == aborted_before + 50
    generated = _metric(server.url, "deepseek_generation_tokens_total") - generated_before
    assert generated < 20 * 24 + 50 * 480 / 2, generated


def test_non_streaming_client_timeout_aborts_its_request(abort_server) -> None:  # type: ignore[no-untyped-def]
    server = abort_server
    labels = 'finish_reason="abort",model="tiny"'
    before = _metric(server.url, "deepseek_requests_finished_total", labels)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 480, "n": 4, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    aborted = _wait_metric(
        server.url, "deepseek_requests_finished_total", before + 4, timeout=10, labels=labels
    )
    assert aborted == before + 4
    assert _wait_metric(server.url, "deepseek_kv_cache_usage_ratio", 0.0, timeout=5) == 0.0
