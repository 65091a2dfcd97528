"""Issue 7, point 3: the processor rides through a graceful broker restart and a broker
SIGKILL while events keep flowing, without a process restart, and ``changes`` and
``rejected`` end up exactly what the state machine says of what the ingest topic holds.

The writer retries a chunk the broker did not take, so the ingest topic may hold some
events twice: the expected outputs are computed from what is really on the ingest topic,
in its order, not from what the test meant to send.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from schemas.messages import IngestEnvelope
from service import metrics
from service.backoff import Deadline
from service.kafka import ensure_topics
from service.processor import Processor
from testkit import (
    Event,
    by_call,
    expected_outcomes,
    kafka,
    partitions_of,
    private_broker,
    produce,
    read_committed,
    settings_for,
)
from tests.integration.test_processor import scenario

PORT = 20100  # this test's own broker (ports 20100-20101)


@pytest.fixture
async def own_broker() -> AsyncIterator[dict[str, str]]:
    async with private_broker(PORT) as broker:
        yield broker


def endless_scenarios(rng: random.Random) -> Iterator[list[Event]]:
    """Chunks of 10 events, from one 500-call scenario after another (fresh call ids in
    each), for as long as they are asked for: the load must outlast the faults however
    slowly the broker comes back on a given machine, so no fixed supply of events."""
    while True:
        events = scenario(rng, calls=500)
        for i in range(0, len(events), 10):
            yield events[i : i + 10]


async def keep_writing(
    bootstrap: str, topic: str, chunks: Iterator[list[Event]], enough: asyncio.Event
) -> list[Event]:
    """Write ``chunks`` until ``enough`` is set; a chunk that fails (broker away, a
    producer that lost its sequence) is written again by a fresh producer. Returns the
    events written (acknowledged)."""
    done: list[Event] = []
    for chunk in chunks:
        if enough.is_set():
            break
        while True:
            try:
                # No timeout of our own: cancelling would leave the producer unclosed,
                # and aiokafka's idempotent sends wait for the broker to come back.
                await produce(bootstrap, topic, chunk)
                break
            except (KafkaError, OSError):
                await asyncio.sleep(0.5)  # retry pacing while the broker is away
        done += chunk
    return done


async def ingest_events(bootstrap: str, topic: str) -> list[Event]:
    """Every event on the ingest topic, partition by partition, in offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[Event] = []
    try:
        deadline = Deadline(60)
        tps = await partitions_of(bootstrap, topic, asyncio.get_running_loop().time() + 60)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            assert not deadline.expired, "could not read the ingest topic"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    e = IngestEnvelope.model_validate_json(r.value or b"")
                    out.append(Event(e.eventId, e.call, e.source, e.receivedAt))
    finally:
        await consumer.stop()
    return out


def processed(p: Processor) -> int:
    return sum(w.next_offset for w in p._workers.values())


async def wait_for_progress(p: Processor, beyond: int, what: str) -> None:
    deadline = Deadline(300)
    while processed(p) <= beyond:
        assert not deadline.expired, f"the processor made no progress {what}"
        await asyncio.sleep(0.2)  # polling interval


def sigkill_broker(broker: dict[str, str]) -> None:
    """SIGKILL the broker and wait until its port is closed: a JVM takes a moment to go
    after the signal, and the launcher refuses to start on a port still in use."""
    # The launcher records the broker's pid in its data dir (deploy/local/kafka).
    pid = int((Path(broker["KAFKA_DATA_DIR"]) / "kafka.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    give_up = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
        except OSError:
            return  # nobody listens any more
        assert time.monotonic() < give_up, "the killed broker still listens"
        time.sleep(0.2)  # polling interval


async def test_broker_restart_and_sigkill_under_load(
    own_broker: dict[str, str], unique: str
) -> None:
    bootstrap = own_broker["address"]
    settings = settings_for(bootstrap, unique, topic_partitions=3, processor_batch_max=20)
    await ensure_topics(settings)
    restarts_before = restart_count()
    chunks = endless_scenarios(random.Random(77))

    processor = Processor(settings)
    task = asyncio.create_task(processor.run())
    enough = asyncio.Event()
    writer = asyncio.create_task(keep_writing(bootstrap, settings.topic_ingest, chunks, enough))
    try:
        await wait_for_progress(processor, 0, "before the faults")
        # A graceful restart (what a rolling upgrade does), while events flow.
        await asyncio.to_thread(kafka, "down", own_broker)
        mark = processed(processor)
        await asyncio.to_thread(kafka, "up", own_broker)
        await wait_for_progress(processor, mark, "after the graceful restart")
        assert not task.done(), "the processor gave up"
        # And a crash: no leader hand-over, open transactions left behind.
        await asyncio.to_thread(sigkill_broker, own_broker)
        mark = processed(processor)
        await asyncio.to_thread(kafka, "up", own_broker)
        await wait_for_progress(processor, mark, "after the SIGKILL")
        assert not task.done(), "the processor gave up"
        assert not writer.done(), "the load stopped before the faults were over"
        enough.set()
        acknowledged = await writer

        written = await ingest_events(bootstrap, settings.topic_ingest)
        assert {e.event_id for e in acknowledged} <= {e.event_id for e in written}
        expected = expected_outcomes(written)
        n_changes = sum(map(len, expected.changes.values()))
        n_rejected = sum(map(len, expected.rejected.values()))
        changes = await read_committed(bootstrap, settings.topic_changes, n_changes, 240, 3)
        rejected = await read_committed(bootstrap, settings.topic_rejected, n_rejected, 60, 1)
    finally:
        enough.set()
        await processor.stop()
        await asyncio.wait_for(task, 120)
        if not writer.done():
            writer.cancel()
    assert task.exception() is None  # it was never down for good
    assert len(changes) == n_changes
    assert by_call(changes) == expected.changes
    assert len(rejected) == n_rejected
    assert by_call(rejected) == {c: [e for e, _ in r] for c, r in expected.rejected.items()}
    # For the record: aiokafka usually rides a restart out on the same producers; when
    # it cannot, the processor restarts itself and rebuilds them (both are fine here).
    print(
        f"broker faults under load: {len(written)} ingest records, {n_changes} changes, "
        f"{n_rejected} rejected, {restart_count() - restarts_before:.0f} processor restarts"
    )


def restart_count() -> float:
    return sum(
        sample.value
        for metric in metrics.PROCESSOR_RESTARTS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
