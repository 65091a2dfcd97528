"""``make bench`` (``python -m bench``): every figure of issue 10 in one run.

Starts a private broker (the project's launcher, on --kafka-port and the port after it),
builds vegeta and the Go peer, runs each server under test as its own process, and
measures: ingest max throughput (closed loop, wrk, rounds interleaved across the
servers, with both the server's and wrk's CPU) and latency at fixed offered rates (open
loop, vegeta) for the service with ROLE=ingest and ROLE=all, the Go peer and a bare
Starlette endpoint; a bare aiokafka send loop; the ingest handler in process; the processor over a
preloaded topic of realistic lifecycles; end-to-end latency to a read_committed consumer;
state bytes per call in memory and on the state topic. Prints progress and one table;
writes results.json, table.md and latency.png to --out.

``--smoke`` does all of it with tiny loads in well under a minute (``make test`` runs it,
so the harness cannot rot); ``--profile`` also samples the service under the closed-loop
load and the processor with py-spy. Figures depend on the machine and on whatever else
runs on it: the table is a measurement, never an assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import e2e, load, processor_run, report, restore_run, servers, wrk
from bench.data import write_targets, write_wrk_requests
from bench.kafka_loop import send_loop
from bench.profile import Recording
from service.settings import Role
from testkit import create_topics, private_broker

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    closed_s: float
    closed_rounds: int
    open_s: float
    fractions: tuple[float, ...]
    kafka_loop_s: float
    handler_requests: int
    processor_calls: int
    processor_rounds: int
    e2e_rates: tuple[float, ...]
    e2e_s: float
    memory_calls: tuple[int, ...]
    restore_calls: int


FULL = Plan(
    closed_s=8,
    closed_rounds=3,
    open_s=5,
    fractions=(0.25, 0.5, 0.75),
    kafka_loop_s=8,
    handler_requests=20_000,
    processor_calls=25_000,
    processor_rounds=3,
    e2e_rates=(2000.0,),
    e2e_s=10,
    memory_calls=(100_000, 1_000_000),
    restore_calls=1_000_000,
)
SMOKE = Plan(
    closed_s=1,
    closed_rounds=2,  # two, so the interleaving and the spread are exercised
    open_s=1,
    fractions=(0.5,),
    kafka_loop_s=1,
    handler_requests=300,
    processor_calls=5000,  # enough events for /proc's 10 ms CPU ticks to see
    processor_rounds=2,
    e2e_rates=(20.0,),
    e2e_s=1,
    memory_calls=(1000,),
    restore_calls=2000,
)
# Pools of pre-signed requests for a closed-loop round: the first one against a server
# (its warm-up) has no rate to go by, and WARM_UP_RATE per second covers the fastest
# server here. Later rounds get 1.5x the best rate seen so far, at least POOL_FLOOR_RATE
# per second: a cold warm-up understates a server (the Go peer's was half its later
# rate), and a round that runs out is void and run again with twice the pool.
WARM_UP_RATE = 40_000
POOL_FLOOR_RATE = 15_000
WARM_UP_S = 2.0

_started = time.monotonic()


def progress(message: str) -> None:
    elapsed = int(time.monotonic() - _started)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


def _git(*args: str) -> str:
    run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return run.stdout.strip() if run.returncode == 0 else "unknown"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "load_average_at_end": None,
        # Which code was measured: the README's figures come from a run on main.
        "commit": _git("rev-parse", "--short", "HEAD"),
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": _git("status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
        "note": "shared machine: other work may have run during the measurement",
    }


async def _python_json(*args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {args[0]} failed with exit code {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


class Bench:
    def __init__(
        self, plan: Plan, bootstrap: str, work: Path, out: Path, profile: bool, wrk_threads: int
    ) -> None:
        self.plan = plan
        self.bootstrap = bootstrap
        self.work = work
        self.out = out
        self.profile = profile
        self.vegeta, self.peer = load.build_tools()
        self.wrk = wrk.find()
        self.wrk_threads = wrk_threads
        # Per server, the best closed-loop rate seen so far: what its next pool is sized by.
        self.best_rate: dict[str, float] = {}

    def targets(self, url: str, count: int) -> Path:
        """Fresh targets for one attack: new calls, signed now (inside the tolerance)."""
        path = self.work / "targets.json"
        return write_targets(path, url, count, uuid.uuid4().hex, int(time.time()))

    async def attack(self, server: servers.Server, seconds: float, rate: float) -> load.Report:
        """One open-loop attack (vegeta) with the server's CPU per request."""
        count = int(rate * seconds * 1.05) + 10
        targets = self.targets(server.url, count)
        cpu = server.cpu_seconds()
        rep = await load.attack(self.vegeta, targets, self.work / "results.bin", seconds, rate)
        # CPU per request moves far less than req/s when neighbours take the cores.
        cpu_us = (server.cpu_seconds() - cpu) / max(1, rep.requests) * 1e6
        rep = dataclasses.replace(rep, load_average=os.getloadavg()[0], cpu_us_per_request=cpu_us)
        if rep.requests > count:
            progress(f"  note: {rep.requests} requests > {count} targets: some were repeated")
        # "0" is vegeta's code for no answer (a timeout, a refused connection): the server
        # fell behind, which the success share shows. Any other answer than 202 to a
        # valid, signed, new call is a harness or server bug, and no figure at all.
        wrong = {code: n for code, n in rep.codes.items() if code not in ("202", "0")}
        if wrong:
            raise RuntimeError(f"{server.name}: open loop answered {wrong}; see {server.log_path}")
        return rep

    async def settle(self, server: servers.Server) -> None:
        """A ROLE=all server's processor works off what the attack wrote before the next
        attack starts, so its catch-up does not eat the next server's CPU."""
        if server.group is not None and server.topic is not None:
            await processor_run.wait_caught_up(self.bootstrap, server.group, server.topic, 300)

    async def wrk_round(self, server: servers.Server, seconds: float) -> wrk.Round:
        """One closed-loop round with wrk, from a pool of new calls signed now. A pool
        that ran out voids the round (the rest would have been repeats): it is run again
        with twice the pool. Any answer but 202, or any socket error, stops the bench:
        a 401 counted as throughput would be a lie."""
        best = self.best_rate.get(server.name)
        rate = WARM_UP_RATE if best is None else max(POOL_FLOOR_RATE, 1.5 * best)
        pool = int(rate * seconds) + 2000
        for _ in range(4):
            prefix = self.work / "wrk-requests"
            url = httpx.URL(server.url)
            await asyncio.to_thread(
                write_wrk_requests,
                prefix,
                f"{url.host}:{url.port}",
                url.path,
                pool,
                self.wrk_threads,
                uuid.uuid4().hex,
                int(time.time()),
            )
            try:
                rep = await wrk.attack(self.wrk, server, prefix, pool, self.wrk_threads, seconds)
            except wrk.PoolExhausted as exc:
                progress(f"  {exc}; again with {2 * pool:,}")
                await self.settle(server)
                pool *= 2
                continue
            if not rep.all_accepted:
                raise RuntimeError(
                    f"{server.name}: closed loop answered {rep.codes} with socket errors "
                    f"{rep.errors} (every request was valid, signed and new: only 202 is "
                    f"right; see {server.log_path})"
                )
            self.best_rate[server.name] = max(self.best_rate.get(server.name, 0), rep.throughput)
            return rep
        raise RuntimeError(f"{server.name}: the pool of requests kept running out")

    async def closed_loop(self, server: servers.Server, round_: int) -> wrk.Round:
        recording = None
        if self.profile and server.service is not None and round_ == 0:
            slug = server.name.split("=")[-1]
            recording = Recording(server.pid, self.out / f"profile-ingest-{slug}.txt")
        rep = await self.wrk_round(server, self.plan.closed_s)
        if recording is not None:
            summary = recording.stop()
            recording.path.with_suffix(".summary.txt").write_text("\n".join(summary))
        await self.settle(server)
        progress(
            f"{server.name}: closed loop round {round_ + 1}: {rep.throughput:,.0f} req/s, "
            f"{rep.cpu_us_per_request:.1f} µs CPU/request (server {rep.server_cores:.2f} "
            f"cores, wrk {rep.generator_cores:.2f}), load {rep.load_average:.1f}"
        )
        return rep

    async def measure_servers(
        self, starts: list[Callable[[], Awaitable[servers.Server]]], results: dict[str, Any]
    ) -> None:
        """All servers run at once (idle ones cost nothing) and are measured in turns,
        round after round (A, B, C, D, A, B, ...), so a busy minute on the shared machine
        hits all of them rather than whichever happened to run then. Each server's
        figure is the median of its rounds, with the spread beside it."""
        running: list[servers.Server] = []
        try:
            for start in starts:
                running.append(await start())
            for server in running:
                progress(f"{server.name}: warming up (closed loop, {WARM_UP_S:g} s)")
                warm = await self.wrk_round(server, min(WARM_UP_S, self.plan.closed_s))
                await self.settle(server)
                progress(f"{server.name}: warm-up {warm.throughput:,.0f} req/s")
            rounds: dict[str, list[wrk.Round]] = {s.name: [] for s in running}
            for round_ in range(self.plan.closed_rounds):
                for server in running:
                    rounds[server.name].append(await self.closed_loop(server, round_))
            results["closed_loop"] = {n: wrk.summarise(reps) for n, reps in rounds.items()}
            results["open_loop"] = {s.name: [] for s in running}
            for fraction in self.plan.fractions:
                for server in running:
                    rate = max(1.0, results["closed_loop"][server.name]["throughput"] * fraction)
                    rep = await self.attack(server, self.plan.open_s, rate)
                    await self.settle(server)
                    progress(
                        f"{server.name}: open loop {rate:,.0f}/s: p50 {rep.p50_ms:.1f} ms, "
                        f"p99 {rep.p99_ms:.1f} ms, {rep.success:.1%} 2xx"
                    )
                    results["open_loop"][server.name].append(rep.as_json())
        finally:
            for server in running:
                await server.stop()

    async def run(self) -> dict[str, Any]:
        plan, bootstrap, work = self.plan, self.bootstrap, self.work
        results: dict[str, Any] = {
            "machine": machine(),
            "config": {
                **plan.__dict__,
                "closed_workers": wrk.CONNECTIONS,
                "closed_generator": wrk.version(self.wrk),
                "closed_generator_threads": self.wrk_threads,
                "open_generator": f"vegeta {load.VEGETA_MODULE.rpartition('@')[2]}",
                "open_loop_connections": load.OPEN_LOOP_CONNECTIONS,
                "kafka": "private single-node broker (deploy/local/kafka), same machine",
            },
            "closed_loop": {},
            "open_loop": {},
        }
        progress("ingest handler in process")
        results["handler"] = await _python_json("bench.ingest_overhead", str(plan.handler_requests))
        progress(f"bare aiokafka loop, {plan.kafka_loop_s:g} s")
        loop_topic = f"bench-loop-{uuid.uuid4().hex[:8]}"
        await create_topics(bootstrap, [loop_topic], 6)
        results["kafka_loop_msgs_per_s"] = await send_loop(bootstrap, loop_topic, plan.kafka_loop_s)
        progress(f"bare aiokafka loop: {results['kafka_loop_msgs_per_s']:,.0f} msg/s")

        def service(role: Role) -> Callable[[], Awaitable[servers.Server]]:
            unique = f"bench-{role.value}-{uuid.uuid4().hex[:8]}"
            name = report.SERVICE_INGEST if role is Role.INGEST else report.SERVICE_ALL
            return lambda: servers.service(name, bootstrap, unique, role, work)

        async def go_peer() -> servers.Server:
            topic = f"bench-peer-{uuid.uuid4().hex[:8]}"
            await create_topics(bootstrap, [topic], 6)
            return await servers.go_peer(self.peer, bootstrap, topic, work)

        async def bare() -> servers.Server:
            return await servers.bare_starlette(work)

        await self.measure_servers(
            [service(Role.INGEST), service(Role.ALL), go_peer, bare], results
        )

        rounds = []
        for n in range(plan.processor_rounds):
            progress(
                f"processor round {n + 1} of {plan.processor_rounds}: "
                f"{plan.processor_calls:,} preloaded lifecycles"
            )
            one = await processor_run.run(
                bootstrap,
                work,
                plan.processor_calls,
                progress,
                self.out / "profile-processor.txt" if self.profile and n == 0 else None,
                # Once is enough: the restore is its own figure, not the processor's rate.
                restore=n == plan.processor_rounds - 1,
            )
            progress(
                f"processor round {n + 1}: {one['events_per_s']:,.0f} events/s, "
                f"{one['cpu_us_per_event']:.1f} µs CPU/event, load {one['load_average']:.1f}"
            )
            rounds.append(one)
        results["processor"] = processor_run.summarise(rounds)

        results["end_to_end"] = []
        for rate in plan.e2e_rates:
            progress(f"end to end, ROLE=all at {rate:,.0f}/s for {plan.e2e_s:g} s")
            unique = f"bench-e2e-{uuid.uuid4().hex[:8]}"
            server = await servers.service(
                "e2e", bootstrap, unique, Role.ALL, work, log_format="json"
            )
            try:
                await self.attack(server, min(2.0, plan.e2e_s), 20)  # warm up
                targets = self.targets(server.url, int(rate * plan.e2e_s * 1.05) + 10)
                outcome = await e2e.run(
                    self.vegeta,
                    server,
                    bootstrap,
                    f"t-{unique}.changes",
                    targets,
                    work / "results.bin",
                    rate,
                    plan.e2e_s,
                )
            finally:
                await server.stop()
            progress(f"end to end: p50 {outcome['p50_ms']:.0f} ms, p99 {outcome['p99_ms']:.0f} ms")
            results["end_to_end"].append(outcome)

        progress(f"state memory per call at {', '.join(f'{n:,}' for n in plan.memory_calls)}")
        memory = await _python_json("bench.memory", *map(str, plan.memory_calls))
        results["memory_bytes_per_call"] = memory
        progress(f"restore of {plan.restore_calls:,} preloaded states")
        results["restore"] = await restore_run.run(bootstrap, plan.restore_calls)
        progress(f"restore: {results['restore']['seconds']:.1f} s")
        results["machine"]["load_average_at_end"] = os.getloadavg()
        return results


async def main(args: argparse.Namespace) -> int:
    plan = SMOKE if args.smoke else FULL
    out = Path(args.out)
    progress("building vegeta and the Go peer")
    await asyncio.to_thread(load.build_tools)
    wrk.find()  # before the broker starts: a missing wrk is known at once
    progress(f"starting a private broker on 127.0.0.1:{args.kafka_port}")
    with tempfile.TemporaryDirectory(prefix="callstatus-bench-") as tmp:
        async with private_broker(args.kafka_port) as broker:
            bench = Bench(plan, broker["address"], Path(tmp), out, args.profile, args.wrk_threads)
            results = await bench.run()
        results["smoke"] = args.smoke
        results["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        written = report.write(results, out)
    print(report.table(results))
    progress("wrote " + ", ".join(str(p) for p in written))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few seconds of tiny load")
    p.add_argument("--profile", action="store_true", help="also record py-spy profiles")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    p.add_argument(
        "--kafka-port", type=int, default=20400, help="private broker port (and the next one)"
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk threads of the closed loop (1, as in issue 21; 2 if wrk is the limit)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    Path(arguments.out).mkdir(parents=True, exist_ok=True)  # profiles land there first
    try:
        sys.exit(asyncio.run(main(arguments)))
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
