"""The open loop's load generator: vegeta (built from the Go module proxy into
bench/.cache) and the Go peer, and runs of open-loop attacks with their results.

Open loop: requests leave at the offered rate whether or not earlier ones have
answered, so a slow server cannot hide its queueing delay (no coordinated omission);
that gives honest latency at a rate. The closed loop (the maximum) is wrk's:
bench/wrk.py.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
BIN = CACHE / "bin"
VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"
# Open loop: vegeta starts a worker, and so a TCP connection, for every request that finds
# no idle one. Uncapped, one hiccup (a GC pause, a busy neighbour) makes it open
# thousands, the listen queue overflows (SYN retried after 1 s, then 3 s) and the run
# measures the kernel's backlog instead of the server. With a cap, a request waiting for a
# connection still counts its wait: latency runs from its scheduled send time.
OPEN_LOOP_CONNECTIONS = 128


def _go_env() -> dict[str, str]:
    return {**os.environ, "GOBIN": str(BIN), "GOFLAGS": "-mod=mod"}


def build_tools() -> tuple[Path, Path]:
    """vegeta and the Go peer, built once and reused while their sources are unchanged."""
    BIN.mkdir(parents=True, exist_ok=True)
    vegeta = BIN / "vegeta"
    if not vegeta.exists():
        subprocess.run(["go", "install", VEGETA_MODULE], env=_go_env(), check=True)
    peer = BIN / "peer"
    sources = [BENCH / "peer" / n for n in ("main.go", "go.mod", "go.sum")]
    if not peer.exists() or peer.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        subprocess.run(
            ["go", "build", "-o", str(peer), "."], cwd=BENCH / "peer", env=_go_env(), check=True
        )
    return vegeta, peer


@dataclass(frozen=True)
class Report:
    """One attack, as vegeta's own report sums it up (latencies in milliseconds)."""

    offered: float  # requests/s
    requests: int
    throughput: float  # successful requests per second
    success: float  # share of 2xx answers
    p50_ms: float
    p99_ms: float
    max_ms: float
    codes: dict[str, int]
    # The machine's 1-minute load average right after the attack (it is shared).
    load_average: float | None = None
    # CPU time the server process spent per request during the attack, in microseconds
    # (a ROLE=all server's includes its processor's work during the attack).
    cpu_us_per_request: float | None = None

    def as_json(self) -> dict[str, object]:
        return asdict(self)


async def _run(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} {args[1]} failed: {err.decode()[-2000:]}")
    return out


async def attack(
    vegeta: Path,
    targets: Path,
    results: Path,
    seconds: float,
    rate: float,
) -> Report:
    """One open-loop attack at ``rate`` requests/s, with as many workers as it takes."""
    args = [
        str(vegeta), "attack", f"-targets={targets}", "-format=json", "-lazy",
        f"-duration={seconds}s", "-timeout=30s", f"-output={results}",
    ]  # fmt: skip
    args += [f"-rate={round(rate)}/1s", "-workers=64", f"-max-connections={OPEN_LOOP_CONNECTIONS}"]
    await _run(*args)
    summary = json.loads(await _run(str(vegeta), "report", "-type=json", str(results)))
    lat = summary["latencies"]
    return Report(
        offered=rate,
        requests=summary["requests"],
        throughput=summary["throughput"],
        success=summary["success"],
        p50_ms=lat["50th"] / 1e6,
        p99_ms=lat["99th"] / 1e6,
        max_ms=lat["max"] / 1e6,
        codes={str(k): v for k, v in summary["status_codes"].items()},
    )


@dataclass(frozen=True)
class Answer:
    """One request: when its answer arrived (unix seconds), its status and body."""

    answered_at: float
    code: int
    body: bytes


async def answers(vegeta: Path, results: Path) -> list[Answer]:
    """Every request of an attack. CSV columns: unix ns sent, code, latency ns, bytes
    out, bytes in, error, base64 body, ..."""
    text = (await _run(str(vegeta), "encode", "-to=csv", str(results))).decode()
    out = []
    for row in csv.reader(text.splitlines()):
        sent_ns, code, latency_ns = int(row[0]), int(row[1]), int(row[2])
        out.append(Answer((sent_ns + latency_ns) / 1e9, code, base64.b64decode(row[6])))
    return out
