"""The HTTP shell: ``POST /v1/call-status`` and the operational endpoints.

The ingest handler runs per request, so it does each thing once: read the body under the
size cap, check the signature on the raw bytes, parse the JSON once, validate, write to
Kafka with the raw body spliced in, and answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

import pydantic_core
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.messages import encode_ingest, normalise_body
from service import metrics, signature
from service.openapi import openapi_document
from service.problems import problem
from service.producer import Unavailable
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.http")

INGEST_PATH = "/v1/call-status"
# Where the access log finds what a handler learned about the request (callId, ...).
LOG_FIELDS = "callstatus.log"


class Publisher(Protocol):
    async def publish(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None: ...
    async def ready(self) -> bool: ...


class Readiness(Protocol):
    def ready(self) -> bool: ...


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes: a declared
    Content-Length over the limit is refused before reading anything, and a streamed
    body without one is cut off at the first chunk that crosses the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in err["loc"])
        errors.append({"field": field or "(body)", "message": err["msg"]})
    return errors


class Ingest:
    """``POST /v1/call-status``."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self._publisher = publisher
        self._limit = settings.max_body_bytes
        self._secrets = settings.signing_secrets
        self._verify = settings.verify_signatures
        self._tolerance = settings.signature_tolerance_seconds
        self._retry_after = str(max(1, int(settings.produce_timeout_seconds)))
        self._outcomes: dict[str, Counter] = {}

    async def handle(self, request: Request) -> Response:
        fields: dict[str, Any] = request.scope[LOG_FIELDS]
        response = await self._handle(request, fields)
        outcome: str = fields["outcome"]
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = metrics.INGEST_OUTCOMES.labels(outcome)
        counter.inc()
        return response

    async def _handle(self, request: Request, fields: dict[str, Any]) -> Response:
        if not _is_json(request.headers.get("content-type", "")):
            fields["outcome"] = "unsupported_media_type"
            return problem(
                415,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as application/json",
            )
        try:
            raw = await read_body(request, self._limit)
        except BodyTooLarge:
            fields["outcome"] = "too_large"
            return problem(
                413,
                "body-too-large",
                "Body too large",
                f"the body exceeds {self._limit} bytes",
            )
        if self._verify:
            verdict = signature.verify(
                request.headers.get(signature.HEADER),
                raw,
                self._secrets,
                time.time(),
                self._tolerance,
            )
            if verdict is not signature.Verdict.VALID:
                # The verdict names the kind of failure, never the expected digest.
                fields["outcome"] = f"signature_{verdict.value}"
                return problem(
                    401,
                    "invalid-signature",
                    "Invalid signature",
                    f"FreeClimb-Signature check failed: {verdict.value}",
                    headers={"WWW-Authenticate": "FreeClimb-Signature"},
                )
        try:
            body = pydantic_core.from_json(raw)
        except ValueError:
            fields["outcome"] = "not_json"
            return problem(
                400, "not-json", "Body is not JSON", "the body could not be parsed as JSON"
            )
        if not isinstance(body, dict):
            fields["outcome"] = "not_object"
            return problem(
                400,
                "not-object",
                "Body is not a JSON object",
                "the body must be one JSON object",
            )
        try:
            source, request_type, call = normalise_body(body)
        except ValidationError as exc:
            fields["outcome"] = "invalid"
            errors = _field_errors(exc)
            fields["errors"] = errors
            return problem(
                422,
                "invalid-call-status",
                "Invalid call-status event",
                f"{len(errors)} field(s) are invalid",
                errors=errors,
            )

        event_id = str(uuid.uuid4())
        fields.update(callId=call.callId, eventId=event_id)
        value = encode_ingest(event_id, datetime.now(UTC), source, request_type, call, raw)
        headers = [("content-type", b"application/json"), ("ce_id", event_id.encode())]
        traceparent = request.headers.get("traceparent")
        if traceparent is not None and len(traceparent) <= 128:
            headers.append(("traceparent", traceparent.encode("latin-1")))
        try:
            await self._publisher.publish(call.callId.encode(), value, headers)
        except Unavailable as exc:
            fields["outcome"] = f"unavailable_{exc.reason}"
            return problem(
                503,
                "kafka-unavailable",
                "Event not stored",
                "Kafka did not acknowledge the event in time; retry later",
                headers={"Retry-After": self._retry_after},
            )
        fields["outcome"] = "accepted"
        # Both ids have fixed, JSON-safe shapes (a UUID, CA + hex): no encoder needed.
        accepted = f'{{"eventId":"{event_id}","callId":"{call.callId}"}}'
        return Response(accepted, status_code=202, media_type="application/json")


class AccessLog:
    """One structured log line and the HTTP metrics for every request.

    Routes outside the known set are counted as "other" so a scanner probing random
    paths cannot blow up the metrics' label cardinality.
    """

    def __init__(self, app: ASGIApp, routes: frozenset[str]) -> None:
        self.app = app
        self.routes = routes
        # Bound once: a lazy structlog proxy would re-bind on every request.
        self.log = log.bind()
        # Label children are looked up once per (route, code), not per request.
        self.counters: dict[tuple[str, int], Counter] = {}
        self.latencies = {r: metrics.HTTP_LATENCY.labels(r) for r in (*routes, "other")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        fields: dict[str, Any] = {}
        scope[LOG_FIELDS] = fields
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            elapsed = time.perf_counter() - start
            path: str = scope["path"]
            route = path if path in self.routes else "other"
            counter = self.counters.get((route, status))
            if counter is None:
                counter = metrics.HTTP_REQUESTS.labels(route, str(status))
                self.counters[route, status] = counter
            counter.inc()
            self.latencies[route].observe(elapsed)
            request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
            self.log.info(
                "request",
                method=scope["method"],
                path=path,
                status=status,
                latency_ms=round(elapsed * 1000, 3),
                request_id=request_id,
                **fields,
            )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))[:128]
    return None


def create_app(
    settings: Settings,
    publisher: Publisher | None,
    processor: Readiness | None = None,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    draining: Callable[[], bool] = lambda: False,
) -> Starlette:
    """Build the ASGI app; ``publisher`` is None for a processor-only node, and
    ``draining`` tells readiness when a shutdown has begun."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        checks: dict[str, bool] = {"draining": not draining()}
        if publisher is not None:
            checks["kafka"] = await publisher.ready()
        if processor is not None:
            checks["processor"] = processor.ready()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_document())

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return problem(exc.status_code, "http", exc.detail, exc.detail, headers=exc.headers)

    async def server_error(_: Request, exc: Exception) -> Response:
        # Never a stack trace in the answer; the log line has the details.
        log.exception("unhandled error", exc_info=exc)
        return problem(500, "internal", "Internal error", "the request could not be handled")

    routes = []
    if publisher is not None:  # first: the route matched for every event
        routes.append(Route(INGEST_PATH, Ingest(settings, publisher).handle, methods=["POST"]))
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.add_middleware(AccessLog, routes=frozenset(r.path for r in routes))
    return app
