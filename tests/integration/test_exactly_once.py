"""Exactly-once on changes and rejected, proven against the real broker with real
processes: SIGKILLs at random moments, and members joining and leaving the group.

Each test produces a stream of events while it disturbs the processors, then lets one
processor finish, and compares what ``read_committed`` readers see with what the pure
FSM says, call by call and in order: a lost, duplicated or reordered output fails it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from service.kafka import ensure_topics
from service.settings import Settings
from testkit import (
    Event,
    ServiceProcess,
    by_call,
    expected_outcomes,
    produce,
    read_committed,
    settings_for,
)
from tests.conftest import BOOTSTRAP
from tests.integration.test_processor import scenario


async def check_exactly_once(settings: Settings, events: list[Event]) -> None:
    expected = expected_outcomes(events)
    n_changes = sum(map(len, expected.changes.values()))
    n_rejected = sum(map(len, expected.rejected.values()))
    changes = await read_committed(BOOTSTRAP, settings.topic_changes, n_changes, 180, 3)
    rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, n_rejected, 60, 1)
    assert len(changes) == n_changes
    assert by_call(changes) == expected.changes
    assert len(rejected) == n_rejected
    assert by_call(rejected) == {
        cid: [eid for eid, _ in rej] for cid, rej in expected.rejected.items()
    }


async def pause(rng: random.Random, low: float, high: float) -> None:
    # A random moment to strike, not a synchronisation: nothing waits for this.
    await asyncio.sleep(rng.uniform(low, high))


async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    unique: str, tmp_path: Path
) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=6, processor_batch_max=50)
    await ensure_topics(settings)
    rng = random.Random(2026)
    events = scenario(rng, calls=240)

    # Ten chunks, a kill in every other one: five kills, each at a random moment while a
    # full chunk flows (a kill and its restart cost ~7 s of the suite's budget).
    size = -(-len(events) // 10)
    chunks = [events[i : i + size] for i in range(0, len(events), size)]
    kills = 0
    proc = ServiceProcess(settings, tmp_path, "p0")
    for n, chunk in enumerate(chunks):
        if n % 2 == 0:
            # Strike while this chunk is being processed: after the node has its
            # partitions, at a random moment while events flow in.
            await proc.wait_ready()
            producing = asyncio.create_task(produce(BOOTSTRAP, settings.topic_ingest, chunk))
            await pause(rng, 0.05, 1.5)
            proc.kill()
            kills += 1
            await producing
            proc = ServiceProcess(settings, tmp_path, f"p{n}")
        else:
            await produce(BOOTSTRAP, settings.topic_ingest, chunk)
    assert kills == 5
    try:
        await check_exactly_once(settings, events)
    finally:
        assert proc.terminate()


async def test_rebalancing_members_lose_and_duplicate_nothing(unique: str, tmp_path: Path) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=6, processor_batch_max=50)
    await ensure_topics(settings)
    rng = random.Random(99)
    events = scenario(rng, calls=210)
    chunks = [events[i : i + 100] for i in range(0, len(events), 100)]

    a = ServiceProcess(settings, tmp_path, "a")
    await a.wait_ready()
    await produce(BOOTSTRAP, settings.topic_ingest, chunks[0])
    b = ServiceProcess(settings, tmp_path, "b")  # joins mid-stream
    await produce(BOOTSTRAP, settings.topic_ingest, chunks[1])
    c = ServiceProcess(settings, tmp_path, "c")  # a third joins
    await pause(rng, 1.0, 3.0)
    assert a.terminate()  # leaves cleanly mid-stream
    for chunk in chunks[2:]:
        await produce(BOOTSTRAP, settings.topic_ingest, chunk)
    await pause(rng, 0.5, 2.0)
    b.kill()  # and one dies
    try:
        await check_exactly_once(settings, events)
    finally:
        assert c.terminate()
