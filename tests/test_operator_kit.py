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
SHARED = ROOT / "deploy" / "k8s" / "base" / "shared" / "kustomization.yaml"
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


def configured_spool_cap() -> int:
    """CALLSTATUS_SPOOL_MAX_BYTES as the manifests' ConfigMap sets it (tests/test_deploy.py
    checks that it is the service's default and that the volumes exceed it)."""
    shared = yaml.safe_load(SHARED.read_text(encoding="utf-8"))
    [generator] = [g for g in shared["configMapGenerator"] if g["name"] == "callstatus-config"]
    literals = dict(literal.split("=", 1) for literal in generator["literals"])
    return int(literals["CALLSTATUS_SPOOL_MAX_BYTES"])


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
        # the spool row: events, bytes vs cap, oldest age, appends vs drained, tail cuts
        "callstatus_spool_events",
        "callstatus_spool_bytes",
        "callstatus_spool_oldest_age_seconds",
        "callstatus_spool_appends_total",
        "callstatus_spool_drained_total",
        "callstatus_spool_corrupt_bytes_total",
    ):
        assert metric in used, f"the dashboard lacks {metric}"


EVENTS_SELECTOR = re.compile(r"callstatus_processor_events_total\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"')


def test_the_events_counters_label_values_in_the_kit_exist() -> None:
    # A selector on a value the processor never writes matches nothing, silently: an
    # alert on outcome="undecodable" (a reason, not an outcome) never fired.
    from schemas.messages import RejectReason, Source
    from service.fsm import Outcome

    values = {
        "source": {s.value for s in Source} | {""},
        "outcome": {o.value for o in Outcome},
        "reason": {r.value for r in RejectReason} | {""},
    }
    exprs = dashboard_exprs() + [a["expr"] for a in alerts()]
    selectors = [m for expr in exprs for m in EVENTS_SELECTOR.findall(expr)]
    assert any("source" in s for s in selectors), "the reconciler's api events are shown"
    for selector in selectors:
        for label, op, value in MATCHER.findall(selector):
            assert label in values, f"no label {label} on the events counter"
            wanted = value.split("|") if op == "=~" else [value]
            assert set(wanted) <= values[label], f"{label}{op}{value!r} matches nothing"


def test_spool_cap_written_in_the_kit_is_the_configured_one() -> None:
    # The service exports no cap metric, so the filling alert and the dashboard's cap
    # line carry the number: it must follow CALLSTATUS_SPOOL_MAX_BYTES.
    cap = configured_spool_cap()
    [filling] = [a for a in alerts() if a["alert"] == "CallstatusSpoolFilling"]
    assert re.search(r"callstatus_spool_bytes\b.*> 0\.5 \* (\d+)\s*$", filling["expr"].strip())
    assert re.findall(r"> 0\.5 \* (\d+)", filling["expr"]) == [str(cap)]
    [panel] = [p for p in dashboard()["panels"] if p["title"] == "Spool bytes vs cap"]
    exprs = [t["expr"] for t in panel["targets"]]
    assert f"vector({cap})" in exprs
    assert f"vector(0.5 * {cap})" in exprs


def test_spool_alerts_exist() -> None:
    names = {a["alert"]: a for a in alerts()}
    for name, metric in (
        ("CallstatusSpoolFilling", "callstatus_spool_bytes"),
        ("CallstatusSpoolOldEvents", "callstatus_spool_oldest_age_seconds"),
        ("CallstatusSpoolCorruptTail", "callstatus_spool_corrupt_bytes_total"),
        ("CallstatusSpoolNotDraining", "callstatus_spool_drain_stalled"),
        ("CallstatusSpoolDeadLetters", "callstatus_spool_dead_letters_total"),
        ("CallstatusSpoolStranded", "callstatus_spool_events"),
    ):
        assert metric in names[name]["expr"], name
    # With the spool on, an unusable producer means 202s from the spool, not 503s.
    unusable = names["CallstatusProducerUnusable"]["annotations"]["description"]
    assert "spool" in unusable and "503 only" in unusable


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


def fired(alert: str, summary: str, instance: str = "ingest-0") -> dict[str, Any]:
    """An expected firing of ``alert`` on ``instance``, with its rendered summary."""
    [rule] = [a for a in alerts() if a["alert"] == alert]
    annotations = {**rule["annotations"], "summary": summary}
    labels = {"severity": rule["labels"]["severity"], "instance": instance}
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
            promtool_test(series, checks),
            promtool_test(*spool_alert_tests()),
            promtool_test(*drain_alert_tests()),
            promtool_test(*stranded_alert_tests()),
            promtool_test(*accounts_alert_tests()),
            promtool_test(*reconcile_alert_tests()),
        ],
    }


Check = tuple[str, str, list[dict[str, Any]]]


def promtool_test(series: dict[str, str], checks: list[Check]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {"eval_time": at, "alertname": name, "exp_alerts": expected}
            for at, name, expected in checks
        ],
    }


def reconcile_alert_tests() -> tuple[dict[str, str], list[Check]]:
    """processor-0's fetches fail from minute 5 on and nothing is published after; on
    processor-1 some fail but others are published (a few 429s): no alert there."""
    fetches = 'callstatus_reconcile_fetches_total{{instance="{}", trigger="held", outcome="{}"}}'
    series = {
        fetches.format("processor-0", "published"): "0+5x4 20x60",
        fetches.format("processor-0", "failed"): "0x4 0+3x60",
        fetches.format("processor-1", "published"): "0+5x65",
        fetches.format("processor-1", "failed"): "0+1x65",
    }
    failing = fired(
        "CallstatusReconcileFailing",
        "processor-0: reconciliation keeps failing; nothing fetched has been published for "
        "30 minutes",
        "processor-0",
    )
    checks: list[Check] = [
        ("30m", "CallstatusReconcileFailing", []),  # minute 4's publications still count
        ("50m", "CallstatusReconcileFailing", [failing]),  # only processor-0
    ]
    return series, checks


def spool_alert_tests() -> tuple[dict[str, str], list[Check]]:
    """Three pods. Kafka goes away for ingest-0 at minute 5: its spool grows past half
    the cap from minute 8 on and its oldest event ages a minute per minute. ingest-1
    passes half the cap for 3 minutes only (under the 5 min `for`). processor-0 has no
    spool (gauges at 0). Torn tails: ingest-0's container restarts at minute 10 and its
    counter goes 0 -> 4096 on the same instance; ingest-2 is a new pod whose series is
    born at 4096 (the cut happens before the first scrape) -- the case increase() alone
    would miss."""
    cap = configured_spool_cap()
    half = cap // 2
    series = {
        'callstatus_spool_bytes{instance="ingest-0"}': f"0x4 {half // 2}x2 {half + 1}x30",
        'callstatus_spool_bytes{instance="ingest-1"}': f"0x4 {cap}x2 0x30",
        'callstatus_spool_bytes{instance="processor-0"}': "0x40",
        'callstatus_spool_oldest_age_seconds{instance="ingest-0"}': "0x4 0+60x30",
        'callstatus_spool_oldest_age_seconds{instance="ingest-1"}': "0x4 60 120 180 0x30",
        'callstatus_spool_oldest_age_seconds{instance="processor-0"}': "0x40",
        'callstatus_spool_corrupt_bytes_total{instance="ingest-0"}': "0x9 _ 4096x30",
        'callstatus_spool_corrupt_bytes_total{instance="ingest-2"}': "_x10 4096x30",
        'callstatus_spool_corrupt_bytes_total{instance="processor-0"}': "0x40",
    }
    filling = fired(
        "CallstatusSpoolFilling",
        "ingest-0: the spool holds 128Mi" + "B, over half of its cap",
    )
    old = fired(
        "CallstatusSpoolOldEvents", "ingest-0: an accepted event has waited 6m 0s in the spool"
    )
    cut = "the spool cut a torn or corrupt tail at start"
    corrupt = [
        fired("CallstatusSpoolCorruptTail", f"ingest-0: {cut}"),
        fired("CallstatusSpoolCorruptTail", f"ingest-2: {cut}", "ingest-2"),
    ]
    checks: list[Check] = [
        ("12m", "CallstatusSpoolFilling", []),  # over half since minute 8: pending
        ("13m", "CallstatusSpoolFilling", [filling]),  # only ingest-0: 5 min over half
        ("10m", "CallstatusSpoolOldEvents", []),  # 300 s is not over 5 min
        ("11m", "CallstatusSpoolOldEvents", [old]),
        ("9m", "CallstatusSpoolCorruptTail", []),
        ("12m", "CallstatusSpoolCorruptTail", corrupt),  # a cut seen either way
        ("35m", "CallstatusSpoolCorruptTail", []),  # resolves: no new cut for 15 min
    ]
    return series, checks


def drain_alert_tests() -> tuple[dict[str, str], list[Check]]:
    """ingest-0's drain stalls from minute 5 to 12 (the service's gauge, which already
    waited its 30 s); ingest-1's spool waits for Kafka (stalled stays 0: Kafka trouble is
    not a stall). ingest-0 dead-letters one event at minute 8; a new pod's counter that
    stays 0 never fires."""
    dead_letters = 'callstatus_spool_dead_letters_total{{instance="{}", reason="{}"}}'
    series = {
        'callstatus_spool_drain_stalled{instance="ingest-0"}': "0x4 1x6 0x20",
        'callstatus_spool_drain_stalled{instance="ingest-1"}': "0x30",
        dead_letters.format("ingest-0", "MessageSizeTooLargeError"): "0x7 1x30",
        dead_letters.format("ingest-1", "MessageSizeTooLargeError"): "0x30",
    }
    stalled = fired(
        "CallstatusSpoolNotDraining",
        "ingest-0: the spool is not draining while Kafka takes writes",
    )
    dead = fired(
        "CallstatusSpoolDeadLetters",
        "ingest-0: Kafka refused spooled events for good; they are in the dead-letter directory",
    )
    checks: list[Check] = [
        ("4m", "CallstatusSpoolNotDraining", []),
        ("5m", "CallstatusSpoolNotDraining", [stalled]),  # at once: the gauge waited
        ("13m", "CallstatusSpoolNotDraining", []),  # resolves when the drain moves
        ("7m", "CallstatusSpoolDeadLetters", []),
        ("9m", "CallstatusSpoolDeadLetters", [dead]),
        ("30m", "CallstatusSpoolDeadLetters", []),  # no new dead letter for 15 min
    ]
    return series, checks


def stranded(pod: str, events: int) -> dict[str, Any]:
    """An expected firing of CallstatusSpoolStranded for ``pod`` (labels: the pod's, not
    an instance: a recreated pod keeps its name, not its IP), annotations rendered."""
    [rule] = [a for a in alerts() if a["alert"] == "CallstatusSpoolStranded"]
    annotations = {
        key: text.replace("{{ $labels.pod }}", pod).replace("{{ $value }}", str(events))
        for key, text in rule["annotations"].items()
    }
    labels = {"severity": rule["labels"]["severity"], "namespace": "callstatus", "pod": pod}
    return {"exp_labels": labels, "exp_annotations": annotations}


def stranded_alert_tests() -> tuple[dict[str, str], list[Check]]:
    """Spool gauges as the ServiceMonitor labels them (namespace, pod, instance = the
    pod's IP); `stale` is the marker Prometheus writes when a target goes away. Kafka is
    away from minute 5 on and the HPA scales down at minute 10: ingest-7 stops with 40
    events; ingest-6 drained to 0 before it stopped. ingest-5 is recreated under its
    name (a rolling update): its first incarnation stops with 30 events at minute 10,
    the second (a new IP) starts at minute 13 on the same claim, drains it and is
    itself scaled down at minute 37, empty. ingest-0 runs on while Prometheus is down
    from minute 10 to 18 (no samples, no staleness markers: its series goes missing).
    processor-0 has no spool and is replaced at minute 20."""
    events = 'callstatus_spool_events{{namespace="callstatus", pod="{}", instance="{}"}}'
    series = {
        events.format("callstatus-ingest-7", "10.0.0.7:8080"): "0x4 40x5 stale",
        events.format("callstatus-ingest-6", "10.0.0.6:8080"): "0x4 40x2 0x2 stale",
        events.format("callstatus-ingest-5", "10.0.0.5:8080"): "0x4 30x5 stale",
        events.format("callstatus-ingest-5", "10.0.0.15:8080"): "_x13 30x3 0x20 stale",
        events.format("callstatus-ingest-0", "10.0.0.1:8080"): "0x4 40x5 _x8 40x5 0x20",
        events.format("callstatus-processor-0", "10.0.1.1:8080"): "0x19 stale",
    }
    checks: list[Check] = [
        ("24m", "CallstatusSpoolStranded", []),  # gone since minute 10: pending 15 min
        ("26m", "CallstatusSpoolStranded", [stranded("callstatus-ingest-7", 40)]),
        # Only ingest-7: not ingest-6 (drained first), ingest-5 (its last incarnation
        # drained, though the first one's series ends at 30) or ingest-0 (reports again).
        ("60m", "CallstatusSpoolStranded", [stranded("callstatus-ingest-7", 40)]),
        ("24h20m", "CallstatusSpoolStranded", []),  # the 24 h window has passed
    ]
    return series, checks


def accounts_alert_tests() -> tuple[dict[str, str], list[Check]]:
    """ingest-0's accounts file turns invalid at minute 5 and is fixed at minute 15;
    ingest-1 sees one unreadable poll (the gauge is 1 for one sample, under the `for`);
    processor-0 has no accounts file (the gauge stays 0)."""
    series = {
        'callstatus_accounts_file_stale{instance="ingest-0"}': "0x4 1x10 0x20",
        'callstatus_accounts_file_stale{instance="ingest-1"}': "0x4 1 0x25",
        'callstatus_accounts_file_stale{instance="processor-0"}': "0x30",
    }
    stale = fired(
        "CallstatusAccountsFileStale",
        "ingest-0: the accounts file on disk is not loaded; its last good version serves",
    )
    checks: list[Check] = [
        ("5m", "CallstatusAccountsFileStale", []),  # pending: 1m `for`
        ("6m", "CallstatusAccountsFileStale", [stale]),  # only ingest-0
        ("14m", "CallstatusAccountsFileStale", [stale]),
        ("16m", "CallstatusAccountsFileStale", []),  # resolves once a good version loads
    ]
    return series, checks


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
