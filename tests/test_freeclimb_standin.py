"""The FreeClimb REST API client against the stand-in on a real loopback socket: fetching,
paging, typed refusals, retries that honour Retry-After (the waits are recorded by an
injected sleep and clock, never measured), bounded concurrency, and no API key in any log
line, repr or error."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from structlog.testing import capture_logs

from schemas.call import CallStatus
from service.freeclimb import (
    CallNotFound,
    ClientOptions,
    FetchedCall,
    FreeClimbClient,
    NoCredentials,
    RetriesExhausted,
    Unauthorized,
)
from service.standin import StandIn, serve

ACCOUNT = "AC" + "3" * 40
SECOND = "AC" + "4" * 40
KEY = "fc-secret-api-key-0f1e2d3c4b5a"
T0 = datetime(2026, 3, 9, 12, 0, 0, tzinfo=UTC)


def call_id(n: int) -> str:
    return f"CA{n:040x}"


class FakeTime:
    """A monotonic clock that only the client's sleeps move: every wait is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class NoJitter:
    def random(self) -> float:
        return 0.0


@pytest.fixture
async def standin() -> AsyncIterator[tuple[StandIn, str]]:
    api = StandIn({ACCOUNT: KEY, SECOND: KEY + "-2"}, page_size=3, clock=lambda: T0)
    async with serve(api) as base:
        yield api, base


def make_client(base: str, time: FakeTime, key: str = KEY, **options: object) -> FreeClimbClient:
    return FreeClimbClient(
        {ACCOUNT: SecretStr(key), SECOND: SecretStr(KEY + "-2")},
        ClientOptions(base_url=base, **options),  # type: ignore[arg-type]
        sleep=time.sleep,
        clock=time.clock,
        now=lambda: T0,
        rng=NoJitter(),
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_get_returns_the_resource_bytes_and_the_parsed_call(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    api.put_call(ACCOUNT, call_id(1), CallStatus.RINGING)
    api.advance(ACCOUNT, call_id(1), CallStatus.IN_PROGRESS, at=T0 + timedelta(seconds=5))
    time = FakeTime()
    before = sample(
        "callstatus_freeclimb_api_requests_total", operation="get_call", code="200", outcome="ok"
    )
    async with make_client(base, time) as client:
        fetched = await client.get_call(ACCOUNT, call_id(1))
    assert isinstance(fetched, FetchedCall)
    assert fetched.data == api.call(ACCOUNT, call_id(1))
    assert fetched.body.startswith(b'{"uri":')
    assert fetched.call.status is CallStatus.IN_PROGRESS
    assert fetched.call.revision == 2
    assert fetched.call.connectTime == T0 + timedelta(seconds=5)
    assert fetched.call.endTime is None  # "" in the resource: not reached yet
    assert time.sleeps == []
    after = sample(
        "callstatus_freeclimb_api_requests_total", operation="get_call", code="200", outcome="ok"
    )
    assert after == before + 1


async def test_an_unknown_call_is_not_found_and_not_retried(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    time = FakeTime()
    async with make_client(base, time) as client:
        with pytest.raises(CallNotFound) as raised:
            await client.get_call(ACCOUNT, call_id(404))
    assert raised.value.status == 404
    assert [s.status for s in api.seen] == [404]
    assert time.sleeps == []


async def test_a_wrong_key_is_unauthorized_at_once_and_never_shown(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    api.put_call(ACCOUNT, call_id(1))
    wrong = "wrong-key-that-must-stay-hidden"
    time = FakeTime()
    with capture_logs() as logs:
        async with make_client(base, time, key=wrong) as client:
            with pytest.raises(Unauthorized) as raised:
                await client.get_call(ACCOUNT, call_id(1))
            with pytest.raises(Unauthorized):
                [item async for item in client.list_calls(ACCOUNT, active=True)]
            with pytest.raises(NoCredentials):
                await client.get_call("AC" + "9" * 40, call_id(1))
            shown = [repr(client), str(client), repr(raised.value), str(raised.value)]
    assert [s.status for s in api.seen] == [401, 401]
    assert any(event["event"] == "freeclimb_api_refused" for event in logs)
    for text in [*shown, repr(logs)]:
        assert wrong not in text
        assert base64.b64encode(f"{ACCOUNT}:{wrong}".encode()).decode() not in text
    assert ACCOUNT in str(raised.value)


async def test_listing_follows_next_page_uri_with_the_filters(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    for n in range(11):
        at = T0 + timedelta(minutes=n)
        api.put_call(ACCOUNT, call_id(n), CallStatus.RINGING, at=at)
        if n % 3 != 2:  # calls 2, 5 and 8 stay ringing
            api.advance(ACCOUNT, call_id(n), CallStatus.IN_PROGRESS, at=at + timedelta(seconds=5))
            api.advance(ACCOUNT, call_id(n), CallStatus.COMPLETED, at=at + timedelta(seconds=65))
    api.put_call(SECOND, call_id(100), CallStatus.RINGING)
    time = FakeTime()
    async with make_client(base, time) as client:
        every = [item async for item in client.list_calls(ACCOUNT)]
        assert [i.data["callId"] for i in every] == [call_id(n) for n in range(11)]
        assert len(api.seen) == 4  # 11 calls at 3 a page
        assert all(isinstance(i, FetchedCall) for i in every)

        ended = [
            item.call.callId
            async for item in client.list_calls(
                ACCOUNT,
                status=CallStatus.COMPLETED,
                start_time=T0 + timedelta(minutes=3),
                end_time=T0 + timedelta(minutes=9, seconds=65),
            )
            if isinstance(item, FetchedCall)
        ]
        assert ended == [call_id(n) for n in (3, 4, 6, 7, 9)]
        pages = api.seen[4:]
        assert len(pages) == 2
        assert "status=completed" in pages[0].query
        assert "startTime=2026-03-09+12%3A03%3A00" in pages[0].query
        assert pages[1].query.startswith("cursor=")  # the next page as the API wrote it

        active = [i.data["callId"] async for i in client.list_calls(ACCOUNT, active=True)]
        assert active == [call_id(2), call_id(5), call_id(8)]
        others = [i.data["callId"] async for i in client.list_calls(SECOND)]
        assert others == [call_id(100)]

        # Stopping early fetches no further page.
        seen = len(api.seen)
        async for _ in client.list_calls(ACCOUNT):
            break
        assert len(api.seen) == seen + 1
    assert time.sleeps == []


async def test_429_waits_what_retry_after_asks_then_succeeds(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    api.put_call(ACCOUNT, call_id(1))
    api.fail_next(429, retry_after="7")
    api.fail_next(
        429, retry_after=(T0 + timedelta(seconds=3)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    )
    api.fail_next(429)  # no Retry-After: own backoff, 3rd retry: half of 0.5 s doubled twice
    labels = {"operation": "get_call", "reason": "rate_limited"}
    before = sample("callstatus_freeclimb_api_retries_total", **labels)
    time = FakeTime()
    with capture_logs() as logs:
        async with make_client(base, time, backoff_first=0.5) as client:
            fetched = await client.get_call(ACCOUNT, call_id(1))
    assert fetched.call.callId == call_id(1)
    assert [s.status for s in api.seen] == [429, 429, 429, 200]
    assert time.sleeps == [7.0, 3.0, 1.0]
    assert sample("callstatus_freeclimb_api_retries_total", **labels) == before + 3
    retries = [e for e in logs if e["event"] == "freeclimb_api_retry"]
    assert [(e["code"], e["delay"]) for e in retries] == [("429", 7.0), ("429", 3.0), ("429", 1.0)]


async def test_a_429_holds_back_the_whole_account_not_just_its_request(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    for n in range(2):
        api.put_call(ACCOUNT, call_id(n))
    api.put_call(SECOND, call_id(2))
    api.fail_next(429, retry_after="30")
    time = FakeTime()
    async with make_client(base, time) as client:
        await client.get_call(ACCOUNT, call_id(0))  # met the 429, waited 30 s, then 200
        assert time.sleeps == [30.0]
        time.now -= 20  # as if the next requests came 10 s into that pause
        await client.get_call(SECOND, call_id(2))
        assert time.sleeps == [30.0]  # another account: not held back
        await client.get_call(ACCOUNT, call_id(1))
        assert time.sleeps == [30.0, 20.0]  # the same account: waited out the pause first
    assert [s.status for s in api.seen] == [429, 200, 200, 200]


async def test_5xx_is_retried_with_backoff_then_a_typed_error(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    api.put_call(ACCOUNT, call_id(1))
    api.fail_next(500)
    api.fail_next(503, times=2)
    time = FakeTime()
    async with make_client(base, time, max_retries=3, backoff_first=1.0) as client:
        assert (await client.get_call(ACCOUNT, call_id(1))).call.callId == call_id(1)
        assert time.sleeps == [0.5, 1.0, 2.0]  # equal jitter at its low end: half of each step
        time.sleeps.clear()
        api.fail_next(502, times=10)
        labels = {"operation": "get_call", "code": "502", "outcome": "failed"}
        before = sample("callstatus_freeclimb_api_requests_total", **labels)
        with capture_logs() as logs, pytest.raises(RetriesExhausted) as raised:
            await client.get_call(ACCOUNT, call_id(1))
    assert raised.value.status == 502
    assert raised.value.attempts == 4
    assert time.sleeps == [0.5, 1.0, 2.0]
    assert [s.status for s in api.seen][-4:] == [502] * 4
    assert sample("callstatus_freeclimb_api_requests_total", **labels) == before + 1
    assert any(e["event"] == "freeclimb_api_gave_up" for e in logs)
    assert KEY not in str(raised.value) and KEY not in repr(raised.value)


async def test_retries_on_every_page_of_a_throttled_listing(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    for n in range(8):
        api.put_call(ACCOUNT, call_id(n))
    api.throttle_every = 2
    api.retry_after = "1"
    time = FakeTime()
    async with make_client(base, time) as client:
        listed = [i.data["callId"] async for i in client.list_calls(ACCOUNT)]
    assert listed == [call_id(n) for n in range(8)]
    assert [s.status for s in api.seen] == [200, 429, 200, 429, 200]
    assert time.sleeps == [1.0, 1.0]


async def test_an_unreachable_api_is_retried_then_a_typed_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    time = FakeTime()
    base = f"http://127.0.0.1:{port}/apiserver"
    async with make_client(base, time, max_retries=2) as client:
        with pytest.raises(RetriesExhausted) as raised:
            await client.get_call(ACCOUNT, call_id(1))
    assert raised.value.status is None
    assert raised.value.attempts == 3
    assert len(time.sleeps) == 2


async def test_a_request_past_its_timeout_is_retried_then_a_typed_error(
    standin: tuple[StandIn, str],
) -> None:
    api, base = standin
    api.put_call(ACCOUNT, call_id(1))
    api.hold = asyncio.Event()  # never set: every request hangs until the client gives up
    time = FakeTime()
    async with make_client(base, time, timeout=0.2, max_retries=1) as client:
        with pytest.raises(RetriesExhausted, match="timeout") as raised:
            await client.get_call(ACCOUNT, call_id(1))
    assert raised.value.status is None
    assert len(time.sleeps) == 1
    api.hold.set()


async def test_concurrency_per_account_is_bounded(standin: tuple[StandIn, str]) -> None:
    api, base = standin
    for n in range(6):
        api.put_call(ACCOUNT, call_id(n))
    api.hold = asyncio.Event()
    time = FakeTime()
    async with make_client(base, time, max_concurrency=2) as client:
        tasks = [asyncio.create_task(client.get_call(ACCOUNT, call_id(n))) for n in range(6)]
        async with api.held:
            await api.held.wait_for(lambda: api.waiting >= 2)
        api.hold.set()
        fetched = await asyncio.gather(*tasks)
    assert {f.call.callId for f in fetched} == {call_id(n) for n in range(6)}
    assert api.max_in_flight(ACCOUNT) == 2


async def test_the_key_is_in_no_log_line_of_any_library(
    standin: tuple[StandIn, str], caplog: pytest.LogCaptureFixture
) -> None:
    api, base = standin
    for n in range(4):
        api.put_call(ACCOUNT, call_id(n))
    api.fail_next(429, retry_after="1")
    api.fail_next(503)
    caplog.set_level(logging.DEBUG)  # httpx and httpcore too, at their most talkative
    time = FakeTime()
    with capture_logs() as logs:
        async with make_client(base, time) as client:
            await client.get_call(ACCOUNT, call_id(0))
            [item async for item in client.list_calls(ACCOUNT, to="+13121000096")]
            with pytest.raises(CallNotFound):
                await client.get_call(ACCOUNT, call_id(99))
    header = base64.b64encode(f"{ACCOUNT}:{KEY}".encode()).decode()
    assert caplog.records  # httpx did log its requests
    for text in (caplog.text, repr(logs)):
        assert KEY not in text
        assert header not in text
    assert "+13121000096" not in repr(logs)  # filters (phone numbers) stay out of our lines
