"""The access log: one structured log line and the HTTP metrics for every request.

An ASGI middleware around whatever serves the request. Handlers add what they learned
(callId, eventId, outcome, ...) to a dict the access log puts in the scope under
:data:`LOG_FIELDS`, and it writes them into the request's line.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import structlog
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics, problems
from service.hotmetrics import Count

# One logger name for the whole HTTP shell (app, handler, access log): log queries
# select on it.
LOGGER_NAME = "callstatus.http"
log = structlog.get_logger(logger_name=LOGGER_NAME)

# Where the access log finds what a handler learned about the request (callId, ...).
LOG_FIELDS = "callstatus.log"
# Where an app names the route template of a path with a parameter in it (the account
# path): the metrics label it by the template, never by the path a request made up.
ROUTE = "callstatus.route"


class AccessLog:
    """One structured log line and the HTTP metrics for every request.

    Routes outside the known set are counted as "other" so a scanner probing random
    paths cannot blow up the metrics' label cardinality. It wraps everything that can
    answer, error middleware included (``service.app.App``), so it logs the status that
    was actually sent. The one answer it gives itself is the shutdown's 503 for a request
    cancelled before it had started one: only the outermost layer can still send it, and
    the line must say what the client got.
    """

    def __init__(self, app: ASGIApp, routes: frozenset[str]) -> None:
        self.app = app
        self.routes = routes
        # Bound once: a lazy structlog proxy would re-bind on every request.
        self.log = log.bind()
        # Label children are looked up once per (route, code), not per request.
        self.counters: dict[tuple[str, int], Count] = {}
        self.latencies = {r: metrics.HTTP_LATENCY.labels(r) for r in (*routes, "other")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        fields: dict[str, Any] = {}
        scope[LOG_FIELDS] = fields
        status = 500
        started = False

        async def send_with_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except asyncio.CancelledError:
            # The server cancels requests still running when the shutdown grace ends.
            # Left alone, uvicorn would answer 500 and we would count one: say 503 (the
            # event may or may not be stored; FreeClimb retries) and count it as such.
            fields.setdefault("outcome", problems.CANCELLED.outcome)
            status = problems.CANCELLED.status
            if not started:
                await _answer_cancelled(scope, receive, send)
            raise
        finally:
            self.finish(scope, status, start, fields)

    def finish(self, scope: Scope, status: int, start: float, fields: dict[str, Any]) -> None:
        """The request's metrics and line, once it was answered with ``status``; its
        handling began at ``start`` (``time.perf_counter()``). Also the ingest lane's
        (``service.lane``), which answers without an ASGI cycle."""
        elapsed = time.perf_counter() - start
        path: str = scope["path"]
        route = path if path in self.routes else scope.get(ROUTE, "other")
        counter = self.counters.get((route, status))
        if counter is None:
            counter = metrics.HTTP_REQUESTS.labels(route, str(status))
            self.counters[route, status] = counter
        counter.inc()
        self.latencies[route].observe(elapsed)
        # A random id of a uuid4's 128 bits, without a UUID object or a getrandom(2)
        # per request: it tells requests apart, it guards nothing.
        request_id = _header(scope, b"x-request-id") or f"{random.getrandbits(128):032x}"
        line = {
            "method": scope["method"],
            "path": path,
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
            "request_id": request_id,
            **fields,
        }
        fast_lines = logs.fast_lines()
        if fast_lines is not None:
            # The same line as the call below, a few microseconds cheaper (logs.py).
            fast_lines.info(LOGGER_NAME, "request", line)
        else:
            self.log.info("request", **line)


def cancelled_response() -> Response:
    """The answer to a request the shutdown gave up on before it was answered."""
    return problems.CANCELLED.response(
        "the server is shutting down; retry", headers={"Retry-After": "1"}
    )


async def _answer_cancelled(scope: Scope, receive: Receive, send: Send) -> None:
    with contextlib.suppress(OSError):  # the connection may already be gone
        await cancelled_response()(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))[:128]
    return None
