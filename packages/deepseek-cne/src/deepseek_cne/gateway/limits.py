"""Per-tenant rate limits: requests and tokens per minute, as token buckets; over the limit -> 429 + Retry-After.

Each limit is a bucket holding up to one minute's allowance and refilling continuously. A request needs one
request token and a token bucket that is not in debt; once it finishes, its real usage (prompt + completion
tokens) is taken from the token bucket, which may go negative: the tenant then waits until the debt is
repaid. (The gateway does not tokenize, so the cost of a request is only known when it ends.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from deepseek_core.serving.errors import OpenAIError

from .config import TenantSpec


@dataclass
class Bucket:
    """A token bucket of `per_minute` capacity refilling at per_minute / 60 per second."""

    per_minute: float
    level: float
    updated: float

    @property
    def rate(self) -> float:
        """Refill per second."""
        return self.per_minute / 60.0

    def refill(self, now: float) -> None:
        """Add what accrued since the last update (never above capacity)."""
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until(self, level: float) -> float:
        """Seconds until the bucket holds at least `level` (0 when it already does)."""
        missing = level - self.level
        return 0.0 if missing <= 0 else missing / self.rate


class RateLimiter:
    """The buckets of every tenant; check() before admitting a request, charge_tokens() after it ends."""

    def __init__(self, tenants: dict[str, TenantSpec], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._requests = {
            t.name: Bucket(t.requests_per_minute, t.requests_per_minute, now)
            for t in tenants.values()
            if t.requests_per_minute is not None
        }
        self._tokens = {
            t.name: Bucket(t.tokens_per_minute, t.tokens_per_minute, now)
            for t in tenants.values()
            if t.tokens_per_minute is not None
        }

    def check(self, tenant: str) -> None:
        """Take one request from `tenant`'s allowance, or raise a 429 OpenAIError with Retry-After."""
        now = self._clock()
        requests, tokens = self._requests.get(tenant), self._tokens.get(tenant)
        waits: list[tuple[float, str]] = []
        if requests is not None:
            requests.refill(now)
            if requests.level < 1.0:
                waits.append((requests.seconds_until(1.0), f"{requests.per_minute:g} requests per minute"))
        if tokens is not None:
            tokens.refill(now)
            if tokens.level < 0.0:
                waits.append((tokens.seconds_until(0.0), f"{tokens.per_minute:g} tokens per minute"))
        if waits:
            wait, limit = max(waits)
            retry_after = max(1, math.ceil(wait))
            raise OpenAIError(
                429,
                f"rate limit reached for tenant {tenant!r}: {limit}; retry after {retry_after} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        if requests is not None:
            requests.level -= 1.0

    def charge_tokens(self, tenant: str, count: int) -> None:
        """Take the tokens a finished request used (the bucket may go into debt)."""
        bucket = self._tokens.get(tenant)
        if bucket is None or count <= 0:
            return
        bucket.refill(self._clock())
        bucket.level -= count

    def remaining(self, tenant: str) -> dict[str, float | None]:
        """What is left of each limit now (None: unlimited)."""
        now = self._clock()
        out: dict[str, float | None] = {"requests": None, "tokens": None}
        for key, buckets in (("requests", self._requests), ("tokens", self._tokens)):
            bucket = buckets.get(tenant)
            if bucket is not None:
                bucket.refill(now)
                out[key] = max(0.0, math.floor(bucket.level))
        return out
