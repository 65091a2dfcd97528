"""Kafka transactions, read_committed consumers and consumer groups against a real broker.

These are the broker features the call-status processor relies on, checked with the
client it uses (aiokafka) against the broker the project runs (deploy/local/kafka):

* the admin client creates topics;
* a transactional producer commits and aborts transactions, and while a transaction is
  open its records are not visible to ``read_committed`` readers;
* a ``read_committed`` consumer sees exactly the committed records, an uncommitted
  reader sees the aborted ones too (so the aborted records really were written);
* consumer-group offsets written with ``send_offsets_to_transaction`` take effect when
  the transaction commits, not when it aborts, and a new group member resumes there.

The broker must already be running, e.g. ``deploy/local/kafka up``; its address comes
from ``CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS`` (default ``127.0.0.1:9092``). Every test uses
its own uniquely named topics, groups and transactional ids, so runs never interfere.

No sleeps: every wait is a poll against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

# Needs the real broker: `pytest -m "not kafka"` leaves these out.
pytestmark = pytest.mark.kafka

BOOTSTRAP = os.environ.get("CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")

# Generous upper bounds; on a healthy broker every wait ends in well under a second
# or two (the first transaction / group also creates Kafka's internal topics).
DEADLINE_S = 60.0

T = TypeVar("T")


def _unique(prefix: str) -> str:
    return f"test-broker-txn-{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def _topics(*names: str) -> AsyncIterator[None]:
    """Create single-partition topics with the admin client; delete them afterwards."""
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name=name, num_partitions=1, replication_factor=1) for name in names]
        )
        errors = {entry[0]: entry[1] for entry in response.topic_errors}
        assert errors == dict.fromkeys(names, 0), f"create_topics failed: {response.topic_errors!r}"
        # The topics must be visible in metadata before producers and consumers use them.
        await _poll_until(
            admin.list_topics,
            lambda topics: set(names) <= set(topics),
            what=f"topics {names} listed",
        )
        try:
            yield
        finally:
            await admin.delete_topics(list(names))
    finally:
        await admin.close()


async def _poll_until(
    fetch: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    what: str,
    deadline_s: float = DEADLINE_S,
) -> T:
    """Call ``fetch`` until ``done(result)``; fail with the last result at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        result = await fetch()
        if done(result):
            return result
        if loop.time() >= deadline:
            pytest.fail(f"timed out after {deadline_s}s waiting for {what}; last: {result!r}")


@contextlib.asynccontextmanager
async def _transactional_producer() -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=BOOTSTRAP,
        transactional_id=_unique("txid"),
        enable_idempotence=True,
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def _consumer(
    *topics: str, isolation_level: str, group_id: str | None = None
) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=BOOTSTRAP,
        group_id=group_id,
        isolation_level=isolation_level,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _consume(
    consumer: AIOKafkaConsumer, count: int, *, deadline_s: float = DEADLINE_S
) -> list[tuple[int, bytes]]:
    """Read until ``count`` records arrived (or the deadline); return (offset, value)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    received: list[tuple[int, bytes]] = []
    while len(received) < count and loop.time() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            received.extend((r.offset, r.value) for r in records)
    return received


async def _read_to_end(
    consumer: AIOKafkaConsumer, tp: TopicPartition, end: int
) -> list[tuple[int, bytes]]:
    """Keep fetching until the consumer's position reaches ``end``; return what came."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    extra: list[tuple[int, bytes]] = []
    while await consumer.position(tp) < end:
        if loop.time() >= deadline:
            pytest.fail(f"position stuck at {await consumer.position(tp)}, expected {end}")
        batches = await consumer.getmany(tp, timeout_ms=200)
        extra.extend((r.offset, r.value) for r in batches.get(tp, []))
    return extra


async def _send_all(producer: AIOKafkaProducer, topic: str, values: list[bytes]) -> None:
    """Send inside the producer's current transaction and wait until each is acked."""
    for value in values:
        await (await producer.send(topic, value))


def _values(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


@pytest.mark.asyncio
async def test_read_committed_sees_exactly_the_committed_transactions() -> None:
    topic = _unique("topic")
    async with _topics(topic):
        await _check_read_committed(topic)


async def _check_read_committed(topic: str) -> None:
    tp = TopicPartition(topic, 0)

    first, aborted, open_txn = _values("commit-a", 3), _values("abort", 4), _values("commit-b", 2)

    async with _transactional_producer() as producer:
        async with producer.transaction():
            await _send_all(producer, topic, first)

        await producer.begin_transaction()
        await _send_all(producer, topic, aborted)
        await producer.abort_transaction()

        # A transaction that is open but not committed: its records are in the log
        # (acknowledged), yet read_committed readers must stop before them.
        await producer.begin_transaction()
        await _send_all(producer, topic, open_txn)
        async with (
            _consumer(isolation_level="read_uncommitted") as uncommitted,
            _consumer(isolation_level="read_committed") as committed,
        ):
            high_watermark = (await uncommitted.end_offsets([tp]))[tp]
            last_stable = (await committed.end_offsets([tp]))[tp]
        # 3 committed + marker, 4 aborted + marker, then the 2 open records.
        assert high_watermark == 3 + 1 + 4 + 1 + 2
        assert last_stable == high_watermark - len(open_txn), (
            "the open transaction's records must not be readable under read_committed"
        )
        await producer.commit_transaction()

    async with _consumer(topic, isolation_level="read_committed") as consumer:
        # Everything committed arrives, in order; the aborted records sit between the two
        # committed transactions in the log, so they would show up before "commit-b-*".
        received = await _consume(consumer, len(first) + len(open_txn))
        assert [value for _, value in received] == first + open_txn
        # ...and nothing else follows: reading on up to the end of the log (past the
        # last commit marker) yields no further record.
        end = (await consumer.end_offsets([tp]))[tp]
        assert end == 3 + 1 + 4 + 1 + 2 + 1
        assert await _read_to_end(consumer, tp, end) == []

    # The aborted records physically exist: an uncommitted reader gets all nine values.
    async with _consumer(topic, isolation_level="read_uncommitted") as consumer:
        received = await _consume(consumer, len(first) + len(aborted) + len(open_txn))
        assert [value for _, value in received] == first + aborted + open_txn


@pytest.mark.asyncio
async def test_send_offsets_to_transaction_commits_group_offsets() -> None:
    source, sink = _unique("source"), _unique("sink")
    async with _topics(source, sink):
        await _check_send_offsets_to_transaction(source, sink)


async def _check_send_offsets_to_transaction(source: str, sink: str) -> None:
    group = _unique("group")
    tp = TopicPartition(source, 0)
    inputs = _values("in", 5)

    async with _transactional_producer() as producer:
        async with producer.transaction():
            await _send_all(producer, source, inputs)

        # A group member consumes the input (joining the group: a real rebalance).
        async with _consumer(source, group_id=group, isolation_level="read_committed") as member:
            received = await _consume(member, len(inputs))
            assert [value for _, value in received] == inputs
            assert [offset for offset, _ in received] == list(range(len(inputs)))
            assert await member.committed(tp) is None

            # Consume-transform-produce: output plus the group's offset in one transaction.
            async with producer.transaction():
                await _send_all(producer, sink, [b"out-0", b"out-1", b"out-2"])
                await producer.send_offsets_to_transaction({tp: 3}, group)
            # The coordinator writes the commit markers (here: into __consumer_offsets)
            # just after commit_transaction returns, so the offset shows up shortly.
            await _poll_until(
                lambda: member.committed(tp), lambda offset: offset == 3, what="offset 3 committed"
            )

            # Offsets sent in an aborted transaction must not take effect.
            await producer.begin_transaction()
            await _send_all(producer, sink, [b"out-aborted"])
            await producer.send_offsets_to_transaction({tp: 5}, group)
            await producer.abort_transaction()

            # The coordinator only lets this transactional id run the next transaction
            # once the aborted one is fully completed, so after this commit the abort
            # has been applied everywhere and the group's offset is final.
            async with producer.transaction():
                await _send_all(producer, sink, [b"out-3"])
            assert await member.committed(tp) == 3

    # A new member of the group resumes from the transactionally committed offset.
    async with _consumer(source, group_id=group, isolation_level="read_committed") as member:
        resumed = await _consume(member, len(inputs) - 3)
        assert [offset for offset, _ in resumed] == [3, 4]
        assert [value for _, value in resumed] == inputs[3:]

    # The output topic holds exactly the committed output.
    async with _consumer(sink, isolation_level="read_committed") as reader:
        outputs = await _consume(reader, 4)
        assert [value for _, value in outputs] == [b"out-0", b"out-1", b"out-2", b"out-3"]
