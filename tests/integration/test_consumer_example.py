"""examples/consumer.py against the real broker: it sees only committed changes, skips
a change whose eventId it handled already and a message that breaks the published
schema, keeps per-call order, and commits its offsets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from examples.consumer import Change, ChangesConsumer, SeenEvents
from schemas.call import CallStatus
from schemas.messages import Source, encode_outcome
from testkit import create_topics, make_call
from tests.conftest import BOOTSTRAP

S = CallStatus
CALL_A, CALL_B = "CA" + "a" * 40, "CA" + "b" * 40


def change(call_id: str, before: CallStatus | None, status: CallStatus) -> tuple[str, bytes]:
    event_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    value = encode_outcome(
        event_id=event_id,
        call=make_call(call_id, status),
        previous_status=before,
        previous_revision=None,
        source=Source.WEBHOOK,
        request_type="callStatus",
        received_at=now,
        processed_at=now,
    )
    return event_id, value


async def publish(
    producer: AIOKafkaProducer, topic: str, records: list[tuple[str, bytes]], commit: bool
) -> None:
    """One transaction, committed or aborted, as the processor writes them."""
    await producer.begin_transaction()
    for key, value in records:
        await producer.send_and_wait(topic, value=value, key=key.encode())
    if commit:
        await producer.commit_transaction()
    else:
        await producer.abort_transaction()


async def consume_until(
    consumer: ChangesConsumer, done: Callable[[ChangesConsumer], bool], deadline_s: float = 60
) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    try:
        while not done(consumer):
            assert not running.done(), running.exception()
            assert loop.time() < give_up, f"consumer stuck at {consumer.counts}"
            await asyncio.sleep(0.1)  # polling interval
    finally:
        stop.set()
        await running


async def test_consumer_example(unique: str) -> None:
    topic = f"t-{unique}.changes"
    await create_topics(BOOTSTRAP, [topic], partitions=2)
    a1, a2, a3 = (
        change(CALL_A, None, S.RINGING),
        change(CALL_A, S.RINGING, S.IN_PROGRESS),
        (change(CALL_A, S.IN_PROGRESS, S.COMPLETED)),
    )
    b1 = change(CALL_B, None, S.QUEUED)
    aborted = change(CALL_B, S.QUEUED, S.RINGING)
    invalid = (str(uuid.uuid4()), b'{"eventId":"x","callId":"not a call id"}')

    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=f"tx-{unique}")
    await producer.start()
    try:
        await publish(producer, topic, [(CALL_A, a1[1]), (CALL_A, a2[1]), (CALL_B, b1[1])], True)
        await publish(producer, topic, [(CALL_B, aborted[1])], commit=False)
        # The same change again (as a replay would bring it), a message that breaks the
        # schema, and the call's last change.
        await publish(
            producer, topic, [(CALL_A, a1[1]), (CALL_B, invalid[1]), (CALL_A, a3[1])], True
        )
    finally:
        await producer.stop()

    handled: list[Change] = []

    async def handler(c: Change) -> None:
        handled.append(c)

    seen = SeenEvents()
    group = f"g-{unique}"
    first = ChangesConsumer(BOOTSTRAP, topic, group, handler, seen)
    await consume_until(first, lambda c: c.counts.handled + c.counts.duplicates >= 5)
    assert first.counts.handled == 4
    assert first.counts.duplicates == 1
    assert first.counts.invalid == 1
    ids = [c["eventId"] for c in handled]
    assert aborted[0] not in ids, "an aborted change was handled"
    assert [i for i in ids if i in (a1[0], a2[0], a3[0])] == [a1[0], a2[0], a3[0]]  # call order
    assert set(ids) == {a1[0], a2[0], a3[0], b1[0]}

    # Offsets were committed: the same group starts after what it handled.
    b2 = change(CALL_B, S.QUEUED, S.BUSY)
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=f"tx-{unique}")
    await producer.start()
    try:
        await publish(producer, topic, [(CALL_B, b2[1])], commit=True)
    finally:
        await producer.stop()
    handled.clear()
    again = ChangesConsumer(BOOTSTRAP, topic, group, handler, seen)
    await consume_until(again, lambda c: c.counts.handled >= 1)
    assert [c["eventId"] for c in handled] == [b2[0]]
    assert again.counts.duplicates == again.counts.invalid == 0

    # Read again from the start (a new group: what a lost offset commit amounts to):
    # with the same store of handled ids, every change is skipped as a duplicate.
    handled.clear()
    replay = ChangesConsumer(BOOTSTRAP, topic, f"{group}-replay", handler, seen)
    await consume_until(replay, lambda c: c.counts.duplicates >= 6)
    assert handled == []
    assert replay.counts.invalid == 1
