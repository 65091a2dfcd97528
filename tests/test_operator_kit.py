"""The operator's kit offline: the Grafana dashboard (deploy/grafana/callstatus.json) and
the alert rules (deploy/k8s/base/shared/prometheusrule.yaml) are well formed, their
PromQL parses (promtool, from Debian's `prometheus` package), and chosen alerts fire on
the series they are written for and not on others (`promtool test rules`).
tests/integration/test_operator_kit.py checks that every metric they name is exported
by a running service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "callstatus.json"
RULES = ROOT / "deploy" / "k8s" / "base" / "shared" / "prometheusrule.yaml"
METRIC = re.compile(r"\bcallstatus_[a-z0-9_]+\b")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text(encoding="utf-8"))["spec"][
        "groups"
    ]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def named_metrics() -> set[str]:
    """Every metric name the dashboard and the alert rules use."""
    exprs = dashboard_exprs() + [a["expr"] for a in alerts()]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] == "callstatus"
    [variable] = dash["templating"]["list"]
    assert variable == {**variable, "name": "datasource", "type": "datasource"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), f"say what {panel['title']!r} shows"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))


def test_dashboard_covers_what_operators_watch() -> None:
    used = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    for metric in (
        "callstatus_ingest_total",  # ingest rate and outcomes
        "callstatus_http_request_duration_seconds_bucket",  # latency
        "callstatus_produce_errors_total",
        "callstatus_processor_lag",
        "callstatus_processor_events_total",  # changes and rejections by reason
        "callstatus_producer_rebuilds_total",
        "callstatus_producer_usable",
    ):
        assert metric in used, f"the dashboard lacks {metric}"


def test_every_alert_has_a_severity_a_summary_and_a_runbook_line() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for alert in alerts():
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], alert["alert"]
        runbook = annotations["runbook"]
        assert "\n" not in runbook.strip() and len(runbook) > 30, alert["alert"]


def test_promql_parses(tmp_path: Path) -> None:
    # The dashboard's queries as recording rules, so promtool parses them too; Grafana's
    # $__rate_interval becomes a fixed window.
    records = [
        {"record": f"dashboard:query_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, expr in enumerate(dashboard_exprs())
    ]
    rules = tmp_path / "rules.yml"
    rules.write_text(
        yaml.safe_dump({"groups": [*rule_groups(), {"name": "dashboard", "rules": records}]})
    )
    proc = subprocess.run(
        [promtool(), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts()) + len(records)} rules found" in proc.stdout


INGEST = 'instance="ingest-0", route="/v1/call-status"'


def fired(alert: str, summary: str) -> dict[str, Any]:
    """An expected firing of ``alert`` on ingest-0, with its rendered summary."""
    [rule] = [a for a in alerts() if a["alert"] == alert]
    annotations = {**rule["annotations"], "summary": summary}
    labels = {"severity": rule["labels"]["severity"], "instance": "ingest-0"}
    return {"exp_labels": labels, "exp_annotations": annotations}


def alert_tests() -> dict[str, Any]:
    """Synthetic series (promtool's notation: start+step x count, one sample a minute)
    of two pods: ingest-0 answers webhooks, processor-0 runs only the processor and so
    has the producer gauge at 0 and no ingest samples. Webhooks on ingest-0 are refused
    from the 10th minute on, and one a minute gets a 500 from the 20th."""
    series = {
        'callstatus_producer_usable{instance="ingest-0"}': "1x9 0x30",
        'callstatus_producer_usable{instance="processor-0"}': "0x40",
        'callstatus_ingest_total{instance="ingest-0", outcome="accepted"}': "0+60x9 540x30",
        'callstatus_ingest_total{instance="ingest-0", outcome="unavailable_producer"}': (
            "0x9 0+60x30"
        ),
        f'callstatus_http_requests_total{{{INGEST}, code="503"}}': "0x9 0+60x30",
        f'callstatus_http_requests_total{{{INGEST}, code="500"}}': "0x19 0+1x20",
    }
    unusable = fired(
        "CallstatusProducerUnusable", "ingest-0: the ingest producer cannot take writes"
    )
    errors = fired("CallstatusServerErrors", "ingest-0 answers 5xx other than 503")
    checks = [
        ("8m", "CallstatusProducerUnusable", []),
        ("16m", "CallstatusProducerUnusable", [unusable]),  # processor-0 stays out
        ("16m", "CallstatusServerErrors", []),  # 503s are not server errors
        ("28m", "CallstatusServerErrors", [errors]),
    ]
    return {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": expected}
                    for at, name, expected in checks
                ],
            }
        ],
    }


def test_alerts_fire_on_their_condition_only(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(alert_tests()))
    proc = subprocess.run(
        [promtool(), "test", "rules", "tests.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
