"""The exactly-once holes of issue 8, each against the real broker: a record Kafka
refuses for good (alone, and ahead of batches that then fail on their sequence numbers),
an undecodable record, every Kafka codec, a backlog replayed long
after the events, and another owner's transaction that moves no offset."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from schemas.call import CallStatus
from schemas.messages import (
    UNPROCESSABLE_KEEP_BYTES,
    RejectReason,
    Source,
    UnprocessableMessage,
)
from service import metrics
from service.backoff import Deadline
from service.kafka import ensure_topics
from service.processor import Processor, transactional_id
from service.settings import Settings
from testkit import (
    Event,
    ServiceProcess,
    make_call,
    produce,
    read_committed,
    settings_for,
)
from tests.conftest import BOOTSTRAP

S = CallStatus
T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def hook(call_id: str, status: CallStatus, at: datetime | None = None, **fields: object) -> Event:
    return Event(str(uuid.uuid4()), make_call(call_id, status, None, **fields), Source.WEBHOOK, at)


def cid(n: int) -> str:
    return "CA" + f"{n:040x}"


@asynccontextmanager
async def processor(
    settings: Settings, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[Processor]:
    p = Processor(settings, clock) if clock else Processor(settings)
    task = asyncio.create_task(p.run())
    try:
        yield p
    finally:
        await p.stop()
        await asyncio.wait_for(task, 60)


def event_ids(records: list[object]) -> list[str]:
    return [json.loads(r.value or b"")["eventId"] for r in records]  # type: ignore[attr-defined]


async def committed_offset(settings: Settings, partition: int = 0) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=settings.consumer_group)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(
            TopicPartition(settings.topic_ingest, partition)
        )
        return offset
    finally:
        await consumer.stop()


async def test_an_unwritable_event_goes_to_rejected_and_loses_nothing_else(unique: str) -> None:
    """Issue 8's reproduction: changes takes at most 2 KiB per record batch; one event is
    larger. Before the fix the whole batch vanished from changes while offset and states
    committed. Now the small ones are changes and the large one an `unwritable`."""
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    # Made by hand: the service's start-up now refuses a changes topic this small
    # (ensure_topics), but a topic's limit can still be lowered while it runs.
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(settings.topic_changes, 1, 1, topic_configs={"max.message.bytes": "2048"}),
                *(NewTopic(t, 1, 1) for t in (settings.topic_ingest, settings.topic_rejected)),
                NewTopic(settings.topic_state, 1, 1, topic_configs={"cleanup.policy": "compact"}),
            ]
        )
    finally:
        await admin.close()
    # Random, so that no codec brings it under the limit (outputs are lz4-compressed).
    big = {"recordings": "/Calls/x/Recordings?" + secrets.token_urlsafe(6000)}
    events = [
        hook(cid(1), S.QUEUED),
        hook(cid(2), S.RINGING, subresourceUris=big),
        hook(cid(3), S.IN_PROGRESS),
    ]
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, events)
        rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 1)
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 2)
        states = await read_committed(BOOTSTRAP, settings.topic_state, 2)
    assert sorted(event_ids(changes)) == sorted([events[0].event_id, events[2].event_id])
    assert len(rejected) == 1
    msg = UnprocessableMessage.model_validate_json(rejected[0].value or b"")
    assert (msg.reason, msg.eventId, msg.callId) == (
        RejectReason.UNWRITABLE,
        events[1].event_id,
        cid(2),
    )
    assert msg.truncated and msg.valueBytes > UNPROCESSABLE_KEEP_BYTES
    assert len(base64.b64decode(msg.value)) == UNPROCESSABLE_KEEP_BYTES
    # The refused call has no state: its next event starts it afresh.
    assert sorted(r.key for r in states) == [cid(1).encode(), cid(3).encode()]
    assert await committed_offset(settings) == 3


async def test_a_refused_batch_among_the_partitions_later_batches_finds_its_one_record(
    unique: str,
) -> None:
    """The refused record opens a transaction whose outputs fill several record batches
    of one changes partition: Kafka refuses the first, and the batches after it fail too
    (their sequence numbers follow the refused one's). Those are consequences, not more
    culprits: the worker narrows the transaction by halves down to the one record,
    writes its outputs singly, finds it, and goes back to whole batches; every other
    change lands once, the one record is answered on rejected."""
    # The smallest record batches the settings allow (~9 KiB), so ~60 small changes
    # after the large one fill more than one; changes takes 12,000 bytes per batch.
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1, max_body_bytes=1024)
    assert settings.processor_batch_bytes < 12_000
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    settings.topic_changes, 1, 1, topic_configs={"max.message.bytes": "12000"}
                ),
                *(NewTopic(t, 1, 1) for t in (settings.topic_ingest, settings.topic_rejected)),
                NewTopic(settings.topic_state, 1, 1, topic_configs={"cleanup.policy": "compact"}),
            ]
        )
    finally:
        await admin.close()
    big = {"recordings": "/Calls/x/Recordings?" + secrets.token_urlsafe(12_000)}  # ~16 KB
    events = [hook(cid(0), S.RINGING, subresourceUris=big)]
    # Random fields too, so that compression does not fit them all in one batch.
    events += [hook(cid(n), S.QUEUED, to=f"+1{secrets.randbelow(10**10):010d}",
                    subresourceUris={"notes": secrets.token_urlsafe(200)})
               for n in range(1, 61)]  # fmt: skip
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, events)
        rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 1)
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 60)
    assert sorted(event_ids(changes)) == sorted(e.event_id for e in events[1:])
    assert len(changes) == 60  # each once
    [refused] = [UnprocessableMessage.model_validate_json(r.value or b"") for r in rejected]
    assert (refused.reason, refused.eventId) == (RejectReason.UNWRITABLE, events[0].event_id)
    assert await committed_offset(settings) == len(events)


async def test_an_undecodable_record_goes_to_rejected_in_the_same_transaction(
    unique: str,
) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    counted = metrics.PROCESSOR_EVENTS.labels("", "rejected", "undecodable")
    before = counted._value.get()
    call = cid(7)
    async with processor(settings):
        garbage = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP)
        await garbage.start()
        try:
            await garbage.send_and_wait(settings.topic_ingest, b"not an event", key=call.encode())
        finally:
            await garbage.stop()
        after = hook(call, S.QUEUED)
        await produce(BOOTSTRAP, settings.topic_ingest, [after])
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 1)
        rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 1)
    assert event_ids(changes) == [after.event_id]
    # A worker that is gone no longer exports its partition's lag.
    assert ("0",) not in metrics.PROCESSOR_LAG._metrics
    msg = UnprocessableMessage.model_validate_json(rejected[0].value or b"")
    assert msg.reason is RejectReason.UNDECODABLE
    assert base64.b64decode(msg.value) == b"not an event"
    assert (msg.ingestPartition, msg.ingestOffset, msg.eventId) == (0, 0, None)
    assert rejected[0].key == call.encode()
    assert dict(rejected[0].headers)["ce_type"] == b"com.freeclimb.call.status.rejected"
    assert counted._value.get() == before + 1


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_every_kafka_codec_is_readable(unique: str, codec: str) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    events = [hook(cid(20 + n), S.QUEUED) for n in range(5)]
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, events, compression=codec)
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 5)
    assert sorted(event_ids(changes)) == sorted(e.event_id for e in events)


async def test_a_backlog_replayed_late_keeps_terminal_calls_until_event_time_retention(
    unique: str,
) -> None:
    """Issue 8: `completed` at T, the processor back at T+2h, a redelivery ingested at
    T+10 min still in the backlog. Judged on the wall clock the call was forgotten and
    the redelivery became a second `None -> completed`; in event time it is a duplicate."""
    settings = settings_for(
        BOOTSTRAP, unique, topic_partitions=1, state_terminal_retention_seconds=3600
    )
    await ensure_topics(settings)
    call, other, finished = cid(40), cid(41), cid(42)
    first, done = hook(call, S.COMPLETED, T), hook(finished, S.COMPLETED, T)
    async with processor(settings, lambda: T + timedelta(seconds=1)):
        await produce(BOOTSTRAP, settings.topic_ingest, [first, done])
        await read_committed(BOOTSTRAP, settings.topic_changes, 2, settle_s=0)
    backlog = [
        hook(call, S.COMPLETED, T + timedelta(minutes=10)),  # the redelivery
        hook(other, S.QUEUED, T + timedelta(minutes=11)),  # a marker after it
        # An hour and more later in event time: now the finished call may go.
        hook(other, S.RINGING, T + timedelta(minutes=75)),
        hook(call, S.COMPLETED, T + timedelta(minutes=76)),  # forgotten: a new first event
    ]
    await produce(BOOTSTRAP, settings.topic_ingest, backlog)
    async with processor(settings, lambda: T + timedelta(hours=2)):
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 5)
        states = await read_committed(
            BOOTSTRAP,
            settings.topic_state,
            lambda records: any(r.value is None for r in records),  # the sweep's tombstone
            settle_s=1,
        )
    assert event_ids(changes) == [
        first.event_id,
        done.event_id,
        backlog[1].event_id,
        backlog[2].event_id,
        backlog[3].event_id,
    ]
    # The sweep follows event time too: the call nobody touched again is tombstoned.
    assert [r.key for r in states if r.value is None] == [finished.encode()]


async def test_another_owners_offsetless_transaction_means_the_worker_is_not_current(
    unique: str,
) -> None:
    """A worker kept across a rebalance must not miss another owner's transaction that
    wrote only sweep tombstones (no offset): the state partition's end offset shows it."""
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    async with processor(settings) as p:
        await produce(BOOTSTRAP, settings.topic_ingest, [hook(cid(50), S.COMPLETED)])
        await read_committed(BOOTSTRAP, settings.topic_state, 1, settle_s=0)
        consumer = p._consumer
        assert consumer is not None
        async with p._lock:
            worker = p._workers[0]
            assert await worker.still_current(consumer)
            txn_id = transactional_id(settings.consumer_group, settings.topic_ingest, 0)
            impostor = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=txn_id)
            await impostor.start()
            try:
                await impostor.begin_transaction()
                await impostor.send_and_wait(
                    settings.topic_state, None, key=cid(50).encode(), partition=0
                )
                await impostor.commit_transaction()
            finally:
                await impostor.stop()
            assert not await worker.still_current(consumer)


async def test_a_batch_of_several_states_leaves_the_worker_current(unique: str) -> None:
    """The worker writes a batch's states as one record batch, whose delivery names only
    its first offset: the state end it keeps must still be the partition's real end,
    else a rebalance that gave the partition back would needlessly restore it."""
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    # Written before the processor starts, so one fetch (one transaction) holds them all.
    await produce(BOOTSTRAP, settings.topic_ingest, [hook(cid(60 + n), S.QUEUED) for n in range(5)])
    async with processor(settings) as p:
        await read_committed(BOOTSTRAP, settings.topic_state, 5, settle_s=0)
        consumer = p._consumer
        assert consumer is not None
        async with p._lock:
            worker = p._workers[0]
            state_tp = TopicPartition(settings.topic_state, 0)
            end = (await consumer.end_offsets([state_tp]))[state_tp]
            assert worker.state_end == end
            assert await worker.still_current(consumer)


async def test_a_batch_in_a_codec_the_node_cannot_read_stalls_loudly_not_silently(
    unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the codec library (as before cramjam was a dependency) snappy batches
    cannot be read. They are not skipped (ingest acknowledged them): the node says so
    in its log and its metrics, and keeps retrying, and ingest stays up."""
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1, role="all")
    await ensure_topics(settings)
    await produce(BOOTSTRAP, settings.topic_ingest, [hook(cid(60), S.QUEUED)], "snappy")
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "cramjam.py").write_text('raise ImportError("hidden by the test")\n')
    monkeypatch.setenv("PYTHONPATH", str(hidden))
    node = ServiceProcess(settings, tmp_path, "no-codec")
    try:
        deadline = Deadline(90)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as http:
            while True:
                assert node.alive(), node.log_path.read_text()[-3000:]
                try:
                    text = (await http.get("/metrics")).text
                except httpx.TransportError:
                    text = ""
                if 'callstatus_processor_unreadable_total{error="UnsupportedCodecError"}' in text:
                    break
                assert not deadline.expired, "the unreadable batch was never reported"
                await asyncio.sleep(0.5)  # polling interval
            assert (await http.get("/healthz")).status_code == 200  # ingest is still up
        assert node.logged("ingest records unreadable")
        assert await committed_offset(settings) is None  # nothing skipped
    finally:
        assert node.terminate()
