"""Prometheus metrics of one server (its own CollectorRegistry, every series labelled by `model`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (
    _LATENCY_BUCKETS  # public: other servers over the engine (deepseek-cne's gateway) reuse them
)


class ServerMetrics:
    """The metric families named in the project's contract, bound to one model name."""

    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "deepseek_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(model)
        self.inter_token_latency = Histogram(
            "deepseek_inter_token_latency_seconds",
            "Time between successive generated tokens of a sequence.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        ).labels(model)
        self.e2e_latency = Histogram(
            "deepseek_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(model)
        self.queue_time = Histogram(
            "deepseek_queue_time_seconds",
            "Time a sequence waited before the engine first scheduled it.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(model)
        self.prompt_tokens = Counter(
            "deepseek_prompt_tokens", "Prompt tokens processed (per engine sequence).", ["model"], registry=r
        ).labels(model)
        self.generation_tokens = Counter(
            "deepseek_generation_tokens", "Tokens generated.", ["model"], registry=r
        ).labels(model)
        self._finished = Counter(
            "deepseek_requests_finished",
            "Sequences finished, by finish reason.",
            ["model", "finish_reason"],
            registry=r,
        )
        self._errors = Counter(
            "deepseek_request_errors",
            "HTTP requests answered with an error, by status code.",
            ["model", "code"],
            registry=r,
        )
        self.running = Gauge(
            "deepseek_requests_running", "Sequences the engine is running.", ["model"], registry=r
        ).labels(model)
        self.waiting = Gauge(
            "deepseek_requests_waiting", "Sequences waiting for the engine.", ["model"], registry=r
        ).labels(model)
        self.kv_cache_usage = Gauge(
            "deepseek_kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use (0..1).",
            ["model"],
            registry=r,
        ).labels(model)
        self._stats_source: Callable[[], Any] | None = None
        self.last_token_time = float("-inf")  # perf_counter() of the latest generated token (readiness)

    def finished(self, finish_reason: str | None) -> None:
        """Count one finished sequence."""
        self._finished.labels(self.model, finish_reason or "unknown").inc()

    def error(self, status_code: int) -> None:
        """Count one HTTP error response."""
        self._errors.labels(self.model, str(status_code)).inc()

    def bind_engine_stats(self, source: Callable[[], Any]) -> None:
        """Read the gauges from `source()` (an engine stats object) at every scrape."""
        self._stats_source = source

    def refresh_gauges(self) -> None:
        """Copy running / waiting / kv_cache_usage from the engine's stats into the gauges."""
        if self._stats_source is None:
            return
        stats = self._stats_source()
        self.running.set(float(getattr(stats, "running", 0)))
        self.waiting.set(float(getattr(stats, "waiting", 0)))
        self.kv_cache_usage.set(float(getattr(stats, "kv_cache_usage", 0.0)))

    def render(self) -> bytes:
        """The text exposition format, gauges refreshed first."""
        self.refresh_gauges()
        return generate_latest(self.registry)
