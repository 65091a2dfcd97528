"""Accounts against the real service process and the shared broker: the accounts file
mounted as Kubernetes mounts a Secret (a ``..data`` symlink swapped on update), a secret
rotation under steady signed traffic, cross-account spoofing, and a malformed update.

Every wait polls with a deadline: the process's log for its reloads, /metrics for its
gauges, the topics for their records."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.kafka import ensure_topics
from service.settings import Settings
from service.signature import sign
from testkit import ServiceProcess, read_committed, settings_for
from tests.conftest import BOOTSTRAP
from tests.test_accounts import SecretVolume

pytestmark = pytest.mark.kafka

A = "AC" + "a1" * 20
B = "AC" + "b2" * 20
OLD, NEW = "sigsec_a_old_" + "1" * 20, "sigsec_a_new_" + "2" * 20
B_SECRET = "sigsec_b_" + "3" * 20
DEADLINE_S = 60.0


def accounts_file(*a_secrets: str) -> str:
    listed = ", ".join(f'"{s}"' for s in a_secrets)
    return (
        f"accounts:\n  {A}:\n    signingSecrets: [{listed}]\n"
        f'  {B}:\n    signingSecrets: ["{B_SECRET}"]\n'
    )


def call_body(account: str, call_id: str | None = None) -> tuple[str, bytes]:
    call_id = call_id or "CA" + uuid.uuid4().hex + "0" * 8
    body = {"requestType": "callStatus", "callId": call_id, "accountId": account}
    return call_id, json.dumps({**body, "callStatus": "queued"}).encode()


def signed(body: bytes, secret: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "FreeClimb-Signature": sign(secret, int(time.time()), body),
    }


@dataclass
class Node:
    settings: Settings
    process: ServiceProcess
    volume: SecretVolume
    client: httpx.AsyncClient

    def reloads(self) -> int:
        lines = self.process.log_path.read_text().splitlines()
        return sum(
            1
            for line in lines
            if line.startswith("{") and json.loads(line).get("event") == "accounts reloaded"
        )

    async def wait_for(self, what: str, check: Callable[[], bool | Awaitable[bool]]) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + DEADLINE_S
        while not await _holds(check):
            assert self.process.alive(), self.process.log_path.read_text()[-3000:]
            assert loop.time() < give_up, f"never: {what}"
            await asyncio.sleep(0.05)  # polling interval

    async def metric(self, name: str, labels: str = "") -> float:
        text = (await self.client.get("/metrics")).text
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


async def _holds(check: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = check()
    return await result if isinstance(result, Awaitable) else result


@pytest.fixture
async def node(unique: str, tmp_path: Path) -> AsyncIterator[Node]:
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(accounts_file(OLD))
    settings = settings_for(
        BOOTSTRAP,
        unique,
        role="all",
        verify_signatures=True,
        accounts_file=volume.path,
        accounts_reload_seconds=0.1,
        topic_partitions=3,
    )
    await ensure_topics(settings)
    process = ServiceProcess(settings, tmp_path, "all")
    try:
        await process.wait_ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{process.port}") as client:
            yield Node(settings, process, volume, client)
    finally:
        assert process.terminate()


@dataclass
class FreeClimb:
    """Signs with whatever secret FreeClimb would use at the moment, from several clients
    at once, keeping every answer."""

    secret: str
    answers: list[tuple[int, str, str]] = field(default_factory=list)  # code, callId, text
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def accepted(self) -> int:
        return sum(1 for code, _, _ in self.answers if code == 202)

    async def client(self, base_url: str, n: int) -> None:
        # Both endpoints a user may have in statusCallbackUrl.
        path = f"/v1/call-status/{A}" if n % 2 else "/v1/call-status"
        async with httpx.AsyncClient(base_url=base_url) as http:
            while not self.stop.is_set():
                call_id, body = call_body(A)
                response = await http.post(path, content=body, headers=signed(body, self.secret))
                self.answers.append((response.status_code, call_id, response.text))


async def test_a_rotation_under_steady_traffic_refuses_nothing(node: Node) -> None:
    freeclimb = FreeClimb(OLD)
    pid = node.process.proc.pid
    base = f"http://127.0.0.1:{node.process.port}"
    clients = [asyncio.create_task(freeclimb.client(base, n)) for n in range(4)]
    try:

        async def more_accepted(count: int) -> None:
            target = freeclimb.accepted() + count
            await node.wait_for(f"{target} accepted", lambda: freeclimb.accepted() >= target)

        await more_accepted(30)  # old only
        node.volume.publish(accounts_file(NEW, OLD))  # the overlap
        await node.wait_for("the overlap loaded", lambda: node.reloads() == 1)
        await more_accepted(30)
        freeclimb.secret = NEW  # FreeClimb switches to the new secret
        await more_accepted(30)
        node.volume.publish(accounts_file(NEW))  # the old one removed
        await node.wait_for("the new set loaded", lambda: node.reloads() == 2)
        await more_accepted(30)
    finally:
        freeclimb.stop.set()
        await asyncio.gather(*clients)

    refused = [(code, text) for code, _, text in freeclimb.answers if code != 202]
    assert refused == [], refused[:5]
    assert node.process.alive() and node.process.proc.pid == pid  # no restart
    accepted = {call_id for code, call_id, _ in freeclimb.answers if code == 202}
    # Every 202 reaches changes (each is a new call's first status).
    records = await read_committed(
        BOOTSTRAP,
        node.settings.topic_changes,
        lambda out: accepted <= {json.loads(r.value or b"{}")["callId"] for r in out},
        deadline_s=120,
    )
    changed = {json.loads(r.value or b"{}")["callId"] for r in records}
    assert accepted - changed == set()
    assert await node.metric(
        "callstatus_account_requests_total", f'account="{A}",outcome="accepted"'
    ) == len(freeclimb.answers)
    # The old secret is gone now: what was accepted a moment ago is refused.
    _, body = call_body(A)
    late = await node.client.post("/v1/call-status", content=body, headers=signed(body, OLD))
    assert late.status_code == 401


async def test_one_accounts_secret_never_vouches_for_another_account(node: Node) -> None:
    spoofs: list[tuple[str, int, str]] = []
    for path, expected, kind in (
        (f"/v1/call-status/{A}", 403, "account-mismatch"),  # A's path, body claims B
        ("/v1/call-status", 401, "invalid-signature"),  # only B's secrets are tried
        (f"/v1/call-status/{B}", 401, "invalid-signature"),
    ):
        call_id, body = call_body(B)
        response = await node.client.post(path, content=body, headers=signed(body, OLD))
        assert response.status_code == expected, response.text
        assert response.json()["type"] == f"urn:callstatus:problem:{kind}"
        spoofs.append((path, expected, call_id))
    # Then one good request for B: once it is on the ingest topic, a spoof that had been
    # written would be there too.
    sentinel, body = call_body(B)
    ok = await node.client.post(
        f"/v1/call-status/{B}", content=body, headers=signed(body, B_SECRET)
    )
    assert ok.status_code == 202, ok.text
    records = await read_committed(
        BOOTSTRAP,
        node.settings.topic_ingest,
        lambda out: any(r.key == sentinel.encode() for r in out),
    )
    keys = {r.key for r in records}
    assert sentinel.encode() in keys
    assert [s for s in spoofs if s[2].encode() in keys] == []
    assert (
        await node.metric(
            "callstatus_account_requests_total", f'account="{A}",outcome="account_mismatch"'
        )
        == 1
    )


async def test_a_malformed_update_keeps_the_old_accounts_and_shows_on_metrics(
    node: Node,
) -> None:
    async def post_as_a() -> int:
        _, body = call_body(A)
        response = await node.client.post(
            f"/v1/call-status/{A}", content=body, headers=signed(body, OLD)
        )
        return response.status_code

    assert await post_as_a() == 202
    assert await node.metric("callstatus_accounts_file_stale") == 0
    node.volume.publish("accounts:\n  - this is: [not an accounts file\n")

    async def stale() -> bool:
        return await node.metric("callstatus_accounts_file_stale") == 1

    await node.wait_for("the stale gauge", stale)
    assert await node.metric("callstatus_accounts_reload_failures_total") == 1
    assert await node.metric("callstatus_accounts") == 2
    # Judged by the last good set: still accepted, as many times as asked.
    assert [await post_as_a() for _ in range(5)] == [202] * 5
    assert node.reloads() == 0
    # A good version again: in use, and the gauge clears.
    node.volume.publish(accounts_file(NEW))

    async def fresh() -> bool:
        return await node.metric("callstatus_accounts_file_stale") == 0

    await node.wait_for("the gauge cleared", fresh)
    assert node.reloads() == 1
    assert await post_as_a() == 401  # OLD is no longer in the file
