"""FreeClimb's REST API for Calls, client side: fetch one Call resource or page through an
account's calls (docs/freeclimb.md, section 5), politely and without leaking
the API key.

Etiquette, because FreeClimb documents no rate limits: at most ``max_concurrency``
requests in flight per account; a per-attempt timeout; 429 and 5xx answers, timeouts and
transport errors retried a bounded number of times with capped exponential backoff and
jitter, honouring ``Retry-After`` (a 429's pause holds back every request of that account,
not just the one that met it); then a typed error. 401, 403 and a call's 404 are typed
errors at once: sending them again changes nothing.

The API key lives in a :class:`~pydantic.SecretStr` (and so does the ``Authorization``
value built from it): it is never part of a URL, a log line, a repr or an exception's
text. Log lines name the account, the path and the status, never the query (phone
numbers) or a header.

Each call comes back as the resource's JSON bytes (what an ingest record keeps as its
body), its parsed JSON and the validated :class:`~schemas.call.Call`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

import httpx
import pydantic
import structlog
from pydantic import SecretStr

from schemas.call import Call, CallStatus
from service import metrics, strictjson

log = structlog.get_logger(logger_name="callstatus.freeclimb")

DEFAULT_API_URL: Final = "https://www.freeclimb.com/apiserver"

# Ingest's own nesting bound for a body (service/ingest.py): a listed call, re-encoded on
# its own, must fit it. A page holds its calls two levels deeper.
_CALL_MAX_DEPTH: Final = 32
_PAGE_MAX_DEPTH: Final = _CALL_MAX_DEPTH + 2

# Identifiers go into the URL path with the account's credentials: anything but the
# documented shape ("../", "?", "/") could point those credentials somewhere else.
_ACCOUNT_ID = re.compile(r"AC[0-9a-fA-F]{40}", re.ASCII)
_CALL_ID = re.compile(r"CA[0-9a-fA-F]{40}", re.ASCII)
_DELAY_SECONDS = re.compile(r"[0-9]{1,10}", re.ASCII)


# --- errors -------------------------------------------------------------------------


class FreeClimbError(Exception):
    """A request to FreeClimb's REST API that did not give what was asked. The text names
    the account, the path and what went wrong; never a credential."""

    def __init__(self, message: str, *, account_id: str, path: str, status: int | None) -> None:
        path = _path_only(path)  # a next-page URI's query holds the filters' phone numbers
        super().__init__(f"{message} (account {account_id}, GET {path})")
        self.account_id = account_id
        self.path = path
        self.status = status


class NoCredentials(FreeClimbError):
    """No API key is configured for the account: nothing was sent."""


class Unauthorized(FreeClimbError):
    """401: the account id and API key were not accepted."""


class Forbidden(FreeClimbError):
    """403: the credentials are valid but may not read this."""


class CallNotFound(FreeClimbError):
    """404 for a call: FreeClimb has no such call in this account. Not retried."""


class RetriesExhausted(FreeClimbError):
    """429, 5xx, timeouts or transport errors, still there after the last retry; or a
    ``Retry-After`` longer than the client will wait (``retry_after`` says how long)."""

    def __init__(
        self,
        message: str,
        *,
        account_id: str,
        path: str,
        status: int | None,
        attempts: int,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, account_id=account_id, path=path, status=status)
        self.attempts = attempts
        self.retry_after = retry_after


class UnexpectedResponse(FreeClimbError):
    """Any other answer: another 4xx, a body that is not the JSON documented, a body too
    large, a ``nextPageUri`` off the API's origin, or a Call the model refuses."""


# --- results ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchedCall:
    """One Call resource: ``body`` is the response's bytes for :meth:`get_call`, and for a
    listed call its JSON object re-encoded compactly (keys and values as received)."""

    body: bytes
    data: Mapping[str, Any]
    call: Call


@dataclass(frozen=True, slots=True)
class InvalidCall:
    """A listed resource the Call model refused, yielded rather than stopping the listing
    (one odd call must not hide the rest of a sweep). ``problem`` is pydantic's summary."""

    body: bytes
    data: Mapping[str, Any]
    problem: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """An account id and its API key. The key shows as ``**********`` in any repr."""

    account_id: str
    api_key: SecretStr

    def __post_init__(self) -> None:
        if _ACCOUNT_ID.fullmatch(self.account_id) is None:
            raise ValueError("an account id is AC followed by 40 hex digits")


# --- pure helpers -------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 10.2.3): delay-seconds, or an
    HTTP date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) measured from
    ``now``, 0 when already past. None when absent or not understood: the caller then
    falls back on its own backoff."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" dates: HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, random_value: float, *, first: float, cap: float) -> float:
    """The wait before retry number ``attempt`` (0 for the first retry): ``first`` doubling
    up to ``cap``, with "equal jitter" (half fixed, half ``random_value`` in [0, 1) of it),
    the shape of service/backoff.py, so clients that met the same 429 do not come back in
    step."""
    base = min(cap, first * float(2 ** min(attempt, 62)))
    return base / 2 + random_value * (base / 2)


def retry_delay(
    attempt: int, random_value: float, retry_after: float | None, *, first: float, cap: float
) -> float:
    """The wait before a retry: what ``Retry-After`` asked, when it asked, plus up to 10 %
    (at most 1 s) of jitter so that a fleet told the same second does not return at that
    very instant; else :func:`backoff_delay`."""
    if retry_after is None:
        return backoff_delay(attempt, random_value, first=first, cap=cap)
    return retry_after + random_value * min(1.0, retry_after * 0.1)


def format_filter_time(value: datetime) -> str:
    """A ``startTime``/``endTime`` filter value: FreeClimb's SDKs document
    ``YYYY-MM-DD hh:mm:ss``; sent in UTC (the API's dates are all GMT)."""
    if value.tzinfo is None:
        raise ValueError("filter times must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def call_filters(
    *,
    active: bool | None = None,
    status: CallStatus | None = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    to: str | None = None,
    from_: str | None = None,
    parent_call_id: str | None = None,
    application_ids: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """The query of a Calls list request, in FreeClimb's parameter names (section 5):
    ``start_time`` keeps calls that started at or after it, ``end_time`` calls that ended
    at or before it."""
    query: list[tuple[str, str]] = []
    if active is not None:
        query.append(("active", "true" if active else "false"))
    if status is not None:
        query.append(("status", str(status)))
    if start_time is not None:
        query.append(("startTime", format_filter_time(start_time)))
    if end_time is not None:
        query.append(("endTime", format_filter_time(end_time)))
    if to is not None:
        query.append(("to", to))
    if from_ is not None:
        query.append(("from", from_))
    if parent_call_id is not None:
        query.append(("parentCallId", parent_call_id))
    query.extend(("applicationId", app) for app in application_ids)
    return query


def _basic(credentials: Credentials) -> SecretStr:
    # Built once per account, and kept secret: the header is the key in base64.
    raw = f"{credentials.account_id}:{credentials.api_key.get_secret_value()}".encode()
    return SecretStr("Basic " + base64.b64encode(raw).decode("ascii"))


def _encode(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _validate(data: Mapping[str, Any], account_id: str) -> Call:
    call = Call.model_validate(data)
    # An account's credentials read only its own calls; anything else is not ours to post.
    if call.accountId is not None and call.accountId != account_id:
        raise ValueError("accountId: the call belongs to another account")
    return call


def _problem(exc: pydantic.ValidationError | ValueError) -> str:
    if not isinstance(exc, pydantic.ValidationError):
        return str(exc)
    # Field locations and messages only: pydantic's default text repeats the input.
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'call'}: {err['msg']}" for err in exc.errors()
    )


class _Page(pydantic.BaseModel):
    """The documented page object; only what paging needs is required."""

    model_config = pydantic.ConfigDict(extra="ignore")

    total: int | None = None
    start: int | None = None
    end: int | None = None
    page: int | None = None
    numPages: int | None = None
    pageSize: int | None = None
    nextPageUri: str | None = None
    calls: list[dict[str, Any]] = pydantic.Field(default_factory=list)


# --- the client ---------------------------------------------------------------------


@dataclass(slots=True)
class _Gate:
    """One account's share of the API: its concurrency slots, and the monotonic time
    before which none of its requests go out (set by a 429's ``Retry-After``)."""

    slots: asyncio.Semaphore
    authorization: SecretStr
    resume_at: float = 0.0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: str | None


@dataclass(slots=True)
class _Retry:
    code: str
    reason: str
    status: int | None
    retry_after: float | None = None


class RandomSource(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How the client treats the API; defaults suit a background reconciler."""

    base_url: str = DEFAULT_API_URL
    timeout: float = 10.0  # seconds per attempt, connection to last byte
    max_concurrency: int = 4  # requests in flight per account
    max_retries: int = 4  # sends after the first; then RetriesExhausted
    backoff_first: float = 0.5
    backoff_cap: float = 30.0
    # A Retry-After beyond this is not waited for: the request fails at once with
    # RetriesExhausted(retry_after=...), and the caller's next round comes back later.
    max_retry_after: float = 120.0
    max_body_bytes: int = 8 * 1024 * 1024


class FreeClimbClient:
    """An async client for the Calls part of FreeClimb's REST API, for any number of
    accounts. ``sleep``, ``clock`` (monotonic seconds), ``now`` (for HTTP dates) and
    ``rng`` are injectable so tests drive retries without waiting; ``transport`` likewise
    (httpx's), though the tests run a real stand-in on loopback (service/standin.py)."""

    def __init__(
        self,
        credentials: Mapping[str, SecretStr] | list[Credentials],
        options: ClientOptions | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: RandomSource | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.options = options or ClientOptions()
        if self.options.max_concurrency < 1 or self.options.max_retries < 0:
            raise ValueError("max_concurrency must be at least 1, max_retries at least 0")
        creds = (
            [Credentials(a, k) for a, k in credentials.items()]
            if isinstance(credentials, Mapping)
            else list(credentials)
        )
        self._gates = {
            c.account_id: _Gate(asyncio.Semaphore(self.options.max_concurrency), _basic(c))
            for c in creds
        }
        base = self.options.base_url.rstrip("/")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError("the API base URL must be an http(s) URL without a query")
        self._base = base
        self._sleep = sleep
        self._clock = clock
        self._now = now
        self._rng: RandomSource = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.options.timeout),
            transport=transport,
            follow_redirects=False,  # a redirect must not carry the Authorization header
            headers={"Accept": "application/json", "User-Agent": "callstatus"},
        )

    def __repr__(self) -> str:
        return f"FreeClimbClient(base_url={self._base!r}, accounts={sorted(self._gates)!r})"

    @property
    def accounts(self) -> list[str]:
        return sorted(self._gates)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> FreeClimbClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # --- operations -----------------------------------------------------------------

    async def get_call(self, account_id: str, call_id: str) -> FetchedCall:
        """``GET /Accounts/{account_id}/Calls/{call_id}``; raises :class:`CallNotFound` for
        a 404, and :class:`UnexpectedResponse` if the resource is not a valid Call."""
        if _CALL_ID.fullmatch(call_id) is None:
            raise ValueError("a call id is CA followed by 40 hex digits")
        path = f"/Accounts/{self._account(account_id)}/Calls/{call_id}"
        body = await self._get("get_call", account_id, path)
        data = self._json(body, _CALL_MAX_DEPTH, account_id, path)
        if not isinstance(data, dict):
            raise UnexpectedResponse(
                "the Call resource is not a JSON object",
                account_id=account_id,
                path=path,
                status=200,
            )
        try:
            call = _validate(data, account_id)
        except (pydantic.ValidationError, ValueError) as exc:
            metrics.FREECLIMB_API_INVALID_CALLS.inc()
            raise UnexpectedResponse(
                f"the Call resource does not validate: {_problem(exc)}",
                account_id=account_id,
                path=path,
                status=200,
            ) from None
        if call.callId != call_id:
            raise UnexpectedResponse(
                "the answer is another call's resource",
                account_id=account_id,
                path=path,
                status=200,
            )
        return FetchedCall(body, data, call)

    async def list_calls(
        self,
        account_id: str,
        *,
        active: bool | None = None,
        status: CallStatus | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        to: str | None = None,
        from_: str | None = None,
        parent_call_id: str | None = None,
        application_ids: tuple[str, ...] = (),
    ) -> AsyncIterator[FetchedCall | InvalidCall]:
        """``GET /Accounts/{account_id}/Calls`` with the filters given, then every page its
        ``nextPageUri`` leads to, one call at a time. A page is fetched only when the
        caller has taken the previous one's calls, so stopping early costs nothing more."""
        path = f"/Accounts/{self._account(account_id)}/Calls"
        query = call_filters(
            active=active,
            status=status,
            start_time=start_time,
            end_time=end_time,
            to=to,
            from_=from_,
            parent_call_id=parent_call_id,
            application_ids=application_ids,
        )
        next_path: str | None = f"{path}?{urlencode(query)}" if query else path
        while next_path is not None:
            body = await self._get("list_calls", account_id, next_path)
            raw = self._json(body, _PAGE_MAX_DEPTH, account_id, next_path)
            try:
                page = _Page.model_validate(raw)
            except pydantic.ValidationError as exc:
                raise UnexpectedResponse(
                    f"not a page of calls: {_problem(exc)}",
                    account_id=account_id,
                    path=next_path,
                    status=200,
                ) from None
            for data in page.calls:
                item = _encode(data)
                try:
                    call = _validate(data, account_id)
                except (pydantic.ValidationError, ValueError) as exc:
                    metrics.FREECLIMB_API_INVALID_CALLS.inc()
                    yield InvalidCall(item, data, _problem(exc))
                    continue
                yield FetchedCall(item, data, call)
            next_path = self._next_path(page.nextPageUri, account_id, next_path)

    # --- plumbing -------------------------------------------------------------------

    def _account(self, account_id: str) -> str:
        if _ACCOUNT_ID.fullmatch(account_id) is None:
            raise ValueError("an account id is AC followed by 40 hex digits")
        return account_id

    def _next_path(self, uri: str | None, account_id: str, path: str) -> str | None:
        """The path (relative to the base URL) of the next page, or None at the end. The
        documented form is relative to /apiserver; an absolute URL is followed only when
        it is on the base URL, so the account's credentials never go anywhere else."""
        if not uri:
            return None
        if uri.startswith(self._base + "/"):
            uri = uri[len(self._base) :]
        if not uri.startswith("/") or uri.startswith("//") or "\\" in uri:
            raise UnexpectedResponse(
                "nextPageUri does not point into the API",
                account_id=account_id,
                path=path,
                status=200,
            )
        return uri

    def _json(self, body: bytes, depth: int, account_id: str, path: str) -> Any:
        try:
            return strictjson.parse(body, depth)
        except (strictjson.NotJson, strictjson.DuplicateKey, strictjson.TooDeep) as exc:
            raise UnexpectedResponse(
                f"the answer is not the JSON documented ({type(exc).__name__})",
                account_id=account_id,
                path=path,
                status=200,
            ) from None

    async def _get(self, operation: str, account_id: str, path: str) -> bytes:
        """One GET with its retries; the 200's body, or a typed error."""
        gate = self._gates.get(account_id)
        if gate is None:
            raise NoCredentials(
                "no API key is configured for this account",
                account_id=account_id,
                path=path,
                status=None,
            )
        opts = self.options
        retry: _Retry | None = None
        for attempt in range(opts.max_retries + 1):
            if retry is not None:
                delay = retry_delay(
                    attempt - 1,
                    self._rng.random(),
                    retry.retry_after,
                    first=opts.backoff_first,
                    cap=opts.backoff_cap,
                )
                metrics.FREECLIMB_API_RETRIES.labels(operation, retry.reason).inc()
                log.info(
                    "freeclimb_api_retry",
                    account_id=account_id,
                    path=_path_only(path),
                    code=retry.code,
                    attempt=attempt,
                    delay=round(delay, 3),
                )
                if retry.status == 429:
                    # The account is over its rate: hold all of its requests, not just this.
                    gate.resume_at = max(gate.resume_at, self._clock() + delay)
                else:
                    await self._sleep(delay)
            while (wait := gate.resume_at - self._clock()) > 0:
                await self._sleep(wait)
            async with gate.slots:
                answer = await self._attempt(operation, gate, account_id, path)
            if isinstance(answer, _Retry):
                retry = answer
                self._count(
                    operation, retry.code, "retried" if attempt < opts.max_retries else "failed"
                )
                continue
            code = str(answer.status)
            if answer.status == 200:
                self._count(operation, code, "ok")
                return answer.body
            if answer.status == 429 or answer.status >= 500:
                retry_after = parse_retry_after(answer.retry_after, self._now())
                retry = _Retry(
                    code,
                    "rate_limited" if answer.status == 429 else "server_error",
                    answer.status,
                    retry_after,
                )
                last = attempt == opts.max_retries
                if retry_after is not None and retry_after > opts.max_retry_after:
                    self._count(operation, code, "failed")
                    raise RetriesExhausted(
                        f"HTTP {answer.status} asking to wait {retry_after:.0f} s, longer "
                        f"than {opts.max_retry_after:.0f} s",
                        account_id=account_id,
                        path=path,
                        status=answer.status,
                        attempts=attempt + 1,
                        retry_after=retry_after,
                    )
                self._count(operation, code, "failed" if last else "retried")
                continue
            self._count(operation, code, "not_found" if answer.status == 404 else "failed")
            raise self._refused(answer.status, operation, account_id, path)
        assert retry is not None
        log.warning(
            "freeclimb_api_gave_up",
            account_id=account_id,
            path=_path_only(path),
            code=retry.code,
            attempts=opts.max_retries + 1,
        )
        raise RetriesExhausted(
            f"{retry.code} after {opts.max_retries + 1} attempts",
            account_id=account_id,
            path=path,
            status=retry.status,
            attempts=opts.max_retries + 1,
            retry_after=retry.retry_after,
        )

    async def _attempt(
        self,
        operation: str,
        gate: _Gate,
        account_id: str,
        path: str,
    ) -> _Answer | _Retry:
        """One request: its answer, or what to retry after a timeout or transport error."""
        started = self._clock()
        try:
            async with asyncio.timeout(self.options.timeout):
                async with self._http.stream(
                    "GET",
                    self._base + path,
                    headers={"Authorization": gate.authorization.get_secret_value()},
                ) as response:
                    body = await self._read(response, account_id, path)
                    return _Answer(response.status_code, body, response.headers.get("retry-after"))
        except (TimeoutError, httpx.TimeoutException):
            return _Retry("timeout", "timeout", None)
        except httpx.TransportError as exc:
            log.info(
                "freeclimb_api_transport_error",
                account_id=account_id,
                path=_path_only(path),
                error=type(exc).__name__,
            )
            return _Retry("transport", "transport", None)
        finally:
            metrics.FREECLIMB_API_SECONDS.labels(operation).observe(self._clock() - started)

    async def _read(self, response: httpx.Response, account_id: str, path: str) -> bytes:
        limit = self.options.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise UnexpectedResponse(
                    f"the answer is larger than {limit} bytes",
                    account_id=account_id,
                    path=path,
                    status=response.status_code,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _count(self, operation: str, code: str, outcome: str) -> None:
        metrics.FREECLIMB_API_REQUESTS.labels(operation, code, outcome).inc()

    def _refused(self, status: int, operation: str, account_id: str, path: str) -> FreeClimbError:
        log.warning(
            "freeclimb_api_refused",
            operation=operation,
            account_id=account_id,
            path=_path_only(path),
            status=status,
        )
        kind: type[FreeClimbError] = UnexpectedResponse
        message = f"HTTP {status}"
        if status == 401:
            kind, message = Unauthorized, "HTTP 401: the account id and API key were refused"
        elif status == 403:
            kind, message = Forbidden, "HTTP 403: these credentials may not read this"
        elif status == 404 and operation == "get_call":
            kind, message = CallNotFound, "HTTP 404: no such call"
        return kind(message, account_id=account_id, path=path, status=status)


def _path_only(path: str) -> str:
    # A next-page URI carries the filters, phone numbers among them: keep them out of logs.
    return path.partition("?")[0]
