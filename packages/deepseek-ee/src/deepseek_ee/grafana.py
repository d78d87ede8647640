"""Grafana dashboard for `deepseek-core serve` metrics, and the metric names its PromQL uses.

Only the server's own metric names (see deepseek_core.serving.metrics) appear in the queries; histograms
are queried through their `_bucket` series. Every query filters on the `model` label through a dashboard
variable, and the Prometheus data source is a variable too, so the JSON imports into any Grafana.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

from deepseek_core.fileio import atomic_write_text

__all__ = ["build_dashboard", "dashboard_metric_names", "promql_metric_names", "write_dashboard"]

DASHBOARD_UID = "deepseek-serving"
_DS = {"type": "prometheus", "uid": "${datasource}"}
_SEL = '{model=~"$model"}'
_RATE = "[$__rate_interval]"


def _quantiles(histogram: str, quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{_SEL}{_RATE})))",
            f"p{round(q * 100)}",
        )
        for q in quantiles
    ]


# (title, unit, [(expr, legend)], description); laid out two per row.
_PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "Time to first token",
        "s",
        _quantiles("deepseek_time_to_first_token_seconds"),
        "From request arrival to the first generated token (includes queueing and prefill).",
    ),
    (
        "Token throughput",
        "short",
        [
            (f"sum(rate(deepseek_generation_tokens_total{_SEL}{_RATE}))", "generated tokens/s"),
            (f"sum(rate(deepseek_prompt_tokens_total{_SEL}{_RATE}))", "prompt tokens/s"),
        ],
        "Tokens per second over all replicas.",
    ),
    (
        "Queue",
        "short",
        [
            (f"sum(deepseek_requests_waiting{_SEL})", "waiting"),
            (f"sum(deepseek_requests_running{_SEL})", "running"),
        ],
        "Requests waiting for a batch slot and requests being generated, over all replicas.",
    ),
    (
        "Queue time",
        "s",
        _quantiles("deepseek_queue_time_seconds", (0.5, 0.95)),
        "Time requests spend waiting before their first scheduling.",
    ),
    (
        "KV-cache usage",
        "percentunit",
        [
            (f"max by (pod) (deepseek_kv_cache_usage_ratio{_SEL})", "{{pod}}"),
        ],
        "Fraction of KV-cache blocks in use, per replica; near 1 means requests queue or get preempted.",
    ),
    (
        "Errors and aborts",
        "reqps",
        [
            (f"sum by (code) (rate(deepseek_request_errors_total{_SEL}{_RATE}))", "errors {{code}}"),
            (
                f'sum(rate(deepseek_requests_finished_total{{model=~"$model", finish_reason="abort"}}{_RATE}))',
                "aborted",
            ),
        ],
        "Failed requests by HTTP status code, and requests aborted (client gone or cancelled).",
    ),
    (
        "Request latency",
        "s",
        [
            (
                f"histogram_quantile(0.95, sum by (le) (rate(deepseek_e2e_request_latency_seconds_bucket{_SEL}{_RATE})))",
                "end-to-end p95",
            ),
            (
                f"histogram_quantile(0.95, sum by (le) (rate(deepseek_inter_token_latency_seconds_bucket{_SEL}{_RATE})))",
                "inter-token p95",
            ),
        ],
        "95th percentile of the whole request and of the gap between generated tokens.",
    ),
    (
        "Finished requests",
        "reqps",
        [
            (
                f"sum by (finish_reason) (rate(deepseek_requests_finished_total{_SEL}{_RATE}))",
                "{{finish_reason}}",
            )
        ],
        "Completed requests per second by finish reason (stop, length, abort).",
    ),
]


def build_dashboard(title: str = "DeepSeek serving", uid: str = DASHBOARD_UID) -> dict[str, Any]:
    """The dashboard as a Grafana JSON model (schemaVersion 39), ready for import or provisioning."""
    panels = []
    for index, (panel_title, unit, queries, description) in enumerate(_PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": panel_title,
                "description": description,
                "datasource": dict(_DS),
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        **({"min": 0, "max": 1} if unit == "percentunit" else {"min": 0}),
                    },
                    "overrides": [],
                },
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": dict(_DS),
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for i, (expr, legend) in enumerate(queries)
                ],
            }
        )
    model_query = "label_values(deepseek_requests_running, model)"
    return {
        "uid": uid,
        "title": title,
        "tags": ["deepseek", "llm", "serving"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": dict(_DS),
                    "definition": model_query,
                    "query": {"query": model_query, "refId": "model"},
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": panels,
    }


def write_dashboard(path: str | os.PathLike[str], dashboard: dict[str, Any] | None = None) -> None:
    """Write the dashboard JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(dashboard or build_dashboard(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- PromQL
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[a-zA-Z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2", "start", "end"}  # fmt: skip
# Grafana's templating helpers are not PromQL; label_values(selector, label) names a series in `selector`.
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:(?P<selector>[^,]*?)\s*,)?\s*(?P<label>\w+)\s*\)")


def promql_metric_names(expr: str) -> set[str]:
    """Metric (series) names an expression reads: identifiers that are neither functions, keywords,
    labels, strings, durations nor Grafana variables."""
    if expr.lstrip().startswith("label_values("):
        match = _LABEL_VALUES.match(expr.strip())
        if match is None:
            raise ValueError(f"cannot parse Grafana query {expr!r}")
        return promql_metric_names(match.group("selector") or "")
    text = _STRING.sub(" ", expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def _queries(node: Any) -> Iterator[str]:
    """Every PromQL expression and templating query anywhere in a dashboard (panels, rows, variables)."""
    if isinstance(node, dict):
        for key, value in node.items():
            is_expr = key == "expr" and isinstance(value, str)
            is_variable_query = key == "query" and isinstance(value, str) and node.get("type") == "query"
            if is_expr or is_variable_query:
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """All metric names read by the dashboard's PromQL expressions and variable queries."""
    names: set[str] = set()
    for query in _queries(dashboard):
        names |= promql_metric_names(query)
    return names
