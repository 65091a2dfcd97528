"""The front door: what a connection may hold before it has sent a complete request head.

FreeClimb sends each callback once, so a client that can keep FreeClimb out loses
callbacks for good. uvicorn (with httptools) has no deadline for a request head, no cap
on its size, and its ``limit_concurrency`` counts idle sockets like busy ones: 1,100
sockets that send half a head and wait turn every real webhook into a 503. This module
closes those three holes with a small subclass of uvicorn's httptools protocol plus one
object, :class:`FrontDoor`, shared by every connection of a server
(docs/architecture.md, section 9):

- **Head deadline**: a connection gets ``header_timeout`` seconds to deliver a complete
  head, counted from when it connected or from when its last response was sent
  (keep-alive idle). Bytes arriving do not restart the clock, so one byte a second does
  not keep a socket. The deadline is not running while a request is being handled.
- **Head size**: at most ``max_header_bytes`` of head are fed to the parser and at most
  ``max_header_fields`` fields taken; past either, 431 and the connection is closed. The
  parser never holds more than the cap, whatever the client streams.
- **Connection cap that sheds the idle first**: past ``max_connections`` open sockets, a
  new connection makes room by closing the one that has waited longest for its head
  (mid-head or keep-alive idle). Only when every socket has a request in flight is the
  new connection itself closed. An attacker's sockets are by construction the oldest
  waiting ones; a real client's head follows its connect within milliseconds.

Closing a connection that has no request in flight loses nothing: nothing was accepted
on it. The per-request cost is two dict operations (leave and rejoin the waiting list);
the deadlines are checked by the server's 10 Hz tick, not by a timer per connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import httptools
import structlog
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service import metrics, problems

if TYPE_CHECKING:  # service.lane imports the handler; this module only calls it
    from service.lane import IngestLane

log = structlog.get_logger(logger_name="callstatus.frontdoor")

# How often the summary of closed connections is logged at most: under attack a line per
# socket would let the attacker write our logs.
REPORT_SECONDS = 1.0


class HeadTooLarge(Exception):
    """The request head passed a cap; the message says which."""


class FrontDoor:
    """The connection limits of one server and the connections waiting for a head.

    ``_waiting`` maps each such connection to when its wait began, oldest first (a dict
    keeps insertion order, and a connection leaves it before it rejoins), so both the
    deadline check and the choice of whom to shed look at its front only.
    """

    def __init__(
        self,
        header_timeout: float,
        max_header_bytes: int,
        max_header_fields: int,
        max_connections: int,
    ) -> None:
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.max_header_fields = max_header_fields
        self.max_connections = max_connections
        self._waiting: dict[GuardedProtocol, float] = {}
        self._closed: Counter[str] = Counter()
        self._reported = 0.0
        self._counters = {
            reason: metrics.HTTP_CONNECTIONS_CLOSED.labels(reason)
            for reason in ("head_timeout", "shed", "over_capacity", "head_too_large")
        }

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def connected(self, conn: GuardedProtocol, open_connections: int, now: float) -> bool:
        """Admit a new connection (already counted in ``open_connections``), shedding
        the longest-waiting one if the cap is passed. False: refuse ``conn`` itself,
        because every other connection has a request in flight."""
        if open_connections > self.max_connections:
            if not self._waiting:
                self.closed("over_capacity")
                return False
            oldest = next(iter(self._waiting))
            self.closed("shed")
            oldest.drop()
        self.wait(conn, now)
        return True

    def wait(self, conn: GuardedProtocol, now: float) -> None:
        """``conn`` now waits for a request head; its deadline runs from ``now``."""
        self._waiting.pop(conn, None)
        self._waiting[conn] = now

    def arrived(self, conn: GuardedProtocol) -> None:
        """``conn`` delivered a complete head, or is gone."""
        self._waiting.pop(conn, None)

    def expire(self, now: float) -> int:
        """Close every connection whose head is overdue at ``now``; how many."""
        limit = now - self.header_timeout
        overdue = []
        for conn, since in self._waiting.items():
            if since > limit:
                break  # the rest waited less long
            overdue.append(conn)
        for conn in overdue:
            self.closed("head_timeout")
            conn.drop()
        return len(overdue)

    def closed(self, reason: str) -> None:
        self._counters[reason].inc()
        self._closed[reason] += 1

    def report(self, now: float) -> None:
        """Log what was closed since the last report, at most once per REPORT_SECONDS."""
        if self._closed and now - self._reported >= REPORT_SECONDS:
            self._reported = now
            log.warning(
                "connections closed at the front door",
                header_timeout_s=self.header_timeout,
                max_header_bytes=self.max_header_bytes,
                max_connections=self.max_connections,
                waiting=len(self._waiting),
                **dict(self._closed),
            )
            self._closed.clear()

    def tick(self, now: float) -> None:
        """The server's periodic check (uvicorn's ``on_tick``, 10 times a second)."""
        self.expire(now)
        self.report(now)

    def uvicorn_options(self, lane: IngestLane | None = None) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config``: our protocol bound to this door (and
        to the ingest lane, ``service.lane``, when the node ingests), in place of
        uvicorn's ``limit_concurrency`` (which counts idle sockets as busy and would
        answer real webhooks 503 while they are open), and no WebSocket upgrade (no
        route takes one)."""
        return {
            "http": functools.partial(GuardedProtocol, door=self, lane=lane),
            "ws": "none",
            "limit_concurrency": None,
        }


def head_refusal(detail: str) -> bytes:
    """The whole 431 answer, as bytes: it is written straight to the socket, since no
    request exists yet for an ASGI app to answer."""
    refusal = problems.HEAD_TOO_LARGE
    body = json.dumps(
        {"type": refusal.type, "title": refusal.title, "status": refusal.status, "detail": detail},
        separators=(",", ":"),
    ).encode()
    return b"".join(
        (
            STATUS_LINE[refusal.status],
            b"content-type: ",
            problems.MEDIA_TYPE.encode(),
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        )
    )


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head deadline, the head caps and the
    shedding of :class:`FrontDoor`, and the way into the ingest lane (``service.lane``,
    whose docstring says which requests take it)."""

    def __init__(
        self, *args: Any, door: FrontDoor, lane: IngestLane | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.door = door
        self.lane = lane
        # True from the connect, and from the end of each request's body, until the next
        # head is complete: the bytes meanwhile are head bytes.
        self._in_head = True
        self._head_room = door.max_header_bytes
        # The body so far of a request the lane may take, from the end of its head to
        # the end of the read; None otherwise. Its cycle is made at the end of the body
        # (the lane's) or of the read (uvicorn's, when the body is still coming).
        self._lane_body: list[bytes] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.door.connected(self, len(self.connections), self.loop.time()):
            self.drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.arrived(self)
        super().connection_lost(exc)

    def drop(self) -> None:
        """Close a connection with no request in flight: nothing is lost with it."""
        self.door.arrived(self)
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, with the head cap: its version catches every parser error as a
        # 400, and a cap refusal comes out of the parser as one (a callback's error).
        self._unset_keepalive_if_required()
        try:
            self._feed(data)
        except HeadTooLarge as exc:
            self._lane_body = None
            self._refuse_head(str(exc))
        except httptools.HttpParserError as exc:
            self._lane_body = None
            if isinstance(exc.__context__, HeadTooLarge):  # raised in a parser callback
                self._refuse_head(str(exc.__context__))
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            self._lane_body = None
            self._unsupported_upgrade_warning()
        else:
            if self._lane_body is not None:
                self._to_uvicorn()

    def _feed(self, data: bytes) -> None:
        """Feed the parser, never more than the room left for the current head. When a
        chunk passes that room, only the part that fits is fed: the head must be complete
        within it, or it is too large. (Bytes of a pipelined next head that arrive in the
        same chunk as the end of a body are not counted: at most one read more.)"""
        while self._in_head and len(data) > self._head_room:
            room = self._head_room
            self._head_room = -1  # on_message_complete resets it: a new head began
            self.parser.feed_data(memoryview(data)[:room])
            if self.transport.is_closing():
                return
            if self._in_head and self._head_room == -1:
                raise HeadTooLarge(f"the request head exceeds {self.door.max_header_bytes} bytes")
            data = data[room:]
        if self._in_head:
            self._head_room -= len(data)
        self.parser.feed_data(data)

    def _refuse_head(self, detail: str) -> None:
        self.door.closed("head_too_large")
        self.door.arrived(self)
        if not self.transport.is_closing():
            self.transport.write(head_refusal(detail))
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.door.arrived(self)
        # Counted here, not per field in on_header (a Python call per header costs ~3 %
        # of a request): the byte cap already bounds the list.
        if len(self.headers) > self.door.max_header_fields:
            raise HeadTooLarge(
                f"the request head has more than {self.door.max_header_fields} fields"
            )
        if self.lane is not None and self._lane_may_take():
            self._lane_body = []  # decided at the end of the body, or of this read
            return
        super().on_headers_complete()

    def _lane_may_take(self) -> bool:
        cycle = self.cycle
        parser = self.parser
        return (
            (cycle is None or cycle.response_complete)  # else uvicorn's pipeline queues it
            # A client that does not read its answers: uvicorn's pipeline then holds the
            # rest with reading paused, where the lane would go on answering into the
            # write buffer (review finding: megabytes, with pipelined refusals).
            and not self.flow.write_paused
            and not self.expect_100_continue
            and parser.get_method() == b"POST"
            and parser.get_http_version() == "1.1"
            and not parser.should_upgrade()
            and self.lane is not None
            and self.lane.takes(self.url)
        )

    def _to_uvicorn(self) -> None:
        """A request the lane may have taken, whose body did not all come in the read
        its head ended in: uvicorn's, from its head on, with the body so far."""
        body = self._lane_body or []
        self._lane_body = None
        super().on_headers_complete()
        if body:  # as uvicorn's on_body would have taken it
            self.cycle.body = bytearray().join(body)
            if len(self.cycle.body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            self.cycle.message_event.set()

    def on_body(self, body: bytes) -> None:
        if self._lane_body is not None:
            self._lane_body.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_room = self.door.max_header_bytes
        body = self._lane_body
        if body is not None and self.lane is not None:
            self._lane_body = None
            cycle = self.lane.begin(self, keep_alive=self.parser.should_keep_alive())
            # Current before the handler runs: it may answer at once, and the answer's
            # on_response_complete reads it.
            self.cycle = cycle  # type: ignore[assignment]
            self.lane.handle(cycle, body[0] if len(body) == 1 else b"".join(body))
            return
        super().on_message_complete()
        if self.cycle.response_complete:
            # Answered before its body was all read (a 401, a 413): the wait for the
            # next head starts now, as on_response_complete could not know it would.
            self.door.wait(self, self.loop.time())

    def on_response_complete(self) -> None:
        # uvicorn's own, but for its keep-alive timer: a call_later and its cancel per
        # request (~1.5 µs) for a deadline the door keeps already, since the wait for the
        # next head is the keep-alive idle time (header_timeout_seconds, checked by the
        # tick; test_front_door holds both idle cases to it).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # a pipelined request waited for this answer: it starts now
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        # Keep-alive: the wait for the next head starts now, unless a pipelined request
        # is already being handled (it rejoins when that one is answered). Also when the
        # answer came before the body was all read (a 401, a 413): nothing is owed on the
        # socket any more, and a client that then goes quiet (or trickles the rest of a
        # body it declared) must not hold it past the deadline (review finding: with
        # neither this nor uvicorn's timer, such a socket stayed open for good).
        if self.cycle.response_complete:
            self.door.wait(self, self.loop.time())
