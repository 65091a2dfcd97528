"""The ingest handler: ``POST /v1/call-status[/{accountId}]``, from the request's headers
to its answer.

It runs per request, so it does each thing once, as a short sequence of steps: take the
accounts' book (one snapshot for the whole request), check the path's account id and look
it up, check the media type and the signature header (before a single body byte is read),
read the body under the size cap and the read deadline, find the claimed account in the
raw bytes when the path named none, check the signature's digest on the raw bytes with
that one account's secrets, parse the JSON once (strictly, authenticated input only),
validate, require the body's accountId to be the account that verified it, write to Kafka
with the raw body spliced in, and answer. Each step refuses with an entry of ``problems``.

It is a plain ASGI callable that the app's fast path (``service.app.App``) calls under
the access log, outside Starlette's middleware, router and ``Request``/``Response``
objects: those cost about 15 % of a request's CPU (bench/README.md, Findings) and give
this one route nothing it needs. Most requests do not even come that way: the ingest
lane (``service.lane``) hands a request that came whole in one read to
:meth:`Ingest.take`, which runs the same steps (``_head``, ``_judge``, ``_stored``)
without a coroutine and answers from the broker's ack callback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import structlog
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from schemas.call import CallLike
from schemas.messages import (
    RecordHeaders,
    RecordTooLarge,
    Source,
    event_id_for,
    ingest_call,
    ingest_record,
)
from service import metrics, problems, signature, strictjson
from service.accesslog import LOG_FIELDS
from service.accountbook import Account, AccountBook, canonical_id
from service.accounts import AccountSource, StaticAccounts
from service.binding import (
    SCOPE_KEY,
    body_account,
    check_binding,
    path_account,
)
from service.body import BodyReader, too_large
from service.hotmetrics import Count
from service.problems import Refused, problem
from service.producer import SendDone, Unavailable, Unwritable
from service.settings import Settings

# One logger name for the whole HTTP shell (app, handler, access log): log queries
# select on it.
log = structlog.get_logger(logger_name="callstatus.http")

# The outcome of a request whose signed bytes were stored already: 202, nothing written.
REPLAYED = "replayed"
# The request headers the ingest handler reads (ASGI servers give names in lower case).
CONTENT_TYPE = b"content-type"
CONTENT_LENGTH = b"content-length"
SIGNATURE_HEADER = signature.HEADER.lower().encode()
TRACEPARENT = b"traceparent"
_INGEST_HEADERS = frozenset((CONTENT_TYPE, CONTENT_LENGTH, SIGNATURE_HEADER, TRACEPARENT))
# The 202's headers but its length: the body is always JSON.
_ACCEPTED_TYPE = (b"content-type", b"application/json")
# What judges requests when signatures are not verified (local play): any account, no
# secret, and so no account binding but the path's.
_UNVERIFIED = AccountBook(any_account=Account(None, ()))
# Deepest nesting of objects and arrays a body may have. A webhook has 2 levels; the
# processor's decoder stops at 200, and reads the body one level deeper than we do.
MAX_DEPTH = 32


class Publisher(Protocol):
    """Where the handler stores events (the producer, or the spooling publisher)."""

    async def publish(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None: ...
    async def ready(self) -> bool: ...


@runtime_checkable
class CallbackPublisher(Publisher, Protocol):
    """A publisher that can also store an event without a coroutine (the ingest lane's
    way; both of ours can). With one that cannot, the lane awaits ``publish`` in a task."""

    def publish_now(
        self,
        key: bytes,
        value: bytes,
        headers: Sequence[tuple[str, bytes]],
        done: SendDone,
    ) -> bool: ...


def ingest_headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The few request headers the ingest handler reads, each at its first occurrence
    (as Starlette's ``Headers.get`` would pick it), in one pass over the ASGI list."""
    found: dict[bytes, bytes] = {}
    for name, value in raw:
        if name in _INGEST_HEADERS and name not in found:
            found[name] = value
    return found


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


def validate_body(
    body: dict[str, Any], fields: dict[str, Any]
) -> tuple[Source, str | None, CallLike]:
    try:
        return ingest_call(body)
    except ValidationError as exc:
        errors = _field_errors(exc)
        fields["errors"] = errors
        raise Refused(
            problems.INVALID, f"{len(errors)} field(s) are invalid", errors=errors
        ) from None


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# ~0.5 us more per request for these two.
@dataclass(slots=True)
class Head:
    """What the ingest handler learned from a request's head (``Ingest._head``)."""

    book: AccountBook
    path_id: str | None
    account: Account | None
    headers: dict[bytes, bytes]
    signed: signature.ParsedSignature | None


@dataclass(slots=True)
class Event:
    """A judged request's event: its record on the ingest topic, and what the replay
    cache remembers once it is stored (the account prefix, then the callId)."""

    record: tuple[bytes, bytes, RecordHeaders]
    event_id: str
    call_id: str
    answer: str


# What a lane request's publish reports: None once stored, else why not.
Done = Callable[[Exception | None], None]


class Reply(Protocol):
    """A lane request's answer (``service.lane.LaneCycle``): given once."""

    @property
    def response_complete(self) -> bool: ...
    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None: ...
    def track(self, task: asyncio.Future[None]) -> None: ...


def _answer(reply: Reply, response: Response) -> None:
    reply.answer(response.status_code, response.raw_headers, bytes(response.body))


def _accepted(body: bytes) -> list[tuple[bytes, bytes]]:
    """The 202's headers."""
    return [_ACCEPTED_TYPE, (CONTENT_LENGTH, str(len(body)).encode())]


def _accepted_body(event_id: str, call_id: str) -> bytes:
    # Both ids have fixed, JSON-safe shapes (a UUID, CA + hex): no encoder needed.
    return f'{{"eventId":"{event_id}","callId":"{call_id}"}}'.encode()


class ReceivedClock:
    """receivedAt now, as RFC 3339 text in ``format_rfc3339``'s form
    ("2026-01-01T00:00:05.123Z"): the date and time formatted once per second, only the
    milliseconds per request. A datetime made and formatted per request cost ~1 µs."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        ns = time.time_ns()
        second = ns // 1_000_000_000
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        # Milliseconds cut, not rounded, as isoformat(timespec="milliseconds") does.
        return f"{self._prefix}.{ns // 1_000_000 % 1000:03d}Z"


class Ingest:
    """``POST /v1/call-status[/{accountId}]``, as an ASGI app (see the module docstring
    for why). ``accounts`` gives the book in use; the handler reads it once per request."""

    def __init__(self, settings: Settings, publisher: Publisher, accounts: AccountSource) -> None:
        self._publisher = publisher
        self._publish_now = (
            publisher.publish_now if isinstance(publisher, CallbackPublisher) else None
        )
        self._accounts: AccountSource = accounts
        if not settings.verify_signatures:
            self._accounts = StaticAccounts(_UNVERIFIED)
        self._body = BodyReader(settings.max_body_bytes, settings.body_read_timeout_seconds)
        self._max_value = settings.max_ingest_value_bytes
        self._verify = settings.verify_signatures
        self._tolerance = settings.signature_tolerance_seconds
        self._retry_after = str(max(1, int(settings.produce_timeout_seconds)))
        # Every outcome the catalogue names exists from the start (at zero), so an alert
        # on a rate sees the series before the first refusal of its kind.
        self._outcomes: dict[str, Count] = {
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
        # callstatus_account_requests_total's children, looked up once per (account,
        # outcome): bounded by the accounts ever configured, never by what requests claim.
        self._by_account: dict[tuple[str, str], Count] = {}
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
        self._clock = ReceivedClock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields: dict[str, Any] = scope[LOG_FIELDS]
        try:
            accepted = await self._handle(scope, receive, fields)
        except Refused as refused:
            await self._refusal(scope, fields, refused)(scope, receive, send)
            return
        except asyncio.CancelledError:
            # Shutdown gave up on this request: its own outcome, never a 500. AccessLog
            # answers for it; the cancellation goes on.
            self.cancelled(scope, fields)
            raise
        except Exception as exc:
            # What Starlette's exception middleware would answer: never a stack trace.
            await internal_error(exc)(scope, receive, send)
            return
        self._acceptance(scope, fields)
        # Two plain messages instead of a Response object: the 202 is the same every
        # time but for its body.
        await send({"type": "http.response.start", "status": 202, "headers": _accepted(accepted)})
        await send({"type": "http.response.body", "body": accepted})

    def take(self, scope: Scope, raw: bytes, reply: Reply) -> None:
        """The ingest lane's way in (``service.lane``): the request's head and its whole
        body in hand, and no task. The same steps as the ASGI path, and the same answers;
        the broker's ack arrives as a callback, and ``reply`` is answered from it. Only
        an event that cannot go straight into the producer's buffer (the spool's path,
        a full batch) gets a task, to await what the ASGI path awaits."""
        fields: dict[str, Any] = scope[LOG_FIELDS]
        try:
            head = self._head(scope, fields)
            if len(raw) > self._body.limit:
                raise too_large(self._body.limit)
            event = self._judge(scope, head, raw, fields)
            if isinstance(event, bytes):  # a replay: answered from the cache
                self._acceptance(scope, fields)
                reply.answer(202, _accepted(event), event)
                return
            done = partial(self._published, scope, fields, event, reply)
            now = self._publish_now
            if now is None or not now(*event.record, done):
                reply.track(asyncio.ensure_future(self._publish(event, done)))
        except Refused as refused:
            _answer(reply, self._refusal(scope, fields, refused))
        except Exception as exc:
            _answer(reply, internal_error(exc))

    async def _publish(self, event: Event, done: Done) -> None:
        try:
            await self._publisher.publish(*event.record)
        except Exception as exc:  # every failure must reach done(): it answers
            done(exc)
            return
        done(None)

    def _published(
        self,
        scope: Scope,
        fields: dict[str, Any],
        event: Event,
        reply: Reply,
        failure: Exception | None,
    ) -> None:
        """A lane request's event is stored, or ``failure`` says why not."""
        if reply.response_complete:
            return  # answered already: the shutdown's grace ran out first
        try:
            if failure is None:
                answer = self._stored(event)
                self._acceptance(scope, fields)
                reply.answer(202, _accepted(answer), answer)
            elif isinstance(failure, Unavailable):
                refused = self._unstored(event.event_id, failure)
                _answer(reply, self._refusal(scope, fields, refused))
            else:
                _answer(reply, internal_error(failure))
        except Exception as exc:  # a bug: answered as one, not left hanging
            if not reply.response_complete:
                _answer(reply, internal_error(exc))
            else:
                raise

    def _refusal(self, scope: Scope, fields: dict[str, Any], refused: Refused) -> Response:
        fields["outcome"] = refused.outcome
        self._count(refused.outcome)
        self._count_account(scope.get(SCOPE_KEY), refused.outcome)
        return refused.response()

    def _acceptance(self, scope: Scope, fields: dict[str, Any]) -> None:
        outcome = fields.setdefault("outcome", "accepted")
        (self._replayed if outcome == REPLAYED else self._accepted).inc()
        self._count_account(scope.get(SCOPE_KEY), outcome)

    def cancelled(self, scope: Scope, fields: dict[str, Any]) -> None:
        """Count a request that the shutdown gave up on (its answer is the access
        log's, ``service.accesslog.cancelled_response``)."""
        fields["outcome"] = problems.CANCELLED.outcome
        self._count(problems.CANCELLED.outcome)
        self._count_account(scope.get(SCOPE_KEY), problems.CANCELLED.outcome)

    def _count(self, outcome: str) -> None:
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = metrics.INGEST_OUTCOMES.labels(outcome)
        counter.inc()

    def _count_account(self, account: Account | None, outcome: str) -> None:
        label = account.metric_label if account is not None else metrics.UNKNOWN_ACCOUNT
        counter = self._by_account.get((label, outcome))
        if counter is None:
            counter = self._by_account[label, outcome] = metrics.ACCOUNT_REQUESTS.labels(
                label, outcome
            )
        counter.inc()

    async def _handle(self, scope: Scope, receive: Receive, fields: dict[str, Any]) -> bytes:
        """The 202's body once the event is stored, or :class:`Refused`."""
        head = self._head(scope, fields)
        raw = await self._body.read(receive, head.headers.get(CONTENT_LENGTH))
        event = self._judge(scope, head, raw, fields)
        if isinstance(event, bytes):
            return event  # a replay: answered from the cache
        # Awaited here rather than in a helper coroutine: one coroutine less per request.
        try:
            await self._publisher.publish(*event.record)
        except (Unwritable, Unavailable) as exc:
            raise self._unstored(event.event_id, exc) from None
        return self._stored(event)

    def _head(self, scope: Scope, fields: dict[str, Any]) -> Head:
        """What the head alone decides, before a body byte is read: the account the
        path names, the media type, the signature's grammar and time."""
        # One snapshot for the whole request: a reload while it runs never changes who
        # judges it, so a rotation's swap cannot refuse it.
        book = self._accounts.book
        path_id, account = path_account(scope, book, fields)
        headers = ingest_headers(scope["headers"])
        content_type = headers.get(CONTENT_TYPE, b"")
        if content_type != b"application/json" and not _is_json(content_type.decode("latin-1")):
            raise Refused(problems.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
        signed = self._check_header(headers.get(SIGNATURE_HEADER))
        return Head(book, path_id, account, headers, signed)

    def _judge(self, scope: Scope, head: Head, raw: bytes, fields: dict[str, Any]) -> Event | bytes:
        """The body's verdict: the event to store, or the 202's body of a replay (its
        bytes stored already), or :class:`Refused`."""
        account = head.account
        if account is None:
            account = body_account(scope, head.book, raw, fields)
        if head.signed is not None:
            # The HMACs of this one account's secrets, however many accounts there are.
            verdict = signature.check_body(head.signed, raw, account.keys)
            if verdict is not signature.Verdict.VALID:
                raise _signature_refused(verdict)
        # The account the body must name: the one whose secret verified it, or for the
        # unbound shorthand the path's (None: any, as before accounts existed).
        path_id = head.path_id
        bound = account.id if account.id is not None else path_id and canonical_id(path_id)
        # Cached answers carry the account they were stored for, then "|": the same bytes
        # signed by another account's secret are judged afresh (and refused), not
        # answered 202; and an answer stored for no account ("|") is never taken for, or
        # by, one stored for an account.
        prefix = (bound or "") + "|"
        event_id = event_id_for(raw)
        cached = self._recent.get(event_id) or self._older.get(event_id)
        if cached is not None and cached.startswith(prefix):
            # The same signed bytes were stored already: answer as the first time did.
            call_id = cached[len(prefix) :]
            fields.update(callId=call_id, eventId=event_id, outcome=REPLAYED)
            return _accepted_body(event_id, call_id)
        source, request_type, call = validate_body(parse_body(raw), fields)
        if bound is not None:
            check_binding(call.accountId, bound, path_id)
        call_id = call.callId
        fields.update(callId=call_id, eventId=event_id)
        traceparent = head.headers.get(TRACEPARENT)
        record = self._record(traceparent, event_id, source, request_type, call, raw)
        return Event(record, event_id, call_id, prefix + call_id)

    def _stored(self, event: Event) -> bytes:
        """The 202's body of an event now stored, remembered for a replay of its bytes."""
        if self._recent_half:
            self._remember(event.event_id, event.answer)
        return _accepted_body(event.event_id, event.call_id)

    def _remember(self, event_id: str, answer: str) -> None:
        """The stored event's answer, for a replay of its bytes: two plain dicts of
        half the cache each, the older dropped whole when the newer fills."""
        self._recent[event_id] = answer
        if len(self._recent) >= self._recent_half:
            self._older, self._recent = self._recent, {}

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

    def _record(
        self,
        traceparent: bytes | None,
        event_id: str,
        source: Source,
        request_type: str | None,
        call: CallLike,
        raw: bytes,
    ) -> tuple[bytes, bytes, RecordHeaders]:
        """The event's (key, value, headers) on the ingest topic, or :class:`Refused`."""
        try:
            return ingest_record(
                event_id,
                self._clock.now(),
                source,
                request_type,
                call,
                raw,
                self._max_value,
                traceparent,
            )
        except RecordTooLarge:
            # The producer would refuse it on every retry (a 503 forever): say so now.
            raise Refused(
                problems.TOO_LARGE,
                f"stored, this event would exceed {self._max_value} bytes; send fewer or "
                "shorter fields",
            ) from None

    def _unstored(self, event_id: str, exc: Unwritable | Unavailable) -> Refused:
        """The answer to an event the publisher could not store."""
        if isinstance(exc, Unwritable):
            # Kafka refuses this event for good (a topic's max.message.bytes lowered while
            # running, a policy): no retry can help, so no Retry-After and no 503. A 5xx
            # the server errors alert sees: an operator must fix the topic.
            log.error("kafka refuses the event for good", eventId=event_id, error=exc.cause)
            return Refused(
                problems.UNWRITABLE,
                f"Kafka refuses this event ({exc.cause}); it was not stored",
            )
        # Say which of the two could not take it: an operator reading the answer looks at
        # Kafka for one and at the node's spool volume for the other.
        detail = (
            "Kafka did not take the event in time and the node's spool could not store "
            f"it ({'full' if exc.reason == 'spool_full' else 'disk error'}); retry later"
            if exc.reason.startswith("spool_")
            else "Kafka did not acknowledge the event in time; retry later"
        )
        return Refused(
            problems.UNAVAILABLE,
            detail,
            outcome=f"{problems.UNAVAILABLE.outcome}_{exc.reason}",
            headers={"Retry-After": self._retry_after},
        )


def internal_error(exc: Exception) -> Response:
    """A bug's answer: never a stack trace in it; the log line has the details. The
    other routes' exception handler (``service.app``) answers the same."""
    log.exception("unhandled error", exc_info=exc)
    return problem(500, "internal", "Internal error", "the request could not be handled")
