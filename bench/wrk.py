"""The closed loop's load generator: wrk (Debian's package) with bench/wrk_post.lua, and
one round of it against a server with both sides' CPU time.

Closed loop: CONNECTIONS connections, each sending its next request when the last one
answered, as fast as the server answers: the server's maximum throughput. wrk is an
event loop in C per thread; vegeta (a goroutine per request, Go's HTTP client) topped out
near 16-20k req/s on this machine, under the fast servers' maximum, so the bench
understated them. The generator's own CPU is measured every round and shown beside the
server's, so a reader can see that it was not the limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.servers import Server

SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
CONNECTIONS = 64  # as wrk -c64 in issue 21's first measurements
_MARK = "WRK-JSON "


def find() -> Path:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError(
            "wrk not found: the closed loop needs it (Debian/Ubuntu: apt-get install wrk)"
        )
    return Path(path)


def version(wrk: Path) -> str:
    """``wrk debian/4.1.0-3+b2``: the first words of ``wrk -v`` (which exits 1)."""
    run = subprocess.run([str(wrk), "-v"], capture_output=True, text=True, check=False)
    first = (run.stdout or run.stderr).splitlines()[0] if (run.stdout or run.stderr) else "wrk"
    return " ".join(first.split()[:2])


@dataclass(frozen=True)
class Round:
    """One closed-loop round: what wrk's Lua script counted and both sides' CPU time."""

    requests: int  # answers wrk received
    seconds: float  # wrk's own duration of the round
    throughput: float  # 202 answers per second
    codes: dict[str, int]  # every answer's status, counted by the script
    errors: dict[str, int]  # wrk's socket errors and timeouts
    p50_ms: float  # closed-loop latency: under coordinated omission, see the README
    p99_ms: float
    max_ms: float
    server_cpu_s: float  # user + system of the server process tree over the round
    cpu_us_per_request: float
    server_cores: float  # server CPU / round duration
    generator_cpu_s: float  # user + system of wrk over its whole run
    generator_cores: float  # wrk CPU / round duration
    generator_threads: int
    pool: int  # pre-signed requests it had; it never ran out in a kept round
    load_average: float  # the machine's 1-minute load average right after

    @property
    def generator_share(self) -> float:
        """wrk's CPU as a share of the cores its threads can use (one each)."""
        return self.generator_cores / self.generator_threads

    @property
    def all_accepted(self) -> bool:
        return self.codes == {"202": self.requests} and not any(self.errors.values())

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "generator_share": self.generator_share}


class PoolExhausted(Exception):
    """wrk sent every pre-signed request before the round ended: what came after would
    be repeats (the replay cache's answer, not a new call), so the round is void."""


def _run_wrk(args: list[str], out: Path) -> tuple[int, float]:
    """wrk to its end; its exit code and its user + system CPU time. The time is taken
    from wait4's rusage: the kernel's utime and stime of the process (what
    /proc/<pid>/stat shows), read once it has ended, when /proc no longer has it. It
    includes loading the request files before the round's clock starts, so it
    overstates the generator's share a little, never understates it."""
    with out.open("wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, usage.ru_utime + usage.ru_stime


async def attack(
    wrk: Path, server: Server, prefix: Path, pool: int, threads: int, seconds: float
) -> Round:
    """One closed-loop round of ``seconds`` against ``server`` from the request files at
    ``prefix``. Raises PoolExhausted when the files ran out."""
    base = server.url.removesuffix("/v1/call-status")
    out = prefix.with_name(prefix.name + ".out")
    # wrk takes whole seconds only ("2.0s" is a usage error).
    length = f"{max(1, round(seconds))}s"
    args = [
        str(wrk), f"-t{threads}", f"-c{CONNECTIONS}", f"-d{length}", "--timeout", "30s",
        "-s", str(SCRIPT), base, "--", str(prefix),
    ]  # fmt: skip
    cpu_before = server.cpu_seconds()
    code, generator_cpu = await asyncio.to_thread(_run_wrk, args, out)
    server_cpu = server.cpu_seconds() - cpu_before
    text = out.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith(_MARK)]
    if code != 0 or not lines:
        raise RuntimeError(f"wrk failed (exit {code}) against {server.name}: {text[-2000:]}")
    summary = json.loads(lines[-1].removeprefix(_MARK))
    broken = sum(summary["errors"][k] for k in ("connect", "read", "write"))
    if summary["exhausted_threads"]:
        if broken:
            # wrk takes a new request for every new connection: connections that keep
            # breaking use up any pool, so a bigger pool would not help.
            raise RuntimeError(
                f"wrk's connections to {server.name} kept breaking: {summary['errors']}, "
                f"{summary['taken']:,} requests taken for {summary['requests']:,} answered"
            )
        raise PoolExhausted(
            f"{server.name}: {pool:,} requests were not enough "
            f"({summary['taken']:,} taken, {summary['requests']:,} answered)"
        )
    duration = summary["duration_us"] / 1e6
    requests = summary["requests"]
    codes = {str(k): int(v) for k, v in summary["codes"].items()}
    lat = summary["latency_us"]
    return Round(
        requests=requests,
        seconds=duration,
        throughput=codes.get("202", 0) / duration,
        codes=codes,
        errors={k: int(v) for k, v in summary["errors"].items()},
        p50_ms=lat["p50"] / 1e3,
        p99_ms=lat["p99"] / 1e3,
        max_ms=lat["max"] / 1e3,
        server_cpu_s=server_cpu,
        cpu_us_per_request=server_cpu / max(1, requests) * 1e6,
        server_cores=server_cpu / duration,
        generator_cpu_s=generator_cpu,
        generator_cores=generator_cpu / duration,
        generator_threads=threads,
        pool=pool,
        load_average=os.getloadavg()[0],
    )


def summarise(rounds: list[Round]) -> dict[str, object]:
    """A server's rounds as the table reads them: medians, with the spread (min-max) of
    throughput and CPU per request, and every round as measured."""
    med = statistics.median
    thr = [r.throughput for r in rounds]
    cpu = [r.cpu_us_per_request for r in rounds]
    codes: dict[str, int] = {}
    for r in rounds:
        for code, count in r.codes.items():
            codes[code] = codes.get(code, 0) + count
    requests = sum(r.requests for r in rounds)
    return {
        "generator": "wrk",
        "rounds": [r.as_json() for r in rounds],
        "throughput": med(thr),
        "throughput_min": min(thr),
        "throughput_max": max(thr),
        "cpu_us_per_request": med(cpu),
        "cpu_us_per_request_min": min(cpu),
        "cpu_us_per_request_max": max(cpu),
        "server_cores": med(r.server_cores for r in rounds),
        "generator_cores": med(r.generator_cores for r in rounds),
        "generator_share_max": max(r.generator_share for r in rounds),
        "generator_threads": rounds[0].generator_threads,
        "requests": requests,
        "codes": codes,
        "success": codes.get("202", 0) / max(1, requests),
        "p50_ms": med(r.p50_ms for r in rounds),
        "p99_ms": med(r.p99_ms for r in rounds),
        "load_average": med(r.load_average for r in rounds),
    }
