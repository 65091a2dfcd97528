"""The one table, the JSON file and the chart of a benchmark run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_INGEST = "service ROLE=ingest"
SERVICE_ALL = "service ROLE=all"
GO_PEER = "Go peer"
BARE = "bare Starlette"


@dataclass(frozen=True)
class Row:
    figure: str
    value: str
    ratio: str = ""
    target: str = ""


def _num(x: float, unit: str = "") -> str:
    if math.isnan(x):
        return "n/a"
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}" if abs(x) >= 10 else f"{x:,.2f}"
    return f"{text}{unit}"


def _ratio(a: float, b: float, of: str) -> str:
    return f"{a / b:.2f}x {of}" if b and not math.isnan(a) and not math.isnan(b) else ""


def _load(rep: dict[str, Any]) -> str:
    load = rep.get("load_average")
    return f", load {load:.1f}" if load is not None else ""


def _verdict(ok: bool, target: str) -> str:
    return f"{target} {'✓' if ok else '✗'}"


def rows(r: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    closed = r["closed_loop"]
    go = closed[GO_PEER]["throughput"]
    bare = closed[BARE]["throughput"]
    go_cpu = closed[GO_PEER].get("cpu_us_per_request") or math.nan
    for name, rep in closed.items():
        ratio = _ratio(rep["throughput"], go, GO_PEER) if name != GO_PEER else ""
        if name in (SERVICE_INGEST, SERVICE_ALL):
            ratio += f", {_ratio(rep['throughput'], bare, BARE)}"
            cpu = rep.get("cpu_us_per_request") or math.nan
            ratio += f"; CPU/request {_ratio(cpu, go_cpu, GO_PEER)}"
        target = ""
        if name == SERVICE_INGEST:
            target = _verdict(rep["throughput"] >= 0.6 * go, "≥ 0.6x Go peer")
        out.append(
            Row(
                f"{name}: max, closed loop ({r['config']['closed_workers']} conns)",
                f"{_num(rep['throughput'])} req/s, p50 {_num(rep['p50_ms'])} ms, "
                f"p99 {_num(rep['p99_ms'])} ms, {rep['success']:.1%} 2xx, "
                f"{_num(rep.get('cpu_us_per_request') or math.nan)} µs CPU/request{_load(rep)}",
                ratio,
                target,
            )
        )
    for name, reports in r["open_loop"].items():
        for rep in reports:
            fraction = rep["offered"] / closed[name]["throughput"]
            target = ""
            if name == SERVICE_INGEST and abs(fraction - 0.5) < 0.01:
                target = _verdict(rep["p99_ms"] <= 25, "p99 ≤ 25 ms at ½ max")
            out.append(
                Row(
                    f"{name}: open loop at {fraction:.2f}x its max",
                    f"{_num(rep['offered'])} req/s offered, {_num(rep['throughput'])} done, "
                    f"p50 {_num(rep['p50_ms'])} ms, p99 {_num(rep['p99_ms'])} ms, "
                    f"{rep['success']:.1%} 2xx{_load(rep)}",
                    "",
                    target,
                )
            )
    loop = r["kafka_loop_msgs_per_s"]
    out.append(
        Row(
            "bare aiokafka loop (64 x send_and_wait, acks=all, idempotent)",
            f"{_num(loop)} msg/s",
            _ratio(closed[SERVICE_INGEST]["throughput"], loop, "of it: service ROLE=ingest"),
        )
    )
    h = r["handler"]
    out.append(
        Row(
            "ingest handler in process, no sockets, no Kafka",
            f"{_num(h['ingest_us'])} µs/request vs bare {_num(h['bare_us'])} µs",
            f"{h['ingest_us'] / h['bare_us']:.1f}x bare Starlette",
        )
    )
    for kind, how in (("body", "/v1/call-status"), ("path", "/v1/call-status/{accountId}")):
        one, many = h.get(f"accounts_1_{kind}_cpu_us"), h.get(f"accounts_1000_{kind}_cpu_us")
        if one is None or many is None:
            continue
        out.append(
            Row(
                f"handler CPU with 1 vs 1,000 accounts, {how}",
                f"{_num(one)} vs {_num(many)} µs CPU/request",
                f"{many / one:.2f}x",
                _verdict(many <= one * 1.1, "the same (≤ 1.1x)"),
            )
        )
    p = r["processor"]
    out.append(
        Row(
            f"processor, exactly-once, {p['events']:,} events of {p['calls']:,} calls",
            f"{_num(p['events_per_s'])} events/s, {_num(p['cpu_us_per_event'])} µs CPU/event "
            f"({p['changes']:,} changes, {p['expected_changes']:,} expected)",
            "",
            _verdict(p["events_per_s"] >= 20_000, "≥ 20,000/s"),
        )
    )
    if p.get("restore_calls"):
        per_million = p["restore_seconds"] / p["restore_calls"] * 1e6
        out.append(
            Row(
                f"processor restore of {p['restore_calls']:,} calls (a new process)",
                f"{_num(p['restore_seconds'])} s, {_num(per_million)} s per 1M calls (linear); "
                f"{_num(p['restore_ready_seconds'])} s from start to ready",
                "",
                _verdict(per_million <= 10, "1M in seconds (≤ 10 s)"),
            )
        )
    if r.get("restore"):
        rs = r["restore"]
        out.append(
            Row(
                f"restore of {rs['calls']:,} preloaded states (service.restore, in process)",
                f"{_num(rs['seconds'])} s",
                "",
                _verdict(rs["calls"] < 1_000_000 or rs["seconds"] <= 10, "1M in seconds (≤ 10 s)"),
            )
        )
    for e in r["end_to_end"]:
        target = ""
        if e["offered"] >= 2000:
            target = _verdict(e["p99_ms"] <= 250, "p99 ≤ 250 ms at 2,000/s")
        out.append(
            Row(
                f"end to end (202 → read_committed), ROLE=all at {_num(e['offered'])}/s",
                f"p50 {_num(e['p50_ms'])} ms, p99 {_num(e['p99_ms'])} ms "
                f"({e['visible']:,} of {e['accepted']:,} 202s seen; "
                f"{e['ingest']['success']:.1%} 2xx)",
                "",
                target,
            )
        )
    for calls, per_call in r["memory_bytes_per_call"].items():
        out.append(
            Row(
                f"state in memory per call, {int(calls):,} calls (tracemalloc)",
                f"{_num(per_call)} B",
                "",
                _verdict(per_call <= 300, "≤ 300 B"),
            )
        )
    out.append(
        Row(
            "state topic per call (key + value + headers of the latest record)",
            f"{_num(p['state_bytes_per_call'])} B",
            "",
            _verdict(p["state_bytes_per_call"] <= 300, "≤ 300 B"),
        )
    )
    return out


def table(r: dict[str, Any]) -> str:
    body = rows(r)
    lines = ["| figure | value | ratio to baseline | target |", "|---|---|---|---|"]
    lines += [f"| {x.figure} | {x.value} | {x.ratio} | {x.target} |" for x in body]
    return "\n".join(lines)


def write(r: dict[str, Any], out: Path) -> list[Path]:
    """results.json, table.md and, when matplotlib is installed, latency.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "table.md"]
    written[0].write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    written[1].write_text(table(r) + "\n")
    chart = _chart(r, out / "latency.png")
    if chart is not None:
        written.append(chart)
    return written


def _chart(r: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for name, reports in r["open_loop"].items():
        xs = [rep["offered"] for rep in reports]
        (line,) = ax.plot(xs, [rep["p99_ms"] for rep in reports], marker="o", label=f"{name} p99")
        ax.plot(
            xs,
            [rep["p50_ms"] for rep in reports],
            marker=".",
            linestyle="--",
            color=line.get_color(),
            label=f"{name} p50",
        )
    ax.axhline(25, color="grey", linestyle=":", linewidth=1, label="issue 10: p99 ≤ 25 ms at ½ max")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, requests/s (open loop, vegeta)")
    ax.set_ylabel("latency, ms")
    m = r["machine"]
    load = m["load_average_at_start"][0]
    ax.set_title(
        f"POST /v1/call-status latency vs offered rate\n{m['cpus']} CPUs ({m['cpu']}), shared "
        f"with the broker, the load generator and other work; load {load:.1f} at start"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
