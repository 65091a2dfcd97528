"""End to end: from the 202 to the change being visible to a ``read_committed`` consumer,
with ``ROLE=all`` at a fixed offered rate (open loop). Each request is a new call, so each
202 must become exactly one change; the change's ``ce_id`` header is the 202's eventId."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from bench import load
from bench.servers import Server
from service.stats import percentile
from testkit import partitions_of


async def run(
    vegeta: Path,
    server: Server,
    bootstrap: str,
    changes_topic: str,
    targets: Path,
    results: Path,
    rate: float,
    seconds: float,
) -> dict[str, object]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    seen: dict[str, float] = {}
    try:
        loop = asyncio.get_running_loop()
        tps = await partitions_of(bootstrap, changes_topic, loop.time() + 60)
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, before any change of ours can land
            await consumer.position(tp)

        async def follow() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for records in batches.values():
                    for r in records:
                        for key, value in r.headers:
                            if key == "ce_id":
                                seen[value.decode()] = now

        follower = asyncio.create_task(follow())
        try:
            report = await load.attack(vegeta, targets, results, seconds, rate)
            accepted = {
                json.loads(a.body)["eventId"]: a.answered_at
                for a in await load.answers(vegeta, results)
                if a.code == 202
            }
            give_up = loop.time() + 60
            while True:
                if accepted.keys() <= seen.keys() or loop.time() > give_up:
                    break
                await asyncio.sleep(0.1)  # polling interval
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    finally:
        await consumer.stop()
    delays = [(seen[e] - t) * 1000 for e, t in accepted.items() if e in seen]
    return {
        "offered": rate,
        "ingest": report.as_json(),
        "accepted": len(accepted),
        "visible": len(delays),
        # No change seen at all: "n/a" in the table, never a latency of 0.
        "p50_ms": percentile(delays, 50) if delays else math.nan,
        "p99_ms": percentile(delays, 99) if delays else math.nan,
    }
