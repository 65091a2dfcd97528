"""The HTTP API's refusals and outcomes, without a broker.

Durable 202s and 503s from Kafka are proven against the real broker in
tests/integration/test_ingest.py. Here a refused request meets a publisher that fails the
test if it is ever reached (a refusal is never written), and an accepted one meets a
publisher that keeps what it would have written (``Capture``), so the record itself can
be checked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.types import Message
from structlog.testing import capture_logs

from schemas.messages import IngestEnvelope
from service.app import create_app
from service.ingest import MAX_DEPTH, ReceivedClock
from service.producer import Unavailable, Unwritable
from service.signature import sign
from tests.conftest import SECRET, make_settings

CALL_ID = "CA" + "ab" * 20
WEBHOOK = {
    "requestType": "callStatus",
    "callId": CALL_ID,
    "accountId": "AC" + "cd" * 20,
    "callStatus": "completed",
    "direction": "inbound",
    "from": "+13121000109",
    "to": "+13121000096",
}


class Capture:
    """Keeps what the handler would write to Kafka, and acknowledges it."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes, dict[str, bytes]]] = []

    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        self.records.append((key, value, dict(headers)))

    async def ready(self) -> bool:
        return True


class MustNotPublish:
    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        raise AssertionError("a refused request reached Kafka")

    async def ready(self) -> bool:
        return True


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(max_body_bytes=4096), MustNotPublish())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def signed(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if at is None else at
    return {"content-type": "application/json", "FreeClimb-Signature": sign(secret, stamp, body)}


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and isinstance(body["detail"], str)
    return body


async def test_400_not_json(client: httpx.AsyncClient) -> None:
    body = b"{not json"
    assert_problem(await client.post("/v1/call-status", content=body, headers=signed(body)), 400)


@pytest.mark.parametrize("body", [b"[1,2]", b'"text"', b"42", b"null"])
async def test_400_json_but_not_an_object(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/v1/call-status", content=body, headers=signed(body))
    assert assert_problem(response, 400)["type"] == "urn:callstatus:problem:not-object"


def _signed_at(secret: str, skew: int) -> dict[str, str]:
    return {"FreeClimb-Signature": sign(secret, int(time.time()) + skew, b"{}")}


# Headers are built when the test runs, not at collection: a full run reaches this file
# minutes after collecting it, longer than the signature tolerance.
@pytest.mark.parametrize(
    ("make_headers", "verdict"),
    [
        (lambda: {}, "missing"),
        (lambda: {"FreeClimb-Signature": "nonsense"}, "malformed"),
        (lambda: _signed_at("sigsec_" + "9" * 40, 0), "mismatch"),
        (lambda: _signed_at(SECRET, -3600), "too_old"),
        (lambda: _signed_at(SECRET, 3600), "too_new"),
    ],
)
async def test_401_signature(
    client: httpx.AsyncClient, make_headers: Callable[[], dict[str, str]], verdict: str
) -> None:
    headers = make_headers()
    response = await client.post(
        "/v1/call-status", content=b"{}", headers={"content-type": "application/json", **headers}
    )
    body = assert_problem(response, 401)
    assert verdict in str(body["detail"])
    assert SECRET not in response.text


async def test_401_lowercase_header_name_still_verifies(client: httpx.AsyncClient) -> None:
    body = json.dumps({**WEBHOOK, "callStatus": "bogus"}).encode()
    headers = {
        "content-type": "application/json",
        "freeclimb-signature": signed(body)["FreeClimb-Signature"],
    }
    # A valid signature gets past 401 to validation (422): header names are case-insensitive.
    assert (await client.post("/v1/call-status", content=body, headers=headers)).status_code == 422


async def test_413_declared_length(client: httpx.AsyncClient) -> None:
    body = b"{" + b" " * 5000 + b"}"
    assert_problem(await client.post("/v1/call-status", content=body, headers=signed(body)), 413)


async def test_413_streamed_without_length_is_cut_off_early(client: httpx.AsyncClient) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"a":"'
        for _ in range(50 * 1024):  # 50 MiB if it were all read
            sent += 1024
            yield b"x" * 1024

    response = await client.post(
        "/v1/call-status",
        content=endless(),
        headers={
            "content-type": "application/json",
            # Well-formed and current, so the body is read; its digest is never checked.
            "FreeClimb-Signature": f"t={int(time.time())},v1=" + "0" * 64,
        },
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert sent < 64 * 1024  # refused within a few chunks past the 4 KiB limit


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_415_not_json(client: httpx.AsyncClient, ctype: str) -> None:
    body = json.dumps(WEBHOOK).encode()
    headers = {**signed(body), "content-type": ctype}
    assert_problem(await client.post("/v1/call-status", content=body, headers=headers), 415)


async def test_422_lists_each_field_error(client: httpx.AsyncClient) -> None:
    bad = {**WEBHOOK, "callStatus": "exploded", "callId": "CA123", "callDuration": -1}
    body = json.dumps(bad).encode()
    problem = assert_problem(
        await client.post("/v1/call-status", content=body, headers=signed(body)), 422
    )
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert {e["field"] for e in errors} == {"callStatus", "callId", "callDuration"}


async def test_422_resource_with_inconsistent_durations(client: httpx.AsyncClient) -> None:
    body = json.dumps(
        {"callId": CALL_ID, "status": "completed", "duration": 5, "connectDuration": 9}
    ).encode()
    problem = assert_problem(
        await client.post("/v1/call-status", content=body, headers=signed(body)), 422
    )
    assert "connectDuration" in json.dumps(problem["errors"])


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nope"), 404)
    assert_problem(await client.get("/v1/call-status"), 405)


async def test_healthz_openapi_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    spec = (await client.get("/openapi.json")).json()
    responses = spec["paths"]["/v1/call-status"]["post"]["responses"]
    expected = {"202", "400", "401", "403", "408", "413", "415", "422", "431", "500", "503"}
    assert set(responses) == expected
    # The account path adds its 404 (a segment that is no account id).
    with_account = spec["paths"]["/v1/call-status/{accountId}"]["post"]["responses"]
    assert set(with_account) == expected | {"404"}
    body = json.dumps(WEBHOOK).encode()
    await client.post("/v1/call-status", content=body, headers={"content-type": "application/json"})
    text = (await client.get("/metrics")).text
    assert 'callstatus_http_requests_total{code="401",route="/v1/call-status"}' in text
    assert 'callstatus_ingest_total{outcome="signature_missing"}' in text
    # The catalogue's outcomes exist before their first occurrence.
    for outcome in ("too_deep", "duplicate_key", "too_slow", "client_disconnected", "cancelled"):
        assert f'callstatus_ingest_total{{outcome="{outcome}"}}' in text
    assert "callstatus_http_request_duration_seconds_bucket" in text


async def test_readyz_reports_the_publisher() -> None:
    class Down(MustNotPublish):
        async def ready(self) -> bool:
            return False

    app = create_app(make_settings(), Down())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["kafka"] is False


async def test_a_bug_in_another_route_is_a_problem_500_and_logged_as_one() -> None:
    # The access log sits outside Starlette's error middleware (so the ingest route meets
    # none of it): it must still see, count and log the 500 that middleware answers.
    class Broken(MustNotPublish):
        async def ready(self) -> bool:
            raise RuntimeError("bug")

    app = create_app(make_settings(), Broken())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    before = counted("callstatus_http_requests_total", route="/readyz", code="500")
    with capture_logs() as logs:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.get("/readyz")
    problem_body = assert_problem(response, 500)
    assert problem_body["type"] == "urn:callstatus:problem:internal"
    assert "RuntimeError" not in response.text
    assert counted("callstatus_http_requests_total", route="/readyz", code="500") == before + 1
    [line] = [entry for entry in logs if entry["event"] == "request"]
    assert (line["path"], line["status"]) == ("/readyz", 500)


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ingest_outcome(outcome: str) -> float:
    return counted("callstatus_ingest_total", outcome=outcome)


def http_code(code: int) -> float:
    return counted("callstatus_http_requests_total", route="/v1/call-status", code=str(code))


def webhook_with(**extra: Any) -> bytes:
    return json.dumps({**WEBHOOK, **extra}).encode()


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"x": value}
    return value


# --- strict JSON: what every downstream reader can decode, or 400 --------------------------


@pytest.mark.parametrize(
    "body",
    [
        webhook_with(callDuration=0)[:-1] + b',"extra":NaN}',
        webhook_with()[:-1] + b',"extra":Infinity}',
        webhook_with()[:-1] + b',"extra":[-Infinity]}',
        webhook_with()[:-1] + b',"extra":1e400}',  # not a finite double
        webhook_with()[:-1] + b',"extra":"\\ud800"}',  # a lone surrogate
        webhook_with()[:-1] + b',"extra":"caf\xe9"}',  # Latin-1, not UTF-8
        webhook_with().decode().encode("utf-16"),
        b"\xef\xbb\xbf" + webhook_with(),  # a byte order mark
    ],
    ids=["nan", "infinity", "minus-infinity", "overflow", "surrogate", "latin1", "utf16", "bom"],
)
async def test_400_not_strict_json(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/v1/call-status", content=body, headers=signed(body))
    assert assert_problem(response, 400)["type"] == "urn:callstatus:problem:not-json"


async def test_400_nested_too_deep(client: httpx.AsyncClient) -> None:
    # An unknown field a few hundred levels deep: the processor's decoder would give up
    # on the record after we had answered 202.
    body = webhook_with(conferenceId=nested(300))
    response = await client.post("/v1/call-status", content=body, headers=signed(body))
    problem = assert_problem(response, 400)
    assert problem["type"] == "urn:callstatus:problem:too-deep"
    assert str(MAX_DEPTH) in str(problem["detail"])
    for array_depth in (MAX_DEPTH, 1900):  # arrays count too; past the recursion limit too
        deep = webhook_with()[:-1] + b',"a":' + b"[" * array_depth + b"]" * array_depth + b"}"
        response = await client.post("/v1/call-status", content=deep, headers=signed(deep))
        assert assert_problem(response, 400)["type"] == "urn:callstatus:problem:too-deep"


async def test_nesting_up_to_the_cap_is_accepted() -> None:
    capture = Capture()
    app = create_app(make_settings(), capture)
    body = webhook_with(conferenceId=nested(MAX_DEPTH - 1))  # the body itself is level 1
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/v1/call-status", content=body, headers=signed(body))
    assert response.status_code == 202
    envelope = IngestEnvelope.model_validate_json(capture.records[0][1])
    assert envelope.call.callId == CALL_ID


@pytest.mark.parametrize(
    "body",
    [
        webhook_with()[:-1] + f',"callId":"CA{"ef" * 20}"}}'.encode(),
        webhook_with(subresourceUris={"x": 1})[:-2] + b',"x":2}}',
    ],
    ids=["callId", "nested"],
)
async def test_400_duplicate_keys(client: httpx.AsyncClient, body: bytes) -> None:
    # Readers disagree on which duplicate wins: the record key and the body could name
    # different calls.
    response = await client.post("/v1/call-status", content=body, headers=signed(body))
    problem = assert_problem(response, 400)
    assert problem["type"] == "urn:callstatus:problem:duplicate-key"


# --- the signature header is judged before the body is read --------------------------------


@pytest.mark.parametrize(
    ("header", "verdict"),
    [
        (None, "missing"),
        ("t=abc,v1=zz", "malformed"),
        (f"t={int(time.time()) - 3600},v1={'0' * 64}", "too_old"),
        (f"t={int(time.time()) + 3600},v1={'0' * 64}", "too_new"),
    ],
    ids=["missing", "malformed", "too_old", "too_new"],  # no clock in an id: xdist's workers
)
async def test_401_without_reading_the_body(
    client: httpx.AsyncClient, header: str | None, verdict: str
) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1000):
            pulled += 1
            yield b" "

    headers = {"content-type": "application/json"}
    if header is not None:
        headers["FreeClimb-Signature"] = header
    response = await client.post("/v1/call-status", content=body(), headers=headers)
    assert verdict in str(assert_problem(response, 401)["detail"])
    assert pulled == 0


async def test_408_when_the_body_does_not_arrive_in_time() -> None:
    app = create_app(make_settings(body_read_timeout_seconds=0.2), MustNotPublish())
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"callId":'
        await never.wait()  # a client that stops sending half-way
        yield b"}"

    before = ingest_outcome("too_slow")
    headers = {
        "content-type": "application/json",
        "FreeClimb-Signature": f"t={int(time.time())},v1=" + "0" * 64,
    }
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
        asyncio.timeout(60),  # without a read deadline the request would hang: fail instead
    ):
        response = await c.post("/v1/call-status", content=stalled(), headers=headers)
    problem = assert_problem(response, 408)
    assert problem["type"] == "urn:callstatus:problem:body-timeout"
    assert ingest_outcome("too_slow") == before + 1


async def test_read_deadlines_survive_one_event_loop_after_another() -> None:
    # A read that ends leaves the watchdog scheduled in its loop; when that loop is gone,
    # the next loop's reads must still get a watchdog of their own.
    app = create_app(make_settings(body_read_timeout_seconds=0.2), MustNotPublish())
    headers = {
        "content-type": "application/json",
        "FreeClimb-Signature": f"t={int(time.time())},v1=" + "0" * 64,
    }

    async def post(content: bytes | AsyncIterator[bytes]) -> int:
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
            asyncio.timeout(60),
        ):
            return (await c.post("/v1/call-status", content=content, headers=headers)).status_code

    async def stalled() -> AsyncIterator[bytes]:
        yield b"{"
        await asyncio.Event().wait()

    def in_own_loop(content: bytes | AsyncIterator[bytes]) -> int:
        return asyncio.run(post(content))

    assert await asyncio.to_thread(in_own_loop, b"{}") == 401  # read at once, digest wrong
    assert await asyncio.to_thread(in_own_loop, stalled()) == 408


# --- causes a client (or a shutdown) can trigger are never counted as 500 ------------------


def _scope(body: bytes) -> dict[str, Any]:
    headers = [(k.lower().encode(), v.encode()) for k, v in signed(body).items()]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/call-status",
        "raw_path": b"/v1/call-status",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }


async def test_client_disconnect_mid_body_is_its_own_outcome() -> None:
    app = create_app(make_settings(), MustNotPublish())
    body = webhook_with()
    incoming: list[Message] = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    before = (ingest_outcome("client_disconnected"), http_code(499), http_code(500))
    with capture_logs() as logs:  # the app binds its access log on its first request
        await app(_scope(body), receive, send)
    after = (ingest_outcome("client_disconnected"), http_code(499), http_code(500))
    assert after == (before[0] + 1, before[1] + 1, before[2])
    assert sent[0]["status"] == 499  # what the access log says; nobody is left to read it
    [line] = [entry for entry in logs if entry["event"] == "request"]
    assert (line["status"], line["outcome"]) == (499, "client_disconnected")


async def test_a_request_cancelled_at_shutdown_is_a_503_not_a_500() -> None:
    class Stuck(Capture):
        def __init__(self) -> None:
            super().__init__()
            self.waiting = asyncio.Event()

        async def publish(
            self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
        ) -> None:
            self.waiting.set()
            await asyncio.Event().wait()  # Kafka never answers

    publisher = Stuck()
    app = create_app(make_settings(), publisher)
    body = webhook_with()
    incoming: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    before = (ingest_outcome("cancelled"), http_code(503), http_code(500))
    with capture_logs() as logs:  # the app binds its access log on its first request
        task = asyncio.create_task(app(_scope(body), receive, send))
        await publisher.waiting.wait()
        task.cancel()  # what uvicorn does when the shutdown grace runs out
        with pytest.raises(asyncio.CancelledError):
            await task
    after = (ingest_outcome("cancelled"), http_code(503), http_code(500))
    assert after == (before[0] + 1, before[1] + 1, before[2])
    assert sent[0]["status"] == 503
    assert ("retry-after", "1") in [(k.decode(), v.decode()) for k, v in sent[0]["headers"]]
    assert json.loads(sent[1]["body"])["type"] == "urn:callstatus:problem:shutting-down"
    [line] = [entry for entry in logs if entry["event"] == "request"]
    assert (line["status"], line["outcome"]) == (503, "cancelled")


async def test_shutdown_while_reading_the_body_is_a_cancellation_not_a_408() -> None:
    app = create_app(make_settings(body_read_timeout_seconds=300), MustNotPublish())
    body = webhook_with()
    reading = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if not reading.is_set():
            reading.set()
            return {"type": "http.request", "body": body[:5], "more_body": True}
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    before = (ingest_outcome("cancelled"), ingest_outcome("too_slow"))
    task = asyncio.create_task(app(_scope(body), receive, send))
    await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (ingest_outcome("cancelled"), ingest_outcome("too_slow")) == (before[0] + 1, before[1])
    assert sent[0]["status"] == 503


# --- replays and retries carry the same eventId ---------------------------------------------


async def test_event_id_is_derived_from_the_signed_body_alone() -> None:
    capture = Capture()
    # No replay cache: every copy is written, so the stored ids show the rule.
    app = create_app(make_settings(replay_cache_entries=0), capture)
    body = webhook_with()
    now = int(time.time())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        first = await c.post("/v1/call-status", content=body, headers=signed(body, at=now))
        replay = await c.post("/v1/call-status", content=body, headers=signed(body, at=now))
        retry = await c.post("/v1/call-status", content=body, headers=signed(body, at=now - 60))
        other_body = webhook_with(callStatus="ringing")
        other = await c.post("/v1/call-status", content=other_body, headers=signed(other_body))
    ids = [r.json()["eventId"] for r in (first, replay, retry, other)]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    stored = [IngestEnvelope.model_validate_json(value).eventId for _, value, _ in capture.records]
    assert stored == ids
    assert [headers["ce_id"].decode() for _, _, headers in capture.records] == ids


class FailsFirst(Capture):
    """Answers Unavailable (a 503) for the first write, then stores."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise Unavailable("timeout")
        await super().publish(key, value, headers)


async def test_a_replay_of_a_stored_event_is_202_without_a_second_write() -> None:
    capture = Capture()
    app = create_app(make_settings(replay_cache_entries=2), capture)
    bodies = [webhook_with(callStatus=s) for s in ("queued", "ringing", "inProgress")]
    now = int(time.time())
    replayed = ingest_outcome("replayed")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        first = await c.post("/v1/call-status", content=bodies[0], headers=signed(bodies[0]))
        for _ in range(20):  # a captured request replayed in a loop, and FreeClimb's resend
            again = await c.post(
                "/v1/call-status", content=bodies[0], headers=signed(bodies[0], at=now - 1)
            )
            assert (again.status_code, again.json()) == (202, first.json())
        assert len(capture.records) == 1
        assert ingest_outcome("replayed") == replayed + 20
        # The cache is bounded (2 entries here): the oldest is forgotten and written again,
        # which the processor then drops as a duplicate (rule 0).
        for body in bodies[1:]:
            await c.post("/v1/call-status", content=body, headers=signed(body))
        await c.post("/v1/call-status", content=bodies[0], headers=signed(bodies[0]))
    assert len(capture.records) == 4


async def test_a_replay_after_a_503_is_written() -> None:
    """A 503 means "maybe stored": the retry must be written, never answered from memory."""
    publisher = FailsFirst()
    app = create_app(make_settings(), publisher)
    body = webhook_with()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        refused = await c.post("/v1/call-status", content=body, headers=signed(body))
        retried = await c.post("/v1/call-status", content=body, headers=signed(body))
    assert (refused.status_code, retried.status_code) == (503, 202)
    assert publisher.attempts == 2 and len(publisher.records) == 1


async def test_an_event_kafka_refuses_for_good_is_a_500_without_retry_after() -> None:
    class Refuses(MustNotPublish):
        async def publish(
            self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
        ) -> None:
            raise Unwritable("MessageSizeTooLargeError")

    app = create_app(make_settings(), Refuses())
    body = webhook_with()
    before = ingest_outcome("unwritable")
    with capture_logs() as logs:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            response = await c.post("/v1/call-status", content=body, headers=signed(body))
    problem = assert_problem(response, 500)
    assert problem["type"] == "urn:callstatus:problem:event-unwritable"
    assert "MessageSizeTooLargeError" in str(problem["detail"])
    assert "retry-after" not in response.headers
    assert ingest_outcome("unwritable") == before + 1
    assert any(line["event"] == "kafka refuses the event for good" for line in logs)


@pytest.mark.parametrize(
    ("reason", "says"),
    [("timeout", "Kafka did not acknowledge"), ("spool_full", "full"), ("spool_error", "disk")],
)
async def test_a_503_says_whether_kafka_or_the_spool_could_not_take_the_event(
    reason: str, says: str
) -> None:
    class Refuses(MustNotPublish):
        async def publish(
            self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
        ) -> None:
            raise Unavailable(reason)

    app = create_app(make_settings(), Refuses())
    body = webhook_with()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/v1/call-status", content=body, headers=signed(body))
    problem = assert_problem(response, 503)
    assert says in str(problem["detail"])
    assert response.headers["retry-after"]


async def test_a_replay_that_fails_the_signature_is_still_401() -> None:
    capture = Capture()
    app = create_app(make_settings(), capture)
    body = webhook_with()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.post("/v1/call-status", content=body, headers=signed(body))).status_code
        forged = await c.post("/v1/call-status", content=body, headers=signed(body, "sigsec_x"))
    assert_problem(forged, 401)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**WEBHOOK, "callDuration": 10**30}, "callDuration"),
        ({**WEBHOOK, "callDuration": 2**63}, "callDuration"),
        ({"callId": CALL_ID, "status": "completed", "duration": 2**63}, "duration"),
        ({"callId": CALL_ID, "status": "completed", "connectDuration": 1e30}, "connectDuration"),
        ({"callId": CALL_ID, "status": "completed", "revision": 2**64}, "revision"),
    ],
)
async def test_422_for_an_integer_past_64_bits(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    raw = json.dumps(body).encode()
    problem = assert_problem(
        await client.post("/v1/call-status", content=raw, headers=signed(raw)), 422
    )
    assert [e["field"] for e in problem["errors"]] == [field]  # type: ignore[attr-defined]


async def test_the_largest_64_bit_integer_is_accepted() -> None:
    capture = Capture()
    app = create_app(make_settings(), capture)
    raw = webhook_with(callDuration=2**63 - 1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/v1/call-status", content=raw, headers=signed(raw))
    assert response.status_code == 202
    stored = IngestEnvelope.model_validate_json(capture.records[0][1])
    assert stored.call.duration == 2**63 - 1


async def test_readyz_asks_kafka_at_most_once_a_second_however_often_it_is_called() -> None:
    class Counting(MustNotPublish):
        asked = 0

        async def ready(self) -> bool:
            Counting.asked += 1
            await asyncio.sleep(0)  # an ask that takes a moment, as a round trip does
            return True

    app = create_app(make_settings(), Counting())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        answers = await asyncio.gather(*(c.get("/readyz") for _ in range(50)))
        answers += [await c.get("/readyz") for _ in range(50)]
    assert {a.status_code for a in answers} == {200}
    # 100 GETs within far less than a second (no sleeps here): one ask, shared.
    assert Counting.asked == 1


# --- every accepted event fits the producer's max request size ------------------------------

LIMIT = 65536


def _at_size(prefix: bytes, suffix: bytes, filler: bytes) -> bytes:
    """prefix + filler repeated + suffix, as close to LIMIT bytes as the filler allows."""
    room = LIMIT - len(prefix) - len(suffix)
    return prefix + filler * (room // len(filler)) + suffix


@pytest.mark.parametrize(
    "body",
    [
        _at_size(
            b'{"requestType":"', f'","callId":"{CALL_ID}","callStatus":"queued"}}'.encode(), b"r"
        ),
        _at_size(b'{"to":"', f'","callId":"{CALL_ID}","status":"queued"}}'.encode(), b"t"),
        _at_size(b'{"uri":"', f'","callId":"{CALL_ID}","status":"queued"}}'.encode(), b"\\u00e9"),
        _at_size(
            b'{"subresourceUris":{"a":[0',
            f']}},"callId":"{CALL_ID}","status":"queued"}}'.encode(),
            b",1",
        ),
    ],
    ids=["requestType", "to", "escapes", "small-numbers"],
)
async def test_a_body_at_the_limit_is_stored_within_the_producer_limit(body: bytes) -> None:
    settings = make_settings(max_body_bytes=LIMIT)
    capture = Capture()
    app = create_app(settings, capture)
    assert len(body) <= LIMIT
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/v1/call-status", content=body, headers=signed(body))
    assert response.status_code == 202, response.text
    key, value, headers = capture.records[0]
    framing = sum(len(k) + len(v) for k, v in headers.items()) + 200
    assert len(key) + len(value) + framing <= settings.producer_max_request_bytes


async def test_a_body_whose_record_would_not_fit_is_413_not_503_forever() -> None:
    # 1e15 is 4 bytes in the body and 18 when written back in the call: the record grows
    # past twice the body, and the producer would refuse it on every retry.
    body = _at_size(
        b'{"subresourceUris":{"a":[0',
        f']}},"callId":"{CALL_ID}","status":"queued"}}'.encode(),
        b",1e15",
    )
    app = create_app(make_settings(max_body_bytes=LIMIT), MustNotPublish())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/v1/call-status", content=body, headers=signed(body))
    problem = assert_problem(response, 413)
    assert "stored" in str(problem["detail"])


async def test_a_bug_behind_the_ingest_fast_path_is_a_plain_500(client: httpx.AsyncClient) -> None:
    # The ingest route skips Starlette's router and exception middleware; a failure the
    # handler does not expect must still be a problem+json 500, never a stack trace.
    body = json.dumps(WEBHOOK).encode()
    before = http_code(500)
    response = await client.post(
        "/v1/call-status",
        content=body,
        headers={"content-type": "application/json", **signed(body)},
    )
    problem_body = assert_problem(response, 500)
    assert "Traceback" not in response.text and "AssertionError" not in response.text
    assert problem_body["type"] == "urn:callstatus:problem:internal"
    assert http_code(500) == before + 1


def test_the_received_clock_writes_format_rfc3339s_form_of_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import UTC, datetime, timedelta

    from schemas.call import format_rfc3339

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    clock = ReceivedClock()
    # Within one second (its prefix cached), across a second, a minute and a year.
    for ns in (
        1_767_225_599_000_000_000,
        1_767_225_599_999_999_999,
        1_767_225_600_000_999_999,
        1_767_225_600_123_456_789,
        1_767_225_661_007_000_000,
    ):
        monkeypatch.setattr("time.time_ns", lambda ns=ns: ns)
        expected = format_rfc3339(epoch + timedelta(microseconds=ns // 1000))
        assert clock.now() == expected
