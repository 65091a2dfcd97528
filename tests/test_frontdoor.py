"""The front door (service/frontdoor.py): the waiting list's rules as plain logic, then the
guarded protocol in a real uvicorn server on loopback, with a trivial app (no broker)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from structlog.testing import capture_logs

from service import metrics
from service.frontdoor import FrontDoor, GuardedProtocol
from tests.loopback import on_loopback


class Conn:
    """Stands in for a protocol in the waiting-list rules: only ``drop`` is called."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True
        self.door.arrived(cast(GuardedProtocol, self))


def _conn(door: FrontDoor) -> GuardedProtocol:
    return cast(GuardedProtocol, Conn(door))


def _closed(reason: str) -> float:
    value = metrics.HTTP_CONNECTIONS_CLOSED.labels(reason)._value.get()
    return float(value)


def test_past_the_cap_the_longest_waiting_connection_is_shed() -> None:
    door = FrontDoor(5.0, 16384, 100, max_connections=2)
    first, second, third = _conn(door), _conn(door), _conn(door)
    assert door.connected(first, 1, now=0.0)
    assert door.connected(second, 2, now=1.0)
    shed = _closed("shed")
    assert door.connected(third, 3, now=2.0)
    assert cast(Conn, first).dropped and not cast(Conn, second).dropped
    assert _closed("shed") == shed + 1
    assert door.waiting == 2


def test_a_connection_that_rejoined_the_wait_is_not_the_oldest_any_more() -> None:
    door = FrontDoor(5.0, 16384, 100, max_connections=2)
    first, second, third = _conn(door), _conn(door), _conn(door)
    door.connected(first, 1, now=0.0)
    door.connected(second, 2, now=1.0)
    door.arrived(first)  # a head arrived, the request was answered ...
    door.wait(first, now=3.0)  # ... and it idles again (keep-alive)
    door.connected(third, 3, now=4.0)
    assert cast(Conn, second).dropped and not cast(Conn, first).dropped


def test_when_every_connection_is_busy_the_new_one_is_refused() -> None:
    door = FrontDoor(5.0, 16384, 100, max_connections=1)
    busy, new = _conn(door), _conn(door)
    door.connected(busy, 1, now=0.0)
    door.arrived(busy)  # its request is in flight: never shed
    refused = _closed("over_capacity")
    assert not door.connected(new, 2, now=1.0)
    assert not cast(Conn, busy).dropped
    assert _closed("over_capacity") == refused + 1


def test_heads_overdue_are_closed_and_only_those() -> None:
    door = FrontDoor(5.0, 16384, 100, max_connections=10)
    old, young, busy = _conn(door), _conn(door), _conn(door)
    door.connected(old, 1, now=0.0)
    door.connected(busy, 2, now=0.5)
    door.arrived(busy)
    door.connected(young, 3, now=3.0)
    assert door.expire(now=4.9) == 0
    assert door.expire(now=5.0) == 1
    assert cast(Conn, old).dropped and not cast(Conn, young).dropped
    assert not cast(Conn, busy).dropped


# -- the protocol in a real server -------------------------------------------------------


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":  # answered before its body is read, as a 401 is
        await send(
            {"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]}
        )
        await send({"type": "http.response.body", "body": b""})
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = json.dumps({"headers": len(scope["headers"])}).encode()
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": 200, "headers": [length]})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def running(door: FrontDoor) -> AsyncIterator[tuple[int, set[object]]]:
    """A real uvicorn server on loopback with the guarded protocol; yields its port and
    its set of open connections."""
    config = uvicorn.Config(
        _app, host="127.0.0.1", port=0, log_config=None, lifespan="off", **door.uvicorn_options()
    )
    srv = uvicorn.Server(config)
    # uvicorn's own 10 Hz tick runs the deadlines in production (server.DrainingServer).
    original = srv.on_tick

    async def on_tick(counter: int) -> bool:
        door.tick(asyncio.get_running_loop().time())
        return await original(counter)

    srv.on_tick = on_tick  # type: ignore[method-assign]
    async with on_loopback(srv) as port:
        yield port, srv.server_state.connections  # type: ignore[misc]


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, FrontDoor]]:
    door = FrontDoor(1.0, 4096, 50, max_connections=20)
    async with running(door) as (port, _):
        yield port, door


async def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, return everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def _status_and_body(answer: bytes) -> tuple[int, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body) if body else None


async def test_a_head_over_the_byte_cap_gets_431_problem_json(
    server: tuple[int, FrontDoor],
) -> None:
    port, _ = server
    before = _closed("head_too_large")
    answer = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n")
    status, body = _status_and_body(answer)
    assert status == 431
    assert b"content-type: application/problem+json" in answer
    assert body["type"] == "urn:callstatus:problem:head-too-large"
    assert "4096 bytes" in body["detail"]
    assert _closed("head_too_large") == before + 1


async def test_a_head_with_too_many_fields_gets_431(server: tuple[int, FrontDoor]) -> None:
    port, _ = server
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(60))  # ~600 bytes: under the byte cap
    answer = await _exchange(port, b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    status, body = _status_and_body(answer)
    assert status == 431
    assert "more than 50 fields" in body["detail"]


async def test_a_head_just_under_the_caps_is_served(server: tuple[int, FrontDoor]) -> None:
    port, _ = server
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(49))
    head = b"GET / HTTP/1.1\r\nConnection: close\r\n" + fields + b"\r\n"
    status, body = _status_and_body(await _exchange(port, head))
    assert (status, body) == (200, {"headers": 50})


async def test_a_head_split_across_many_writes_is_capped_in_total(
    server: tuple[int, FrontDoor],
) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nX-Big: ")
        for _ in range(6):  # 6 x 1000 bytes > 4096, each write alone well under it
            writer.write(b"a" * 1000)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert _status_and_body(answer)[0] == 431


async def test_a_trickling_head_is_closed_at_the_deadline(server: tuple[int, FrontDoor]) -> None:
    port, _ = server
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()
    closed_at = None
    try:
        for byte in b"GET / HTTP/1.1\r\nHost: example.org\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    closed_at = loop.time()
                    break
    finally:
        writer.close()
    assert closed_at is not None, "a head trickling one byte per 0.1 s was never closed"
    # The deadline is 1 s from the connect, checked every 0.1 s: bytes did not extend it.
    assert 0.9 <= closed_at - started < 3.0


async def test_keep_alive_idle_past_the_deadline_is_closed_even_after_a_byte(
    server: tuple[int, FrontDoor],
) -> None:
    port, _ = server
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readexactly(len(b'{"headers": 1}')), 5)
        answered = loop.time()
        # One byte of a next head: it must not keep the socket (the door's deadline, not
        # uvicorn's keep-alive timer, which the guarded protocol does not arm).
        writer.write(b"G")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - answered < 3.0
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order_then_the_idle_socket_closed(
    server: tuple[int, FrontDoor],
) -> None:
    """Three requests in one write: uvicorn queues the later ones until the earlier is
    answered, and the guarded protocol's own end of a response starts them (it replaces
    uvicorn's to leave out the keep-alive timer); then the idle socket is closed by the
    door's deadline alone."""
    port, _ = server
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        heads = (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * n + b"\r\n" for n in range(3))
        writer.write(b"".join(heads))
        await writer.drain()
        for n in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            body = json.dumps({"headers": 1 + n}).encode()  # Host, then n X-N fields
            assert await asyncio.wait_for(reader.readexactly(len(body)), 5) == body
        answered = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - answered < 3.0
    finally:
        writer.close()


@pytest.mark.parametrize("trickle", [False, True])
async def test_a_socket_answered_before_its_body_is_closed_at_the_deadline(
    server: tuple[int, FrontDoor], trickle: bool
) -> None:
    """A 401 before the body: the socket owes nothing more, so a client that goes quiet
    mid-body, or trickles the body it declared, must not keep it."""
    port, _ = server
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\nx")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 401")
        answered = loop.time()

        async def trickling() -> None:
            while trickle:
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)  # the trickle's pace, not a synchronisation

        feeding = asyncio.create_task(trickling())
        try:
            # A close with the trickled bytes unread reaches the client as a reset, not an
            # EOF: either way the server let go of the socket.
            assert await _closed_by_server(reader)
        finally:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await feeding
        # The deadline is 1 s, checked every 0.1 s.
        assert loop.time() - answered < 3.0
    finally:
        writer.close()


def test_closes_are_logged_as_one_summary_line_a_second_at_most() -> None:
    door = FrontDoor(5.0, 16384, 100, max_connections=10)
    with capture_logs() as logs:
        door.closed("head_too_large")
        door.closed("head_timeout")
        door.closed("head_timeout")
        door.report(now=10.0)
        door.closed("shed")
        door.report(now=10.5)  # within the second: held back, still counted
        door.report(now=11.0)
    lines = [line for line in logs if line["event"] == "connections closed at the front door"]
    assert len(lines) == 2
    assert (lines[0]["head_too_large"], lines[0]["head_timeout"]) == (1, 2)
    assert lines[0]["log_level"] == "warning"
    assert lines[1]["shed"] == 1 and "head_timeout" not in lines[1]


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        return True


async def test_past_the_cap_a_new_connection_sheds_the_idle_one_over_real_sockets() -> None:
    door = FrontDoor(30.0, 4096, 50, max_connections=2)
    async with running(door) as (port, connections):
        loop = asyncio.get_running_loop()

        async def until_waiting(n: int) -> None:
            """``n`` of the open connections wait for a head (the rest are in flight)."""
            give_up = loop.time() + 5
            while door.waiting != n or len(connections) != n + 1:
                assert loop.time() < give_up
                await asyncio.sleep(0.01)  # polling interval

        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        # A complete head whose body has not come: a request in flight, never shed.
        busy_w.write(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
        await until_waiting(0)  # open, and its head taken
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(b"GET / HTT")  # half a head: waiting, sheddable
        await until_waiting(1)
        shed = _closed("shed")
        answer = await _exchange(port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert _status_and_body(answer) == (200, {"headers": 1})
        assert await _closed_by_server(idle_r)
        assert _closed("shed") == shed + 1
        # The busy one was not touched: its body completes the request.
        busy_w.write(b"abc")
        head = await asyncio.wait_for(busy_r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        for w in (idle_w, busy_w):
            w.close()


async def test_when_every_socket_has_a_request_in_flight_a_new_one_is_closed() -> None:
    door = FrontDoor(30.0, 4096, 50, max_connections=1)
    async with running(door) as (port, connections):
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        busy_w.write(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
        await busy_w.drain()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 5
        while door.waiting or not connections:  # open, and its head taken: in flight
            assert loop.time() < give_up
            await asyncio.sleep(0.01)  # polling interval
        refused = _closed("over_capacity")
        new_r, new_w = await asyncio.open_connection("127.0.0.1", port)
        assert await _closed_by_server(new_r)
        assert _closed("over_capacity") == refused + 1
        busy_w.write(b"abc")
        head = await asyncio.wait_for(busy_r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        for w in (busy_w, new_w):
            w.close()
