"""Which path an event takes while the spool holds events (issue 16, finding 3), against
a broker of the test's own: a call with events in the spool is spooled behind them; a
call with nothing spooled goes straight to Kafka once Kafka takes writes again; while
Kafka is failing every event goes to the spool at once; and a spool left by an earlier
run holds every call back until it has emptied. Per-call order holds throughout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service import metrics
from service.kafka import ensure_topics
from service.producer import IngestProducer
from service.publisher import SpoolingPublisher
from service.settings import Settings
from service.spool import Spool
from testkit import kafka, private_broker, read_committed, settings_for

CALL_A = b"CA" + b"a1" * 20
CALL_B = b"CA" + b"b2" * 20
CALL_C = b"CA" + b"c3" * 20


@pytest.fixture
async def broker() -> AsyncIterator[dict[str, str]]:
    async with private_broker(19592) as env:
        yield env


def settings(env: dict[str, str], unique: str) -> Settings:
    return settings_for(
        env["address"],
        unique,
        role="ingest",
        produce_timeout_seconds=1.0,
        produce_delivery_timeout_seconds=3.0,
    )


async def publish(publisher: SpoolingPublisher, call: bytes, n: int) -> None:
    value = json.dumps({"call": call.decode(), "n": n}).encode()
    await publisher.publish(call, value, [("ce_id", f"{call.decode()}-{n}".encode())])


def appends() -> float:
    return float(metrics.SPOOL_APPENDS._value.get())


async def until(condition: object, deadline_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not condition():  # type: ignore[operator]
        assert loop.time() < give_up, "condition not reached in time"
        await asyncio.sleep(0.05)  # polling interval


async def ingest_order(s: Settings, expected: int) -> dict[str, list[int]]:
    records = await read_committed(s.kafka_bootstrap_servers, s.topic_ingest, expected)
    order: dict[str, list[int]] = {}
    for r in records:
        value = json.loads(r.value or b"")
        order.setdefault(value["call"], []).append(value["n"])
    return order


async def test_calls_with_nothing_spooled_go_straight_to_kafka_while_the_spool_drains(
    broker: dict[str, str], unique: str, tmp_path: Path
) -> None:
    s = settings(broker, unique)
    await ensure_topics(s)
    publisher = SpoolingPublisher(IngestProducer(s), Spool(tmp_path, 1 << 24), 5.0)
    # The spool and the producer, but no drainer yet: the test decides when it runs.
    publisher.spool.open()
    await publisher.producer.start()
    try:
        await publish(publisher, CALL_A, 1)  # Kafka up, spool empty: direct
        assert publisher.spool.events == 0

        await asyncio.to_thread(kafka, "down", broker)
        await publish(publisher, CALL_A, 2)  # waits out the produce timeout, then spools
        assert publisher.spool.events == 1
        timeouts = metrics.PRODUCE_ERRORS.labels("timeout")._value.get()
        # Kafka is failing: a call with nothing spooled is spooled at once, without
        # another produce attempt that would hold its answer for the timeout.
        await publish(publisher, CALL_B, 1)
        assert publisher.spool.events == 2
        assert metrics.PRODUCE_ERRORS.labels("timeout")._value.get() == timeouts

        await asyncio.to_thread(kafka, "up", broker)
        await until(lambda: publisher.producer.usable)
        # The drainer's first acknowledged batch is what tells the publisher Kafka takes
        # writes again; stand in for that moment while the spool still holds A2 and B1.
        publisher._kafka_ok = True
        before = appends()
        await publish(publisher, CALL_C, 1)  # nothing of C spooled: straight to Kafka
        assert appends() == before and publisher.spool.events == 2
        await publish(publisher, CALL_A, 3)  # A2 is spooled: A3 must queue behind it
        assert appends() == before + 1 and publisher.spool.events == 3

        # Now the drainer: it sends A2, B1, A3 in spool order, and its acks clear them.
        publisher._drainer = asyncio.create_task(publisher._supervise(publisher._drain))
        await until(lambda: publisher.spool.events == 0)
        assert not publisher._spooled
        await publish(publisher, CALL_A, 4)  # A has nothing spooled any more: direct
        assert publisher.spool.events == 0
    finally:
        await publisher.stop()

    order = await ingest_order(s, 6)
    # A1 and A2 may both be in Kafka twice at most if A2's timed-out send landed late;
    # what matters is the order of first appearances and that nothing is missing.
    first_seen = {call: list(dict.fromkeys(ns)) for call, ns in order.items()}
    assert first_seen == {CALL_A.decode(): [1, 2, 3, 4], CALL_B.decode(): [1], CALL_C.decode(): [1]}


async def test_a_drained_batch_acknowledged_reopens_the_direct_path(
    broker: dict[str, str], unique: str, tmp_path: Path
) -> None:
    s = settings(broker, unique)
    await ensure_topics(s)
    publisher = SpoolingPublisher(IngestProducer(s), Spool(tmp_path, 1 << 24), 5.0)
    await publisher.start()
    try:
        await asyncio.to_thread(kafka, "down", broker)
        await publish(publisher, CALL_A, 1)
        assert not publisher._kafka_ok and publisher.spool.events == 1
        await asyncio.to_thread(kafka, "up", broker)
        await until(lambda: publisher.spool.events == 0)
        assert publisher._kafka_ok
    finally:
        await publisher.stop()


async def test_a_spool_left_by_an_earlier_run_holds_every_call_back_until_it_empties(
    broker: dict[str, str], unique: str, tmp_path: Path
) -> None:
    s = settings(broker, unique)
    await ensure_topics(s)
    first = SpoolingPublisher(IngestProducer(s), Spool(tmp_path, 1 << 24), 0.0)
    first.spool.open()
    await first.producer.start()
    await asyncio.to_thread(kafka, "down", broker)
    try:
        await publish(first, CALL_A, 1)
        await publish(first, CALL_B, 1)
        assert first.spool.events == 2
    finally:
        # Kafka back first: a producer stopping without a broker waits for it (the node
        # bounds its stop; this test has no node). No drainer ran: both stay spooled.
        await asyncio.to_thread(kafka, "up", broker)
        await first.stop()
    second = SpoolingPublisher(IngestProducer(s), Spool(tmp_path, 1 << 24), 5.0)
    second.open()  # the drainer waits: no producer yet
    try:
        assert second.spool.events == 2 and not second._keys_known
        # Which calls the earlier run spooled is not known: even C is spooled.
        await publish(second, CALL_C, 1)
        assert second.spool.events == 3
        await second.producer.start()
        await until(lambda: second.spool.events == 0)
        assert second._keys_known and not second._spooled
    finally:
        await second.stop()
    order = await ingest_order(s, 3)
    assert {call: ns[:1] for call, ns in order.items()} == {
        CALL_A.decode(): [1],
        CALL_B.decode(): [1],
        CALL_C.decode(): [1],
    }
