"""The HTTP shell: ``POST /v1/call-status`` and the operational endpoints.

The ingest handler runs per request, so it does each thing once, as a short sequence of
steps: check the media type and the signature header (before a single body byte is
read), read the body under the size cap and the read deadline, check the signature's
digest on the raw bytes, parse the JSON once (strictly), validate, write to Kafka with the
raw body spliced in, and answer. Each step refuses with an entry of ``problems``.

It is a plain ASGI callable that the access log calls directly, outside Starlette's
middleware, router and ``Request``/``Response`` objects: those cost about a third of a
request's CPU (bench/README.md, Findings) and give this one route nothing it needs.
Starlette serves every other route.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.call import Call
from schemas.messages import INGEST_PATH, Source, encode_ingest, event_id_for, normalise_body
from service import metrics, problems, signature, strictjson
from service.openapi import openapi_document
from service.problems import Refused, problem
from service.producer import Unavailable, Unwritable
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.http")

# The outcome of a request whose signed bytes were stored already: 202, nothing written.
REPLAYED = "replayed"
# How old the publisher's readiness verdict /readyz answers with may be.
READINESS_MAX_AGE_SECONDS = 1.0
# Where the access log finds what a handler learned about the request (callId, ...).
LOG_FIELDS = "callstatus.log"
# The request headers the ingest handler reads (ASGI servers give names in lower case).
CONTENT_TYPE = b"content-type"
CONTENT_LENGTH = b"content-length"
SIGNATURE_HEADER = signature.HEADER.lower().encode()
TRACEPARENT = b"traceparent"
_INGEST_HEADERS = frozenset((CONTENT_TYPE, CONTENT_LENGTH, SIGNATURE_HEADER, TRACEPARENT))
# The 202's headers but its length: the body is always JSON.
_ACCEPTED_TYPE = (b"content-type", b"application/json")
# Deepest nesting of objects and arrays a body may have. A webhook has 2 levels; the
# processor's decoder stops at 200, and reads the body one level deeper than we do.
MAX_DEPTH = 32


class Publisher(Protocol):
    async def publish(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None: ...
    async def ready(self) -> bool: ...


class Readiness(Protocol):
    def ready(self) -> bool: ...


def ingest_headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The few request headers the ingest handler reads, each at its first occurrence
    (as Starlette's ``Headers.get`` would pick it), in one pass over the ASGI list."""
    found: dict[bytes, bytes] = {}
    for name, value in raw:
        if name in _INGEST_HEADERS and name not in found:
            found[name] = value
    return found


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes: a declared
    Content-Length over the limit is refused before reading anything, and a streamed
    body without one is cut off at the first chunk that crosses the limit. Raises
    ``ClientDisconnect`` when the client hangs up first."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                # A webhook arrives in one chunk: no join, no copy.
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        elif kind == "http.disconnect":
            raise ClientDisconnect()


def _too_large(limit: int) -> Refused:
    return Refused(problems.TOO_LARGE, f"the body exceeds {limit} bytes")


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


def _signature_refused(verdict: signature.Verdict) -> Refused:
    # The verdict names the kind of failure, never the expected digest.
    return Refused(
        problems.SIGNATURE,
        f"FreeClimb-Signature check failed: {verdict.value}",
        outcome=f"{problems.SIGNATURE.outcome}_{verdict.value}",
        headers={"WWW-Authenticate": "FreeClimb-Signature"},
    )


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as one JSON object, parsed once and strictly, or :class:`Refused`."""
    try:
        body = strictjson.parse(raw, MAX_DEPTH)
    except strictjson.TooDeep:
        raise Refused(
            problems.TOO_DEEP, f"objects and arrays may nest at most {MAX_DEPTH} deep"
        ) from None
    except strictjson.DuplicateKey as exc:
        raise Refused(
            problems.DUPLICATE_KEY, f"key {exc.key[:64]!r} appears twice in one object"
        ) from None
    except strictjson.NotJson as exc:
        raise Refused(problems.NOT_JSON, f"the body is not RFC 8259 JSON: {exc}"[:200]) from None
    if not isinstance(body, dict):
        raise Refused(problems.NOT_OBJECT, "the body must be one JSON object")
    return body


def validate_body(body: dict[str, Any], fields: dict[str, Any]) -> tuple[Source, str | None, Call]:
    try:
        return normalise_body(body)
    except ValidationError as exc:
        errors = _field_errors(exc)
        fields["errors"] = errors
        raise Refused(
            problems.INVALID, f"{len(errors)} field(s) are invalid", errors=errors
        ) from None


class ReadDeadlines:
    """Body-read deadlines for all requests, kept by one watchdog instead of one timer
    each: a request costs a dict insert and delete, and the watchdog runs only while
    reads are in flight, checking about ``resolution`` often. A read past its deadline
    gets its task cancelled and is reported as expired."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.resolution = min(1.0, timeout / 2)
        self._reading: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_loop: asyncio.AbstractEventLoop | None = None

    def start(self, task: asyncio.Task[Any]) -> None:
        loop = task.get_loop()
        self._reading[task] = loop.time() + self.timeout
        # A watchdog of a loop that has ended (tests run one loop after another) is dead.
        if self._watchdog is None or self._watchdog_loop is not loop:
            self._watchdog = loop.call_later(self.resolution, self._check, loop)
            self._watchdog_loop = loop

    def finish(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; True when its deadline had passed and cancelled it."""
        self._reading.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self._reading.items()):
            if deadline <= now:
                del self._reading[task]
                self._expired.add(task)
                task.cancel()
        self._watchdog = (
            loop.call_later(self.resolution, self._check, loop) if self._reading else None
        )


def _accepted_body(event_id: str, call_id: str) -> bytes:
    # Both ids have fixed, JSON-safe shapes (a UUID, CA + hex): no encoder needed.
    return f'{{"eventId":"{event_id}","callId":"{call_id}"}}'.encode()


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


class Ingest:
    """``POST /v1/call-status``, as an ASGI app (see the module docstring for why)."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self._publisher = publisher
        self._limit = settings.max_body_bytes
        self._read_timeout = settings.body_read_timeout_seconds
        self._deadlines = ReadDeadlines(self._read_timeout)
        self._max_value = settings.max_ingest_value_bytes
        self._secrets = settings.signing_secrets
        self._verify = settings.verify_signatures
        self._tolerance = settings.signature_tolerance_seconds
        self._retry_after = str(max(1, int(settings.produce_timeout_seconds)))
        # Every outcome the catalogue names exists from the start (at zero), so an alert
        # on a rate sees the series before the first refusal of its kind.
        self._outcomes: dict[str, Counter] = {
            outcome: metrics.INGEST_OUTCOMES.labels(outcome)
            for outcome in (
                "accepted",
                REPLAYED,
                *(r.outcome for r in problems.CATALOGUE if not r.connection),
            )
            if outcome not in (problems.SIGNATURE.outcome, problems.UNAVAILABLE.outcome)
        }
        self._accepted = self._outcomes["accepted"]
        self._replayed = self._outcomes[REPLAYED]
        # The callIds of the last events stored, by eventId (section 9): a signed
        # request repeated within the tolerance is answered from here, so a replay loop
        # costs no Kafka write and cannot fill the spool during an outage. Only stored
        # events enter it: one whose first attempt got a 503 is written again. Plain
        # strings on purpose: the garbage collector does not track them, whereas 20,000
        # tuples in a long-lived dict cost ~10 us per request in its full collections
        # (measured with wrk, cache on vs off). Two plain dicts, each up to half the
        # size, the older dropped whole when the newer is full: the cheapest bounded
        # store (no per-entry eviction), remembering the last half to all of
        # REPLAY_CACHE_ENTRIES events.
        self._recent: dict[str, str] = {}
        self._older: dict[str, str] = {}
        entries = settings.replay_cache_entries
        self._recent_half = (entries + 1) // 2

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields: dict[str, Any] = scope[LOG_FIELDS]
        try:
            accepted = await self._handle(scope, receive, fields)
        except Refused as refused:
            fields["outcome"] = refused.outcome
            self._count(refused.outcome)
            await refused.response()(scope, receive, send)
            return
        except asyncio.CancelledError:
            # Shutdown gave up on this request: its own outcome, never a 500. AccessLog
            # answers for it; the cancellation goes on.
            fields["outcome"] = problems.CANCELLED.outcome
            self._count(problems.CANCELLED.outcome)
            raise
        except Exception as exc:
            # What Starlette's exception middleware would answer: never a stack trace.
            await internal_error(exc)(scope, receive, send)
            return
        outcome = fields.setdefault("outcome", "accepted")
        (self._replayed if outcome == REPLAYED else self._accepted).inc()
        # Two plain messages instead of a Response object: the 202 is the same every
        # time but for its body.
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [_ACCEPTED_TYPE, (CONTENT_LENGTH, str(len(accepted)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": accepted})

    def _count(self, outcome: str) -> None:
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = metrics.INGEST_OUTCOMES.labels(outcome)
        counter.inc()

    async def _handle(self, scope: Scope, receive: Receive, fields: dict[str, Any]) -> bytes:
        """The 202's body once the event is stored, or :class:`Refused`."""
        headers = ingest_headers(scope["headers"])
        content_type = headers.get(CONTENT_TYPE, b"")
        if content_type != b"application/json" and not _is_json(content_type.decode("latin-1")):
            raise Refused(problems.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
        signed = self._check_header(headers.get(SIGNATURE_HEADER))
        raw = await self._read(receive, headers.get(CONTENT_LENGTH))
        if signed is not None:
            verdict = signature.check_body(signed, raw, self._secrets)
            if verdict is not signature.Verdict.VALID:
                raise _signature_refused(verdict)
        event_id = event_id_for(raw)
        call_id = self._recent.get(event_id) or self._older.get(event_id)
        if call_id is not None:
            # The same signed bytes were stored already: answer as the first time did.
            fields.update(callId=call_id, eventId=event_id, outcome=REPLAYED)
            return _accepted_body(event_id, call_id)
        source, request_type, call = validate_body(parse_body(raw), fields)
        call_id = call.callId
        fields.update(callId=call_id, eventId=event_id)
        await self._store(headers.get(TRACEPARENT), event_id, source, request_type, call, raw)
        if self._recent_half:
            self._recent[event_id] = call_id
            if len(self._recent) >= self._recent_half:
                self._older, self._recent = self._recent, {}
        return _accepted_body(event_id, call_id)

    def _check_header(self, header: bytes | None) -> signature.ParsedSignature | None:
        """Presence, grammar and time window of the signature, before reading the body:
        an unsigned or stale request is refused without buffering it."""
        if not self._verify:
            return None
        parsed = signature.check_header(
            None if header is None else header.decode("latin-1"), time.time(), self._tolerance
        )
        if isinstance(parsed, signature.Verdict):
            raise _signature_refused(parsed)
        return parsed

    async def _read(self, receive: Receive, declared: bytes | None) -> bytes:
        task = asyncio.current_task()
        assert task is not None
        self._deadlines.start(task)
        try:
            body = await read_body(receive, declared, self._limit)
        except asyncio.CancelledError:
            # Ours only if the deadline cancelled it and nobody else (shutdown) did too.
            if not self._deadlines.finish(task) or task.uncancel() > 0:
                raise
            raise Refused(
                problems.TOO_SLOW, f"the body was not received within {self._read_timeout} s"
            ) from None
        except ClientDisconnect:
            self._deadlines.finish(task)
            # Not our failure and nobody to answer: counted apart, so a client that hangs
            # up mid-body cannot trip the 5xx alert.
            raise Refused(problems.CLIENT_CLOSED, "the client closed the connection") from None
        except BaseException:
            self._deadlines.finish(task)
            raise
        if self._deadlines.finish(task):
            # Cannot happen while read_body lets CancelledError through, but if it ever
            # swallowed one: the deadline's cancellation would hit the next await. Take it
            # here, so it cannot cut the answer short.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
            task.uncancel()
        return body

    async def _store(
        self,
        traceparent: bytes | None,
        event_id: str,
        source: Source,
        request_type: str | None,
        call: Call,
        raw: bytes,
    ) -> None:
        value = encode_ingest(event_id, datetime.now(UTC), source, request_type, call, raw)
        key = call.callId.encode()
        if len(value) + len(key) > self._max_value:
            # The producer would refuse it on every retry (a 503 forever): say so now.
            raise Refused(
                problems.TOO_LARGE,
                f"stored, this event would exceed {self._max_value} bytes; send fewer or "
                "shorter fields",
            )
        headers = [("content-type", b"application/json"), ("ce_id", event_id.encode())]
        if traceparent is not None and len(traceparent) <= 128:
            headers.append(("traceparent", traceparent))
        try:
            await self._publisher.publish(key, value, headers)
        except Unwritable as exc:
            # Kafka refuses this event for good (a topic's max.message.bytes lowered while
            # running, a policy): no retry can help, so no Retry-After and no 503. A 5xx
            # the server errors alert sees: an operator must fix the topic.
            log.error("kafka refuses the event for good", eventId=event_id, error=exc.cause)
            raise Refused(
                problems.UNWRITABLE,
                f"Kafka refuses this event ({exc.cause}); it was not stored",
            ) from None
        except Unavailable as exc:
            # Say which of the two could not take it: an operator reading the answer
            # looks at Kafka for one and at the node's spool volume for the other.
            detail = (
                "Kafka did not take the event in time and the node's spool could not store "
                f"it ({'full' if exc.reason == 'spool_full' else 'disk error'}); retry later"
                if exc.reason.startswith("spool_")
                else "Kafka did not acknowledge the event in time; retry later"
            )
            raise Refused(
                problems.UNAVAILABLE,
                detail,
                outcome=f"{problems.UNAVAILABLE.outcome}_{exc.reason}",
                headers={"Retry-After": self._retry_after},
            ) from None


class AccessLog:
    """One structured log line and the HTTP metrics for every request.

    Routes outside the known set are counted as "other" so a scanner probing random
    paths cannot blow up the metrics' label cardinality. It is the outermost layer
    (:class:`App`), so an ingest request meets no Starlette code at all.
    """

    def __init__(self, app: ASGIApp, routes: frozenset[str], ingest: Ingest | None = None) -> None:
        self.app = app
        self.routes = routes
        self.ingest = ingest
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
        started = False

        async def send_with_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        try:
            if (
                self.ingest is not None
                and scope["path"] == INGEST_PATH
                and scope["method"] == "POST"
            ):
                # The route every event takes goes straight to its handler: Starlette's
                # middleware, router and Request objects cost ~15 % of a request's CPU
                # (bench/README.md, Findings) and add nothing this handler needs.
                await self.ingest(scope, receive, send_with_status)
            else:
                await self.app(scope, receive, send_with_status)
        except asyncio.CancelledError:
            # The server cancels requests still running when the shutdown grace ends.
            # Left alone, uvicorn would answer 500 and we would count one: say 503 (the
            # event may or may not be stored; FreeClimb retries) and count it as such.
            fields.setdefault("outcome", problems.CANCELLED.outcome)
            status = problems.CANCELLED.status
            if not started:
                response = problems.CANCELLED.response(
                    "the server is shutting down; retry", headers={"Retry-After": "1"}
                )
                with contextlib.suppress(OSError):  # the connection may already be gone
                    await response(scope, receive, send)
            raise
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
            # A random id (a uuid4's 128 bits without building a UUID object per request).
            request_id = _header(scope, b"x-request-id") or os.urandom(16).hex()
            self.log.info(
                "request",
                method=scope["method"],
                path=path,
                status=status,
                latency_ms=round(elapsed * 1000, 3),
                request_id=request_id,
                **fields,
            )


def internal_error(exc: Exception) -> Response:
    """A bug's answer: never a stack trace in it; the log line has the details."""
    log.exception("unhandled error", exc_info=exc)
    return problem(500, "internal", "Internal error", "the request could not be handled")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))[:128]
    return None


class App(Starlette):
    """Starlette with :class:`AccessLog` outside its whole middleware stack, error
    middleware included: Starlette always puts ``ServerErrorMiddleware`` first, and its
    send wrapper would otherwise run for every ingest answer. Errors of the other routes
    still get that middleware's 500 (and the access log sees the status it sent)."""

    def __init__(self, routes: list[Route], ingest: Ingest | None, **kwargs: Any) -> None:
        super().__init__(routes=routes, **kwargs)
        self._logged_routes = frozenset(r.path for r in routes)
        self._ingest = ingest

    def build_middleware_stack(self) -> ASGIApp:
        return AccessLog(super().build_middleware_stack(), self._logged_routes, self._ingest)


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

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_document())

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return problem(exc.status_code, "http", exc.detail, exc.detail, headers=exc.headers)

    async def server_error(_: Request, exc: Exception) -> Response:
        return internal_error(exc)

    routes = []
    ingest = Ingest(settings, publisher) if publisher is not None else None
    if ingest is not None:
        # Served by AccessLog's fast path; the route stays for 405s and the route list.
        routes.append(Route(INGEST_PATH, ingest, methods=["POST"]))
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
