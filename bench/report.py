"""The one table, the JSON file and the chart of a benchmark run, and the README's
Performance section regenerated from a results.json: ``python -m bench.report
--readme`` rewrites what lies between the section's markers."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# wrk's CPU as a share of its threads' cores above which the table flags a max as maybe
# the generator's own limit (a wrk thread is one event loop on one core).
GENERATOR_LIMIT_SHARE = 0.7
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


def _spread(rep: dict[str, Any], key: str, unit: str) -> str:
    """``median unit (min-max)``: the median of the rounds with their spread."""
    lo, hi = rep.get(f"{key}_min"), rep.get(f"{key}_max")
    text = f"{_num(rep[key])} {unit}"
    return f"{text} ({_num(lo)}-{_num(hi)})" if lo is not None and hi is not None else text


def _generator(rep: dict[str, Any]) -> str:
    """wrk's CPU beside the server's: how much of the cores its threads can use it took
    (median), and the most of any round."""
    share = rep.get("generator_share_max")
    if share is None:
        return ""
    threads = rep.get("generator_threads", 1)
    text = f"wrk {rep['generator_cores']:.2f} cores of its {threads} (max {share:.0%})"
    if share > GENERATOR_LIMIT_SHARE:
        text += " ⚠ wrk near its limit: this max may be the generator's"
    return text


def context(r: dict[str, Any]) -> list[Row]:
    """The machine and the load generators: what every figure below was measured on."""
    m, c = r["machine"], r["config"]
    load_end = m.get("load_average_at_end") or [math.nan]
    commit = m.get("commit", "unknown")
    if m.get("dirty"):
        commit += " with uncommitted changes"
    rounds = f"{c['closed_rounds']} rounds of {c['closed_s']:g} s per server, interleaved"
    return [
        Row(
            "machine",
            f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, load average "
            f"{m['load_average_at_start'][0]:.1f} at start, {load_end[0]:.1f} at end; "
            f"{m.get('branch', 'unknown')} at {commit}",
        ),
        Row(
            "load generators (same machine as the servers and the broker)",
            f"closed loop: {c.get('closed_generator', 'wrk')} -t"
            f"{c.get('closed_generator_threads', 1)} -c{c['closed_workers']}, {rounds}; "
            f"open loop: {c.get('open_generator', 'vegeta')}, at most "
            f"{c.get('open_loop_connections', '?')} connections",
        ),
    ]


def rows(r: dict[str, Any]) -> list[Row]:
    out = context(r)
    closed = r["closed_loop"]
    go, bare = closed[GO_PEER], closed[BARE]
    go_cpu = go.get("cpu_us_per_request") or math.nan
    for name in (SERVICE_INGEST, SERVICE_ALL, GO_PEER, BARE):
        rep = closed[name]
        cpu = rep.get("cpu_us_per_request") or math.nan
        ratio, target = "", ""
        if name in (SERVICE_INGEST, SERVICE_ALL):
            ratio = (
                f"CPU/request {_ratio(cpu, go_cpu, GO_PEER)}; req/s "
                f"{_ratio(rep['throughput'], go['throughput'], GO_PEER)}, "
                f"{_ratio(rep['throughput'], bare['throughput'], BARE)}"
            )
        elif name == BARE:
            ratio = f"req/s {_ratio(rep['throughput'], go['throughput'], GO_PEER)}"
        if name == SERVICE_INGEST:
            target = _verdict(cpu <= 2 * go_cpu, "CPU/request ≤ 2x Go peer")
        label = f"{name} (`make run` config)" if name in (SERVICE_INGEST, SERVICE_ALL) else name
        rounds = len(rep.get("rounds", [])) or 1
        value = (
            f"{_spread(rep, 'throughput', 'req/s')}, "
            f"{_spread(rep, 'cpu_us_per_request', 'µs CPU/request')}, "
            f"server busy {rep.get('server_cores', math.nan):.2f} cores; "
        )
        value += f"{_generator(rep)}; p99 {_num(rep['p99_ms'])} ms, "
        value += f"{rep['success']:.1%} 202{_load(rep)}"
        out.append(Row(f"{label}: max, closed loop, median of {rounds}", value, ratio, target))
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
    n = len(p.get("rounds", [])) or 1
    out.append(
        Row(
            f"processor, exactly-once, {p['events']:,} events of {p['calls']:,} calls, "
            f"median of {n}",
            f"{_spread(p, 'events_per_s', 'events/s')}, "
            f"{_spread(p, 'cpu_us_per_event', 'µs CPU/event')} ({p['changes']:,} changes in all, "
            f"{p['expected_changes']:,} "
            f"expected){_load(p)}",
            "",
            _verdict(p["events_per_s"] >= 20_000, "≥ 20,000/s median"),
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


ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- bench:begin: generated by `python -m bench.report --readme`; edit bench/report.py -->"
END = "<!-- bench:end -->"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def readme_section(r: dict[str, Any]) -> str:
    """What goes between the README's markers: where and on what the run was made, the
    table, the chart, and the issue's targets read off the run."""
    m, closed, p = r["machine"], r["closed_loop"], r["processor"]
    svc, go = closed[SERVICE_INGEST], closed[GO_PEER]
    cpu_ratio = svc["cpu_us_per_request"] / go["cpu_us_per_request"]
    share = max(rep.get("generator_share_max", 0.0) for rep in closed.values())
    when = r.get("finished_at", "an unrecorded time")
    commit = m.get("commit", "unknown") + (" (with uncommitted changes)" if m.get("dirty") else "")
    lines = [
        f"Run of {when} on `{m.get('branch', 'unknown')}` at {commit}: {m['cpus']} CPUs "
        f"({m['cpu']}), Python {m['python']}, a private single-node Kafka and the load "
        "generators on the same machine (load average in the table). Read ratios within "
        "the run, and CPU per request across runs.",
        "",
        table(r),
        "",
        "![latency against offered rate](bench/results/latency.png)",
        "",
        "Against issue 21's targets, in this run:",
        "",
        f"- ingest (`ROLE=ingest`, `make run` config) CPU per request is "
        f"**{_num(svc['cpu_us_per_request'])} µs against the Go peer's "
        f"{_num(go['cpu_us_per_request'])} µs: {cpu_ratio:.2f}x** (target ≤ 2x): "
        f"{_met(cpu_ratio <= 2)}; its max is {_num(svc['throughput'])} req/s, "
        f"{svc['throughput'] / go['throughput']:.2f}x the peer's {_num(go['throughput'])}.",
        f"- processor: **{_num(p['events_per_s'])} events/s**, median of "
        f"{len(p.get('rounds', [])) or 1} rounds ({_num(p['events_per_s_min'])}-"
        f"{_num(p['events_per_s_max'])}), at {_num(p['cpu_us_per_event'])} µs of CPU per "
        f"event (target ≥ 20,000 events/s): {_met(p['events_per_s'] >= 20_000)}.",
        f"- the closed loop's generator (wrk) used at most {share:.0%} of its threads' "
        + (
            "cores: it was not the limit."
            if share <= GENERATOR_LIMIT_SHARE
            else f"cores (over {GENERATOR_LIMIT_SHARE:.0%}): the fastest maxima may be "
            "wrk's; rerun with `--wrk-threads 2`."
        ),
    ]
    return "\n".join(lines)


def rewrite_readme(readme: Path, r: dict[str, Any]) -> None:
    """Replace what lies between the markers with the section of ``r``."""
    text = readme.read_text()
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{readme}: the markers {BEGIN!r} and {END!r} are missing")
    readme.write_text(f"{head}{BEGIN}\n{readme_section(r)}\n{END}{tail}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "results.json")
    parser.add_argument("--readme", action="store_true", help="rewrite README's section")
    args = parser.parse_args(argv)
    r = json.loads(args.results.read_text())
    if not args.readme:
        print(table(r))
        return 0
    if r.get("smoke"):
        # A smoke run's loads are tiny: its figures measure start-up, not the service.
        print(f"bench.report: {args.results} is a --smoke run; not for the README", file=sys.stderr)
        return 1
    rewrite_readme(ROOT / "README.md", r)
    print(f"bench.report: README.md's Performance section now shows {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
