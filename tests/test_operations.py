"""What operators run beside chatd: the alert rules, the Grafana dashboard, compose's
monitoring profile and the systemd unit. Each must load, and name only metrics chatd
serves at /metrics."""

from __future__ import annotations

import configparser
import json
import re

import httpx
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "chatd.json"
# Prometheus's own series, not chatd's.
PROMETHEUS_SERIES = {"up"}
# What a histogram's or a counter's samples add to its name in a query.
SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: identifiers followed by `{`, `[`, `)` or a space
    that are not PromQL functions, keywords or label names."""
    names = set()
    for match in re.finditer(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", expr):
        name = match[1]
        if name.startswith("chatd_") or name in PROMETHEUS_SERIES:
            names.add(name)
    return names


def served(text: str) -> set[str]:
    """Every name /metrics serves, with the suffixes its samples may carry."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            base = line.split()[2]
            names.add(base)
            names.update(base + suffix for suffix in (*SUFFIXES, "_total"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_alert_rules_load_and_cover_what_operators_need() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    exprs = " ".join(rule["expr"] for rule in rules)
    # Slow sends, 1013 overflows, the database unavailable, Redis lost, rate-limit spikes.
    for metric in (
        "chatd_send_seconds_bucket",
        "chatd_queue_overflows_total",
        'chatd_errors_total{code="unavailable"}',
        "chatd_redis_subscription_lost_total",
        "chatd_rate_limited_total",
    ):
        assert metric in exprs, metric


def test_the_dashboard_loads() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "chatd"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(panel["targets"] for panel in dashboard["panels"])


async def test_every_metric_named_is_served(http: httpx.AsyncClient) -> None:
    available = served((await http.get("/metrics")).text)
    named: dict[str, str] = {}
    for rule in alert_rules():
        named.update(dict.fromkeys(metric_names(rule["expr"]), f"alert {rule['alert']}"))
    for expr in dashboard_exprs():
        named.update(dict.fromkeys(metric_names(expr), "the dashboard"))
    assert len(named) >= 10
    missing = {
        name: where
        for name, where in named.items()
        if name not in available and name not in PROMETHEUS_SERIES
    }
    assert not missing, f"named but not served at /metrics: {missing}"


def test_compose_monitoring_profile_and_readiness() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert "/readyz" in " ".join(services["chatd"]["healthcheck"]["test"])
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), (name, source)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert prometheus["scrape_configs"][0]["job_name"] == "chatd"


def test_the_systemd_unit_runs_chatd_serve() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "chatd.service")
    assert unit["Service"]["ExecStart"].split()[1:3] == ["serve", "--host"]
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
