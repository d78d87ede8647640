"""Scale to zero and object storage, against the session's real gateway.

- A model idle for its `idle_timeout_s` is unloaded: its worker process exits and the gateway's process tree
  gives back (at least most of) the weights' memory; the next request loads it again and succeeds.
- A model whose uri is s3:// (moto's S3 server on loopback) is fetched, verified and served.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from .conftest import BIG_IDLE_TIMEOUT_S, GATEWAY_ADMIN_KEY, GatewayProcess

pytestmark = pytest.mark.integration


def _tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants (bytes)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def _complete(
    gateway: GatewayProcess, model: str, tenant: str = "alpha", max_tokens: int = 2
) -> dict[str, Any]:
    with gateway.client(tenant) as c:
        response = c.post(
            "/v1/completions",
            json={"model": model, "prompt": "the model reads", "max_tokens": max_tokens, "temperature": 0},
        )
    assert response.status_code == 200, response.text
    return dict(response.json())


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def test_idle_model_is_unloaded_and_its_memory_released(
    gateway: GatewayProcess, gateway_big_dir: Path
) -> None:
    weights = _weights_bytes(gateway_big_dir)
    assert weights > 150 * 1024**2
    loads_before = gateway.status()["models"]["big"]["loads"]

    _complete(gateway, "big")
    # Keep the model busy (every request resets its idle clock) until the warm pool has replaced the worker the
    # load took: only then is the process tree's memory steady enough to compare.
    deadline = time.monotonic() + 300
    while True:
        _complete(gateway, "big", max_tokens=1)
        status = gateway.status()
        pool, model = status["pool"], status["models"]["big"]
        if len(pool["idle"]) >= pool["size"] and pool["starting"] == 0:
            rss_loaded = _tree_rss(gateway.proc.pid)
            break
        assert time.monotonic() < deadline, f"the warm pool did not settle: {pool}"
        time.sleep(0.3)
    assert model["state"] == "loaded" and model["loads"] == loads_before + 1
    pid = model["pid"]
    assert psutil.pid_exists(pid)

    deadline = time.monotonic() + BIG_IDLE_TIMEOUT_S + 30
    while gateway.status()["models"]["big"]["state"] != "unloaded":
        assert time.monotonic() < deadline, "the idle model was not unloaded"
        time.sleep(0.1)
    # The worker process is gone: its memory went back to the operating system.
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"worker {pid} still running"
        time.sleep(0.05)
    gateway.wait_pool_settled()
    rss_unloaded = _tree_rss(gateway.proc.pid)
    released = rss_loaded - rss_unloaded
    print(f"process tree RSS {rss_loaded / 2**20:.0f} MiB loaded, {rss_unloaded / 2**20:.0f} MiB after unloading "
          f"({released / 2**20:.0f} MiB released; weights {weights / 2**20:.0f} MiB)")  # fmt: skip
    assert released >= 0.7 * weights

    # The next request loads it again (a cold start) and succeeds.
    answer = _complete(gateway, "big", max_tokens=3)
    assert answer["usage"]["completion_tokens"] == 3
    model = gateway.status()["models"]["big"]
    assert model["state"] == "loaded" and model["loads"] == loads_before + 2 and model["pid"] != pid
    with gateway.client(key=GATEWAY_ADMIN_KEY) as c:
        metrics = c.get("/metrics").text
    assert f'deepseek_model_loads_total{{model="big"}} {float(loads_before + 2)}' in metrics
    assert 'deepseek_model_unloads_total{model="big"}' in metrics


def test_model_served_from_s3(gateway: GatewayProcess, gateway_tiny_dir: Path, s3_bucket: str) -> None:
    from deepseek_core import storage
    from deepseek_core.engine import LLM, SamplingParams

    storage.upload_directory(gateway_tiny_dir, storage.url_join(s3_bucket, "gateway-tiny"))
    answer = _complete(gateway, "s3-tiny", max_tokens=6)
    expected = LLM(str(gateway_tiny_dir), kv_cache_bytes=4 * 1024**2).generate(
        ["the model reads"], SamplingParams(max_tokens=6, temperature=0.0)
    )[0]
    assert answer["choices"][0]["text"] == expected.text  # the same weights, fetched from the bucket
    last_load = gateway.status()["models"]["s3-tiny"]["last_load"]
    assert last_load["fetch_s"] > 0


def test_a_crashed_worker_is_replaced_on_the_next_request(gateway: GatewayProcess) -> None:
    _complete(gateway, "alpha-private")
    pid = gateway.status()["models"]["alpha-private"]["pid"]
    psutil.Process(pid).kill()  # the model's worker dies (out of memory, a bug...)
    deadline = time.monotonic() + 30
    while gateway.status()["models"]["alpha-private"]["state"] != "unloaded":
        assert time.monotonic() < deadline, "the gateway did not notice the dead worker"
        time.sleep(0.05)
    answer = _complete(gateway, "alpha-private", max_tokens=3)  # loads it again into a fresh worker
    assert answer["usage"]["completion_tokens"] == 3
    model = gateway.status()["models"]["alpha-private"]
    assert model["state"] == "loaded" and model["pid"] != pid
    assert _complete(gateway, "shared-tiny", tenant="beta")["choices"]  # other models never noticed
