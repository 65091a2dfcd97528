"""The bench's table and the README section made from a results.json (bench/report.py):
the issue's ratios and verdicts come out right, wrk near its limit is flagged, and the
README is rewritten between its markers only, never from a smoke run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.report import BARE, BEGIN, END, GO_PEER, SERVICE_ALL, SERVICE_INGEST


def _closed(rate: float, cpu_us: float, share: float = 0.2) -> dict[str, Any]:
    return {
        "rounds": [{}, {}, {}],
        "throughput": rate,
        "throughput_min": rate * 0.9,
        "throughput_max": rate * 1.1,
        "cpu_us_per_request": cpu_us,
        "cpu_us_per_request_min": cpu_us * 0.95,
        "cpu_us_per_request_max": cpu_us * 1.05,
        "server_cores": 0.9,
        "generator_cores": share,
        "generator_share_max": share,
        "generator_threads": 1,
        "requests": 1000,
        "codes": {"202": 1000},
        "success": 1.0,
        "p50_ms": 3.0,
        "p99_ms": 12.0,
        "load_average": 1.0,
    }


def results(service_cpu: float, go_cpu: float, wrk_share: float = 0.2) -> dict[str, Any]:
    return {
        "smoke": False,
        "finished_at": "2026-12-01 16:00 UTC",
        "machine": {
            "cpus": 2,
            "cpu": "Test CPU",
            "python": "3.11.7",
            "load_average_at_start": [0.5, 0.5, 0.5],
            "load_average_at_end": [0.7, 0.6, 0.5],
            "commit": "abc1234",
            "branch": "main",
            "dirty": False,
        },
        "config": {
            "closed_rounds": 3,
            "closed_s": 8,
            "closed_workers": 64,
            "closed_generator": "wrk debian/4.1.0",
            "closed_generator_threads": 1,
            "open_generator": "vegeta v12.13.0",
            "open_loop_connections": 128,
        },
        "closed_loop": {
            SERVICE_INGEST: _closed(7000, service_cpu),
            SERVICE_ALL: _closed(4000, 200),
            GO_PEER: _closed(20000, go_cpu, wrk_share),
            BARE: _closed(25000, 30),
        },
        "open_loop": {
            SERVICE_INGEST: [
                {
                    "offered": 3500,
                    "throughput": 3500,
                    "p50_ms": 2.0,
                    "p99_ms": 20.0,
                    "success": 1.0,
                }
            ]
        },
        "kafka_loop_msgs_per_s": 50000,
        "handler": {"ingest_us": 30.0, "bare_us": 7.0},
        "processor": {
            "events": 90000,
            "calls": 25000,
            "rounds": [{}, {}, {}],
            "events_per_s": 21000,
            "events_per_s_min": 19000,
            "events_per_s_max": 22000,
            "cpu_us_per_event": 40.0,
            "cpu_us_per_event_min": 39.0,
            "cpu_us_per_event_max": 42.0,
            "changes": 3,
            "expected_changes": 3,
            "state_bytes_per_call": 100.0,
        },
        "end_to_end": [],
        "memory_bytes_per_call": {"1000": 200.0},
    }


def _row(r: dict[str, Any], starts: str) -> report.Row:
    (row,) = [x for x in report.rows(r) if x.figure.startswith(starts)]
    return row


def test_the_cpu_ratio_to_the_go_peer_is_judged_against_two() -> None:
    over = _row(results(service_cpu=110, go_cpu=50), SERVICE_INGEST + " ")
    assert "2.20x Go peer" in over.ratio and over.target.endswith("✗")
    under = _row(results(service_cpu=95, go_cpu=50), SERVICE_INGEST + " ")
    assert "1.90x Go peer" in under.ratio and under.target.endswith("✓")
    # Median and spread both shown, and the generator's CPU beside the server's.
    assert "7,000 req/s (6,300-7,700)" in under.value and "wrk 0.20 cores" in under.value


def test_wrk_near_its_limit_is_flagged() -> None:
    assert "⚠" not in _row(results(95, 50, wrk_share=0.5), GO_PEER).value
    assert "⚠ wrk near its limit" in _row(results(95, 50, wrk_share=0.8), GO_PEER).value


def test_the_processor_is_judged_by_its_median() -> None:
    row = _row(results(95, 50), "processor, exactly-once")
    assert row.value.startswith("21,000 events/s (19,000-22,000)") and row.target.endswith("✓")


def test_the_machine_and_the_generators_are_named() -> None:
    table = report.table(results(95, 50))
    assert "2 CPUs (Test CPU)" in table and "main at abc1234" in table
    assert "wrk debian/4.1.0 -t1 -c64, 3 rounds of 8 s" in table and "vegeta v12.13.0" in table


def test_the_readme_is_rewritten_between_its_markers_only(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{BEGIN}\nold figures\n{END}\nafter\n")
    report.rewrite_readme(readme, results(95, 50))
    text = readme.read_text()
    assert text.startswith(f"before\n{BEGIN}\n") and text.endswith(f"\n{END}\nafter\n")
    assert "old figures" not in text
    assert report.table(results(95, 50)) in text
    assert "1.90x** (target ≤ 2x): **met**" in text
    # Twice gives the same text: the markers survive a rewrite.
    report.rewrite_readme(readme, results(95, 50))
    assert readme.read_text() == text


def test_a_readme_without_markers_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.rewrite_readme(readme, results(95, 50))
    assert readme.read_text() == "no markers\n"


def test_a_smoke_run_never_reaches_the_readme(tmp_path: Path) -> None:
    smoke = tmp_path / "results.json"
    smoke.write_text(json.dumps({**results(95, 50), "smoke": True}))
    assert report.main(["--results", str(smoke), "--readme"]) == 1


def test_the_readme_has_the_markers() -> None:
    text = (Path(report.ROOT) / "README.md").read_text()
    assert text.index(BEGIN) < text.index(END)
