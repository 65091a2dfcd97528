"""The HTTP API with accounts, without a broker: the account path, the binding of a body
to the account whose secret verified it, and each refusal that binding adds.

A refused request meets a publisher that fails the test if it is ever reached; an
accepted one meets ``Capture``. The accounts come from a book given to the app, as the
server gives its watcher's.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from starlette.types import Message

from service.accountbook import Account, AccountBook, shorthand_book
from service.accounts import StaticAccounts
from service.app import create_app
from service.binding import claimed_account
from service.signature import sign
from tests.conftest import SECRET, make_settings
from tests.test_http import WEBHOOK, Capture, MustNotPublish, assert_problem

A = "AC" + "a1" * 20
B = "AC" + "b2" * 20
C = "AC" + "c3" * 20  # configured nowhere
A_OLD, A_NEW = "sigsec_a_old_" + "1" * 20, "sigsec_a_new_" + "2" * 20
B_SECRET = "sigsec_b_" + "3" * 20
BOOK = AccountBook(
    [
        Account(A, (SecretStr(A_NEW), SecretStr(A_OLD))),
        Account(B, (SecretStr(B_SECRET),)),
    ]
)
PROBLEM = "urn:callstatus:problem:"


def body_for(account: str | None, **extra: Any) -> bytes:
    fields = {**WEBHOOK, **extra}
    if account is None:
        del fields["accountId"]
    else:
        fields["accountId"] = account
    return json.dumps(fields).encode()


JSON = {"content-type": "application/json"}


def signed(body: bytes, secret: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "FreeClimb-Signature": sign(secret, int(time.time()), body),
    }


def account_count(account: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "callstatus_account_requests_total", {"account": account, "outcome": outcome}
    )
    return value or 0.0


class Source:
    """A book that a test can swap, counting how often the handler reads it."""

    def __init__(self, book: AccountBook) -> None:
        self.current = book
        self.reads = 0

    @property
    def book(self) -> AccountBook:
        self.reads += 1
        return self.current

    async def run(self) -> None:
        """Nothing to watch."""


def client_for(publisher: Any, book: AccountBook = BOOK, **settings: Any) -> httpx.AsyncClient:
    app = create_app(make_settings(**settings), publisher, accounts=StaticAccounts(book))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def refusing() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(MustNotPublish()) as c:
        yield c


# --------------------------------------------------------------------- accepted


@pytest.mark.parametrize("path", [f"/v1/call-status/{A}", "/v1/call-status"])
@pytest.mark.parametrize("secret", [A_NEW, A_OLD])
async def test_each_secret_of_the_account_is_accepted_on_both_paths(path: str, secret: str) -> None:
    capture = Capture()
    before = account_count(A, "accepted")
    async with client_for(capture) as c:
        body = body_for(A)
        response = await c.post(path, content=body, headers=signed(body, secret))
    assert response.status_code == 202, response.text
    [(_, value, _)] = capture.records
    assert body in value  # the raw body, spliced in
    assert account_count(A, "accepted") == before + 1


async def test_the_account_path_takes_the_id_in_either_case_and_a_body_without_one() -> None:
    capture = Capture()
    async with client_for(capture) as c:
        body = body_for(None)
        upper = "AC" + A[2:].upper()
        response = await c.post(
            f"/v1/call-status/{upper}", content=body, headers=signed(body, A_NEW)
        )
        assert response.status_code == 202, response.text
        body = body_for(upper, callStatus="ringing")
        response = await c.post(f"/v1/call-status/{A}", content=body, headers=signed(body, A_NEW))
        assert response.status_code == 202, response.text
    assert len(capture.records) == 2


async def test_the_account_path_is_its_own_route_in_the_metrics() -> None:
    async with client_for(Capture()) as c:
        body = body_for(A)
        await c.post(f"/v1/call-status/{A}", content=body, headers=signed(body, A_NEW))
        text = (await c.get("/metrics")).text
    assert 'route="/v1/call-status/{accountId}"' in text
    assert A not in text.replace(f'account="{A}"', "")  # in the account label only


# --------------------------------------------------------------------- refused


async def test_spoofing_another_account_on_its_path_is_403(refusing: httpx.AsyncClient) -> None:
    # A's secret, A's path, a body claiming B: the signature is good, the claim is not.
    body = body_for(B)
    before = account_count(A, "account_mismatch")
    response = await refusing.post(
        f"/v1/call-status/{A}", content=body, headers=signed(body, A_NEW)
    )
    problem = assert_problem(response, 403)
    assert problem["type"] == PROBLEM + "account-mismatch"
    assert B in str(problem["detail"])
    assert account_count(A, "account_mismatch") == before + 1


async def test_spoofing_another_account_without_the_path_is_401(
    refusing: httpx.AsyncClient,
) -> None:
    # The body claims B, so only B's secrets are tried (one account's HMACs, never all
    # accounts'): A's signature is simply not B's. Counted for B, the claimed account.
    body = body_for(B)
    before = account_count(B, "signature_mismatch")
    response = await refusing.post("/v1/call-status", content=body, headers=signed(body, A_NEW))
    problem = assert_problem(response, 401)
    assert problem["type"] == PROBLEM + "invalid-signature"
    assert "mismatch" in str(problem["detail"])
    assert account_count(B, "signature_mismatch") == before + 1
    # And on B's path, A's secret is no better.
    response = await refusing.post(
        f"/v1/call-status/{B}", content=body, headers=signed(body, A_NEW)
    )
    assert assert_problem(response, 401)["type"] == PROBLEM + "invalid-signature"


async def test_an_accountid_nested_elsewhere_cannot_stand_for_the_body(
    refusing: httpx.AsyncClient,
) -> None:
    # The raw scan finds B first (in a nested object) and B's secret verifies it, but
    # the body itself claims A: the parse decides, and refuses.
    fields = {"extra": {"accountId": B}, **{k: v for k, v in WEBHOOK.items()}}
    fields["accountId"] = A
    body = json.dumps(fields).encode()
    assert claimed_account(body) == B
    response = await refusing.post("/v1/call-status", content=body, headers=signed(body, B_SECRET))
    assert assert_problem(response, 403)["type"] == PROBLEM + "account-mismatch"


async def test_an_unknown_account_on_the_path_is_refused_before_the_body_is_read() -> None:
    app = create_app(make_settings(), MustNotPublish(), accounts=StaticAccounts(BOOK))
    body = body_for(C)
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body was read")

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(k.lower().encode(), v.encode()) for k, v in signed(body, A_NEW).items()]
    path = f"/v1/call-status/{C}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    before = account_count("unknown", "unknown_account")
    await app(scope, receive, send)
    assert sent[0]["status"] == 403
    problem = json.loads(sent[1]["body"])
    assert problem["type"] == PROBLEM + "unknown-account"
    assert C in problem["detail"]
    assert A not in problem["detail"] and B not in problem["detail"]  # never the configured
    assert account_count("unknown", "unknown_account") == before + 1
    # No series for the id a request made up.
    assert (
        REGISTRY.get_sample_value(
            "callstatus_account_requests_total", {"account": C, "outcome": "unknown_account"}
        )
        is None
    )


async def test_an_unknown_account_in_the_body_is_403(refusing: httpx.AsyncClient) -> None:
    body = body_for(C)
    response = await refusing.post("/v1/call-status", content=body, headers=signed(body, A_NEW))
    problem = assert_problem(response, 403)
    assert problem["type"] == PROBLEM + "unknown-account"
    assert C in str(problem["detail"]) and A not in str(problem["detail"])


@pytest.mark.parametrize(
    "body",
    [
        body_for(None),
        body_for(""),
        body_for("not-an-account"),
        b'{"accountId": 42}',
        b"{not json",
    ],
)
async def test_a_body_naming_no_account_is_401_without_the_path(
    refusing: httpx.AsyncClient, body: bytes
) -> None:
    # No account's secret can verify it, and the parser never sees unauthenticated input.
    response = await refusing.post("/v1/call-status", content=body, headers=signed(body, A_NEW))
    problem = assert_problem(response, 401)
    assert problem["type"] == PROBLEM + "invalid-signature"
    assert "no_account" in str(problem["detail"])


@pytest.mark.parametrize(
    "segment",
    ["", "AC123", "AC" + "g" * 40, "ac" + "a" * 40, A + "/extra", A + "0"],
)
async def test_a_path_segment_that_is_no_account_id_is_404(
    refusing: httpx.AsyncClient, segment: str
) -> None:
    body = body_for(A)
    response = await refusing.post(
        f"/v1/call-status/{segment}", content=body, headers=signed(body, A_NEW)
    )
    assert assert_problem(response, 404)["type"] == PROBLEM + "not-an-account-id"


@pytest.mark.parametrize("path", [f"/v1/call-status/{A}", "/v1/call-status"])
async def test_other_methods_are_405_on_both_paths(refusing: httpx.AsyncClient, path: str) -> None:
    response = await refusing.get(path)
    assert_problem(response, 405)
    assert response.headers["allow"] == "POST"


async def test_a_replay_is_answered_only_for_the_account_it_was_stored_for() -> None:
    capture = Capture()
    async with client_for(capture) as c:
        body = body_for(A)
        first = await c.post(f"/v1/call-status/{A}", content=body, headers=signed(body, A_NEW))
        assert first.status_code == 202
        again = await c.post("/v1/call-status", content=body, headers=signed(body, A_OLD))
        assert again.json() == first.json()  # replayed: the same answer, nothing written
        assert len(capture.records) == 1
        # The same bytes, signed by B on B's path: judged afresh, not answered from cache.
        spoof = await c.post(f"/v1/call-status/{B}", content=body, headers=signed(body, B_SECRET))
    assert assert_problem(spoof, 403)["type"] == PROBLEM + "account-mismatch"
    assert len(capture.records) == 1


async def test_a_replay_stored_for_an_account_is_not_answered_for_no_account() -> None:
    # Signatures off: the account path binds the body to the path's account, the plain
    # path to none. The same bytes on the plain path after the account path are judged
    # afresh, and answered with their own callId, not with the first answer's prefix.
    capture = Capture()
    async with client_for(capture, AccountBook(), verify_signatures=False) as c:
        body = body_for(A)
        first = await c.post(f"/v1/call-status/{A}", content=body, headers=JSON)
        plain = await c.post("/v1/call-status", content=body, headers=JSON)
        again = await c.post("/v1/call-status", content=body, headers=JSON)
    assert first.status_code == plain.status_code == again.status_code == 202
    assert plain.json() == again.json() == first.json()
    assert plain.json()["callId"].startswith("CA")
    assert len(capture.records) == 2  # the plain path's first was stored, its repeat not


# ------------------------------------------------------------------- snapshots


async def test_the_book_is_read_once_and_a_swap_mid_request_does_not_refuse_it() -> None:
    source = Source(BOOK)
    capture = Capture()
    app = create_app(make_settings(), capture, accounts=source)
    body = body_for(A)
    rotated = AccountBook([Account(A, (SecretStr("sigsec_other_" + "9" * 20),))])

    async def receive() -> Message:
        # The file is swapped while the body is on its way: the request keeps the book
        # it started with, whose secrets verify it.
        source.current = rotated
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(k.lower().encode(), v.encode()) for k, v in signed(body, A_OLD).items()]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/call-status",
        "raw_path": b"/v1/call-status",
        "query_string": b"",
        "headers": headers,
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 202
    assert source.reads == 1
    assert len(capture.records) == 1


# ------------------------------------------------------------------- shorthand


async def test_the_unbound_shorthand_takes_any_account_as_before() -> None:
    capture = Capture()
    book = shorthand_book((SecretStr(SECRET),), None)
    before = account_count("default", "accepted")
    async with client_for(capture, book) as c:
        for account in (A, C, None):
            body = body_for(account)
            response = await c.post("/v1/call-status", content=body, headers=signed(body, SECRET))
            assert response.status_code == 202, response.text
        # The account path binds the body to the path's account, even so.
        body = body_for(C, callStatus="ringing")
        ok = await c.post(f"/v1/call-status/{C}", content=body, headers=signed(body, SECRET))
        assert ok.status_code == 202
        other = await c.post(f"/v1/call-status/{A}", content=body, headers=signed(body, SECRET))
    assert assert_problem(other, 403)["type"] == PROBLEM + "account-mismatch"
    assert len(capture.records) == 4
    assert account_count("default", "accepted") == before + 4


async def test_the_bound_shorthand_is_one_account() -> None:
    book = shorthand_book((SecretStr(SECRET),), A)
    async with client_for(MustNotPublish(), book) as c:
        body = body_for(B)
        response = await c.post("/v1/call-status", content=body, headers=signed(body, SECRET))
    assert assert_problem(response, 403)["type"] == PROBLEM + "unknown-account"


async def test_unverified_local_play_still_binds_the_path() -> None:
    capture = Capture()
    async with client_for(capture, AccountBook(), verify_signatures=False) as c:
        body = body_for(B)
        headers = {"content-type": "application/json"}
        assert (await c.post("/v1/call-status", content=body, headers=headers)).status_code == 202
        refused = await c.post(f"/v1/call-status/{A}", content=body, headers=headers)
    assert assert_problem(refused, 403)["type"] == PROBLEM + "account-mismatch"
    assert len(capture.records) == 1


# ------------------------------------------------------------------- the scan


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        (f'{{"accountId":"{A}"}}'.encode(), A),
        (f'{{ "accountId" \n:\t "{A}" }}'.encode(), A),
        (f'{{"x":"accountId","accountId":"{B}"}}'.encode(), B),  # a value first, then the key
        (f'{{"from":"\\"accountId\\":\\"{B}\\"","accountId":"{A}"}}'.encode(), A),  # escaped
        (b'{"accountId":"AC12"}', None),
        (b'{"accountId":null}', None),
        (b'{"accountId"', None),
        (b"", None),
    ],
)
def test_the_claimed_account_scan(raw: bytes, found: str | None) -> None:
    assert claimed_account(raw) == found


async def test_per_account_outcomes_name_only_configured_accounts() -> None:
    # Before the body is read the claim of /v1/call-status is not known: `unknown`; the
    # account path's is, once looked up; the unbound shorthand's is always `default`.
    body = body_for(A)
    unsigned = {"content-type": "application/json"}
    before = (
        account_count("unknown", "signature_missing"),
        account_count(A, "signature_missing"),
        account_count("default", "signature_missing"),
    )
    async with client_for(MustNotPublish()) as c:
        await c.post("/v1/call-status", content=body, headers=unsigned)
        await c.post(f"/v1/call-status/{A}", content=body, headers=unsigned)
    async with client_for(MustNotPublish(), shorthand_book((SecretStr(SECRET),), None)) as c:
        await c.post("/v1/call-status", content=body, headers=unsigned)
    after = (
        account_count("unknown", "signature_missing"),
        account_count(A, "signature_missing"),
        account_count("default", "signature_missing"),
    )
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)
