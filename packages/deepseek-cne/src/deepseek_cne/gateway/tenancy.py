"""Tenants: who a bearer key belongs to, which models a tenant can see, and its usage.

A tenant never learns of another's private models: asking for one gets exactly the 404 of a model that does
not exist, and /v1/models lists only the tenant's own and allowed shared models.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from deepseek_core.serving.auth import bearer_token
from deepseek_core.serving.errors import OpenAIError

from .config import GatewayConfig, TenantSpec


def model_not_found(model: str) -> OpenAIError:
    """The one 404 for a model the caller cannot use, whether it exists for someone else or not at all."""
    return OpenAIError(
        404,
        f"The model {model!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


class TenantDirectory:
    """Maps API keys (by their sha256) to tenants and answers what a tenant may see."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        # Looking up the sha256 of the presented key leaks nothing useful through timing: the digest of an
        # unknown key tells nothing about the stored ones.
        self._by_hash = {h: t for t in config.tenants.values() for h in t.key_hashes}
        self._admin = set(config.admin_key_hashes)
        self._visible = {t.name: frozenset(config.visible_models(t)) for t in config.tenants.values()}

    def authenticate(self, authorization: str | None) -> TenantSpec:
        """The tenant owning the bearer key, or a 401 OpenAIError."""
        token = bearer_token(authorization)
        if token is None:
            raise OpenAIError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        tenant = self._by_hash.get(hashlib.sha256(token.encode("utf-8")).hexdigest())
        if tenant is None:
            raise OpenAIError(401, "incorrect API key provided", code="invalid_api_key")
        return tenant

    def authenticate_admin(self, authorization: str | None) -> None:
        """Pass for an admin key; 401 otherwise (and 404 when no admin key is configured)."""
        if not self._admin:
            raise OpenAIError(404, "admin endpoints are disabled (no admin_api_keys in the configuration)")
        token = bearer_token(authorization)
        if token is None or hashlib.sha256(token.encode("utf-8")).hexdigest() not in self._admin:
            raise OpenAIError(401, "an admin API key is required", code="invalid_api_key")

    def visible(self, tenant: TenantSpec) -> list[str]:
        """Model names `tenant` may use, sorted."""
        return sorted(self._visible[tenant.name])

    def resolve(self, tenant: TenantSpec, model: str) -> str:
        """`model` if `tenant` may use it, else the not-found 404."""
        if model not in self._visible[tenant.name]:
            raise model_not_found(model)
        return model


@dataclass
class ModelUsage:
    """One tenant's use of one model."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class UsageBook:
    """Usage per tenant and model since the gateway started."""

    since: float = field(default_factory=time.time)
    _usage: dict[str, dict[str, ModelUsage]] = field(default_factory=lambda: defaultdict(dict))

    def record(self, tenant: str, model: str, ok: bool, prompt_tokens: int, completion_tokens: int) -> None:
        """Add one finished request."""
        usage = self._usage[tenant].setdefault(model, ModelUsage())
        usage.requests += 1
        usage.errors += 0 if ok else 1
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens

    def report(self, tenant: str) -> dict[str, Any]:
        """The tenant's own usage, per model and in total."""
        rows = []
        totals = ModelUsage()
        for model, u in sorted(self._usage.get(tenant, {}).items()):
            rows.append(
                {
                    "model": model,
                    "requests": u.requests,
                    "errors": u.errors,
                    "prompt_tokens": u.prompt_tokens,
                    "completion_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens,
                }
            )
            totals.requests += u.requests
            totals.errors += u.errors
            totals.prompt_tokens += u.prompt_tokens
            totals.completion_tokens += u.completion_tokens
        return {
            "object": "usage",
            "tenant": tenant,
            "since": int(self.since),
            "data": rows,
            "total": {
                "requests": totals.requests,
                "errors": totals.errors,
                "prompt_tokens": totals.prompt_tokens,
                "completion_tokens": totals.completion_tokens,
                "total_tokens": totals.prompt_tokens + totals.completion_tokens,
            },
        }
