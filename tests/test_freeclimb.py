"""The FreeClimb REST API client's pure parts (Retry-After, backoff, filters, credentials)
and its handling of odd answers, with httpx's mock transport: no network."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from pydantic import SecretStr

from schemas.call import CallStatus
from service.freeclimb import (
    DEFAULT_API_URL,
    CallNotFound,
    ClientOptions,
    Credentials,
    FetchedCall,
    Forbidden,
    FreeClimbClient,
    InvalidCall,
    NoCredentials,
    RetriesExhausted,
    UnexpectedResponse,
    backoff_delay,
    call_filters,
    format_filter_time,
    parse_retry_after,
    retry_delay,
)

ACCOUNT = "AC" + "a" * 40
CALL = "CA" + "b" * 40
KEY = "fc-api-key-not-for-logs-0123456789"
NOW = datetime(2026, 3, 9, 12, 0, 0, tzinfo=UTC)


# --- Retry-After ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("Mon, 09 Mar 2026 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Monday, 09-Mar-26 12:01:00 GMT", 60.0),  # RFC 850, obsolete but allowed
        ("Mon Mar  9 12:00:05 2026", 5.0),  # asctime, no zone: GMT
        ("Mon, 09 Mar 2026 11:00:00 GMT", 0.0),  # already past: go now
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "1e3", "12345678901"])
def test_retry_after_not_understood_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


# --- backoff --------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_with_equal_jitter() -> None:
    lows = [backoff_delay(n, 0.0, first=1.0, cap=8.0) for n in range(6)]
    highs = [backoff_delay(n, 1.0, first=1.0, cap=8.0) for n in range(6)]
    assert lows == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert highs == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff_delay(10_000, 0.5, first=1.0, cap=8.0) == 6.0  # no overflow


def test_retry_after_wins_over_backoff_with_a_little_jitter_on_top() -> None:
    assert retry_delay(5, 0.0, 7.0, first=1.0, cap=8.0) == 7.0
    assert 7.0 < retry_delay(5, 0.99, 7.0, first=1.0, cap=8.0) < 7.7
    assert retry_delay(0, 0.99, 300.0, first=1.0, cap=8.0) < 301.0  # at most 1 s more
    assert retry_delay(0, 0.5, 0.0, first=1.0, cap=8.0) == 0.0
    assert retry_delay(2, 0.0, None, first=1.0, cap=8.0) == 2.0


# --- filters --------------------------------------------------------------------------


def test_filters_use_freeclimbs_names_and_times_in_utc() -> None:
    east = timezone(timedelta(hours=2))
    query = call_filters(
        active=False,
        status=CallStatus.COMPLETED,
        start_time=datetime(2026, 3, 9, 14, 0, 0, tzinfo=east),
        end_time=NOW,
        to="+13121000096",
        from_="+13121000109",
        parent_call_id=CALL,
        application_ids=("AP1", "AP2"),
    )
    assert query == [
        ("active", "false"),
        ("status", "completed"),
        ("startTime", "2026-03-09 12:00:00"),
        ("endTime", "2026-03-09 12:00:00"),
        ("to", "+13121000096"),
        ("from", "+13121000109"),
        ("parentCallId", CALL),
        ("applicationId", "AP1"),
        ("applicationId", "AP2"),
    ]
    assert call_filters() == []
    with pytest.raises(ValueError, match="timezone-aware"):
        format_filter_time(datetime(2026, 3, 9))  # naive: the point of the test


# --- credentials and ids ----------------------------------------------------------------


def test_the_key_never_shows_in_a_repr() -> None:
    creds = Credentials(ACCOUNT, SecretStr(KEY))
    client = FreeClimbClient([creds])
    assert KEY not in repr(creds) and KEY not in str(creds)
    assert KEY not in repr(client) and KEY not in str(client)
    assert ACCOUNT in repr(client)
    assert DEFAULT_API_URL in repr(client)
    with pytest.raises(ValueError, match="account id"):
        Credentials("AC-not-an-id", SecretStr(KEY))


async def test_ids_that_could_leave_the_path_are_refused_before_sending() -> None:
    sent: list[httpx.Request] = []
    client = _client(_answering(sent, 200))
    with pytest.raises(ValueError, match="call id"):
        await client.get_call(ACCOUNT, "../../Accounts")
    with pytest.raises(ValueError, match="account id"):
        await client.get_call("AC" + "a" * 40 + "/x", CALL)
    with pytest.raises(ValueError, match="account id"):
        await anext(client.list_calls("../" + ACCOUNT))
    assert sent == []
    with pytest.raises(ValueError, match="base URL"):
        FreeClimbClient({}, ClientOptions(base_url="ftp://example.com/apiserver"))


# --- odd answers, through httpx's mock transport --------------------------------------


def _client(
    handler: Callable[[httpx.Request], httpx.Response], **options: object
) -> FreeClimbClient:
    async def no_sleep(_: float) -> None:
        return None

    return FreeClimbClient(
        {ACCOUNT: SecretStr(KEY)},
        ClientOptions(base_url="https://api.test/apiserver", **options),  # type: ignore[arg-type]
        sleep=no_sleep,
        transport=httpx.MockTransport(handler),
    )


def _answering(seen: list[httpx.Request], status: int) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status)

    return handler


def _resource(call_id: str = CALL, **fields: object) -> dict[str, object]:
    return {"callId": call_id, "accountId": ACCOUNT, "status": "completed", **fields}


async def test_the_request_carries_basic_auth_and_no_credential_in_the_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=json.dumps(_resource()).encode())

    fetched = await _client(handler).get_call(ACCOUNT, CALL)
    assert isinstance(fetched, FetchedCall)
    assert fetched.call.status is CallStatus.COMPLETED
    (request,) = seen
    assert str(request.url) == f"https://api.test/apiserver/Accounts/{ACCOUNT}/Calls/{CALL}"
    assert request.url.userinfo == b""
    expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{KEY}".encode()).decode()
    assert request.headers["authorization"] == expected
    assert KEY not in repr(request.headers)  # httpx masks it too


async def test_new_keys_count_from_the_next_request_and_an_unchanged_one_keeps_its_gate() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=json.dumps(_resource()).encode())

    def basic(key: str) -> str:
        return "Basic " + base64.b64encode(f"{ACCOUNT}:{key}".encode()).decode()

    client = _client(handler)
    gate = client._gates[ACCOUNT]
    gate.resume_at = 1.0  # as a 429 leaves it: a reload must not forget the pause
    client.use({ACCOUNT: SecretStr(KEY)})  # the same key (a re-synced Secret)
    assert client._gates[ACCOUNT] is gate and gate.resume_at == 1.0
    client.use({ACCOUNT: SecretStr("rotated")})
    assert client._gates[ACCOUNT] is gate and gate.resume_at == 1.0
    await client.get_call(ACCOUNT, CALL)
    assert seen[-1].headers["authorization"] == basic("rotated")
    other = "AC" + "c" * 40
    client.use({other: SecretStr("other")})  # ACCOUNT removed, another added
    assert client.accounts == [other]
    with pytest.raises(NoCredentials):
        await client.get_call(ACCOUNT, CALL)
    assert len(seen) == 1  # nothing sent for an account without a key


@pytest.mark.parametrize(
    ("status", "error"),
    [(403, Forbidden), (404, CallNotFound), (400, UnexpectedResponse), (410, UnexpectedResponse)],
)
async def test_refusals_are_typed_and_not_retried(status: int, error: type[Exception]) -> None:
    seen: list[httpx.Request] = []
    client = _client(_answering(seen, status))
    with pytest.raises(error) as raised:
        await client.get_call(ACCOUNT, CALL)
    assert len(seen) == 1
    assert getattr(raised.value, "status", None) == status
    assert KEY not in str(raised.value)


async def test_a_resource_the_model_refuses_is_an_unexpected_response() -> None:
    body = json.dumps(_resource(duration=5, connectDuration=9)).encode()
    client = _client(lambda _: httpx.Response(200, content=body))
    with pytest.raises(UnexpectedResponse, match="connectDuration must not exceed duration"):
        await client.get_call(ACCOUNT, CALL)
    for bad in (b"[]", b"not json", b'{"callId": 1, "callId": 2}'):
        client = _client(lambda _, bad=bad: httpx.Response(200, content=bad))  # type: ignore[misc]
        with pytest.raises(UnexpectedResponse):
            await client.get_call(ACCOUNT, CALL)


async def test_a_listed_call_the_model_refuses_is_yielded_as_invalid_not_raised() -> None:
    good, other = _resource(), _resource("CA" + "c" * 40, status="teleported")
    page = {"total": 2, "page": 0, "numPages": 1, "nextPageUri": None, "calls": [good, other]}
    client = _client(lambda _: httpx.Response(200, content=json.dumps(page).encode()))
    items = [item async for item in client.list_calls(ACCOUNT)]
    assert isinstance(items[0], FetchedCall)
    assert isinstance(items[1], InvalidCall)
    assert "status" in items[1].problem
    assert json.loads(items[1].body) == other


@pytest.mark.parametrize(
    "next_uri",
    [
        "https://elsewhere.test/apiserver/Accounts/x/Calls?cursor=1",
        "//elsewhere.test/apiserver/Accounts",
        "Accounts/x/Calls",
    ],
)
async def test_the_credentials_never_follow_a_next_page_off_the_api(next_uri: str) -> None:
    page = {"calls": [], "nextPageUri": next_uri}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=json.dumps(page).encode())

    with pytest.raises(UnexpectedResponse, match="nextPageUri"):
        [item async for item in _client(handler).list_calls(ACCOUNT)]
    assert len(seen) == 1


async def test_an_absolute_next_page_on_the_base_url_is_followed() -> None:
    pages = iter(
        [
            {"calls": [_resource()], "nextPageUri": "https://api.test/apiserver/next?cursor=2"},
            {"calls": [_resource("CA" + "d" * 40)], "nextPageUri": None},
        ]
    )
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=json.dumps(next(pages)).encode())

    items = [item async for item in _client(handler).list_calls(ACCOUNT)]
    assert len(items) == 2
    assert seen[1] == "https://api.test/apiserver/next?cursor=2"


async def test_a_body_past_the_limit_is_refused() -> None:
    body = json.dumps(_resource(uri="x" * 5000)).encode()
    client = _client(lambda _: httpx.Response(200, content=body), max_body_bytes=1000)
    with pytest.raises(UnexpectedResponse, match="larger than 1000 bytes"):
        await client.get_call(ACCOUNT, CALL)


async def test_a_retry_after_longer_than_the_client_waits_fails_at_once() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(429, headers={"Retry-After": "3600"})

    with pytest.raises(RetriesExhausted) as raised:
        await _client(handler, max_retry_after=120.0).get_call(ACCOUNT, CALL)
    assert raised.value.retry_after == 3600.0
    assert raised.value.status == 429
    assert len(seen) == 1


async def test_another_call_or_account_in_the_answer_is_refused() -> None:
    other_call = json.dumps(_resource("CA" + "e" * 40)).encode()
    client = _client(lambda _: httpx.Response(200, content=other_call))
    with pytest.raises(UnexpectedResponse, match="another call"):
        await client.get_call(ACCOUNT, CALL)
    other_account = json.dumps(_resource(accountId="AC" + "f" * 40)).encode()
    client = _client(lambda _: httpx.Response(200, content=other_account))
    with pytest.raises(UnexpectedResponse, match="another account"):
        await client.get_call(ACCOUNT, CALL)
    page = {"calls": [json.loads(other_account)], "nextPageUri": None}
    client = _client(lambda _: httpx.Response(200, content=json.dumps(page).encode()))
    (item,) = [item async for item in client.list_calls(ACCOUNT)]
    assert isinstance(item, InvalidCall)
    assert "another account" in item.problem
