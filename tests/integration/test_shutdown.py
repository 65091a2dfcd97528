"""SIGTERM under load, with a real process: every request that got a 202 is in Kafka
and is processed exactly once; requests after the signal are refused, not lost."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx

from service.kafka import ensure_topics
from service.signature import sign
from testkit import ServiceProcess, read_committed, settings_for
from tests.conftest import BOOTSTRAP, SECRET


def webhook(n: int) -> bytes:
    call_id = "CA" + f"{n:040x}"
    return json.dumps(
        {"requestType": "callStatus", "callId": call_id, "callStatus": "queued"}
    ).encode()


async def test_sigterm_under_load_loses_and_duplicates_nothing(unique: str, tmp_path: Path) -> None:
    settings = settings_for(
        BOOTSTRAP,
        unique,
        role="all",
        verify_signatures=True,
        signing_secrets=(SECRET,),
        topic_partitions=3,
    )
    await ensure_topics(settings)
    node = ServiceProcess(settings, tmp_path, "node")
    await node.wait_ready()

    accepted: list[str] = []
    refused = 0
    sent = 0
    stop = asyncio.Event()

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal refused, sent
        for i in range(400):  # bounded: the loop ends by itself
            if stop.is_set():
                return
            body = webhook(worker * 1000 + i)
            headers = {
                "content-type": "application/json",
                "FreeClimb-Signature": sign(SECRET, int(time.time()), body),
            }
            sent += 1
            try:
                response = await http.post("/v1/call-status", content=body, headers=headers)
            except httpx.TransportError:
                refused += 1  # the listener is gone: FreeClimb would retry
                if node.proc.poll() is not None:
                    return
                continue
            if response.status_code == 202:
                accepted.append(response.json()["eventId"])
            else:
                assert response.status_code == 503, response.text
                refused += 1

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", timeout=30) as http:
        workers = [asyncio.create_task(client(w, http)) for w in range(8)]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60
        while len(accepted) < 150:  # under load before the signal
            assert loop.time() < give_up
            await asyncio.sleep(0.05)  # polling interval
        node.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(node.wait, 60)
        stop.set()
        await asyncio.gather(*workers)
    assert code in (0, -signal.SIGTERM)
    assert node.logged("stopped")
    assert refused > 0 or sent == len(accepted)

    # A fresh processor finishes the work; every 202 shows up exactly once.
    after = ServiceProcess(settings_for(BOOTSTRAP, unique, topic_partitions=3), tmp_path, "after")
    try:
        ingest = await read_committed(BOOTSTRAP, settings.topic_ingest, len(accepted))
        stored = [json.loads(r.value or b"")["eventId"] for r in ingest]
        changes = await read_committed(BOOTSTRAP, settings.topic_changes, len(stored))
        published = [json.loads(r.value or b"")["eventId"] for r in changes]
    finally:
        assert after.terminate()
    assert set(accepted) <= set(stored)
    assert len(published) == len(set(published))  # no duplicates
    assert set(published) == set(stored)  # every stored event (all first events) changed


async def test_sigterm_first_turns_readiness_off_while_still_serving(
    unique: str, tmp_path: Path
) -> None:
    settings = settings_for(
        BOOTSTRAP, unique, role="ingest", verify_signatures=False, drain_delay_seconds=30
    )
    await ensure_topics(settings)
    node = ServiceProcess(settings, tmp_path, "draining")
    await node.wait_ready()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", timeout=10) as http:
        node.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10
        while (ready := await http.get("/readyz")).status_code == 200:
            assert loop.time() < give_up, "readiness never turned off"
            await asyncio.sleep(0.05)  # polling interval
        assert ready.json()["checks"]["draining"] is False
        # Still serving during the drain: the load balancer has time to move away.
        body = webhook(1)
        accepted = await http.post(
            "/v1/call-status", content=body, headers={"content-type": "application/json"}
        )
        assert accepted.status_code == 202
        # A second signal means "now": the node stops without waiting out the drain.
        node.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(node.wait, 30)
    assert code in (0, -signal.SIGTERM)
    assert node.logged("stopped")


async def test_shutdown_is_bounded_when_kafka_is_gone(unique: str, tmp_path: Path) -> None:
    from testkit import kafka, private_broker

    async with private_broker(19892) as broker:
        settings = settings_for(broker["address"], unique, role="all", shutdown_grace_seconds=2)
        node = ServiceProcess(settings, tmp_path, "orphan")
        try:
            await node.wait_ready(deadline_s=90)
        except BaseException:
            node.kill()
            raise
        await asyncio.to_thread(kafka, "down", broker)
        # grace (2 s) + 10 s bound on the stop sequence, plus process start-up slack
        assert node.terminate(timeout=40), node.log_path.read_text()[-2000:]
