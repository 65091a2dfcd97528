"""A restarted processor restores its states from the state topic and does not
re-accept old events; states past their retention are tombstoned."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from schemas.call import CallStatus
from schemas.messages import Source
from service.kafka import ensure_topics
from service.processor import Processor
from service.settings import Settings
from testkit import (
    ROOT,
    Event,
    make_call,
    produce,
    read_committed,
    settings_env,
    settings_for,
)
from tests.conftest import BOOTSTRAP

S = CallStatus
CALL = "CA" + "5a" * 20


def hook(status: CallStatus, call_id: str = CALL) -> Event:
    return Event(str(uuid.uuid4()), make_call(call_id, status), Source.WEBHOOK)


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


async def test_restart_restores_state_and_never_reaccepts(unique: str) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=2)
    await ensure_topics(settings)
    first = [hook(S.QUEUED), hook(S.RINGING), hook(S.IN_PROGRESS)]
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, first)
        await read_committed(BOOTSTRAP, settings.topic_changes, 3, settle_s=0.5)

    # A new processor: it knows nothing but what the state topic says.
    redelivered = [hook(S.RINGING), hook(S.IN_PROGRESS), hook(S.QUEUED)]
    last = hook(S.COMPLETED)
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, [*redelivered, last])
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 4)
        rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 2)

    values = [json.loads(r.value or b"") for r in changes]
    assert [v["eventId"] for v in values] == [e.event_id for e in [*first, last]]
    # The change after the restart knows where the call was before it.
    assert (values[-1]["previousStatus"], values[-1]["status"]) == ("inProgress", "completed")
    # Redelivered old steps: the same status is a silent duplicate, older ones are late.
    reasons = [json.loads(r.value or b"")["reason"] for r in rejected]
    assert reasons == ["out_of_order", "out_of_order"]


async def test_states_written_by_the_json_release_are_restored_after_an_upgrade(
    unique: str,
) -> None:
    """A state topic written by the release before packed states (version 1, JSON with
    the whole call and the eventIds judged) keeps deciding the same after the upgrade:
    a replayed event is dropped, a late step rejected, the next step accepted."""
    from aiokafka import AIOKafkaProducer

    from service.statecodec import VERSION, unpack

    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    ringing = hook(S.RINGING)
    v1 = {
        "callId": CALL,
        "status": "inProgress",
        "revision": None,
        "eventId": "e-progress",
        "updatedAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "call": {"callId": CALL, "status": "inProgress"},
        "judged": [ringing.event_id, "e-progress"],
    }
    writer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP)
    await writer.start()
    try:
        await writer.send_and_wait(
            settings.topic_state, json.dumps(v1).encode(), key=CALL.encode(), partition=0
        )
    finally:
        await writer.stop()
    late, done = hook(S.QUEUED), hook(S.COMPLETED)
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, [ringing, late, done])
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 1)
        rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 1)
        states = await read_committed(BOOTSTRAP, settings.topic_state, 2)
    change = json.loads(changes[0].value or b"")
    assert (change["eventId"], change["previousStatus"]) == (done.event_id, "inProgress")
    assert [json.loads(r.value or b"")["eventId"] for r in rejected] == [late.event_id]
    # What the processor wrote back is the packed state, remembering the old eventIds.
    assert (states[-1].value or b"")[0] == VERSION
    assert unpack(states[-1].value or b"").status is S.COMPLETED


async def test_retention_tombstones_terminal_calls_in_event_time(unique: str) -> None:
    settings = settings_for(
        BOOTSTRAP,
        unique,
        topic_partitions=1,
        state_terminal_retention_seconds=60,
        signature_tolerance_seconds=30,
    )
    await ensure_topics(settings)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    done, live, later = "CA" + "d0" * 20, "CA" + "11" * 20, "CA" + "22" * 20
    # The wall clock stands still: only the events' receivedAt moves time on.
    async with processor(settings, lambda: t0):
        await produce(
            BOOTSTRAP,
            settings.topic_ingest,
            [
                Event(str(uuid.uuid4()), make_call(done, S.COMPLETED), Source.WEBHOOK, t0),
                Event(str(uuid.uuid4()), make_call(live, S.RINGING), Source.WEBHOOK, t0),
            ],
        )
        await read_committed(BOOTSTRAP, settings.topic_state, 2, settle_s=0.2)
        # Five minutes later in event time: past the terminal retention, not the idle one.
        at = t0 + timedelta(minutes=5)
        await produce(
            BOOTSTRAP,
            settings.topic_ingest,
            [Event(str(uuid.uuid4()), make_call(later, S.QUEUED), Source.WEBHOOK, at)],
        )
        states = await read_committed(BOOTSTRAP, settings.topic_state, 4)

    tombstones = [r.key for r in states if r.value is None]
    assert tombstones == [done.encode()]


async def test_tail_prints_one_line_per_change_and_rejection(unique: str) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, [hook(S.IN_PROGRESS), hook(S.RINGING)])
        await read_committed(BOOTSTRAP, settings.topic_rejected, 1, settle_s=0.2)
    env = {**settings_env(settings, 8080), "PATH": os.environ.get("PATH", "")}
    out = await asyncio.to_thread(
        subprocess.run,
        [
            str(ROOT / ".venv/bin/callstatus"),
            "tail",
            "--from-beginning",
            "--max-messages",
            "1",
            "--idle-timeout",
            "30",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1  # --max-messages is exact, even within one fetched batch
    assert f"CHANGED  {CALL} (new) -> inProgress" in lines[0] or (
        f"REJECTED {CALL} inProgress -> ringing out_of_order" in lines[0]
    )
    as_json = await asyncio.to_thread(
        subprocess.run,
        [
            str(ROOT / ".venv/bin/callstatus"),
            "tail",
            "--from-beginning",
            "--json",
            "--idle-timeout",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    messages = [json.loads(line) for line in as_json.stdout.strip().splitlines()]
    assert sorted(m.get("reason", "") for m in messages) == ["", "out_of_order"]


async def test_a_fenced_processor_rebuilds_and_stays_exactly_once(unique: str) -> None:
    """Another owner initialising the partition's transactional id (what a new member
    does) fences us: our next commit fails, nothing of it is visible, and the restart
    rebuilds from Kafka without losing or repeating a change."""
    from aiokafka import AIOKafkaProducer

    from service import metrics
    from service.processor import transactional_id

    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    # The broker answers a fenced producer with either error, depending on the request.
    fences = [
        metrics.PROCESSOR_RESTARTS.labels(r) for r in ("ProducerFenced", "InvalidProducerEpoch")
    ]
    before = sum(c._value.get() for c in fences)
    first = [hook(S.QUEUED), hook(S.RINGING)]
    later = [hook(S.IN_PROGRESS), hook(S.QUEUED), hook(S.COMPLETED)]
    async with processor(settings):
        await produce(BOOTSTRAP, settings.topic_ingest, first)
        await read_committed(BOOTSTRAP, settings.topic_changes, 2, settle_s=0)
        usurper = AIOKafkaProducer(
            bootstrap_servers=BOOTSTRAP,
            transactional_id=transactional_id(settings.consumer_group, settings.topic_ingest, 0),
        )
        await usurper.start()
        await usurper.begin_transaction()  # waits for InitProducerId: the fence is up
        await usurper.abort_transaction()
        await usurper.stop()
        await produce(BOOTSTRAP, settings.topic_ingest, later)
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, 4)
        rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 1)
    assert [json.loads(r.value or b"")["eventId"] for r in changes] == [
        e.event_id for e in (*first, later[0], later[2])
    ]
    assert [json.loads(r.value or b"")["eventId"] for r in rejected] == [later[1].event_id]
    assert sum(c._value.get() for c in fences) > before  # it really was fenced and restarted
    # aiokafka leaves its internal batch futures of the fenced transaction with an
    # unretrieved error; collect them here rather than at some random later moment
    # (CPython 3.11.7 can fail compiling a module if such a __del__ runs mid-compile).
    gc.collect()
