"""`deepseek-cne serve --config cne.yaml`: the multi-tenant gateway; `deepseek-cne hash-key`: hash an API key.

cne.yaml stores the sha256 of each tenant key, never the key: `deepseek-cne hash-key` reads the key from
stdin (or --key) and prints the digest, the same as `printf %s "$KEY" | sha256sum`.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def register(subparsers: Any) -> None:
    """Add `serve` and `hash-key` to the CLI."""
    p = subparsers.add_parser(
        "serve",
        help="run the serverless multi-tenant OpenAI-compatible gateway",
        description=(
            "Serve every model of cne.yaml to its tenants: hashed API keys, private and shared models, rate limits, "
            "fair scheduling, models loaded on first use into warm workers and unloaded when idle, TLS."
        ),
    )
    p.add_argument("--config", required=True, help="the gateway configuration (cne.yaml)")
    p.add_argument("--host", default=None, help="override cne.yaml's host")
    p.add_argument("--port", type=int, default=None, help="override cne.yaml's port")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default info)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.set_defaults(handler=run)

    h = subparsers.add_parser(
        "hash-key",
        help="print the sha256 of an API key, as cne.yaml's tenants[].api_keys stores it",
        description="Print the sha256 hex digest of an API key (read from stdin, or --key).",
    )
    h.add_argument(
        "--key", default=None, help="the key (default: read it from stdin, or prompt on a terminal)"
    )
    h.set_defaults(handler=run_hash_key)


def run(args: argparse.Namespace) -> int:
    """Load cne.yaml and serve until SIGTERM/SIGINT (0 after a clean drain)."""
    from ..gateway.config import load_config
    from ..gateway.server import run_gateway

    logging.getLogger().setLevel(args.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    config = load_config(args.config)
    if args.host is not None:
        config.host = args.host
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port: must be in 0..65535, got {args.port}")
        config.port = args.port
    scheme = "https" if config.tls is not None else "http"
    print(
        f"deepseek-cne gateway: {len(config.models)} models, {len(config.tenants)} tenants, warm pool "
        f"{config.warm_pool}, on {scheme}://{config.host}:{config.port}",
        file=sys.stderr,
        flush=True,
    )
    run_gateway(config, log_level=args.log_level, access_log=args.access_log)
    return 0


def run_hash_key(args: argparse.Namespace) -> int:
    """Print sha256(key) in hex."""
    from ..gateway.config import hash_key

    key = args.key
    if key is None:
        key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.read().rstrip("\r\n")
    print(hash_key(key))
    return 0
