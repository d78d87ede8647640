"""Fixtures of the deepseek-cne tests: tiny checkpoints, the S3 bucket name (moto itself: tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from deepseek_core import ModelConfig, Transformer, save_model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def s3_bucket_name() -> str:
    """The bucket the root conftest's `s3_bucket` creates: the gateway config's model uris point into it."""
    return "models"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved deepseek-tiny checkpoint (random weights)."""
    torch.manual_seed(0)
    return save_model(
        Transformer(ModelConfig.from_preset("deepseek-tiny")), tmp_path_factory.mktemp("m") / "tiny"
    )


# ---------------------------------------------------------------------------------------------------------------
# Gateway fixtures (tests/cne/test_gateway_*.py): one `deepseek-cne serve --config` over TLS for the session,
# tiny checkpoints with a trained BPE tokenizer, a self-signed certificate, and an admin view of the gateway.
# ---------------------------------------------------------------------------------------------------------------
import contextlib as _gw_contextlib  # noqa: E402
import hashlib as _gw_hashlib  # noqa: E402
import json as _gw_json  # noqa: E402
import ssl as _gw_ssl  # noqa: E402
from typing import Any as _GwAny  # noqa: E402

GATEWAY_KEYS = {
    "alpha": "alpha-secret-key",
    "beta": "beta-secret-key",
    "limited": "limited-secret-key",
    "tokens": "tokens-secret-key",
    "flood": "flood-secret-key",
    "victim": "victim-secret-key",
}
GATEWAY_ADMIN_KEY = "admin-secret-key"
BIG_IDLE_TIMEOUT_S = 1.5


def _sha256(text: str) -> str:
    return _gw_hashlib.sha256(text.encode("utf-8")).hexdigest()


def gateway_tokenizer():  # type: ignore[no-untyped-def]
    """A small byte-level BPE (core's train_tokenizer) on generated text; BOS id 0, EOS id 1."""
    import random

    from deepseek_core.training import train_tokenizer

    words = [
        *[
            "the",
            "model",
            "reads",
            "a",
            "token",
            "and",
            "writes",
            "the",
            "next",
            "one",
            "while",
            "the",
            "cache",
            "keeps",
            "keys",
            "and",
            "values",
        ],
        *[
            "of",
            "every",
            "layer",
            "so",
            "that",
            "a",
            "gateway",
            "can",
            "answer",
            "many",
            "tenants",
            "at",
            "once",
            "with",
            "low",
            "latency",
        ],
    ]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) for _ in range(400)]
    return train_tokenizer(texts, vocab_size=400)


def _gateway_checkpoint(directory: Path, **shape: int) -> Path:
    tokenizer = gateway_tokenizer()
    config = ModelConfig.from_preset(
        "deepseek-tiny",
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        **shape,
    )
    torch.manual_seed(0)
    return save_model(Transformer(config), directory, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def gateway_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama (2 layers, hidden 64) with its tokenizer: the gateway's everyday model."""
    return _gateway_checkpoint(
        tmp_path_factory.mktemp("gw") / "tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def gateway_big_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~50M-parameter model (about 200 MB of float32 weights): big enough to see it leave memory."""
    return _gateway_checkpoint(
        tmp_path_factory.mktemp("gw") / "big",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key (PEM), made with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deepseek-cne test gateway")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class GatewayProcess:
    """`deepseek-cne serve --config` in its own process group, on a free port, with TLS."""

    def __init__(self, config_path: Path, cert: Path, log_path: Path, env: dict[str, str]) -> None:
        """Start it; `env` is the whole environment of the gateway process."""
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.config_path = config_path
        self.cert = cert
        self.log_path = log_path
        self.audit_path = config_path.parent / "audit.jsonl"
        script = Path(sys.executable).parent / "deepseek-cne"
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "deepseek_cne.cli"]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *launcher,
                "serve",
                "--config",
                str(config_path),
                "--port",
                str(self.port),
                "--log-level",
                "info",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"PYTHONUNBUFFERED": "1", **env},
        )

    def ssl_context(self) -> _gw_ssl.SSLContext:
        """A client context trusting only the test certificate."""
        return _gw_ssl.create_default_context(cafile=str(self.cert))

    def client(self, tenant: str | None = None, key: str | None = None, timeout: float = 120.0):  # type: ignore[no-untyped-def]
        """An httpx client for a tenant (by name), an explicit key, or no key."""
        import httpx

        token = key if key is not None else (GATEWAY_KEYS[tenant] if tenant else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), headers=headers, timeout=timeout)

    def log(self) -> str:
        """What the gateway printed so far."""
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, _GwAny]:
        """GET /admin/status."""
        with self.client(key=GATEWAY_ADMIN_KEY) as c:
            response = c.get("/admin/status")
            response.raise_for_status()
            return dict(response.json())

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll /ready (warm pool filled), bounded."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            with _gw_contextlib.suppress(httpx.HTTPError), self.client() as c:
                if c.get("/ready", timeout=5).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"gateway not ready after {timeout}s:\n{self.log()[-4000:]}")

    def wait_pool_settled(self, timeout: float = 300.0) -> None:
        """Until the warm pool is full and no worker is starting (its imports would load the CPU)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pool = self.status()["pool"]
            if len(pool["idle"]) >= pool["size"] and pool["starting"] == 0:
                return
            time.sleep(0.2)
        raise TimeoutError(f"warm pool not settled after {timeout}s: {self.status()['pool']}")

    def stop(self) -> None:
        """SIGTERM (the gateway drains and stops its workers), then kill the whole process group; idempotent."""
        if self.proc.poll() is None:
            with _gw_contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with _gw_contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        with _gw_contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        self.proc.wait(timeout=30)
        self._log.close()


def gateway_config(tiny: Path, big: Path, cert: Path, key: Path) -> dict[str, _GwAny]:
    """The session gateway's cne.yaml (as a dict)."""
    return {
        "host": "127.0.0.1",
        "warm_pool": 2,
        "worker_threads": 1,
        "audit_log": "audit.jsonl",
        "tls": {"cert": str(cert), "key": str(key)},
        "admin_api_keys": [_sha256(GATEWAY_ADMIN_KEY)],
        "models": [
            {
                "name": "shared-tiny",
                "uri": str(tiny),
                "idle_timeout_s": 600,
                "kv_cache_bytes": "4MiB",
                "max_num_seqs": 32,
            },
            {
                "name": "alpha-private",
                "uri": str(tiny),
                "shared": False,
                "idle_timeout_s": 600,
                "kv_cache_bytes": "4MiB",
            },
            {
                "name": "beta-private",
                "uri": str(tiny),
                "shared": False,
                "idle_timeout_s": 600,
                "kv_cache_bytes": "4MiB",
            },
            {
                "name": "fair-tiny",
                "uri": str(tiny),
                "idle_timeout_s": 600,
                "kv_cache_bytes": "8MiB",
                "max_num_seqs": 16,
            },
            {"name": "big", "uri": str(big), "idle_timeout_s": BIG_IDLE_TIMEOUT_S, "kv_cache_bytes": "4MiB"},
            {
                "name": "s3-tiny",
                "uri": "s3://models/gateway-tiny",
                "idle_timeout_s": 600,
                "kv_cache_bytes": "4MiB",
            },
        ],
        "tenants": [
            {"name": "alpha", "api_keys": [_sha256(GATEWAY_KEYS["alpha"])], "models": ["alpha-private"]},
            {
                "name": "beta",
                "api_keys": [_sha256(GATEWAY_KEYS["beta"])],
                "models": ["beta-private"],
                "shared_models": ["shared-tiny"],
            },
            {
                "name": "limited",
                "api_keys": [_sha256(GATEWAY_KEYS["limited"])],
                "shared_models": ["shared-tiny"],
                "requests_per_minute": 3,
            },
            {
                "name": "tokens",
                "api_keys": [_sha256(GATEWAY_KEYS["tokens"])],
                "shared_models": ["shared-tiny"],
                "tokens_per_minute": 60,
            },
            {
                "name": "flood",
                "api_keys": [_sha256(GATEWAY_KEYS["flood"])],
                "shared_models": ["fair-tiny"],
                "max_concurrent": 4,
                "max_queued": 64,
            },
            {
                "name": "victim",
                "api_keys": [_sha256(GATEWAY_KEYS["victim"])],
                "shared_models": ["fair-tiny"],
                "max_concurrent": 4,
            },
        ],
    }


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    gateway_tiny_dir: Path,
    gateway_big_dir: Path,
    tls_files: tuple[Path, Path],
    moto_endpoint: str,
) -> Iterator[GatewayProcess]:
    """The session's gateway: six models, six tenants, TLS, an audit log, S3 on moto; killed at the end."""
    directory = tmp_path_factory.mktemp("gateway")
    config_path = directory / "cne.yaml"
    config_path.write_text(
        _gw_json.dumps(gateway_config(gateway_tiny_dir, gateway_big_dir, *tls_files), indent=1)
    )
    dropped = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "DEEPSEEK_S3_ENDPOINT_URL")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=moto_endpoint,
        DEEPSEEK_CACHE=str(directory / "cache"),
    )
    process = GatewayProcess(config_path, tls_files[0], directory / "gateway.log", env)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
