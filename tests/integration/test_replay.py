"""Replays end to end: the ingest app (in process, real producer) and the processor
against the real broker. A captured request re-sent inside the tolerance window, and
FreeClimb's own retry of it (same body, new ``t=``), carry the original's eventId and add
no change and no rejection."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from schemas.messages import IngestEvent
from service.app import create_app
from service.kafka import ensure_topics
from service.processor import Processor
from service.producer import IngestProducer
from service.settings import Settings
from service.signature import sign
from testkit import read_committed, settings_for
from tests.conftest import BOOTSTRAP, SECRET

CALL_ID = "CA" + "9d" * 20
SENTINEL_ID = "CA" + "5e" * 20


def body(status: str, call_id: str = CALL_ID) -> bytes:
    return json.dumps(
        {"requestType": "callStatus", "callId": call_id, "callStatus": status}
    ).encode()


def signed(raw: bytes, at: int) -> dict[str, str]:
    return {"content-type": "application/json", "FreeClimb-Signature": sign(SECRET, at, raw)}


@pytest.fixture(params=[0, 20_000], ids=["no-replay-cache", "replay-cache"])
async def node(
    unique: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Settings, httpx.AsyncClient]]:
    """One ingest app and one processor on fresh topics; with ingest's replay cache off
    (every copy reaches the processor, which must drop it: rule 0, and what happens when
    copies reach different ingest pods) and on (copies are answered at the door)."""
    settings = settings_for(
        BOOTSTRAP,
        unique,
        role="all",
        verify_signatures=True,
        signing_secrets=(SECRET,),
        topic_partitions=1,  # one ordered stream, so a later event proves the earlier judged
        replay_cache_entries=request.param,
    )
    await ensure_topics(settings)
    producer = IngestProducer(settings)
    await producer.start()
    processor = Processor(settings)
    task = asyncio.create_task(processor.run())
    app = create_app(settings, producer)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            yield settings, client
    finally:
        await processor.stop()
        await asyncio.wait_for(task, 60)
        await producer.stop()


async def outputs_after_all_judged(
    settings: Settings, client: httpx.AsyncClient, changes_before: int
) -> tuple[list[str], list[str]]:
    """Send one event of another call and wait for its change: everything sent before it
    has then been judged and committed. Returns the eventIds on changes and rejected."""
    sentinel = body("queued", SENTINEL_ID)
    response = await client.post(
        "/v1/call-status", content=sentinel, headers=signed(sentinel, int(time.time()))
    )
    assert response.status_code == 202
    changes = await read_committed(BOOTSTRAP, settings.topic_changes, changes_before + 1)
    values = [json.loads(r.value or b"") for r in changes]
    assert values[-1]["callId"] == SENTINEL_ID
    rejected = await read_committed(BOOTSTRAP, settings.topic_rejected, 0, settle_s=0.5)
    return (
        [v["eventId"] for v in values if v["callId"] == CALL_ID],
        [json.loads(r.value or b"")["eventId"] for r in rejected],
    )


async def test_a_replay_and_a_retry_are_one_event(
    node: tuple[Settings, httpx.AsyncClient],
) -> None:
    settings, client = node
    ringing = body("ringing")
    now = int(time.time())
    original = await client.post("/v1/call-status", content=ringing, headers=signed(ringing, now))
    # The captured request, byte for byte, and FreeClimb's retry with a fresh timestamp.
    replay = await client.post("/v1/call-status", content=ringing, headers=signed(ringing, now))
    retry = await client.post("/v1/call-status", content=ringing, headers=signed(ringing, now + 30))
    assert [r.status_code for r in (original, replay, retry)] == [202, 202, 202]
    event_id = original.json()["eventId"]
    assert replay.json()["eventId"] == retry.json()["eventId"] == event_id

    # Without the cache all three copies are written; with it, only the first.
    copies = 1 if settings.replay_cache_entries else 3
    stored = await read_committed(BOOTSTRAP, settings.topic_ingest, copies, settle_s=0.5)
    assert [IngestEvent.model_validate_json(r.value or b"").eventId for r in stored] == [
        event_id
    ] * copies
    changes, rejected = await outputs_after_all_judged(settings, client, 1)
    assert (changes, rejected) == ([event_id], [])


async def test_a_replay_of_an_earlier_status_after_a_later_one_adds_nothing(
    node: tuple[Settings, httpx.AsyncClient],
) -> None:
    settings, client = node
    ringing, completed = body("ringing"), body("completed")
    now = int(time.time())
    captured = signed(ringing, now)
    assert (await client.post("/v1/call-status", content=ringing, headers=captured)).is_success
    done = await client.post("/v1/call-status", content=completed, headers=signed(completed, now))
    assert done.is_success
    again = await client.post("/v1/call-status", content=ringing, headers=captured)
    assert again.status_code == 202

    changes, rejected = await outputs_after_all_judged(settings, client, 2)
    assert (len(changes), rejected) == (2, [])
