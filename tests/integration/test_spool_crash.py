"""A node SIGKILLed between a drained batch's ack and its checkpoint, whose call's state
is retired while it is down, must not make a second change when it comes back (issue 16,
finding 4). Real broker, real files, real SIGKILL: the checkpoint is made unwritable (a
directory where its temporary file goes), so the node is certain to die with Kafka
holding the event and the spool still holding it too."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiokafka.structs import ConsumerRecord

from schemas.call import CallStatus
from schemas.messages import Source
from service.kafka import ensure_topics
from service.processor import Processor
from testkit import (
    Event,
    ServiceProcess,
    kafka,
    make_call,
    private_broker,
    produce,
    read_committed,
    settings_for,
)

CALL = "CA" + "d4" * 20


@pytest.fixture
async def broker() -> AsyncIterator[dict[str, str]]:
    async with private_broker(19792) as env:
        yield env


async def spool_events(node: ServiceProcess) -> float:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("callstatus_spool_events "):
            return float(line.split()[1])
    raise AssertionError("no callstatus_spool_events")


async def poll(check: object, what: str, deadline_s: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not await check():  # type: ignore[operator]
        assert loop.time() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)  # polling interval


def changes_of(records: list[ConsumerRecord[bytes, bytes]], event_id: str) -> int:
    return [json.loads(r.value or b"")["eventId"] for r in records].count(event_id)


async def test_a_resend_after_sigkill_is_no_second_change_even_after_retention(
    broker: dict[str, str], unique: str, tmp_path: Path
) -> None:
    address = broker["address"]
    # Retention as short as the settings allow (twice a 1 s tolerance): the call's
    # state is retired within seconds of the node's death.
    settings = settings_for(
        address,
        unique,
        role="processor",
        signature_tolerance_seconds=1,
        state_terminal_retention_seconds=2,
        state_idle_retention_seconds=2,
        topic_partitions=1,
    )
    ingest = settings.model_copy(
        update={
            "role": settings.role.INGEST,
            "produce_timeout_seconds": 1.0,
            "produce_delivery_timeout_seconds": 3.0,
            "spool_dir": Path("spool"),
        }
    )
    await ensure_topics(settings)
    processor = Processor(settings)
    processing = asyncio.create_task(processor.run())
    node = ServiceProcess(ingest, tmp_path, "first")
    try:
        await node.wait_ready()
        await asyncio.to_thread(kafka, "down", broker)
        body = json.dumps(
            {"requestType": "callStatus", "callId": CALL, "callStatus": "completed"}
        ).encode()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as client:
            answer = await client.post(
                "/v1/call-status", content=body, headers={"content-type": "application/json"}
            )
        assert answer.status_code == 202  # from the spool: Kafka is down
        event_id = answer.json()["eventId"]
        assert await spool_events(node) == 1
        (tmp_path / "spool" / "checkpoint.tmp").mkdir()  # every checkpoint write fails now

        await asyncio.to_thread(kafka, "up", broker)
        changes = await read_committed(address, settings.topic_changes, 1, settle_s=0)
        assert changes_of(changes, event_id) == 1  # drained, acknowledged, processed ...

        async def release_failed() -> bool:
            return "spool drain step failed" in node.log_path.read_text()

        await poll(release_failed, "the checkpoint write to fail")
        assert await spool_events(node) == 1  # ... and still in the spool
        node.kill()  # SIGKILL: Kafka has the event, the spool has it too
        (tmp_path / "spool" / "checkpoint.tmp").rmdir()

        # While the node is down, traffic of other calls moves event time on until the
        # call's state is retired (a tombstone on the state topic).
        async def retired() -> bool:
            other = Event(
                str(uuid.uuid4()),
                make_call("CA" + uuid.uuid4().hex + "0" * 8, CallStatus.RINGING),
                Source.WEBHOOK,
            )
            await produce(address, settings.topic_ingest, [other])
            states = await read_committed(
                address, settings.topic_state, 0, deadline_s=2, settle_s=0.5
            )
            return any(r.key == CALL.encode() and r.value is None for r in states)

        await poll(retired, "the call's state to be retired")

        again = ServiceProcess(ingest, tmp_path, "second")
        try:
            await again.wait_ready()

            async def drained() -> bool:
                return await spool_events(again) == 0

            await poll(drained, "the spool to drain")
            assert "already_in_kafka" in again.log_path.read_text()
        finally:
            again.terminate()

        # A last event, judged after anything the second node sent: then count.
        sentinel = Event(str(uuid.uuid4()), make_call("CA" + "e5" * 20, CallStatus.QUEUED))
        await produce(address, settings.topic_ingest, [sentinel])

        def judged(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
            return changes_of(records, sentinel.event_id) == 1

        changes = await read_committed(address, settings.topic_changes, judged, settle_s=1)
        assert changes_of(changes, event_id) == 1, "the re-sent event made a second change"
    finally:
        if node.alive():
            node.kill()
        await processor.stop()
        await asyncio.wait_for(processing, 60)
