"""Alerts and dashboard: the seed's alerts, the panels operators need, and metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "gmco-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gmco-overview.json"
SEED_ALERTS = {
    "GmcoRecommendP99OverSLO",  # p99 over the SLO
    "GmcoCacheHitRatioLow",  # cache hit ratio below 90 %
    "GmcoGpuNodeDown",
    "GmcoShardUnderReplicated",  # a shard with fewer than 2 healthy replicas
    "GmcoShardReplicaLagging",
    "GmcoGpuUtilisationLow",
}
# Alerts on the services' own failure counters (tests/deploy/test_deploy_alerts.py unit-tests them all).
INTEGRITY_ALERTS = {
    "GmcoShardPoisonLogEntries",  # gmco_shard_log_entries_skipped_total
    "GmcoShardSnapshotRejected",  # gmco_shard_snapshots_rejected_total
    "GmcoBackgroundJobFailing",  # gmco_background_failures_total
    "GmcoBackgroundTaskDown",  # gmco_background_task_up
}
METRIC = re.compile(r"\b((?:gmco|grpc_server)_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def rules():
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_rules_hold_the_seed_alerts_with_severity_and_summary():
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(alerts) == SEED_ALERTS | INTEGRITY_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "ticket", "info"}, name
        assert rule["annotations"]["summary"] and rule["for"], name
    assert "> 0.1" in alerts["GmcoRecommendP99OverSLO"]["expr"]
    assert "< 0.9" in alerts["GmcoCacheHitRatioLow"]["expr"]
    assert "< 2" in alerts["GmcoShardUnderReplicated"]["expr"]


def test_chart_ships_the_rules_and_dashboard_verbatim(default_objects):
    (rule,) = default_objects.of_kind("PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    dashboard = default_objects.find("ConfigMap", "gmco-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["gmco-overview.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_has_the_operator_panels():
    titles = " | ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for needed in ("qps", "p99", "hit ratio", "latency per stage", "gpu memory", "gpu utilisation",
                   "replica lag"):
        assert needed in titles, needed


def test_every_metric_referenced_is_exported_by_a_service():
    """A renamed metric would silently empty a panel or mute an alert."""
    exported = set()
    for source in [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]:
        exported |= set(re.findall(r"[\"'](gmco_[a-z0-9_]+|grpc_server_[a-z0-9_]+)[\"']", source.read_text()))
    referenced = set()
    for expr in [r["expr"] for r in rules()] + dashboard_exprs():
        for name in METRIC.findall(expr):
            referenced.add(next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name))
    assert referenced and not referenced - exported, f"not exported anywhere: {sorted(referenced - exported)}"
