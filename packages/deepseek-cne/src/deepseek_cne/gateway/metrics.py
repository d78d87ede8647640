"""The gateway's Prometheus metrics: core's serving series labelled by `model` AND `tenant`, plus scale-to-zero.

Label values are always names from cne.yaml (or "-" for a request without a known tenant or model), never
text from the request, so a client cannot blow up the number of series.
"""

from __future__ import annotations

from deepseek_core.serving.metrics import CONTENT_TYPE, LATENCY_BUCKETS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

_TENANT_MODEL = ["tenant", "model"]


class GatewayMetrics:
    """Per-tenant request, token and latency series; model load/unload series."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        self.time_to_first_token = Histogram(
            "deepseek_time_to_first_token_seconds",
            "Time from request arrival at the gateway to its first generated token (queueing and cold start included).",
            _TENANT_MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "deepseek_e2e_request_latency_seconds",
            "Time from request arrival at the gateway to its last byte.",
            _TENANT_MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "deepseek_queue_time_seconds",
            "Time a request waited in its tenant's queue for the model's capacity.",
            _TENANT_MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "deepseek_prompt_tokens", "Prompt tokens processed.", _TENANT_MODEL, registry=r
        )
        self.generation_tokens = Counter(
            "deepseek_generation_tokens", "Tokens generated.", _TENANT_MODEL, registry=r
        )
        self.requests = Counter(
            "deepseek_tenant_requests",
            "HTTP requests by tenant, model and status code.",
            ["tenant", "model", "code"],
            registry=r,
        )
        self.errors = Counter(
            "deepseek_request_errors",
            "HTTP requests answered with an error, by status code.",
            ["tenant", "model", "code"],
            registry=r,
        )
        self.rate_limited = Counter(
            "deepseek_rate_limited_requests",
            "Requests refused with 429, by limit (requests, tokens, queue).",
            ["tenant", "limit"],
            registry=r,
        )
        self.running = Gauge(
            "deepseek_requests_running", "Requests admitted and running.", _TENANT_MODEL, registry=r
        )
        self.waiting = Gauge(
            "deepseek_requests_waiting",
            "Requests waiting in their tenant's queue.",
            _TENANT_MODEL,
            registry=r,
        )
        self.loaded = Gauge(
            "deepseek_model_loaded", "1 while the model is loaded in a worker.", ["model"], registry=r
        )
        self.cold_starts = Counter(
            "deepseek_model_loads", "Model loads (cold starts).", ["model"], registry=r
        )
        self.unloads = Counter(
            "deepseek_model_unloads", "Model unloads (scale to zero).", ["model"], registry=r
        )
        self.load_time = Histogram(
            "deepseek_model_load_seconds",
            "Time to load a model into a worker (fetch, worker hand-out, weights, KV cache, app).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.warm_workers = Gauge(
            "deepseek_warm_workers", "Idle pre-started workers in the pool.", registry=r
        )

    def model_loaded(self, model: str, seconds: float) -> None:
        """Count a cold start."""
        self.cold_starts.labels(model).inc()
        self.load_time.labels(model).observe(seconds)
        self.loaded.labels(model).set(1)

    def model_unloaded(self, model: str) -> None:
        """Count an unload."""
        self.unloads.labels(model).inc()
        self.loaded.labels(model).set(0)

    def render(self) -> bytes:
        """Text exposition."""
        return generate_latest(self.registry)
