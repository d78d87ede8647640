"""Grafana dashboard: structure, PromQL metric names, and `deepseek-ee deploy --grafana-dashboard`."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from deepseek_ee.cli import main
from deepseek_ee.grafana import build_dashboard, dashboard_metric_names, promql_metric_names
from prometheus_client.parser import text_string_to_metric_families


def _panels(dashboard):
    return dashboard["panels"]


def _exprs(panel):
    return [t["expr"] for t in panel["targets"]]


def _live_series(base: str) -> set[str]:
    """Every sample name a live server's /metrics exposes (histograms as _bucket/_sum/_count)."""
    text = httpx.get(base + "/metrics", timeout=30).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_promql_metric_is_exposed_by_a_live_server(stdlib_lm, serve_model):
    base = serve_model(stdlib_lm.model_dir)
    ok = httpx.post(
        base + "/v1/completions",
        json={"model": str(stdlib_lm.model_dir), "prompt": "def ", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    bad = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": -1}, timeout=60)
    assert bad.status_code == 400, bad.text  # labelled error series appear once an error was counted

    names = dashboard_metric_names(build_dashboard())
    exposed = _live_series(base)
    assert names <= exposed, (
        f"dashboard queries metrics the server does not expose: {sorted(names - exposed)}"
    )
    # Every required signal is on the dashboard.
    assert {
        "deepseek_time_to_first_token_seconds_bucket",
        "deepseek_generation_tokens_total",
        "deepseek_requests_waiting",
        "deepseek_queue_time_seconds_bucket",
        "deepseek_kv_cache_usage_ratio",
        "deepseek_request_errors_total",
        "deepseek_requests_finished_total",
    } <= names


def test_required_panels_and_queries():
    panels = {p["title"]: p for p in _panels(build_dashboard())}
    ttft = " ".join(_exprs(panels["Time to first token"]))
    assert "histogram_quantile(0.95" in ttft and "deepseek_time_to_first_token_seconds_bucket" in ttft
    assert "sum by (le)" in ttft and panels["Time to first token"]["fieldConfig"]["defaults"]["unit"] == "s"
    assert any("rate(deepseek_generation_tokens_total" in e for e in _exprs(panels["Token throughput"]))
    assert any("deepseek_requests_waiting" in e for e in _exprs(panels["Queue"]))
    assert any("deepseek_queue_time_seconds_bucket" in e for e in _exprs(panels["Queue time"]))
    kv = panels["KV-cache usage"]
    assert any("deepseek_kv_cache_usage_ratio" in e for e in _exprs(kv))
    assert (
        kv["fieldConfig"]["defaults"]["unit"] == "percentunit" and kv["fieldConfig"]["defaults"]["max"] == 1
    )
    errors = _exprs(panels["Errors and aborts"])
    assert any("deepseek_request_errors_total" in e for e in errors)
    assert any("deepseek_requests_finished_total{" in e and 'finish_reason="abort"' in e for e in errors)


def test_dashboard_structure_is_importable():
    dashboard = json.loads(json.dumps(build_dashboard()))  # JSON round trip: plain data only
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["model"]["type"] == "query"
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        assert panel["type"] == "timeseries" and panel["datasource"] == {
            "type": "prometheus",
            "uid": "${datasource}",
        }
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids)
        for expr in _exprs(panel):
            assert 'model=~"$model"' in expr  # every query follows the model selector
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")


@pytest.mark.parametrize(
    "expr,expected",
    [
        ("up", {"up"}),
        ('sum by (code) (rate(foo_total{job="a", code=~"5.."}[5m]))', {"foo_total"}),
        (
            'histogram_quantile(0.9, sum by (le) (rate(lat_bucket{m="bar_total"}[$__rate_interval])))',
            {"lat_bucket"},
        ),
        ("a / on(model) group_left(pod) b offset 1h > bool 1e3", {"a", "b"}),
        ("sum without (instance) (x:recorded:rate5m) and ignoring (job) y", {"x:recorded:rate5m", "y"}),
        ("max_over_time(g[1h:5m]) unless absent(h)", {"g", "h"}),
        ("label_values(deepseek_requests_running, model)", {"deepseek_requests_running"}),
        ('label_values(up{job="x"}, instance)', {"up"}),
        ("label_values(instance)", set()),
        ("rate(c_total[5m]) * 60 + vector(0)", {"c_total"}),
    ],
)
def test_promql_metric_names(expr, expected):
    assert promql_metric_names(expr) == expected


def test_dashboard_metric_names_reads_panels_rows_and_variables():
    dashboard = {
        "templating": {"list": [{"type": "query", "query": "label_values(v_metric, model)"}]},
        "panels": [
            {"targets": [{"expr": "rate(a_total[1m])"}]},
            {"type": "row", "panels": [{"targets": [{"expr": "b_gauge"}]}]},
            {"targets": [{"expr": 'sum(c{label="not_a_metric"})', "legendFormat": "d_not_expr"}]},
        ],
    }
    assert dashboard_metric_names(dashboard) == {"v_metric", "a_total", "b_gauge", "c"}


def test_cli_writes_dashboard_alone(tmp_path):
    target = tmp_path / "dash" / "deepseek.json"
    assert main(["deploy", "--grafana-dashboard", str(target)]) == 0
    assert json.loads(target.read_text()) == build_dashboard()


def test_cli_writes_dashboard_with_a_deployment(tmp_path, capsys):
    target = tmp_path / "deepseek.json"
    argv = ["deploy", "--model", "m", "--name", "chat", "--grafana-dashboard", str(target), "--dry-run"]
    assert main(argv) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert "Deployment" in kinds and "ServiceMonitor" in kinds
    assert json.loads(target.read_text()) == build_dashboard()


def test_cli_reports_an_unwritable_dashboard_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["deploy", "--grafana-dashboard", str(blocker / "dash.json")]) == 1
    assert "--grafana-dashboard" in capsys.readouterr().err
