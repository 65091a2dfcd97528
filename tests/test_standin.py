"""The FreeClimb Calls API stand-in serves calls as docs/freeclimb.md documents
them: fields, date formats, revisions, filters, paging, Basic auth and injected faults."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas.call import Call, CallDirection, CallStatus
from service.standin import StandIn, serve

ACCOUNT = "AC" + "1" * 40
OTHER = "AC" + "2" * 40
KEY = "standin-key-1"
T0 = datetime(2026, 3, 9, 12, 0, 0, 250_000, tzinfo=UTC)

RFC1123 = re.compile(r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT")
RFC3339_MILLIS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FIELDS = {
    "uri", "dateCreated", "dateUpdated", "dateCreatedISO", "dateUpdatedISO", "revision",
    "callId", "parentCallId", "accountId", "to", "from", "phoneNumberId", "status",
    "startTime", "connectTime", "endTime", "connectDuration", "duration", "direction",
    "answeredBy", "subresourceUris", "applicationId",
}  # fmt: skip


def call_id(n: int) -> str:
    return f"CA{n:040x}"


def auth(account: str = ACCOUNT, key: str = KEY) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{account}:{key}".encode()).decode()}


def test_a_call_through_its_life_has_every_field_in_the_documented_formats() -> None:
    standin = StandIn({ACCOUNT: KEY})
    ident = call_id(1)
    created = standin.put_call(ACCOUNT, ident, CallStatus.QUEUED, at=T0)
    assert set(created) == FIELDS
    assert created["revision"] == 1
    assert created["startTime"] == created["endTime"] == created["duration"] == ""
    assert created["dateCreated"] == "Mon, 09 Mar 2026 12:00:00 GMT"
    assert created["dateCreatedISO"] == "2026-03-09T12:00:00.250Z"
    assert created["uri"] == f"/Accounts/{ACCOUNT}/Calls/{ident}"
    lives = [created]
    for seconds, status in [
        (2, CallStatus.RINGING),
        (9, CallStatus.IN_PROGRESS),
        (70, CallStatus.COMPLETED),
    ]:
        lives.append(standin.advance(ACCOUNT, ident, status, at=T0 + timedelta(seconds=seconds)))
    assert [r["revision"] for r in lives] == [1, 2, 3, 4]
    assert [r["status"] for r in lives] == ["queued", "ringing", "inProgress", "completed"]
    done = lives[-1]
    assert done["startTime"] == "Mon, 09 Mar 2026 12:00:02 GMT"
    assert done["connectTime"] == "Mon, 09 Mar 2026 12:00:09 GMT"
    assert done["endTime"] == "Mon, 09 Mar 2026 12:01:10 GMT"
    assert (done["duration"], done["connectDuration"]) == (68, 61)
    assert done["dateCreated"] == created["dateCreated"]
    assert done["dateUpdatedISO"] == "2026-03-09T12:01:10.250Z"
    for resource in lives:
        for name in ("dateCreated", "dateUpdated", "startTime", "connectTime", "endTime"):
            assert resource[name] == "" or RFC1123.fullmatch(resource[name]), name
        for name in ("dateCreatedISO", "dateUpdatedISO"):
            assert RFC3339_MILLIS.fullmatch(resource[name]), name
        call = Call.model_validate(resource)  # the service's own model takes every stage
        assert call.revision == resource["revision"]
        assert Call.model_validate_json(call.to_json()) == call
    with pytest.raises(ValueError, match="ended"):
        standin.advance(ACCOUNT, ident, CallStatus.FAILED)
    with pytest.raises(ValueError, match="already exists"):
        standin.put_call(ACCOUNT, ident)


def test_unanswered_endings_have_no_durations() -> None:
    standin = StandIn({ACCOUNT: KEY}, clock=lambda: T0)
    for n, status in enumerate([CallStatus.BUSY, CallStatus.NO_ANSWER, CallStatus.FAILED]):
        standin.put_call(ACCOUNT, call_id(n), CallStatus.RINGING, direction=CallDirection.INBOUND)
        ended = standin.advance(ACCOUNT, call_id(n), status)
        assert ended["endTime"] != ""
        assert ended["duration"] == ended["connectDuration"] == ""
        assert Call.model_validate(ended).duration is None


def test_a_call_dialled_has_a_start_time_even_when_it_failed_from_queued() -> None:
    # The sweep lists by startTime: an outbound call that failed straight from queued
    # was dialled ("could not be completed as dialed") and must be listed; one canceled
    # while queued never rang and has none (a broken rule here hid the failed calls of
    # `simulate --lost` from every sweep).
    standin = StandIn({ACCOUNT: KEY}, clock=lambda: T0)
    standin.put_call(ACCOUNT, call_id(1), CallStatus.QUEUED)
    failed = standin.advance(ACCOUNT, call_id(1), CallStatus.FAILED)
    assert failed["startTime"] == failed["endTime"] == "Mon, 09 Mar 2026 12:00:00 GMT"
    standin.put_call(ACCOUNT, call_id(2), CallStatus.QUEUED)
    canceled = standin.advance(ACCOUNT, call_id(2), CallStatus.CANCELED)
    assert canceled["startTime"] == "" and canceled["endTime"] != ""


@pytest.fixture
async def api() -> AsyncIterator[tuple[StandIn, httpx.AsyncClient]]:
    standin = StandIn({ACCOUNT: KEY, OTHER: "other-key"}, page_size=2)
    async with serve(standin) as base, httpx.AsyncClient(base_url=base) as client:
        yield standin, client


async def test_served_on_a_real_socket_with_basic_auth(
    api: tuple[StandIn, httpx.AsyncClient],
) -> None:
    standin, client = api
    standin.put_call(ACCOUNT, call_id(1), CallStatus.RINGING)
    path = f"/Accounts/{ACCOUNT}/Calls/{call_id(1)}"
    ok = await client.get(path, headers=auth())
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "application/json"
    assert ok.json() == standin.call(ACCOUNT, call_id(1))
    assert (await client.get(path)).status_code == 401
    wrong = await client.get(path, headers=auth(key="guess"))
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Basic")
    assert (await client.get(path, headers=auth(OTHER, "other-key"))).status_code == 403
    missing = f"/Accounts/{ACCOUNT}/Calls/{call_id(2)}"
    assert (await client.get(missing, headers=auth())).status_code == 404
    assert [s.status for s in standin.seen] == [200, 401, 401, 403, 404]
    assert [s.account_id for s in standin.seen] == [ACCOUNT, None, None, OTHER, ACCOUNT]


async def _pages(client: httpx.AsyncClient, query: dict[str, str]) -> list[dict[str, Any]]:
    pages = []
    response = await client.get(f"/Accounts/{ACCOUNT}/Calls", params=query, headers=auth())
    while True:
        assert response.status_code == 200, response.text
        pages.append(response.json())
        if pages[-1]["nextPageUri"] is None:
            return pages
        response = await client.get(pages[-1]["nextPageUri"], headers=auth())


async def test_lists_page_through_next_page_uri_with_the_filters_kept(
    api: tuple[StandIn, httpx.AsyncClient],
) -> None:
    standin, client = api
    for n in range(7):
        at = T0 + timedelta(minutes=n)
        standin.put_call(ACCOUNT, call_id(n), CallStatus.RINGING, at=at, to=f"+1555000{n % 2}")
        if n < 5:
            standin.advance(
                ACCOUNT, call_id(n), CallStatus.NO_ANSWER, at=at + timedelta(seconds=30)
            )
    standin.put_call(OTHER, call_id(99), CallStatus.RINGING)
    everything = await _pages(client, {})
    assert [p["page"] for p in everything] == [0, 1, 2, 3]
    assert {p["numPages"] for p in everything} == {4}
    assert {p["total"] for p in everything} == {7}
    assert {p["pageSize"] for p in everything} == {2}
    assert [(p["start"], p["end"]) for p in everything] == [(0, 1), (2, 3), (4, 5), (6, 6)]
    ids = [c["callId"] for p in everything for c in p["calls"]]
    assert ids == [call_id(n) for n in range(7)]  # creation order, each once
    assert everything[0]["nextPageUri"].startswith(f"/Accounts/{ACCOUNT}/Calls?cursor=")

    active = await _pages(client, {"active": "true"})
    assert [c["callId"] for p in active for c in p["calls"]] == [call_id(5), call_id(6)]
    ended = await _pages(client, {"status": "noAnswer", "to": "+15550000"})
    assert [c["callId"] for p in ended for c in p["calls"]] == [call_id(0), call_id(2), call_id(4)]
    # Started at or after 12:02:00 and ended at or before 12:03:30 (the second shown, so
    # call 3's end at 12:03:30.250 counts): calls 2 and 3.
    window = {"startTime": "2026-03-09 12:02:00", "endTime": "2026-03-09 12:03:30"}
    timed = await _pages(client, window)
    assert [c["callId"] for p in timed for c in p["calls"]] == [call_id(2), call_id(3)]
    empty = await _pages(client, {"status": "busy"})
    assert empty == [
        {
            "total": 0,
            "start": 0,
            "end": 0,
            "page": 0,
            "numPages": 0,
            "pageSize": 2,
            "nextPageUri": None,
            "calls": [],
        }
    ]
    for bad in ({"status": "teleported"}, {"startTime": "yesterday"}, {"cursor": "!!"}):
        response = await client.get(f"/Accounts/{ACCOUNT}/Calls", params=bad, headers=auth())
        assert response.status_code == 400


async def test_faults_come_before_authentication(
    api: tuple[StandIn, httpx.AsyncClient],
) -> None:
    standin, client = api
    path = f"/Accounts/{ACCOUNT}/Calls"
    standin.fail_next(503)
    standin.fail_next(429, retry_after="Mon, 09 Mar 2026 12:00:30 GMT")
    first, second = await client.get(path), await client.get(path, headers=auth())
    assert first.status_code == 503 and "retry-after" not in first.headers
    assert second.status_code == 429
    assert second.headers["retry-after"] == "Mon, 09 Mar 2026 12:00:30 GMT"
    standin.throttle_every = 3
    standin.retry_after = "2"
    codes = [(await client.get(path, headers=auth())).status_code for _ in range(6)]
    # Requests 3 to 8 of the run: the 3rd, 6th, 9th ... of all are throttled.
    assert codes == [429, 200, 200, 429, 200, 200]
    assert (await client.get("/Accounts/x/Nothing", headers=auth())).status_code == 404
