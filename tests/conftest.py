"""Fixtures shared by every package's tests: an S3-compatible server (moto) on loopback and a fresh bucket.

pytest loads this file for any run under tests/ (the rootdir is the repository root). Each nox session installs
only one package with its test extra, so nothing here may import moto, boto3, s3fs or deepseek_core at module
level: a package whose tests never ask for these fixtures need not have them installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

_SERVER_START_TIMEOUT_S = 60.0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, in its own process group (killed at the end);
    yields its endpoint URL. Needs moto[server] (declared in the test extra of packages whose tests use it)."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"moto server exited with code {proc.returncode} before serving {endpoint} "
                        "(is moto[server] installed?)"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not start on {endpoint} in {_SERVER_START_TIMEOUT_S:.0f}s"
                    ) from None
                time.sleep(0.2)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def s3_bucket_name() -> str:
    """Name of the bucket `s3_bucket` creates; a package's conftest may override it."""
    return "bucket"


@pytest.fixture
def s3_bucket(
    moto_endpoint: str, s3_bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Fake credentials and the moto endpoint in the environment, a fresh DEEPSEEK_CACHE, an emptied server
    holding one empty bucket; returns its URL (``s3://<s3_bucket_name>``)."""
    import urllib.request

    from deepseek_core import storage

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "DEEPSEEK_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("DEEPSEEK_CACHE", str(tmp_path / "cache"))
    reset = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=10).close()
    url = f"s3://{s3_bucket_name}"
    fs, _ = storage._filesystem(url)
    fs.invalidate_cache()  # s3fs caches listings per instance, and instances are shared across tests
    fs.mkdir(s3_bucket_name)
    return url
