"""A real Prometheus server scrapes /metrics; its query API reports the tokens the client received."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.integration


@pytest.fixture
def prometheus(tmp_path, start_server):  # type: ignore[no-untyped-def]
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the `prometheus` binary is not installed (Debian: apt-get install prometheus; "
            "CI: tools/setup-system.sh)"
        )
    from .conftest import free_port

    server = start_server()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: deepseek\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready in 60s")
        yield server, url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def _query(url: str, expr: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_reads_the_generated_token_count(prometheus) -> None:  # type: ignore[no-untyped-def]
    server, prom = prometheus
    received = 0
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        for i in range(5):
            r = client.completions.create(model="tiny", prompt=f"request {i} :", max_tokens=5 + 3 * i, seed=i)
            received += r.usage.completion_tokens
        stream = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
        received += [c for c in stream][-1].usage.completion_tokens
    assert received > 0
    deadline = time.monotonic() + 60
    value = None
    while time.monotonic() < deadline:
        result = _query(prom, 'deepseek_generation_tokens_total{model="tiny"}')
        if result:
            value = float(result[0]["value"][1])
            if value == received:
                break
        time.sleep(0.5)
    assert value == received, f"prometheus has {value}, the client received {received} tokens"
    # The other families are scraped too, with the model label.
    for name in (
        "deepseek_time_to_first_token_seconds_count",
        "deepseek_kv_cache_usage_ratio",
        "deepseek_requests_finished_total",
    ):
        series = _query(prom, f'{name}{{model="tiny"}}')
        assert series, name
    assert float(_query(prom, 'deepseek_time_to_first_token_seconds_count{model="tiny"}')[0]["value"][1]) == 6
