"""Ingest events in and committed outputs out: topics, producing ingest events as the
ingest stage writes them, reading an output topic with read_committed and a deadline,
and what the processor must make of the events (service/oracle.py's prediction)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.call import Call, CallStatus
from schemas.messages import RejectReason, Source, encode_ingest
from service.fsm import Outcome
from service.kafka import partition_counts
from service.oracle import predict


async def create_topics(
    bootstrap: str, names: Sequence[str], partitions: int, compact: Iterable[str] = ()
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        compacted = set(compact)
        await admin.create_topics(
            [
                NewTopic(
                    n,
                    partitions,
                    1,
                    topic_configs={"cleanup.policy": "compact"} if n in compacted else {},
                )
                for n in names
            ]
        )
    finally:
        await admin.close()


@dataclass(frozen=True)
class Event:
    event_id: str
    call: Call
    source: Source = Source.RESOURCE
    received_at: datetime | None = None  # None: when produced


def make_call(
    call_id: str, status: CallStatus, revision: int | None = None, **fields: object
) -> Call:
    return Call.model_validate(
        {"callId": call_id, "status": status, "revision": revision, **fields}
    )


def traceparent(event_id: str) -> bytes:
    """A W3C traceparent derived from the event id, to follow it through the processor."""
    return f"00-{uuid.UUID(event_id).hex}-00f067aa0ba902b7-01".encode()


async def produce(
    bootstrap: str, topic: str, events: Sequence[Event], compression: str | None = None
) -> None:
    """Write events to the ingest topic as the ingest stage does: keyed by callId,
    acks=all, idempotent, so per-call order is the list order."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        compression_type=compression,
    )
    try:
        await producer.start()  # inside: a start that fails must close the producer too
        futures = []
        for e in events:
            received = e.received_at or datetime.now(UTC)
            value = encode_ingest(e.event_id, received, e.source, None, e.call, e.call.to_json())
            headers = [("traceparent", traceparent(e.event_id))]
            futures.append(
                await producer.send(topic, value=value, key=e.call.callId.encode(), headers=headers)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def partitions_of(bootstrap: str, topic: str, give_up: float) -> list[TopicPartition]:
    """The topic's partitions, once the cluster reports them."""
    loop = asyncio.get_running_loop()
    while True:
        count = (await partition_counts({"bootstrap_servers": bootstrap}, [topic])).get(topic, 0)
        if count:
            return [TopicPartition(topic, p) for p in range(count)]
        if loop.time() > give_up:
            raise TimeoutError(f"no metadata for {topic}")
        await asyncio.sleep(0.2)  # polling interval, not synchronisation


async def read_committed(
    bootstrap: str,
    topic: str,
    expected: int | Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    deadline_s: float = 120.0,
    settle_s: float = 2.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the start with read_committed until ``expected`` records are
    in (or, given a predicate, until it holds for what was read), then keep polling
    ``settle_s`` longer so extra (duplicate) records would show. At the deadline it
    returns what it has, for the caller's assertions to judge."""
    enough = expected if callable(expected) else (lambda out: len(out) >= expected)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        tps = await partitions_of(bootstrap, topic, give_up)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        settle_until: float | None = None
        while loop.time() < give_up:
            if enough(out):
                settle_until = settle_until or loop.time() + settle_s
                if loop.time() >= settle_until:
                    break
            batches = await consumer.getmany(timeout_ms=250)
            for records in batches.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


@dataclass
class Expected:
    changes: dict[str, list[str]]  # callId -> accepted eventIds in order
    rejected: dict[str, list[tuple[str, RejectReason]]]


def expected_outcomes(events: Sequence[Event]) -> Expected:
    """The state machine's prediction (service/oracle.py) over each call's events in
    production order, grouped by call."""
    changes: dict[str, list[str]] = defaultdict(list)
    rejected: dict[str, list[tuple[str, RejectReason]]] = defaultdict(list)
    predictions = predict((e.event_id, e.call) for e in events)
    for e, p in zip(events, predictions, strict=True):
        cid = e.call.callId
        if p.outcome is Outcome.ACCEPTED:
            changes[cid].append(e.event_id)
        elif p.outcome is Outcome.REJECTED:
            assert p.reason is not None
            rejected[cid].append((e.event_id, p.reason))
    return Expected(dict(changes), dict(rejected))


def by_call(
    records: Iterable[ConsumerRecord[bytes, bytes]], field: str = "eventId"
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = json.loads(r.value or b"{}")
        out[value["callId"]].append(value[field])
    return dict(out)
