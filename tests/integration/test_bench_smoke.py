"""`python -m bench --smoke`: the whole benchmark harness with tiny loads, so it cannot
rot. It asserts that every figure was measured and that the traffic did what the harness
claims (every request answered 202, every change seen, every call's state written);
never how fast anything was."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from testkit import ROOT

# The harness starts its own private broker here (and on the next port): this range
# belongs to the benchmark, so it never meets another test's broker.
SMOKE_KAFKA_PORT = 20410


def test_smoke_run_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            f"--out={out}",
            f"--kafka-port={SMOKE_KAFKA_PORT}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    r = json.loads((out / "results.json").read_text())
    assert r["smoke"] is True

    servers = {"service ROLE=ingest", "service ROLE=all", "Go peer", "bare Starlette"}
    assert set(r["closed_loop"]) == servers
    assert set(r["open_loop"]) == servers
    assert r["config"]["closed_generator"].startswith("wrk")
    for name in servers:
        closed = r["closed_loop"][name]
        assert closed["requests"] > 0 and closed["throughput"] > 0, name
        # Valid, signed, unique requests: anything but 202 is a harness or server bug.
        assert closed["codes"] == {"202": closed["requests"]}, (name, closed["codes"])
        assert closed["cpu_us_per_request"] > 0, name
        # Every round measured, interleaved, with both sides' CPU: the server's and wrk's.
        assert len(closed["rounds"]) == 2, name
        for one in closed["rounds"]:
            assert one["codes"] == {"202": one["requests"]} and not any(one["errors"].values())
            assert one["server_cpu_s"] > 0 and one["generator_cpu_s"] > 0, name
        low, mid, high = (closed[f"throughput{k}"] for k in ("_min", "", "_max"))
        assert 0 < low <= mid <= high, name
        for rep in r["open_loop"][name]:
            assert rep["offered"] > 0 and rep["codes"] == {"202": rep["requests"]}, name
            assert 0 < rep["p50_ms"] <= rep["p99_ms"], name

    assert r["kafka_loop_msgs_per_s"] > 0
    assert r["handler"]["bare_us"] > 0 and r["handler"]["ingest_us"] > 0
    # The cost of accounts, both ways of naming one: 1 and 1,000 accounts measured.
    for kind in ("body", "path"):
        for n in (1, 1000):
            assert r["handler"][f"accounts_{n}_{kind}_cpu_us"] > 0, (kind, n)

    p = r["processor"]
    assert p["events"] > p["calls"] > 0 and p["events_per_s"] > 0
    assert p["cpu_us_per_event"] > 0
    assert len(p["rounds"]) == 2
    assert 0 < p["events_per_s_min"] <= p["events_per_s"] <= p["events_per_s_max"]
    # The lifecycles carry late steps: some events must have been rejected.
    assert p["expected_rejections"] > 0
    assert p["changes"] == p["expected_changes"], "exactly-once: one change per accepted event"
    assert p["state_calls"] == p["calls"] and p["state_bytes_per_call"] > 0
    # A new processor restores exactly the calls the first one left.
    assert p["restore_calls"] == p["calls"] and p["restore_ready_seconds"] > 0

    (e2e,) = r["end_to_end"]
    assert e2e["accepted"] > 0 and e2e["visible"] == e2e["accepted"]
    assert 0 < e2e["p50_ms"] <= e2e["p99_ms"]

    assert r["restore"]["calls"] == 2000 and r["restore"]["seconds"] > 0
    (per_call,) = r["memory_bytes_per_call"].values()
    assert per_call > 0

    table = (out / "table.md").read_text()
    assert table in run.stdout
    # header, machine and generators, 4 closed-loop, 4 open-loop, handler, 2 account-cost
    # rows, then 7 more
    assert len(table.splitlines()) == 2 + 2 + 4 + 4 + 1 + 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1
    # The chart needs the bench extra (matplotlib); without it the run still passes and
    # simply writes no chart, which is what `make test` (dev extras only) sees.
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latency.png").read_bytes().startswith(b"\x89PNG")
    else:
        assert not (out / "latency.png").exists()
