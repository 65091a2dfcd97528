"""The state restore reads only a finished state partition: a transaction still open on
it (its commit landing, say, after a broker restart) is waited for, never read as absent
(service/restore.py, ``_stable_ends``). Real broker, real transactions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import structlog.testing
from aiokafka import AIOKafkaProducer

from schemas.call import CallStatus
from service import restore as restore_module
from service.fsm import CallState
from service.kafka import client_options, ensure_topics
from service.restore import Restored, restore
from service.statecodec import pack
from testkit import settings_for
from tests.conftest import BOOTSTRAP

WAITING = "state partitions hold an unfinished transaction; waiting"


async def test_a_state_written_in_an_open_transaction_is_waited_for_not_missed(
    unique: str,
) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    options = client_options(settings)
    earlier = pack(CallState(CallStatus.RINGING, None, datetime(2026, 12, 1, tzinfo=UTC)))
    later = pack(CallState(CallStatus.IN_PROGRESS, None, datetime(2026, 12, 1, tzinfo=UTC)))
    writer = AIOKafkaProducer(**options, transactional_id=f"w-{unique}", acks="all")
    await writer.start()
    reading: asyncio.Task[dict[int, Restored]] | None = None
    try:
        async with writer.transaction():  # a first state, committed
            await writer.send_and_wait(settings.topic_state, earlier, b"CAcall", partition=0)
        await writer.begin_transaction()  # the next, written and not yet committed
        await writer.send_and_wait(settings.topic_state, later, b"CAcall", partition=0)
        with structlog.testing.capture_logs() as logged:
            reading = asyncio.create_task(restore(options, settings.topic_state, [0]))
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 60
            # Until it says it waits, or (broken) returns having read past the open one.
            while not reading.done() and not any(e["event"] == WAITING for e in logged):
                assert loop.time() < give_up, "restore neither waited nor returned"
                await asyncio.sleep(0.05)  # polling interval
            assert not reading.done(), "restore read past a transaction still open"
            await writer.commit_transaction()
            restored = (await asyncio.wait_for(reading, 60))[0]
    finally:
        if reading is not None and not reading.done():
            reading.cancel()
            await asyncio.wait([reading])
        await writer.stop()
    assert restored.states == {"CAcall": later}  # the commit's state, not the one before
    assert any(e["event"] == "state partitions finished their transaction" for e in logged)


async def test_a_transaction_that_stays_open_ends_the_wait_with_its_remedy(unique: str) -> None:
    """Past its deadline the wait gives up (the processor then restarts and waits again),
    naming the partition and how an operator finds the transaction."""
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    options = client_options(settings)
    state = pack(CallState(CallStatus.RINGING, None, datetime(2026, 12, 1, tzinfo=UTC)))
    writer = AIOKafkaProducer(**options, transactional_id=f"w-{unique}", acks="all")
    await writer.start()
    try:
        await writer.begin_transaction()
        await writer.send_and_wait(settings.topic_state, state, b"CAcall", partition=0)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(restore_module, "STABLE_DEADLINE_SECONDS", 0.5)
            with pytest.raises(TimeoutError) as exc:
                await restore(options, settings.topic_state, [0])
        await writer.abort_transaction()
    finally:
        await writer.stop()
    assert "state partitions [0]" in str(exc.value)
    assert "kafka-transactions.sh find-hanging" in str(exc.value)
