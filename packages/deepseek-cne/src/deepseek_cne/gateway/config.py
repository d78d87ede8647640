"""cne.yaml: the gateway's models, tenants, limits, warm pool, TLS and audit log, validated with errors naming
the file and field at fault.

    host: 0.0.0.0
    port: 8443
    warm_pool: 2                      # idle pre-started workers (torch and the engine already imported)
    worker_threads: 4                 # torch threads per model worker (default: half the CPUs)
    engine_priority: idle             # CPU priority of the workers' model steps: idle (default) or normal
    audit_log: /var/log/deepseek/audit.jsonl
    tls: {cert: server.crt, key: server.key}
    admin_api_keys: [<sha256 hex>]    # optional: /metrics, /admin/status and /admin/models/{name}/unload
    metrics_public: false             # true: /metrics without a key (only where tenants cannot reach it)
    models:
      - name: coder
        uri: s3://models/deepseek-coder-1.3b      # or a local checkpoint directory
        dtype: bfloat16                            # default: the engine's (float32 on CPU)
        idle_timeout_s: 300                        # unload after this long without requests (null: never)
        shared: true                               # shared models are offered to tenants that allow them
        kv_cache_bytes: 256MiB                     # the KV-cache pool (small = fast cold start)
        max_num_seqs: 16                           # sequences run at once (the fair scheduler's capacity)
      - name: acme-private
        uri: /models/acme-ft
        shared: false                              # private: owned by exactly one tenant
    tenants:
      - name: acme
        api_keys: [<sha256 hex of the key>]        # `deepseek-cne hash-key` prints it
        models: [acme-private]                     # its private models
        shared_models: "*"                         # allowed shared models: "*" (default) or a list
        requests_per_minute: 600                   # null: unlimited
        tokens_per_minute: 200000                  # prompt + completion tokens; null: unlimited
        max_concurrent: 8                          # requests in flight at once; the rest wait in its queue
        max_queued: 128                            # beyond this, 429

API keys are never stored in clear: a tenant lists the sha256 hex digests of its keys.
Relative paths (uri, audit_log, tls) are relative to the directory of the configuration file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepseek_core.engine.priority import check_step_priority
from deepseek_core.errors import ConfigError
from deepseek_core.storage import is_remote

DTYPES = ("auto", "float32", "bfloat16", "float16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
DEFAULT_KV_CACHE_BYTES = 64 * 1024**2


def hash_key(key: str) -> str:
    """The sha256 hex digest of an API key: what cne.yaml stores (`deepseek-cne hash-key` prints it)."""
    if not key:
        raise ValueError("key: must not be empty")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """One servable model."""

    name: str
    uri: str
    dtype: str = "auto"
    idle_timeout_s: float | None = 300.0
    shared: bool = True
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None

    def worker_options(self) -> dict[str, Any]:
        """The engine options a worker needs to load this model (the path is resolved separately)."""
        return {
            "name": self.name,
            "dtype": None if self.dtype == "auto" else self.dtype,
            "kv_cache_bytes": self.kv_cache_bytes,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
        }


@dataclass(frozen=True)
class TenantSpec:
    """One tenant: its hashed keys, its private models, the shared models it may use, and its limits."""

    name: str
    key_hashes: tuple[str, ...]
    private_models: tuple[str, ...] = ()
    shared_models: tuple[str, ...] | None = None  # None: every shared model
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int = 16
    max_queued: int = 128


@dataclass(frozen=True)
class TLSConfig:
    """Certificate and private key files (PEM) for HTTPS."""

    cert: Path
    key: Path


@dataclass
class GatewayConfig:
    """The whole cne.yaml."""

    models: dict[str, ModelSpec]
    tenants: dict[str, TenantSpec]
    host: str = "127.0.0.1"
    port: int = 8000
    warm_pool: int = 1
    worker_threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    # idle: a worker's model steps run only when the host's CPUs have nothing else to do, so the gateway and
    # the workers' request handling never wait behind them (one tenant's flood then barely slows another's
    # first token); normal: steps compete with them (deepseek_core.engine.priority).
    engine_priority: str = "idle"
    audit_log: Path | None = None
    audit_log_include_text: bool = False
    tls: TLSConfig | None = None
    admin_key_hashes: tuple[str, ...] = ()
    metrics_public: bool = False
    drain_timeout_s: float = 30.0
    source: str = "cne.yaml"

    def visible_models(self, tenant: TenantSpec) -> list[str]:
        """Names of the models `tenant` may call: its private ones and the shared ones it allows, sorted."""
        shared = [m.name for m in self.models.values() if m.shared]
        allowed = shared if tenant.shared_models is None else [n for n in tenant.shared_models if n in shared]
        return sorted(set(tenant.private_models) | set(allowed))


# ---------------------------------------------------------------------------------------------- parsing
class _Fields:
    """Reads one mapping of the YAML, naming `where` in every error and refusing unknown keys."""

    def __init__(self, data: Any, where: str, known: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")
        self.data, self.where = data, where

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def string(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.data.get(key, default)
        if value is None:
            if required:
                raise ConfigError(f"{self.where}.{key}: required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.where}.{key}: must be a non-empty string, got {value!r}")
        return value.strip()

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}.{key}: must be true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int, minimum: int) -> int:
        value = self.optional_integer(key, default, minimum)
        if value is None:
            raise ConfigError(f"{self.where}.{key}: must be an integer >= {minimum}, got null")
        return value

    def optional_integer(self, key: str, default: int | None, minimum: int) -> int | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.where}.{key}: must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: float | None, positive: bool = True) -> float | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
            raise ConfigError(f"{self.where}.{key}: must be a number > 0 (or null), got {value!r}")
        return float(value)

    def names(self, key: str) -> tuple[str, ...]:
        value = self.data.get(key) or []
        if isinstance(value, str) or not isinstance(value, list):
            raise ConfigError(f"{self.where}.{key}: must be a list, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.where}.{key}[{i}]: must be a non-empty string, got {item!r}")
        return tuple(value)


def parse_size(value: Any, where: str) -> int:
    """Bytes from an integer or a string such as "64MiB", "1.5GB", "512k"."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, multiplier = float(value), 1
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = (match.group(2) or "B").upper()
        power = 0 if unit == "B" else "KMGT".index(unit[0]) + 1
        multiplier = (1024 if "I" in unit else 1000) ** power
        number = float(match.group(1))
    else:
        raise ConfigError(f'{where}: expected a size in bytes (e.g. 67108864 or "64MiB"), got {value!r}')
    size = int(number * multiplier)
    if size < 1:
        raise ConfigError(f"{where}: must be > 0 bytes, got {value!r}")
    return size


def _key_hashes(values: tuple[str, ...], where: str) -> tuple[str, ...]:
    for i, value in enumerate(values):
        if not _SHA256.match(value):
            raise ConfigError(
                f"{where}[{i}]: must be the sha256 hex digest of the key (64 lowercase hex characters), not the "
                'key itself; print it with `deepseek-cne hash-key` or `printf %s "$KEY" | sha256sum`'
            )
    return values


def _path(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path)


def _model(data: Any, where: str, base: Path) -> ModelSpec:
    f = _Fields(
        data,
        where,
        (
            "name",
            "uri",
            "dtype",
            "idle_timeout_s",
            "shared",
            "kv_cache_bytes",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ),
    )
    name = f.string("name", required=True)
    assert name is not None
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} is not a valid model name (letters, digits, . _ : / -)")
    uri = f.string("uri", required=True)
    assert uri is not None
    if not is_remote(uri):
        if "://" in uri and not uri.startswith("file://"):
            raise ConfigError(
                f"{where}.uri: unsupported scheme in {uri!r} (use a local path, s3:// or gs://)"
            )
        local = _path(base, uri.removeprefix("file://"))
        if not (local / "config.json").is_file():
            raise ConfigError(f"{where}.uri: {local} is not a checkpoint directory (no config.json)")
        uri = str(local)
    dtype = f.string("dtype", "auto")
    if dtype not in DTYPES:
        raise ConfigError(f"{where}.dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kv = parse_size(f.raw("kv_cache_bytes", DEFAULT_KV_CACHE_BYTES), f"{where}.kv_cache_bytes")
    return ModelSpec(
        name=name,
        uri=uri,
        dtype=str(dtype),
        idle_timeout_s=f.number("idle_timeout_s", 300.0),
        shared=f.boolean("shared", True),
        kv_cache_bytes=kv,
        max_num_seqs=f.integer("max_num_seqs", 16, 1),
        max_num_batched_tokens=f.integer("max_num_batched_tokens", 2048, 1),
        max_model_len=f.optional_integer("max_model_len", None, 1),
    )


def _tenant(data: Any, where: str) -> TenantSpec:
    f = _Fields(
        data,
        where,
        (
            "name",
            "api_keys",
            "models",
            "shared_models",
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrent",
            "max_queued",
        ),
    )
    name = f.string("name", required=True)
    assert name is not None
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} is not a valid tenant name (letters, digits, . _ : / -)")
    keys = _key_hashes(f.names("api_keys"), f"{where}.api_keys")
    if not keys:
        raise ConfigError(f"{where}.api_keys: a tenant needs at least one (hashed) API key")
    shared_raw = f.raw("shared_models", "*")
    shared: tuple[str, ...] | None
    if shared_raw == "*" or shared_raw is None:
        shared = None
    else:
        shared = f.names("shared_models")
    return TenantSpec(
        name=name,
        key_hashes=keys,
        private_models=f.names("models"),
        shared_models=shared,
        requests_per_minute=f.number("requests_per_minute", None),
        tokens_per_minute=f.number("tokens_per_minute", None),
        max_concurrent=f.integer("max_concurrent", 16, 1),
        max_queued=f.integer("max_queued", 128, 0),
    )


def config_from_dict(data: Any, source: str = "cne.yaml", base_dir: Path | None = None) -> GatewayConfig:
    """Validate a parsed cne.yaml; every error names `source` and the field."""
    base = base_dir or Path.cwd()
    f = _Fields(
        data,
        source,
        (
            "host",
            "port",
            "warm_pool",
            "worker_threads",
            "engine_priority",
            "audit_log",
            "audit_log_include_text",
            "tls",
            "admin_api_keys",
            "metrics_public",
            "drain_timeout_s",
            "models",
            "tenants",
        ),
    )
    raw_models = f.raw("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{source}: models: must be a non-empty list")
    models: dict[str, ModelSpec] = {}
    for i, item in enumerate(raw_models):
        spec = _model(item, f"{source}: models[{i}]", base)
        if spec.name in models:
            raise ConfigError(f"{source}: models[{i}].name: {spec.name!r} is defined twice")
        models[spec.name] = spec
    raw_tenants = f.raw("tenants")
    if not isinstance(raw_tenants, list) or not raw_tenants:
        raise ConfigError(f"{source}: tenants: must be a non-empty list")
    tenants: dict[str, TenantSpec] = {}
    owner: dict[str, str] = {}
    key_owner: dict[str, str] = {}
    for i, item in enumerate(raw_tenants):
        where = f"{source}: tenants[{i}]"
        tenant = _tenant(item, where)
        if tenant.name in tenants:
            raise ConfigError(f"{where}.name: {tenant.name!r} is defined twice")
        for j, name in enumerate(tenant.private_models):
            if name not in models:
                raise ConfigError(f"{where}.models[{j}]: no model named {name!r} in models")
            if models[name].shared:
                raise ConfigError(
                    f"{where}.models[{j}]: {name!r} is shared; list shared models under shared_models "
                    "(models lists a tenant's private models)"
                )
            if name in owner:
                raise ConfigError(
                    f"{where}.models[{j}]: {name!r} is already private to tenant {owner[name]!r}"
                )
            owner[name] = tenant.name
        for j, name in enumerate(tenant.shared_models or ()):
            if name not in models:
                raise ConfigError(f"{where}.shared_models[{j}]: no model named {name!r} in models")
            if not models[name].shared:
                raise ConfigError(f"{where}.shared_models[{j}]: {name!r} is private (shared: false)")
        for j, digest in enumerate(tenant.key_hashes):
            if digest in key_owner:
                raise ConfigError(
                    f"{where}.api_keys[{j}]: the same key is already given to {key_owner[digest]!r}"
                )
            key_owner[digest] = tenant.name
        tenants[tenant.name] = tenant
    for name, spec in models.items():
        if not spec.shared and name not in owner:
            raise ConfigError(
                f"{source}: model {name!r} is private (shared: false) but no tenant lists it under models"
            )
    tls = None
    if f.raw("tls") is not None:
        t = _Fields(f.raw("tls"), f"{source}: tls", ("cert", "key"))
        cert, key = (
            _path(base, t.string("cert", required=True) or ""),
            _path(base, t.string("key", required=True) or ""),
        )
        for label, p in (("cert", cert), ("key", key)):
            if not p.is_file():
                raise ConfigError(f"{source}: tls.{label}: {p} does not exist")
        tls = TLSConfig(cert=cert, key=key)
    audit = f.string("audit_log")
    engine_priority = f.string("engine_priority", "idle") or "idle"
    try:
        check_step_priority(engine_priority, f"{source}: engine_priority")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    port = f.integer("port", 8000, 0)
    if port > 65535:
        raise ConfigError(f"{source}: port: must be <= 65535, got {port}")
    return GatewayConfig(
        models=models,
        tenants=tenants,
        host=f.string("host", "127.0.0.1") or "127.0.0.1",
        port=port,
        warm_pool=f.integer("warm_pool", 1, 0),
        worker_threads=f.integer("worker_threads", max(1, (os.cpu_count() or 2) // 2), 1),
        engine_priority=engine_priority,
        audit_log=_path(base, audit) if audit else None,
        audit_log_include_text=f.boolean("audit_log_include_text", False),
        tls=tls,
        admin_key_hashes=_key_hashes(f.names("admin_api_keys"), f"{source}: admin_api_keys"),
        metrics_public=f.boolean("metrics_public", False),
        drain_timeout_s=float(f.number("drain_timeout_s", 30.0) or 30.0),
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate cne.yaml (ConfigError naming the file and field on bad input)."""
    import yaml

    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    return config_from_dict(data, source=str(p), base_dir=p.resolve().parent)
