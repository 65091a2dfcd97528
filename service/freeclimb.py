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

This module is the operations, their retries and the account gates; one send is in
service/freeclimbsend.py, the errors and data types in service/freeclimbtypes.py, the
retry arithmetic in service/freeclimbretry.py, the query and the answers' reading in
service/freeclimbwire.py; their public names are re-exported here, where callers have
always imported them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import urlencode, urlsplit

import httpx
import pydantic
import structlog
from pydantic import SecretStr

from schemas.call import ACCOUNT_ID, CALL_ID, CallStatus
from service import metrics
from service.freeclimbretry import backoff_delay, parse_retry_after, retry_delay
from service.freeclimbsend import Answer as _Answer
from service.freeclimbsend import Request, authorization, send
from service.freeclimbsend import Retry as _Retry
from service.freeclimbtypes import (
    DEFAULT_API_URL,
    CallNotFound,
    ClientOptions,
    Credentials,
    FetchedCall,
    Forbidden,
    FreeClimbError,
    InvalidCall,
    NoCredentials,
    RetriesExhausted,
    Unauthorized,
    UnexpectedResponse,
    path_only,
)
from service.freeclimbwire import (
    call_filters,
    encode_call,
    format_filter_time,
    next_page_path,
    problem,
    read_call_object,
    read_page,
    validate_call,
)

__all__ = [
    "DEFAULT_API_URL",
    "CallNotFound",
    "ClientOptions",
    "Credentials",
    "FetchedCall",
    "Forbidden",
    "FreeClimbClient",
    "FreeClimbError",
    "InvalidCall",
    "NoCredentials",
    "RandomSource",
    "RetriesExhausted",
    "Unauthorized",
    "UnexpectedResponse",
    "backoff_delay",
    "call_filters",
    "format_filter_time",
    "parse_retry_after",
    "retry_delay",
]

log = structlog.get_logger(logger_name="callstatus.freeclimb")


# --- the client ---------------------------------------------------------------------


@dataclass(slots=True)
class _Gate:
    """One account's share of the API: its concurrency slots, and the monotonic time
    before which none of its requests go out (set by a 429's ``Retry-After``)."""

    slots: asyncio.Semaphore
    api_key: SecretStr  # what ``authorization`` was built from, to see a rotation
    authorization: SecretStr
    resume_at: float = 0.0


class RandomSource(Protocol):
    def random(self) -> float: ...


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
        self._gates = {c.account_id: self._gate(c) for c in creds}
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

    def use(self, credentials: Mapping[str, SecretStr]) -> None:
        """Ask with these accounts' keys from the next request on (the accounts file
        reloaded): a rotated key replaces its account's ``Authorization``, a new account
        gets a gate, a removed one loses it. An account whose key is unchanged keeps its
        gate, so a 429's pause and the concurrency bound hold across a reload; a request
        already sent finishes with the key it was sent with."""
        for account_id in self._gates.keys() - credentials.keys():
            del self._gates[account_id]
        for account_id, api_key in credentials.items():
            new = Credentials(account_id, api_key)
            gate = self._gates.get(account_id)
            if gate is None:
                self._gates[account_id] = self._gate(new)
            elif gate.api_key != api_key:
                gate.api_key, gate.authorization = api_key, authorization(new)

    def _gate(self, credentials: Credentials) -> _Gate:
        return _Gate(
            asyncio.Semaphore(self.options.max_concurrency),
            credentials.api_key,
            authorization(credentials),
        )

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
        if CALL_ID.fullmatch(call_id) is None:
            raise ValueError("a call id is CA followed by 40 hex digits")
        path = f"/Accounts/{self._account(account_id)}/Calls/{call_id}"
        body = await self._get("get_call", account_id, path)
        data = read_call_object(body, account_id, path)
        try:
            call = validate_call(data, account_id)
        except (pydantic.ValidationError, ValueError) as exc:
            metrics.FREECLIMB_API_INVALID_CALLS.inc()
            raise UnexpectedResponse(
                f"the Call resource does not validate: {problem(exc)}",
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
            page = read_page(body, account_id, next_path)
            for data in page.calls:
                item = encode_call(data)
                try:
                    call = validate_call(data, account_id)
                except (pydantic.ValidationError, ValueError) as exc:
                    metrics.FREECLIMB_API_INVALID_CALLS.inc()
                    yield InvalidCall(item, data, problem(exc))
                    continue
                yield FetchedCall(item, data, call)
            next_path = next_page_path(page.nextPageUri, self._base, account_id, next_path)

    # --- plumbing -------------------------------------------------------------------

    def _account(self, account_id: str) -> str:
        if ACCOUNT_ID.fullmatch(account_id) is None:
            raise ValueError("an account id is AC followed by 40 hex digits")
        return account_id

    async def _get(self, operation: str, account_id: str, path: str) -> bytes:
        """One GET with its retries; the 200's body, or a typed error."""
        gate = self._gates.get(account_id)
        if gate is None:
            # Failure: no key for this account, so nothing is sent at all.
            raise NoCredentials(
                "no API key is configured for this account",
                account_id=account_id,
                path=path,
                status=None,
            )
        retry: _Retry | None = None
        for attempt in range(self.options.max_retries + 1):
            if retry is not None:
                await self._pause(operation, gate, account_id, path, retry, attempt)
            while (wait := gate.resume_at - self._clock()) > 0:
                await self._sleep(wait)  # the account is held back by a 429's pause
            async with gate.slots:
                answer = await self._attempt(operation, gate, account_id, path)
            outcome = self._judge(operation, answer, attempt, account_id, path)
            if isinstance(outcome, bytes):
                return outcome
            retry = outcome
        assert retry is not None
        # Failure: still a 429, a 5xx, a timeout or a transport error after the last send.
        raise self._gave_up(retry, account_id, path)

    async def _pause(
        self,
        operation: str,
        gate: _Gate,
        account_id: str,
        path: str,
        retry: _Retry,
        attempt: int,
    ) -> None:
        """The wait before send number ``attempt`` (1 for the first retry), after ``retry``."""
        opts = self.options
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
            path=path_only(path),
            code=retry.code,
            attempt=attempt,
            delay=round(delay, 3),
        )
        if retry.status == 429:
            # The account is over its rate: hold all of its requests, not just this.
            gate.resume_at = max(gate.resume_at, self._clock() + delay)
        else:
            await self._sleep(delay)

    def _judge(
        self,
        operation: str,
        answer: _Answer | _Retry,
        attempt: int,
        account_id: str,
        path: str,
    ) -> bytes | _Retry:
        """What one send's outcome means: the 200's body, what to retry, or a typed error;
        each counted once in the requests metric."""
        last = attempt == self.options.max_retries
        if isinstance(answer, _Retry):
            # Failure, retried: a timeout or a transport error.
            self._count(operation, answer.code, "failed" if last else "retried")
            return answer
        code = str(answer.status)
        if answer.status == 200:
            self._count(operation, code, "ok")
            return answer.body
        if answer.status == 429 or answer.status >= 500:
            # Failure, retried: the API is over its rate or unwell, and may recover.
            return self._overloaded(operation, answer, attempt, account_id, path)
        # Failure, not retried: 401, 403, 404 or another answer that a resend won't change.
        self._count(operation, code, "not_found" if answer.status == 404 else "failed")
        raise self._refused(answer.status, operation, account_id, path)

    def _overloaded(
        self,
        operation: str,
        answer: _Answer,
        attempt: int,
        account_id: str,
        path: str,
    ) -> _Retry:
        """A 429 or a 5xx: what to retry, unless its ``Retry-After`` is too long to wait."""
        opts = self.options
        code = str(answer.status)
        retry_after = parse_retry_after(answer.retry_after, self._now())
        if retry_after is not None and retry_after > opts.max_retry_after:
            # Failure, at once: waiting that long is the caller's next round's business.
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
        self._count(operation, code, "failed" if attempt == opts.max_retries else "retried")
        reason = "rate_limited" if answer.status == 429 else "server_error"
        return _Retry(code, reason, answer.status, retry_after)

    def _gave_up(self, retry: _Retry, account_id: str, path: str) -> RetriesExhausted:
        attempts = self.options.max_retries + 1
        log.warning(
            "freeclimb_api_gave_up",
            account_id=account_id,
            path=path_only(path),
            code=retry.code,
            attempts=attempts,
        )
        return RetriesExhausted(
            f"{retry.code} after {attempts} attempts",
            account_id=account_id,
            path=path,
            status=retry.status,
            attempts=attempts,
            retry_after=retry.retry_after,
        )

    async def _attempt(
        self, operation: str, gate: _Gate, account_id: str, path: str
    ) -> _Answer | _Retry:
        """One send, under the gate's slot the caller holds."""
        request = Request(operation, account_id, path, self._base + path, gate.authorization)
        return await send(
            self._http,
            request,
            seconds=self.options.timeout,
            max_body_bytes=self.options.max_body_bytes,
            clock=self._clock,
        )

    def _count(self, operation: str, code: str, outcome: str) -> None:
        metrics.FREECLIMB_API_REQUESTS.labels(operation, code, outcome).inc()

    def _refused(self, status: int, operation: str, account_id: str, path: str) -> FreeClimbError:
        log.warning(
            "freeclimb_api_refused",
            operation=operation,
            account_id=account_id,
            path=path_only(path),
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
