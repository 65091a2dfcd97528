"""The ingest lane (service/lane.py) in a real uvicorn server on loopback, with the real
app and a publisher that stands in for Kafka (no broker): which requests take it, that
its answers and access lines are the ASGI path's, byte for byte, and that pipelining,
``Connection: close`` and the shutdown's grace hold on it.

A request goes the ASGI way when its URL has a query string (the lane takes only the
bare path), which the handler ignores: so one request can be sent both ways and the
two answers compared. Through the real broker, every integration test that posts to a
server process goes through the lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from typing import Any

import pytest
import uvicorn
from pydantic import SecretStr
from structlog.testing import capture_logs

from service import metrics
from service.accountbook import Account, AccountBook
from service.accounts import StaticAccounts
from service.app import App, create_app
from service.frontdoor import FrontDoor
from service.ingest import Ingest, Publisher
from service.lane import LaneCycle
from service.producer import Unavailable
from service.signature import sign
from tests.conftest import SECRET, make_settings
from tests.loopback import on_loopback

ACCOUNT = "AC" + "cd" * 20
OTHER = "AC" + "ef" * 20
Done = Callable[[Exception | None], None]


def webhook(call: int, **changes: Any) -> bytes:
    body = {
        "requestType": "callStatus",
        "callId": "CA" + f"{call:040x}",
        "accountId": ACCOUNT,
        "callStatus": "completed",
        "direction": "inbound",
        "from": "+13121000109",
        "to": "+13121000096",
    }
    body.update(changes)
    return json.dumps(body).encode()


def request(
    body: bytes,
    target: str = "/v1/call-status",
    *,
    secret: str = SECRET,
    content_type: str = "application/json",
    extra: str = "",
    version: str = "1.1",
) -> bytes:
    signature = sign(secret, int(time.time()), body)
    head = (
        f"POST {target} HTTP/{version}\r\nhost: test\r\ncontent-type: {content_type}\r\n"
        f"freeclimb-signature: {signature}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


class Instant:
    """Stores at once: from the ack's callback, on the next loop pass, as Kafka would."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.held: list[Done] = []
        self.hold = False
        self.fail: Exception | None = None

    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        if self.fail is not None:
            raise self.fail
        self.records.append(key)

    def publish_now(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]], done: Done
    ) -> bool:
        if self.hold:
            self.held.append(done)
            return True
        self.records.append(key)
        asyncio.get_running_loop().call_soon(done, self.fail)
        return True

    async def ready(self) -> bool:
        return True


class CoroutineOnly:
    """A publisher without publish_now: the lane awaits publish() in a task."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.records: list[bytes] = []

    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        await asyncio.sleep(0)  # a real await, as Kafka's ack is
        if self.fail is not None:
            raise self.fail
        self.records.append(key)

    async def ready(self) -> bool:
        return True


class Server:
    def __init__(self, srv: uvicorn.Server, app: App, port: int) -> None:
        self.srv = srv
        self.app = app
        self.port = port
        self.lane_requests = 0


@contextlib.asynccontextmanager
async def serving(publisher: Publisher, grace: float = 5.0) -> AsyncIterator[Server]:
    book = AccountBook([Account(ACCOUNT, (SecretStr(SECRET),))])
    app = create_app(make_settings(max_body_bytes=2048), publisher, accounts=StaticAccounts(book))
    assert app.lane is not None
    door = FrontDoor(5.0, 16384, 100, 100)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=int(grace),
        **door.uvicorn_options(app.lane),
    )
    srv = uvicorn.Server(config)
    lane = app.lane
    handle = lane.handle
    async with on_loopback(srv) as port:
        server = Server(srv, app, port)

        def counted(cycle: LaneCycle, body: bytes) -> None:
            server.lane_requests += 1
            handle(cycle, body)

        lane.handle = counted  # type: ignore[method-assign]
        yield server


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The next final response (a 100 Continue before it is skipped)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if head.startswith(b"HTTP/1.1 100 "):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        headers[name] = value
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(status_line.split(" ")[1]), headers, body


async def exchange(port: int, *pieces: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


def _lines(logs: list[MutableMapping[str, Any]]) -> list[dict[str, Any]]:
    """The access lines, without what differs per request however it came."""
    drop = {"latency_ms", "request_id", "log_level", "logger_name"}
    return [{k: v for k, v in e.items() if k not in drop} for e in logs if e["event"] == "request"]


CASES: list[tuple[str, Callable[[str], bytes]]] = [
    ("accepted", lambda q: request(webhook(1), "/v1/call-status" + q)),
    ("account path", lambda q: request(webhook(2), f"/v1/call-status/{ACCOUNT}" + q)),
    ("bad signature", lambda q: request(webhook(3), "/v1/call-status" + q, secret="x" * 20)),
    (
        "media type",
        lambda q: request(webhook(4), "/v1/call-status" + q, content_type="text/plain"),
    ),
    ("invalid", lambda q: request(webhook(5, callStatus="nope"), "/v1/call-status" + q)),
    ("not json", lambda q: request(b'{"callId": ', "/v1/call-status" + q)),
    ("too large", lambda q: request(webhook(6, padding="x" * 3000), "/v1/call-status" + q)),
    ("not an account id", lambda q: request(webhook(7), "/v1/call-status/AC12" + q)),
    ("unknown account", lambda q: request(webhook(8), f"/v1/call-status/{OTHER}" + q)),
    ("mismatch", lambda q: request(webhook(9, accountId=OTHER), f"/v1/call-status/{ACCOUNT}" + q)),
]


@pytest.mark.parametrize(("case", "make"), CASES, ids=[c for c, _ in CASES])
async def test_the_lane_answers_as_the_asgi_path_does(
    case: str, make: Callable[[str], bytes]
) -> None:
    publisher = Instant()
    async with serving(publisher) as server:
        with capture_logs() as lane_logs:
            lane = await exchange(server.port, make(""))
        assert server.lane_requests == 1, "the bare path did not take the lane"
        # The same bytes again, the ASGI way: a stored event is now a replay, answered
        # as the first time was (one replay cache for both ways).
        with capture_logs() as asgi_logs:
            asgi = await exchange(server.port, make("?via=asgi"))
        assert server.lane_requests == 1, "a query string took the lane"
    for answer in (lane, asgi):
        answer[1].pop("date")
    assert lane == asgi
    lane_line, asgi_line = _lines(lane_logs), _lines(asgi_logs)
    if lane[0] == 202:
        assert lane_line[0].pop("outcome") == "accepted"
        assert asgi_line[0].pop("outcome") == "replayed"
        assert len(publisher.records) == 1
    else:
        assert publisher.records == []
    assert lane_line == asgi_line


async def test_what_the_lane_leaves_to_uvicorn_is_answered_there() -> None:
    async with serving(Instant()) as server:
        http10 = await exchange(server.port, request(webhook(1), version="1.0"))
        expect = await exchange(server.port, request(webhook(2), extra="expect: 100-continue\r\n"))
        assert server.lane_requests == 0
    assert http10[0] == 202
    assert expect[0] == 202


async def test_a_body_still_coming_when_the_read_ends_goes_the_asgi_way() -> None:
    whole = request(webhook(1))
    cut = whole.index(b"\r\n\r\n") + 4 + 10  # the head and ten bytes of the body
    async with serving(Instant()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(whole[:cut])
        await writer.drain()
        # Once the read that ended the head is taken, the request has uvicorn's cycle,
        # which waits for the rest of its body.
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 10
        while not any(
            getattr(c, "cycle", None) is not None for c in server.srv.server_state.connections
        ):
            assert loop.time() < give_up, "the head was never taken"
            await asyncio.sleep(0.01)  # polling interval
        writer.write(whole[cut:])
        status, _, body = await read_response(reader)
        writer.close()
        assert server.lane_requests == 0
    assert status == 202, body


async def test_pipelined_requests_are_answered_in_order() -> None:
    publisher = Instant()
    async with serving(publisher) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        # Three in one write: the first takes the lane; the others arrive while it is in
        # flight and are queued behind it by uvicorn.
        writer.write(request(webhook(1)) + request(webhook(2)) + request(webhook(3)))
        answers = [await read_response(reader) for _ in range(3)]
        writer.close()
        assert server.lane_requests == 1
    ids = [json.loads(body)["callId"] for _, _, body in answers]
    assert ids == ["CA" + f"{n:040x}" for n in (1, 2, 3)]
    assert all(status == 202 for status, _, _ in answers)


async def test_keep_alive_and_connection_close() -> None:
    async with serving(Instant()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(webhook(1)))
        first = await read_response(reader)
        writer.write(request(webhook(2), extra="connection: close\r\n"))
        second = await read_response(reader)
        assert await asyncio.wait_for(reader.read(), 10) == b"", "the connection stayed open"
        writer.close()
        assert server.lane_requests == 2
    assert "connection" not in first[1]
    assert second[1]["connection"] == "close"
    assert (first[0], second[0]) == (202, 202)


@pytest.mark.parametrize(
    ("publisher", "status", "detail"),
    [
        (CoroutineOnly(), 202, None),
        (CoroutineOnly(Unavailable("timeout")), 503, "did not acknowledge"),
        (CoroutineOnly(Unavailable("spool_full")), 503, "(full)"),
        (CoroutineOnly(RuntimeError("a bug")), 500, "could not be handled"),
    ],
    ids=["stored", "timeout", "spool full", "bug"],
)
async def test_a_publisher_without_callbacks_is_awaited_in_a_task(
    publisher: CoroutineOnly, status: int, detail: str | None
) -> None:
    async with serving(publisher) as server:
        answer = await exchange(server.port, request(webhook(1)))
        assert server.lane_requests == 1
    assert answer[0] == status
    if detail is None:
        assert publisher.records == [("CA" + f"{1:040x}").encode()]
    else:
        assert detail in json.loads(answer[2])["detail"]
    if status == 503:
        assert answer[1]["retry-after"] == "5"


async def test_a_failed_callback_publish_is_answered_503() -> None:
    publisher = Instant()
    publisher.fail = Unavailable("spool_error")
    async with serving(publisher) as server:
        status, headers, body = await exchange(server.port, request(webhook(1)))
    assert status == 503
    assert "disk error" in json.loads(body)["detail"]
    assert headers["retry-after"] == "5"


async def test_a_bug_in_answering_an_acked_event_is_a_500_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer is built in the ack's callback: a bug there (here the replay cache's
    step) must still answer the request, as the ASGI path's error handling would."""

    def broken(self: Ingest, event: object) -> bytes:
        raise RuntimeError("a bug after the ack")

    monkeypatch.setattr(Ingest, "_stored", broken)
    async with serving(Instant()) as server:
        with capture_logs() as logs:
            status, _, body = await exchange(server.port, request(webhook(1)))
        assert server.lane_requests == 1
    assert status == 500
    assert json.loads(body)["type"] == "urn:callstatus:problem:internal"
    assert "RuntimeError" not in body.decode()
    assert any(entry["event"] == "unhandled error" for entry in logs)


async def _in_flight(server: Server, publisher: Instant) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request(webhook(1)))
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    while not publisher.held:
        assert loop.time() < give_up, "the request never reached the publisher"
        await asyncio.sleep(0.01)  # polling interval
    return reader, writer


async def test_a_shutdown_waits_for_a_lane_request_within_its_grace() -> None:
    publisher = Instant()
    publisher.hold = True
    async with serving(publisher, grace=10) as server:
        reader, writer = await _in_flight(server, publisher)
        server.srv.should_exit = True
        # The server is now waiting for the request; the ack comes within the grace.
        asyncio.get_running_loop().call_later(0.3, publisher.held[0], None)
        status, headers, _ = await read_response(reader)
        writer.close()
    assert status == 202
    assert headers["connection"] == "close"  # and then closed: the server is stopping


async def test_past_the_grace_a_lane_request_is_answered_503_cancelled() -> None:
    publisher = Instant()
    publisher.hold = True
    cancelled = metrics.INGEST_OUTCOMES.labels("cancelled")
    before = cancelled.value
    async with serving(publisher, grace=0) as server:
        reader, writer = await _in_flight(server, publisher)
        with capture_logs() as logs:
            server.srv.should_exit = True
            status, headers, body = await read_response(reader)
        writer.close()
        publisher.held[0](None)  # a late ack changes nothing: answered once
    assert status == 503
    assert headers["retry-after"] == "1"
    assert json.loads(body)["type"].endswith("shutting-down")
    assert cancelled.value == before + 1
    [line] = _lines(logs)
    assert (line["status"], line["outcome"]) == (503, "cancelled")


async def test_a_client_that_reads_no_answers_cannot_fill_the_servers_memory() -> None:
    # Pipelined requests answered at once (401: unsigned), and the client never reads:
    # the lane must stop taking them once the socket's write buffer is full, so that
    # uvicorn's pipeline holds the rest with reading paused (review finding: the lane
    # went on answering into the buffer, megabytes of it).
    unsigned = (
        b"POST /v1/call-status HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 2\r\n\r\n{}"
    )
    async with serving(Instant()) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(unsigned * 60_000)
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 20
            connections: set[Any] = server.srv.server_state.connections
            while not any(c.flow.read_paused for c in connections):
                assert loop.time() < give_up, "the server never stopped reading"
                await asyncio.sleep(0.01)  # polling interval
            [protocol] = connections
            assert protocol.transport.get_write_buffer_size() < 1 << 20
            assert server.lane_requests > 0
        finally:
            writer.close()
