"""The serverless multi-tenant gateway of the Cloud-Native Edition (`deepseek-cne serve --config cne.yaml`).

One OpenAI-compatible endpoint for many models and many tenants. The gateway process authenticates tenants by
hashed API keys, hides every tenant's private models from the others, applies per-tenant rate limits and
concurrency caps, admits requests fairly into each model's capacity, and forwards them to per-model worker
processes that run deepseek-core's server over the engine. Models load on their first request (from a local
directory or s3:// / gs://) into pre-started warm workers and unload after an idle period (scale to zero).

    from deepseek_cne.gateway import load_config, create_gateway_app, hash_key
"""

from .config import GatewayConfig, ModelSpec, TenantSpec, hash_key, load_config

__all__ = [
    "GatewayConfig",
    "ModelSpec",
    "TenantSpec",
    "create_gateway_app",
    "hash_key",
    "load_config",
    "run_gateway",
]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # Lazy: the config and key hashing need neither FastAPI nor httpx.
    if name == "create_gateway_app":
        from .app import create_gateway_app

        return create_gateway_app
    if name == "run_gateway":
        from .server import run_gateway

        return run_gateway
    raise AttributeError(f"module 'deepseek_cne.gateway' has no attribute {name!r}")
