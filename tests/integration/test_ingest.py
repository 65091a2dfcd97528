"""The ingest path against the real broker: a 202 means the event is in Kafka, and a
broker outage gives 503s (never a 2xx) until it returns, without restarting."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import httpx
import pytest

from schemas.messages import IngestEvent
from service import metrics
from service.app import create_app
from service.kafka import ensure_topics
from service.producer import IngestProducer
from service.settings import Settings
from service.signature import sign
from testkit import (
    ServiceProcess,
    kafka,
    private_broker,
    read_committed,
    settings_for,
)
from tests.conftest import BOOTSTRAP, SECRET

CALL_ID = "CA" + "7e" * 20
WEBHOOK = (
    b'{"accountId":"AC1334ffb694cd8d969f51cddf5f7c9b478546d50c",'
    b'"callId":"' + CALL_ID.encode() + b'","callStatus":"ringing","conferenceId":null,'
    b'"direction":"inbound","from":"+13121000109","parentCallId":null,"queueId":null,'
    b'"requestType":"inboundCall","to":"+13121000096","someFutureField":{"x":1}}'
)


def headers(body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "FreeClimb-Signature": sign(SECRET, int(time.time()), body),
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }


async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    await ensure_topics(settings)
    producer = IngestProducer(settings)
    await producer.start()
    app = create_app(settings, producer)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            yield client
    finally:
        await producer.stop()


@pytest.fixture
async def client(unique: str) -> AsyncIterator[tuple[Settings, httpx.AsyncClient]]:
    settings = settings_for(
        BOOTSTRAP, unique, role="ingest", verify_signatures=True, signing_secrets=(SECRET,)
    )
    async for c in serve(settings):
        yield settings, c


async def test_202_event_is_in_the_ingest_topic_keyed_by_call_id(
    client: tuple[Settings, httpx.AsyncClient],
) -> None:
    settings, c = client
    response = await c.post("/v1/call-status", content=WEBHOOK, headers=headers(WEBHOOK))
    assert response.status_code == 202
    answer = response.json()
    assert answer["callId"] == CALL_ID

    records = await read_committed(BOOTSTRAP, settings.topic_ingest, 1, settle_s=0.5)
    assert len(records) == 1
    record = records[0]
    assert record.key == CALL_ID.encode()
    event = IngestEvent.model_validate_json(record.value or b"")
    assert event.eventId == answer["eventId"]
    assert event.source.value == "webhook"
    assert event.requestType == "inboundCall"
    assert event.call.status.value == "ringing"
    assert event.call.direction is not None and event.call.direction.value == "inbound"
    # The original body travels byte for byte, unknown fields included.
    assert event.body == json.loads(WEBHOOK)
    assert WEBHOOK in (record.value or b"")
    got = dict(record.headers)
    assert got["ce_id"] == answer["eventId"].encode()
    assert got["traceparent"] == headers(WEBHOOK)["traceparent"].encode()


@pytest.fixture
async def own_broker() -> AsyncIterator[dict[str, str]]:
    async with private_broker(19192) as broker:
        yield broker


async def test_503_while_the_broker_is_down_then_recovers(
    own_broker: dict[str, str], unique: str
) -> None:
    settings = settings_for(
        own_broker["address"],
        unique,
        role="ingest",
        verify_signatures=False,
        produce_timeout_seconds=2.0,
        # Long enough that this test sees the same producer wait and reconnect; the
        # producer's rebuild after the deadline is test_broker_faults's subject.
        produce_delivery_timeout_seconds=120.0,
        max_inflight_produces=1,
    )
    buffer_full = metrics.PRODUCE_ERRORS.labels("buffer_full")
    acknowledged: list[str] = []
    sent = 0

    def post(c: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        # A new event each time: the same bytes again would be answered from the replay
        # cache once stored, with no write to fail or succeed.
        nonlocal sent
        sent += 1
        body = WEBHOOK.replace(b'{"x":1}', b'{"x":%d}' % sent)
        return c.post("/v1/call-status", content=body, headers=headers(body))

    async for c in serve(settings):
        first = await post(c)
        assert first.status_code == 202
        acknowledged.append(first.json()["eventId"])

        await asyncio.to_thread(kafka, "down", own_broker)
        for _ in range(3):
            down = await post(c)
            assert down.status_code == 503
            assert down.headers["content-type"] == "application/problem+json"
            assert int(down.headers["retry-after"]) >= 1
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        # One write waiting for the absent broker fills the (capped) buffer: the next
        # request is refused at once instead of queueing behind it.
        refused_before = buffer_full._value.get()
        both = await asyncio.gather(post(c), post(c))
        assert [r.status_code for r in both] == [503, 503]
        assert buffer_full._value.get() == refused_before + 1

        await asyncio.to_thread(kafka, "up", own_broker)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 90
        while True:  # the same producer reconnects by itself; poll until it does
            again = await post(c)
            assert again.status_code in (202, 503)
            if again.status_code == 202:
                acknowledged.append(again.json()["eventId"])
                break
            assert loop.time() < give_up, "ingest did not recover after the broker returned"
        assert (await c.get("/readyz")).status_code == 200

    # Every acknowledged event is in the topic (503'd ones may be too: never a 202 for
    # an event Kafka lacks, but a 503'd event can land late and be dropped downstream).
    records = await read_committed(own_broker["address"], settings.topic_ingest, len(acknowledged))
    stored = {IngestEvent.model_validate_json(r.value or b"").eventId for r in records}
    assert set(acknowledged) <= stored


async def test_service_started_before_kafka_waits_for_it(unique: str, tmp_path: Path) -> None:
    port = 19392
    settings = settings_for(f"127.0.0.1:{port}", unique, role="all")
    node = ServiceProcess(settings, tmp_path, "early")  # no broker on that port yet
    async with private_broker(port):
        try:
            await node.wait_ready(deadline_s=90)
            assert node.logged("started")
        finally:
            assert node.terminate()
