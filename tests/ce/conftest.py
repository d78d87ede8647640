"""Fixtures of the deepseek-ce tests: a small corpus, a byte-level BPE tokenizer trained on it, tiny models."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from deepseek_core import ModelConfig
from deepseek_core.training import train_tokenizer

# Code plus some Chinese, so the tokenizer has merges for both (byte-level BPE covers any text anyway).
CHINESE = "人工智能发展的关键因素是数据、算力和算法。AI发展的关键因素是人才与开放的研究环境。\n"


def _stdlib_text(max_chars: int) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenized-data cache in a temp dir, never the user's ~/.cache."""
    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "deepseek-cache"))


@pytest.fixture(scope="session")
def corpus_text() -> str:
    """About 200 KB of Python source and some Chinese."""
    return _stdlib_text(200_000) + CHINESE * 20


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """The corpus as one .txt file."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """The corpus as .jsonl, one record per ~2 KB chunk, text under "content"."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    chunks = [corpus_text[i : i + 2000] for i in range(0, len(corpus_text), 2000)]
    path.write_text(
        "\n".join(json.dumps({"content": c, "id": i}) for i, c in enumerate(chunks)) + "\n", encoding="utf-8"
    )
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A 512-token byte-level BPE tokenizer trained on the corpus, saved as tokenizer.json + config."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_file, vocab_size=512, output_dir=out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """The session tokenizer (deepseek_core.Tokenizer)."""
    from deepseek_core import Tokenizer

    return Tokenizer.from_pretrained(tokenizer_dir)


def micro_config(vocab_size: int, **overrides) -> ModelConfig:
    """A deepseek-tiny-shaped model small enough for many CPU training steps in a test."""
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    shape.update(overrides)
    return ModelConfig.from_preset("deepseek-tiny", **shape)


# ---------------------------------------------------------------------------------------------- object storage
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's standalone S3 server on loopback, in its own process group, stopped by killing the group."""
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
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def s3(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Credentials and endpoint for moto, a fresh DEEPSEEK_CACHE and an empty bucket; returns s3://bucket."""
    import urllib.request

    from deepseek_core import storage

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "DEEPSEEK_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("DEEPSEEK_CACHE", str(tmp_path / "cache"))
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=10
    ).close()
    fs, _ = storage._filesystem("s3://bucket")
    fs.invalidate_cache()
    fs.mkdir("bucket")
    return "s3://bucket"
