"""The HTTP app: the route table, the ingest fast path beside it, and the operational
endpoints (``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``).

The parts it puts together have modules of their own: the ingest handler
(``service.ingest``), the body reading under its cap and deadline (``service.body``) and
the access log (``service.accesslog``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from schemas.messages import INGEST_PATH
from service.accesslog import ROUTE, AccessLog
from service.accounts import AccountSource, open_source
from service.binding import ACCOUNT_PATH, ACCOUNT_PATH_PREFIX
from service.ingest import Ingest, Publisher, internal_error
from service.lane import IngestLane
from service.openapi import openapi_document
from service.problems import problem
from service.settings import Settings

# How old the publisher's readiness verdict /readyz answers with may be.
READINESS_MAX_AGE_SECONDS = 1.0


class Readiness(Protocol):
    def ready(self) -> bool: ...


class CachedVerdict:
    """A readiness check asked at most once per ``max_age`` seconds, with one ask in
    flight at a time that concurrent callers share. /readyz is unauthenticated and the
    publisher's check is a Kafka metadata round trip: uncached, every GET would be one."""

    def __init__(self, check: Callable[[], Awaitable[bool]], max_age: float) -> None:
        self._check = check
        self._max_age = max_age
        self._asked = -math.inf
        self._task: asyncio.Future[bool] | None = None

    async def get(self) -> bool:
        loop = asyncio.get_running_loop()
        task = self._task
        stale = task is None or (task.done() and loop.time() - self._asked >= self._max_age)
        if stale or task is None or task.get_loop() is not loop:
            self._asked = loop.time()
            task = self._task = asyncio.ensure_future(self._check())
        # Shielded: a caller that hangs up must not cancel the ask the others share.
        return await asyncio.shield(task)


class App(Starlette):
    """Starlette's route table, with a fast path in front for the route every event takes.

    Each request is dispatched once, on its scope (:meth:`__call__`):

    - ``POST /v1/call-status`` and ``POST /v1/call-status/{accountId}`` (any path under
      ``/v1/call-status/``: the handler judges the segment) go straight to the ingest
      handler, under its own :class:`AccessLog`, and meet no Starlette code at all:
      Starlette's middleware, router and ``Request`` objects cost about 15 % of a
      request's CPU (bench/README.md, Findings) and give that handler nothing it needs;
    - everything else goes to Starlette: the other routes, the lifespan events, and the
      other methods on the ingest paths, which the table's ingest entries answer with a
      405 and ``Allow: POST``.

    Both access logs label the account path by its template, so a made-up account id
    never mints a metric series.

    On the Starlette side the access log sits outside the whole middleware stack, error
    middleware included: Starlette always puts ``ServerErrorMiddleware`` first, and the
    log must see the 500 that middleware sends. Both access logs know the same routes and
    write the same lines and metrics.
    """

    def __init__(self, routes: list[Route], ingest: Ingest | None, **kwargs: Any) -> None:
        super().__init__(routes=routes, **kwargs)
        self._logged_routes = frozenset(r.path for r in routes)
        self._ingest: AccessLog | None = None
        # The same handler and access log without an ASGI cycle, for the HTTP server's
        # protocol to call (service/lane.py): most ingest requests come that way.
        self.lane: IngestLane | None = None
        if ingest is not None:
            self._ingest = AccessLog(ingest, self._logged_routes)
            self.lane = IngestLane(ingest, self._ingest)

    def build_middleware_stack(self) -> ASGIApp:
        return AccessLog(super().build_middleware_stack(), self._logged_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ingest = self._ingest
        if ingest is not None and scope["type"] == "http":
            path: str = scope["path"]
            if path == INGEST_PATH:
                if scope["method"] == "POST":
                    await ingest(scope, receive, send)
                    return
            elif path.startswith(ACCOUNT_PATH_PREFIX):
                scope[ROUTE] = ACCOUNT_PATH
                if scope["method"] == "POST":
                    await ingest(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


# The endpoints and error handlers that need nothing from the node.


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def openapi(_: Request) -> Response:
    return JSONResponse(openapi_document())


async def http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, "http", exc.detail, exc.detail, headers=exc.headers)


async def server_error(_: Request, exc: Exception) -> Response:
    return internal_error(exc)


def create_app(
    settings: Settings,
    publisher: Publisher | None,
    processor: Readiness | None = None,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    draining: Callable[[], bool] = lambda: False,
    accounts: AccountSource | None = None,
) -> App:
    """Build the ASGI app; ``publisher`` is None for a processor-only node, and
    ``draining`` tells readiness when a shutdown has begun. ``accounts`` judges the
    signatures (the server passes the one it watches; by default the settings' own,
    unwatched)."""

    kafka_ready = (
        None if publisher is None else CachedVerdict(publisher.ready, READINESS_MAX_AGE_SECONDS)
    )

    async def readyz(_: Request) -> Response:
        checks: dict[str, bool] = {"draining": not draining()}
        if kafka_ready is not None:
            checks["kafka"] = await kafka_ready.get()
        if processor is not None:
            checks["processor"] = processor.ready()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    routes = []
    ingest = None
    if publisher is not None:
        ingest = Ingest(settings, publisher, accounts or open_source(settings))
        # App sends every POST here to the handler before Starlette sees it: the entries
        # answer the other methods (405, Allow: POST) and name the routes in the metrics.
        routes.append(Route(INGEST_PATH, ingest, methods=["POST"]))
        routes.append(Route(ACCOUNT_PATH, ingest, methods=["POST"]))
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    return App(
        routes,
        ingest,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
