"""The state restore reads only a finished state partition: a transaction still open on
it (its commit landing, say, after a broker restart) is waited for, never read as absent
(service/restore.py, ``_stable_ends``). Real broker, real transactions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from schemas.call import CallStatus
from service.fsm import CallState
from service.kafka import client_options, ensure_topics
from service.restore import restore
from service.statecodec import pack
from testkit import settings_for
from tests.conftest import BOOTSTRAP

NOT_BEFORE_S = 3.0  # a broken restore returns at once; a sound one waits for the commit


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
    try:
        async with writer.transaction():  # a first state, committed
            await writer.send_and_wait(settings.topic_state, earlier, b"CAcall", partition=0)
        await writer.begin_transaction()  # the next, written and not yet committed
        await writer.send_and_wait(settings.topic_state, later, b"CAcall", partition=0)
        reading = asyncio.create_task(restore(options, settings.topic_state, [0]))
        await asyncio.wait([reading], timeout=NOT_BEFORE_S)  # done early only if broken
        assert not reading.done(), "restore read past a transaction still open"
        await writer.commit_transaction()
        restored = (await asyncio.wait_for(reading, 60))[0]
    finally:
        await writer.stop()
    assert restored.states == {"CAcall": later}  # the commit's state, not the one before
