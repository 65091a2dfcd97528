"""The reconciler for real: a ``callstatus serve`` process (role processor) against the
shared broker and a FreeClimb API stand-in on loopback. A call whose ``completed``
callback was never sent reaches ``completed`` on changes exactly once through trigger 1;
a call we never heard of is found by the sweep; ``backfill`` pages through the listing;
a processor-only node follows its accounts file, so a rotated API key needs no restart."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord
from pydantic import SecretStr

from schemas.call import CallStatus
from schemas.messages import ChangeMessage, Source, read_ingest
from service.kafka import ensure_topics
from service.producer import IngestProducer
from service.reconciler import backfill
from service.settings import Settings
from service.standin import StandIn, serve
from testkit import Event, ServiceProcess, make_call, produce, read_committed, settings_for
from tests.conftest import BOOTSTRAP
from tests.test_accounts import SecretVolume

S = CallStatus
ACCOUNT = "AC" + "5e" * 20
API_KEY = "standin-api-key"


def call_id() -> str:
    return "CA" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.fixture
async def api() -> AsyncIterator[tuple[StandIn, str]]:
    standin = StandIn({ACCOUNT: API_KEY}, page_size=2)
    async with serve(standin) as url:
        yield standin, url


def node_settings(unique: str, url: str, **overrides: object) -> Settings:
    return settings_for(
        BOOTSTRAP,
        unique,
        topic_partitions=2,
        freeclimb_api_url=url,
        freeclimb_account_id=ACCOUNT,
        freeclimb_api_key=SecretStr(API_KEY),
        **overrides,
    )


def changes_of(records: list[ConsumerRecord[bytes, bytes]], cid: str) -> list[ChangeMessage]:
    out = [ChangeMessage.model_validate_json(r.value or b"") for r in records]
    return [m for m in out if m.callId == cid]


async def test_a_call_whose_end_was_never_sent_completes_once_through_reconciliation(
    api: tuple[StandIn, str], unique: str, tmp_path: Path
) -> None:
    standin, url = api
    # Trigger 1 alone: no sweep.
    settings = node_settings(unique, url, reconcile_after_seconds=2, reconcile_sweep_seconds=0)
    await ensure_topics(settings)
    cid = call_id()
    standin.put_call(ACCOUNT, cid, S.QUEUED)
    standin.advance(ACCOUNT, cid, S.RINGING)
    standin.advance(ACCOUNT, cid, S.IN_PROGRESS)
    # The callbacks that got through; the `completed` one never does.
    events = [
        Event(str(uuid.uuid4()), make_call(cid, status, accountId=ACCOUNT), Source.WEBHOOK)
        for status in (S.QUEUED, S.RINGING, S.IN_PROGRESS)
    ]
    await produce(BOOTSTRAP, settings.topic_ingest, events)
    standin.advance(ACCOUNT, cid, S.COMPLETED)
    node = ServiceProcess(settings, tmp_path, "reconciler")
    try:
        await node.wait_ready()

        def completed(out: list[ConsumerRecord[bytes, bytes]]) -> bool:
            return any(m.call.status is S.COMPLETED for m in changes_of(out, cid))

        # Settle long enough for several more rounds (0.5 s each) to show a second one.
        records = await read_committed(
            BOOTSTRAP, settings.topic_changes, completed, deadline_s=60, settle_s=4
        )
        changes = changes_of(records, cid)
        assert [m.call.status for m in changes] == [S.QUEUED, S.RINGING, S.IN_PROGRESS, S.COMPLETED]
        assert changes[-1].source is Source.API
        assert changes[-1].call.revision == 4
        fetched = [s for s in standin.seen if s.path.endswith(f"/Calls/{cid}")]
        assert fetched and all(s.status == 200 for s in fetched)
        assert node.logged("reconciliation on")
    finally:
        assert node.terminate()


async def test_the_sweep_finds_a_call_we_never_heard_of(
    api: tuple[StandIn, str], unique: str, tmp_path: Path
) -> None:
    standin, url = api
    settings = node_settings(unique, url, reconcile_after_seconds=600, reconcile_sweep_seconds=1)
    await ensure_topics(settings)
    cid = call_id()
    standin.put_call(ACCOUNT, cid, S.RINGING, at=datetime.now(UTC) - timedelta(seconds=30))
    standin.advance(ACCOUNT, cid, S.NO_ANSWER)
    node = ServiceProcess(settings, tmp_path, "sweeper")
    try:
        await node.wait_ready()

        def found(out: list[ConsumerRecord[bytes, bytes]]) -> bool:
            return bool(changes_of(out, cid))

        # Several sweeps (1 s apart) while settling: still one change.
        records = await read_committed(
            BOOTSTRAP, settings.topic_changes, found, deadline_s=60, settle_s=4
        )
        changes = changes_of(records, cid)
        assert len(changes) == 1
        assert (changes[0].call.status, changes[0].source) == (S.NO_ANSWER, Source.API)
        assert changes[0].previousStatus is None  # a first event: we never heard of it
        listed = [s for s in standin.seen if s.path.endswith(f"/Accounts/{ACCOUNT}/Calls")]
        assert listed and "endTime" in listed[0].query and "startTime" in listed[0].query
    finally:
        assert node.terminate()


async def test_backfill_pages_through_the_listing_and_publishes_each_call(
    api: tuple[StandIn, str], unique: str
) -> None:
    standin, url = api
    settings = node_settings(unique, url)
    await ensure_topics(settings)
    since = datetime.now(UTC) - timedelta(minutes=10)
    ids = [call_id() for _ in range(5)]
    for n, cid in enumerate(ids):
        standin.put_call(ACCOUNT, cid, S.RINGING, at=since + timedelta(seconds=10 + n))
        standin.advance(ACCOUNT, cid, S.BUSY, at=since + timedelta(seconds=20 + n))
    standin.put_call(ACCOUNT, call_id(), S.IN_PROGRESS)  # not ended: not listed
    producer = IngestProducer(settings)
    await producer.start()
    out = io.StringIO()
    try:
        summary = await backfill(
            settings, ACCOUNT, since, datetime.now(UTC), publish=producer.publish, out=out
        )
    finally:
        await producer.stop()
    assert (summary.fetched, summary.published, summary.pages) == (5, 5, 3)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("backfill done: 5 fetched, 5 published, 3 pages")
    assert sum("page" in line for line in lines[:-1]) == 3  # a progress line per page
    records = await read_committed(BOOTSTRAP, settings.topic_ingest, 5, deadline_s=30)
    views = [read_ingest(r.value or b"") for r in records]
    assert sorted(v.call.callId for v in views) == sorted(ids)
    assert {v.source for v in views} == {Source.API}
    assert all(r.key == v.call.callId.encode() for r, v in zip(records, views, strict=True))
    assert all(json.loads(r.value or b"")["body"]["revision"] == 2 for r in records)


async def test_reconciliation_is_off_without_an_api_key(unique: str, tmp_path: Path) -> None:
    settings = settings_for(BOOTSTRAP, unique, topic_partitions=1)
    await ensure_topics(settings)
    node = ServiceProcess(settings, tmp_path, "plain")
    try:
        await node.wait_ready()
        assert node.logged(
            "reconciliation off: no FreeClimb API key configured "
            "(CALLSTATUS_FREECLIMB_API_KEY, or apiKey in the accounts file)"
        )
    finally:
        assert node.terminate()


async def test_a_rotated_api_key_is_used_from_the_next_fetch_without_a_restart(
    api: tuple[StandIn, str], unique: str, tmp_path: Path
) -> None:
    standin, url = api
    # A processor-only node: it watches the accounts file for the API keys alone.
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(accounts_with_key(API_KEY))
    settings = settings_for(
        BOOTSTRAP,
        unique,
        role="processor",
        topic_partitions=2,
        freeclimb_api_url=url,
        accounts_file=volume.path,
        accounts_reload_seconds=0.1,
        reconcile_after_seconds=1,
        reconcile_sweep_seconds=0,
    )
    await ensure_topics(settings)
    cid = call_id()
    standin.put_call(ACCOUNT, cid, S.QUEUED)
    standin.advance(ACCOUNT, cid, S.IN_PROGRESS)
    standin.advance(ACCOUNT, cid, S.COMPLETED)
    events = [
        Event(str(uuid.uuid4()), make_call(cid, status, accountId=ACCOUNT), Source.WEBHOOK)
        for status in (S.QUEUED, S.IN_PROGRESS)
    ]
    await produce(BOOTSTRAP, settings.topic_ingest, events)
    # FreeClimb has the new key already; the Secret does not yet: refused.
    standin.add_account(ACCOUNT, "rotated-api-key")
    standin.put_call(ACCOUNT, cid, S.QUEUED)  # (add_account starts the account afresh)
    standin.advance(ACCOUNT, cid, S.IN_PROGRESS)
    standin.advance(ACCOUNT, cid, S.COMPLETED)
    node = ServiceProcess(settings, tmp_path, "rotation")
    try:
        await node.wait_ready()

        def fetches() -> list[int]:
            return [s.status for s in standin.seen if s.path.endswith(f"/Calls/{cid}")]

        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60
        while 401 not in fetches():
            assert node.alive() and loop.time() < give_up, "never fetched with the old key"
            await asyncio.sleep(0.05)  # polling interval
        volume.publish(accounts_with_key("rotated-api-key"))

        def completed(out: list[ConsumerRecord[bytes, bytes]]) -> bool:
            return any(m.call.status is S.COMPLETED for m in changes_of(out, cid))

        records = await read_committed(BOOTSTRAP, settings.topic_changes, completed, deadline_s=60)
        [done] = [m for m in changes_of(records, cid) if m.call.status is S.COMPLETED]
        assert done.source is Source.API
        statuses = fetches()
        assert statuses[-1] == 200 and set(statuses) == {401, 200}
        assert node.logged("accounts reloaded")
    finally:
        assert node.terminate()


def accounts_with_key(api_key: str) -> str:
    return (
        f"accounts:\n  {ACCOUNT}:\n    signingSecrets: [sigsec_{'4' * 40}]\n    apiKey: {api_key}\n"
    )
