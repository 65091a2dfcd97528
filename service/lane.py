"""The ingest lane: a ``POST /v1/call-status[/{accountId}]`` whose head and whole body
came in one read, handled and answered without uvicorn's ASGI cycle.

Why: per request, the ASGI way costs a task, a cycle with its event, a chain of
coroutines (the cycle, the app, the access log, the handler, two publishers) that every
wake-up resumes, and two send() messages; and the broker's ack wakes each request's task
on its own. The lane runs the handler's steps straight from the parser's callback up to
the producer's buffer, and answers from the ack's callback with one write: about a
fifth of a request's CPU (bench/README.md, "The fourth round").

What takes the lane (``GuardedProtocol`` decides, service/frontdoor.py): HTTP/1.1
``POST`` on the ingest path, or under the account path, with no query string and no
percent-escapes; no ``Expect: 100-continue``, no upgrade; nothing else in flight on the
connection; and the end of the body in the same read as the end of its head. Everything
else goes the ASGI way, as before: a request whose body is still coming when the read
ends is handed to uvicorn then, as if the lane had never looked, so the body's size cap
and read deadline (``service.body``) keep guarding slow bodies.

What stays the same, so a client cannot tell the two ways apart:

- the handler's steps and answers: ``Ingest.take`` shares them with the ASGI path;
- the access line and the HTTP metrics: ``AccessLog.finish``;
- the bytes on the wire: uvicorn's status line, default headers (``date``), the
  response's headers, and ``connection: close`` when the connection closes after it;
- pipelining: a request that arrives while a lane request is in flight is queued by
  uvicorn (this object is the protocol's current cycle) and started once the answer is
  written;
- the shutdown: uvicorn's ``shutdown()`` lets the answer go out, then closes; the server
  waits for lane requests as for its tasks (each has a future in uvicorn's task set);
  when the grace runs out it cancels that future, and the lane answers ``503`` as the
  access log does for a cancelled task (``cancelled_response``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from schemas.messages import INGEST_PATH
from service.accesslog import LOG_FIELDS, ROUTE, AccessLog, cancelled_response
from service.binding import ACCOUNT_PATH, ACCOUNT_PATH_PREFIX
from service.ingest import Ingest

_INGEST_PATH = INGEST_PATH.encode()
_ACCOUNT_PATH_PREFIX = ACCOUNT_PATH_PREFIX.encode()


class _NoEvent:
    """uvicorn's protocol sets its cycle's ``message_event`` when the connection is lost,
    to wake a ``receive()`` waiting for the body: a lane request has none waiting."""

    def set(self) -> None:
        pass


class LaneCycle:
    """One lane request: what uvicorn's protocol reads and sets of its current cycle
    (``response_complete``, ``keep_alive``, ``disconnected``, ``message_event``), and the
    answer the handler gives once (``service.ingest.Reply``)."""

    message_event = _NoEvent()
    __slots__ = (
        "_pending",
        "_task",
        "disconnected",
        "fields",
        "keep_alive",
        "lane",
        "protocol",
        "response_complete",
        "scope",
        "started",
    )

    def __init__(
        self, protocol: HttpToolsProtocol, lane: IngestLane, scope: Scope, keep_alive: bool
    ) -> None:
        self.protocol = protocol
        self.lane = lane
        self.scope = scope
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.started = time.perf_counter()
        self.fields: dict[str, Any] = {}
        scope[LOG_FIELDS] = self.fields
        # The publish of an event that could not go straight to the producer's buffer.
        self._task: asyncio.Future[None] | None = None
        # In uvicorn's set of running tasks, so the shutdown waits for this request as
        # for a task, and cancels it when the grace runs out (_ended answers then).
        self._pending: asyncio.Future[None] = protocol.loop.create_future()
        protocol.tasks.add(self._pending)  # type: ignore[arg-type]
        self._pending.add_done_callback(self._ended)

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write the response, as uvicorn's cycle would, in one write; then log it and
        let the connection go on. Only the first answer counts."""
        if self.response_complete:
            return
        self.response_complete = True
        protocol = self.protocol
        transport = protocol.transport
        if not self.disconnected and not transport.is_closing():
            content = [STATUS_LINE[status]]
            for name, value in protocol.server_state.default_headers:
                content += (name, b": ", value, b"\r\n")
            for name, value in headers:
                content += (name, b": ", value, b"\r\n")
            if not self.keep_alive:
                content.append(b"connection: close\r\n")
            content += (b"\r\n", body)
            transport.write(b"".join(content))
            if not self.keep_alive:
                transport.close()
        pending = self._pending
        if not pending.done():
            # Taken out of the task set here rather than by its done callback, which
            # would cost a loop callback per request.
            pending.remove_done_callback(self._ended)
            pending.set_result(None)
            protocol.tasks.discard(pending)
        self.lane.access.finish(self.scope, status, self.started, self.fields)
        protocol.on_response_complete()

    def track(self, task: asyncio.Future[None]) -> None:
        """The task that publishes this request's event the coroutine way: cancelled
        with the request."""
        self._task = task

    def _ended(self, pending: asyncio.Future[None]) -> None:
        self.protocol.tasks.discard(pending)
        if pending.cancelled() and not self.response_complete:
            # The shutdown's grace ran out before the answer: what the access log does
            # for a cancelled task (the event may or may not be stored).
            if self._task is not None:
                self._task.cancel()
            self.lane.ingest.cancelled(self.scope, self.fields)
            response = cancelled_response()
            self.answer(response.status_code, response.raw_headers, bytes(response.body))


class IngestLane:
    """The ingest handler and its access log, as the lane calls them."""

    def __init__(self, ingest: Ingest, access: AccessLog) -> None:
        self.ingest = ingest
        self.access = access

    @staticmethod
    def takes(url: bytes) -> bool:
        """Whether a POST to ``url`` (the request target as sent) is the lane's: its
        path is then the URL itself, with nothing to parse or unescape."""
        return (url == _INGEST_PATH or url.startswith(_ACCOUNT_PATH_PREFIX)) and not (
            b"?" in url or b"%" in url or b"#" in url or not url.isascii()
        )

    def begin(self, protocol: HttpToolsProtocol, keep_alive: bool) -> LaneCycle:
        """The cycle of the request whose head is in ``protocol`` (its ``scope`` and
        ``url``), the scope completed as uvicorn would. The protocol makes it its
        current cycle before :meth:`handle`, which may answer at once."""
        scope = cast(Scope, protocol.scope)
        url: bytes = protocol.url
        path = url.decode("ascii")
        scope["method"] = "POST"
        scope["path"] = path
        scope["raw_path"] = url
        scope["query_string"] = b""
        if path != INGEST_PATH:
            scope[ROUTE] = ACCOUNT_PATH
        return LaneCycle(protocol, self, scope, keep_alive)

    def handle(self, cycle: LaneCycle, body: bytes) -> None:
        self.ingest.take(cycle.scope, body, cycle)
