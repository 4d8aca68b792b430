"""The Prometheus alert rules and the Grafana dashboard in deploy/ use only metrics the code
registers (ingest/metrics.py), and have the shape their tools expect."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from ingest import metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ingest.json"
# Suffixes Prometheus adds to a metric family's samples.
_SAMPLE_SUFFIX = re.compile(r"_(total|bucket|count|sum|created)$")


def registered_metric_names() -> set[str]:
    """Family names (no ``_total``) of every metric object ingest.metrics defines."""
    return {
        family.name
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    }


def metric_names_in(expr: str) -> set[str]:
    return {_SAMPLE_SUFFIX.sub("", name) for name in re.findall(r"\bingest_[a-z_]+", expr)}


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _panels() -> list[dict[str, Any]]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # rows hold their own when collapsed
    return panels


def test_the_registered_names_are_read_from_the_module() -> None:
    names = registered_metric_names()
    assert {"ingest_downloads", "ingest_media_at_risk", "ingest_receipt_to_stored_seconds"} <= names
    assert metric_names_in("rate(ingest_downloads_total[5m]) + ingest_x_bucket") == {
        "ingest_downloads",
        "ingest_x",
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None
    subprocess.run([promtool, "check", "rules", str(ALERTS)], check=True)


def test_every_rule_is_a_complete_alert() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert document["groups"]
    for group in document["groups"]:
        assert group["name"]
        assert group["rules"], group["name"]
    alerts = [rule["alert"] for rule in _rules()]
    assert len(alerts) == len(set(alerts))
    for rule in _rules():
        assert rule["alert"]
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_the_alerts_cover_the_backlog_failures_and_dependencies() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in _rules()}
    joined = "\n".join(exprs.values())
    assert 'ingest_media_at_risk{within="24h"}' in joined
    assert 'ingest_media_at_risk{within="1h"}' in joined
    assert 'ingest_downloads_total{outcome="failed"}' in joined
    assert "ingest_oldest_pending_seconds) > 600" in joined
    assert "ingest_error_budget_blocked_total" in joined
    assert "ingest_dependency_up) == 0" in joined
    assert 'ingest_callback_deliveries_total{outcome="failed"}' in joined
    consuming = [e for e in exprs.values() if "ingest_queue_depth" in e]
    assert consuming and "rate(ingest_downloads_total[10m])) == 0" in consuming[0]
    severities = {rule["labels"]["severity"] for rule in _rules() if "1h" in rule["expr"]}
    assert severities == {"critical"}


def test_the_rules_use_only_registered_metrics() -> None:
    known = registered_metric_names()
    for rule in _rules():
        used = metric_names_in(rule["expr"])
        assert used, rule["alert"]
        assert used <= known, (rule["alert"], used - known)


def test_the_dashboard_is_a_grafana_model_on_a_prometheus_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in _panels()]
    assert len(ids) == len(set(ids))


def test_the_dashboard_uses_only_registered_metrics() -> None:
    known = registered_metric_names()
    seen: set[str] = set()
    for panel in _panels():
        for target in panel.get("targets", []):
            used = metric_names_in(target["expr"])
            assert used, panel["title"]
            assert used <= known, (panel["title"], used - known)
            seen |= used
    assert {
        "ingest_media_items",
        "ingest_media_at_risk",
        "ingest_oldest_pending_seconds",
        "ingest_queue_depth",
        "ingest_receipt_to_stored_seconds",
        "ingest_downloads",
        "ingest_provider_errors",
        "ingest_error_budget_blocked",
        "ingest_lease_losses",
        "ingest_dependency_up",
    } <= seen


def test_the_latency_panel_shows_three_quantiles_of_the_histogram() -> None:
    exprs = [t["expr"] for p in _panels() for t in p.get("targets", [])]
    quantiles = [e for e in exprs if "ingest_receipt_to_stored_seconds_bucket" in e]
    assert {re.search(r"histogram_quantile\((0\.\d+)", e).group(1) for e in quantiles} == {  # type: ignore[union-attr]
        "0.5",
        "0.95",
        "0.99",
    }
