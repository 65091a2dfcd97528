"""A stand-in for FreeClimb's REST API for Calls, for tests and ``callstatus simulate``: an
in-memory set of calls per account, served the way docs/freeclimb.md
(sections 1 and 5) documents them.

- ``GET {base}/Accounts/{accountId}/Calls/{callId}``: one Call resource, 404 if unknown.
- ``GET {base}/Accounts/{accountId}/Calls``: a page (``total start end page numPages
  pageSize nextPageUri calls``) filtered by ``active``, ``status``, ``startTime`` (started
  at or after), ``endTime`` (ended at or before), ``to``, ``from``, ``parentCallId`` and
  ``applicationId`` (repeatable); times as ``YYYY-MM-DD hh:mm:ss`` in GMT, what FreeClimb's
  SDKs document. ``nextPageUri`` is relative to the base, carries an opaque ``cursor``
  (as FreeClimb's does) and is null on the last page.
- HTTP Basic auth, user = account id, password = its API key: 401 without valid
  credentials, 403 for valid credentials of another account.
- Resources: every documented field; ``dateCreated``/``dateUpdated``/``startTime``/
  ``connectTime``/``endTime`` in RFC 1123 GMT, ``dateCreatedISO``/``dateUpdatedISO`` in
  RFC 3339 with milliseconds; times and durations not reached yet are ``""`` (the seed's
  "empty"); ``revision`` is 1 at creation and +1 on every update.

What FreeClimb does not document, the stand-in decides, and says so here: pages hold
calls in creation order; ``page`` and ``start``/``end`` (inclusive) count from 0; an
empty list has ``numPages`` 0; an unparseable filter is a 400; a call has a
``startTime`` from its first status that says it was dialled, so one that failed (or
was busy) straight from queued has one, and one canceled while queued has none
(service/standincalls.py's ``DIALLED``).

Faults on demand: ``throttle_every = N`` answers every Nth request 429 with
``Retry-After: retry_after``; :meth:`StandIn.fail_next` queues any answers (a 503, a 429
with an HTTP-date ``Retry-After``) for the next requests. Both act before authentication,
as an overloaded front end would.

Calls are put and moved on with :meth:`StandIn.put_call` and :meth:`StandIn.advance`;
:func:`serve` runs the app with uvicorn on a real socket (127.0.0.1, port 0 by default).

This module is the accounts, the faults and the HTTP side; the held calls and their
resource are in service/standincalls.py, the list filters and cursor in
service/standinquery.py (their public names re-exported here).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from schemas.call import CallDirection, CallStatus
from service.standincalls import ACTIVE, TERMINAL, HeldCall, millis, rfc1123, rfc3339
from service.standinquery import filters, read_cursor, write_cursor

# Where ``callstatus simulate`` serves the stand-in by default (on 127.0.0.1), and where
# `make run` (``callstatus local-secret``) points CALLSTATUS_FREECLIMB_API_URL.
LOCAL_PORT = 8082


def local_url(port: int = LOCAL_PORT) -> str:
    """The API base URL of a stand-in served on 127.0.0.1:``port``."""
    return f"http://127.0.0.1:{port}/apiserver"


__all__ = [
    "ACTIVE",
    "LOCAL_PORT",
    "TERMINAL",
    "Fault",
    "HeldCall",
    "Seen",
    "StandIn",
    "local_url",
    "rfc1123",
    "rfc3339",
    "serve",
]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the stand-in answered: tests count and inspect them."""

    path: str
    query: str
    status: int
    account_id: str | None  # whose valid credentials it carried, if any


@dataclass(frozen=True, slots=True)
class Fault:
    status: int
    retry_after: str | None = None


@dataclass(slots=True)
class _Account:
    api_key: str
    calls: dict[str, HeldCall] = field(default_factory=dict)  # creation order
    in_flight: int = 0
    max_in_flight: int = 0


class StandIn:
    """The calls of some accounts, and the Starlette app (:attr:`app`) that serves them.

    ``clock`` gives the time of a put or an advance when none is given. ``hold``, when
    set to an :class:`asyncio.Event`, keeps each authenticated request waiting until it is
    set, so a test can see how many a client has in flight at once: ``waiting`` counts
    them (``held`` is notified on each arrival) and :meth:`max_in_flight` keeps the peak.
    """

    def __init__(
        self,
        accounts: Mapping[str, str] | None = None,
        *,
        base_path: str = "/apiserver",
        page_size: int = 100,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.base_path = base_path.rstrip("/")
        self.page_size = page_size
        self.clock = clock
        self.throttle_every = 0
        self.retry_after = "1"
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Condition()  # notified as each request starts waiting on hold
        self.waiting = 0
        self.seen: list[Seen] = []
        self._accounts: dict[str, _Account] = {}
        self._faults: deque[Fault] = deque()
        self._count = 0
        for account_id, key in (accounts or {}).items():
            self.add_account(account_id, key)
        self.app = Starlette(
            routes=[
                Route(f"{self.base_path}/Accounts/{{account_id}}/Calls", self._list),
                Route(f"{self.base_path}/Accounts/{{account_id}}/Calls/{{call_id}}", self._get),
            ]
        )

    # --- the Python side: accounts, calls, faults ------------------------------------

    def add_account(self, account_id: str, api_key: str) -> None:
        self._accounts[account_id] = _Account(api_key)

    def put_call(
        self,
        account_id: str,
        call_id: str,
        status: CallStatus = CallStatus.QUEUED,
        *,
        direction: CallDirection = CallDirection.OUTBOUND_API,
        from_: str = "+13121000109",
        to: str = "+13121000096",
        parent_call_id: str | None = None,
        application_id: str | None = None,
        phone_number_id: str | None = None,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """A new call (revision 1) in ``status``, created ``at``; its resource."""
        account = self._accounts[account_id]
        if call_id in account.calls:
            raise ValueError(f"call {call_id} already exists; advance it instead")
        when = millis(at or self.clock())
        if phone_number_id is None:  # stable per call, so repeated runs agree
            digest = hashlib.sha1(call_id.encode(), usedforsecurity=False).hexdigest()
            phone_number_id = "PN" + digest
        held = HeldCall(
            account_id,
            call_id,
            CallStatus.QUEUED,
            direction,
            from_,
            to,
            created=when,
            updated=when,
            parent_call_id=parent_call_id,
            application_id=application_id,
            phone_number_id=phone_number_id,
        )
        held.reach(status, when)
        account.calls[call_id] = held
        return held.resource()

    def advance(
        self,
        account_id: str,
        call_id: str,
        status: CallStatus,
        *,
        at: datetime | None = None,
        answered_by: str | None = None,
    ) -> dict[str, Any]:
        """Move a call on to ``status`` at ``at`` (an update: revision + 1); its resource.
        A call that has ended does not change any more."""
        held = self._accounts[account_id].calls[call_id]
        if held.status in TERMINAL:
            raise ValueError(f"call {call_id} has ended ({held.status}); it does not change")
        when = millis(at or self.clock())
        if when < held.updated:
            raise ValueError("a call's updates go forward in time")
        held.reach(status, when)
        if answered_by is not None:
            held.answered_by = answered_by
        held.updated = when
        held.revision += 1
        return held.resource()

    def call(self, account_id: str, call_id: str) -> dict[str, Any]:
        return self._accounts[account_id].calls[call_id].resource()

    def calls(self, account_id: str) -> list[dict[str, Any]]:
        return [held.resource() for held in self._accounts[account_id].calls.values()]

    def max_in_flight(self, account_id: str) -> int:
        return self._accounts[account_id].max_in_flight

    def fail_next(self, status: int, times: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``times`` requests (after those already queued) with ``status``."""
        self._faults.extend([Fault(status, retry_after)] * times)

    # --- the HTTP side ---------------------------------------------------------------

    def _authenticated(self, request: Request) -> str | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        account = self._accounts.get(user)
        if not sep or account is None:
            return None
        if not hmac.compare_digest(password.encode(), account.api_key.encode()):
            return None
        return user

    def _fault(self) -> Fault | None:
        self._count += 1
        if self._faults:
            return self._faults.popleft()
        if self.throttle_every and self._count % self.throttle_every == 0:
            return Fault(429, self.retry_after)
        return None

    async def _answer(
        self, request: Request, handler: Callable[[_Account, str], Response]
    ) -> Response:
        account_id = request.path_params["account_id"]
        fault = self._fault()
        user = self._authenticated(request)
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            response: Response = _error(fault.status, "injected fault", headers)
        elif user is None:
            response = _error(401, "invalid credentials", {"WWW-Authenticate": 'Basic realm="api"'})
        elif user != account_id:
            response = _error(403, "these credentials are for another account")
        else:
            account = self._accounts[user]
            account.in_flight += 1
            account.max_in_flight = max(account.max_in_flight, account.in_flight)
            try:
                if self.hold is not None:
                    async with self.held:
                        self.waiting += 1
                        self.held.notify_all()
                    try:
                        await self.hold.wait()
                    finally:
                        self.waiting -= 1
                response = handler(account, request.url.path)
            finally:
                account.in_flight -= 1
        self.seen.append(Seen(request.url.path, request.url.query, response.status_code, user))
        return response

    async def _get(self, request: Request) -> Response:
        call_id = request.path_params["call_id"]

        def one(account: _Account, _: str) -> Response:
            held = account.calls.get(call_id)
            if held is None:
                return _error(404, "no such call")
            return _json(held.resource())

        return await self._answer(request, one)

    async def _list(self, request: Request) -> Response:
        def page(account: _Account, path: str) -> Response:
            query = list(request.query_params.multi_items())
            cursor = dict(query).get("cursor")
            number = 0
            if cursor is not None:  # the filters of the first request, and a page number
                try:
                    number, query = read_cursor(cursor)
                except ValueError:
                    return _error(400, "invalid cursor")
            try:
                keep = filters(query)
            except ValueError as exc:
                return _error(400, str(exc))
            matching = [held for held in account.calls.values() if keep(held)]
            size = self.page_size
            first = number * size
            calls = [held.resource() for held in matching[first : first + size]]
            pages = math.ceil(len(matching) / size)
            next_uri = None
            if number + 1 < pages:
                next_uri = f"{path.removeprefix(self.base_path)}?" + urlencode(
                    {"cursor": write_cursor(number + 1, query)}
                )
            return _json(
                {
                    "total": len(matching),
                    "start": first,
                    "end": first + len(calls) - 1 if calls else first,
                    "page": number,
                    "numPages": pages,
                    "pageSize": size,
                    "nextPageUri": next_uri,
                    "calls": calls,
                }
            )

        return await self._answer(request, page)


def _json(content: object) -> Response:
    return Response(
        json.dumps(content, separators=(",", ":")).encode(), media_type="application/json"
    )


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    # FreeClimb's error object carries a code and a message; the rest is its business.
    return JSONResponse({"code": status, "message": message}, status, headers=headers)


@contextlib.asynccontextmanager
async def serve(standin: StandIn, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``standin`` with uvicorn on a real socket; yields the API base URL
    (``http://127.0.0.1:<port>/apiserver``). The socket is listening before the server
    task starts, so a request sent at once waits in the backlog instead of failing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    config = uvicorn.Config(standin.app, log_config=None, lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://{host}:{sock.getsockname()[1]}{standin.base_path}"
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()
