"""The processor against the real broker: many interleaved calls with every kind of
misbehaving sequence produce exactly the expected changes and rejections."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord

from schemas.call import CallStatus
from schemas.messages import (
    UNPROCESSABLE_REASONS,
    ChangeMessage,
    RejectedMessage,
    RejectReason,
    Source,
)
from service.fsm import mark
from service.kafka import ensure_topics
from service.processor import Processor
from service.settings import Settings
from service.statecodec import unpack
from testkit import (
    Event,
    ServiceProcess,
    by_call,
    expected_outcomes,
    make_call,
    produce,
    read_committed,
    settings_for,
    traceparent,
)
from tests.conftest import BOOTSTRAP

S = CallStatus
LIFECYCLES = [
    [S.QUEUED, S.RINGING, S.IN_PROGRESS, S.COMPLETED],
    [S.QUEUED, S.RINGING, S.NO_ANSWER],
    [S.QUEUED, S.BUSY],
    [S.RINGING, S.CANCELED],
]


def call_id(rng: random.Random) -> str:
    return "CA" + "".join(rng.choices("0123456789abcdef", k=40))


def scenario(rng: random.Random, calls: int) -> list[Event]:
    """Per call, one of: in order, shuffled, duplicated, gapped, illegal, stale,
    conflicting; then all calls' events interleaved (each call's own order kept)."""
    per_call: list[list[Event]] = []
    for i in range(calls):
        cid = call_id(rng)
        path = rng.choice(LIFECYCLES)
        kind = i % 7
        with_revision = kind in (5, 6) or rng.random() < 0.5

        def ev(
            status: CallStatus,
            rev: int,
            cid: str = cid,
            revised: bool = with_revision,
            **fields: object,
        ) -> Event:
            return Event(
                str(uuid.uuid4()),
                make_call(cid, status, rev if revised else None, **fields),
                Source.RESOURCE if revised else Source.WEBHOOK,
            )

        events = [ev(s, n + 1) for n, s in enumerate(path)]
        if kind == 1:  # shuffled
            rng.shuffle(events)
        elif kind == 2:  # duplicated
            events = [e for e in events for _ in range(rng.randint(1, 3))]
        elif kind == 3:  # gapped
            events = [events[0], events[-1]]
        elif kind == 4:  # illegal: a terminal call "comes back"
            events = [*events, ev(S.IN_PROGRESS, len(events) + 1)]
        elif kind == 5:  # stale: an older revision arrives after a newer one
            events = [*events, ev(path[0], 1)]
        elif kind == 6:  # conflicting: same revision, different content
            events = [*events, ev(path[-1], len(path), to="+15550000000")]
        per_call.append(events)
    interleaved: list[Event] = []
    while any(per_call):
        queue = rng.choice([q for q in per_call if q])
        interleaved.append(queue.pop(0))
    return interleaved


@pytest.fixture
async def running(unique: str) -> AsyncIterator[tuple[Settings, Processor]]:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=3)
    await ensure_topics(settings)
    processor = Processor(settings)
    task = asyncio.create_task(processor.run())
    try:
        yield settings, processor
    finally:
        await processor.stop()
        await asyncio.wait_for(task, 60)


async def test_mixed_sequences_yield_exactly_the_expected_outputs(
    running: tuple[Settings, Processor],
) -> None:
    settings, _ = running
    events = scenario(random.Random(7), calls=70)
    expected = expected_outcomes(events)
    # The scenario really exercises every reject reason.
    reasons = {r for rej in expected.rejected.values() for _, r in rej}
    assert reasons == set(RejectReason) - UNPROCESSABLE_REASONS

    await produce(BOOTSTRAP, settings.topic_ingest, events)
    n_changes = sum(map(len, expected.changes.values()))
    n_rejected = sum(map(len, expected.rejected.values()))
    changes = await read_committed(BOOTSTRAP, settings.topic_changes, n_changes)
    rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, n_rejected)

    assert by_call(changes) == expected.changes
    got_rejected = {
        cid: list(zip(ids, reasons, strict=True))
        for (cid, ids), reasons in zip(
            by_call(rejected).items(), by_call(rejected, "reason").values(), strict=True
        )
    }
    assert got_rejected == {
        cid: [(eid, r.value) for eid, r in rej] for cid, rej in expected.rejected.items()
    }

    # Every message is valid against its model, carries CloudEvents headers and is keyed
    # by callId.
    for record in changes:
        msg = ChangeMessage.model_validate_json(record.value or b"")
        headers = dict(record.headers)
        assert record.key == msg.callId.encode()
        assert headers["ce_specversion"] == b"1.0"
        assert headers["ce_id"] == msg.eventId.encode()
        assert headers["ce_type"] == b"com.freeclimb.call.status.changed"
        assert headers["ce_subject"] == msg.callId.encode()
        assert headers["content-type"] == b"application/json"
        assert headers["traceparent"] == traceparent(msg.eventId)  # the trace continues
    for record in rejected:
        rej = RejectedMessage.model_validate_json(record.value or b"")
        assert dict(record.headers)["ce_type"] == b"com.freeclimb.call.status.rejected"
        assert rej.detail


async def test_state_topic_holds_the_latest_state_per_call(
    running: tuple[Settings, Processor],
) -> None:
    settings, _ = running
    rng = random.Random(11)
    cid = call_id(rng)
    events = [
        Event(str(uuid.uuid4()), make_call(cid, s), Source.WEBHOOK)
        for s in (S.QUEUED, S.RINGING, S.IN_PROGRESS)
    ]
    await produce(BOOTSTRAP, settings.topic_ingest, events)

    def latest_is_in_progress(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        # One state record per call per batch: how many there are depends on batching.
        return bool(records) and unpack(records[-1].value or b"").status is S.IN_PROGRESS

    states = await read_committed(BOOTSTRAP, settings.topic_state, latest_is_in_progress)
    last = unpack(states[-1].value or b"")
    assert (states[-1].key, last.status) == (cid.encode(), S.IN_PROGRESS)
    assert last.remembers(mark(events[-1].event_id))
    # The state lives in the partition numbered like the call's ingest partition.
    changes = await read_committed(BOOTSTRAP, settings.topic_changes, 3)
    assert {r.partition for r in states} == {r.partition for r in changes}
    previous = [json.loads(r.value or b"")["previousStatus"] for r in changes]
    assert previous == [None, "queued", "ringing"]


async def test_unequal_partition_counts_refuse_to_start(unique: str) -> None:
    from service.kafka import TopicLayoutError
    from testkit import create_topics

    settings = settings_for(BOOTSTRAP, unique)
    await create_topics(
        BOOTSTRAP, [settings.topic_ingest, settings.topic_changes, settings.topic_rejected], 3
    )
    await create_topics(BOOTSTRAP, [settings.topic_state], 2, compact=[settings.topic_state])
    with pytest.raises(TopicLayoutError, match="must be equal"):
        await ensure_topics(settings)


async def test_missing_topics_stop_the_service_at_start(unique: str, tmp_path: Path) -> None:
    settings = settings_for(BOOTSTRAP, unique, create_topics=False)
    node = ServiceProcess(settings, tmp_path, "no-topics")
    assert await asyncio.to_thread(node.wait, 60) == 3
    assert "topics missing" in node.log_path.read_text()


async def test_a_corrupt_state_record_stops_the_processor_with_a_repair_hint(
    unique: str, tmp_path: Path
) -> None:
    from aiokafka import AIOKafkaProducer

    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    writer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP)
    await writer.start()
    try:
        await writer.send_and_wait(settings.topic_state, b"{broken", key=b"CA" + b"1" * 40)
    finally:
        await writer.stop()
    node = ServiceProcess(settings, tmp_path, "corrupt")
    assert await asyncio.to_thread(node.wait, 90) == 1  # a failed exit, seen by supervisors
    log = node.log_path.read_text()
    assert "processor crashed" in log
    assert "write a tombstone for that key" in log
