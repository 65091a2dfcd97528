"""The event clock a forger cannot move (issue 17), on the real broker: one ingest record
with receivedAt in 9999 is judged, but it does not move its partition's watermark, so no
state is retired and a replay of an earlier event afterwards is still dropped."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from schemas.call import CallStatus
from schemas.messages import Source
from service import metrics
from service.kafka import ensure_topics
from service.processor import Processor
from service.settings import Settings
from service.statecodec import unpack
from testkit import Event, make_call, produce, read_committed, settings_for
from tests.conftest import BOOTSTRAP

S = CallStatus
CALL, FORGER, SENTINEL = "CA" + "c1" * 20, "CA" + "f0" * 20, "CA" + "e2" * 20
FORGED_AT = datetime(9999, 12, 31, tzinfo=UTC)


def hook(call_id: str, status: CallStatus, at: datetime | None = None) -> Event:
    return Event(str(uuid.uuid4()), make_call(call_id, status), Source.WEBHOOK, at)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Processor]:
    p = Processor(settings)
    task = asyncio.create_task(p.run())
    try:
        yield p
    finally:
        await p.stop()
        await asyncio.wait_for(task, 60)


async def test_a_forged_receivedat_retires_nothing_and_replays_stay_duplicates(
    unique: str,
) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)  # one watermark
    await ensure_topics(settings)
    ringing, completed = hook(CALL, S.RINGING), hook(CALL, S.COMPLETED)
    forged = hook(FORGER, S.QUEUED, FORGED_AT)
    counted = metrics.PROCESSOR_AHEAD_OF_CLOCK._value.get()
    async with running(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, [ringing, completed])
        await read_committed(BOOTSTRAP, settings.topic_changes, 2, settle_s=0)
        await produce(BOOTSTRAP, settings.topic_ingest, [forged])
        await read_committed(BOOTSTRAP, settings.topic_changes, 3, settle_s=0)
        # Replays of the finished call's events, then a new call: once its change is in,
        # everything before it has been judged and committed.
        await produce(BOOTSTRAP, settings.topic_ingest, [completed, ringing])
        await produce(BOOTSTRAP, settings.topic_ingest, [hook(SENTINEL, S.QUEUED)])
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 4)
        rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 0, settle_s=0.5)
        states = await read_committed(BOOTSTRAP, settings.topic_state, 3, settle_s=0.5)

    values = [json.loads(r.value or b"") for r in changes]
    # The forged event was judged (the first of its call), and nothing was judged twice.
    assert [(v["callId"], v["eventId"]) for v in values] == [
        (CALL, ringing.event_id),
        (CALL, completed.event_id),
        (FORGER, forged.event_id),
        (SENTINEL, values[-1]["eventId"]),
    ]
    assert rejected == []
    # No state was retired: without the bound, the watermark in 9999 tombstoned the
    # finished call, and the replay of its last event was a new first event.
    assert [r.key for r in states if r.value is None] == []
    forger_state = [unpack(r.value) for r in states if r.key == FORGER.encode() and r.value]
    assert forger_state and forger_state[-1].updated_at.year < 9999  # kept at the bound
    assert metrics.PROCESSOR_AHEAD_OF_CLOCK._value.get() == counted + 1
