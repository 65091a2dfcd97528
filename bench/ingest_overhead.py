"""How much the ingest handler costs next to a bare Starlette endpoint, in process.

Drives both ASGI apps directly (no sockets, no Kafka: the publisher returns at once),
with a realistic signed webhook, and prints microseconds per request and the ratio.
It measures our per-event work: size cap, HMAC, one JSON parse, validation, encoding,
metrics and the JSON access-log line. ``make bench`` runs it as one of its figures
(``python -m bench.ingest_overhead [N]`` prints one JSON object).

It also measures the handler's CPU per request (process time) with a book of 1 account
and of 1,000 accounts, in the same run and in alternating rounds, on both ingest paths:
the account is looked up in O(1) and only its own secrets are tried, so the two must be
equal within the noise (issue 18). Each account has two secrets (a rotation) and the
request is signed with the second, so both HMACs run: one account's worst case.
``python -m bench.ingest_overhead --accounts [N]`` measures only that.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from service import logs
from service.accountbook import Account, AccountBook
from service.accounts import StaticAccounts
from service.app import create_app
from service.settings import Settings
from service.signature import sign

SECRET = "sigsec_" + "0" * 40
ACCOUNT_ID = "AC" + "b" * 40  # the body's
BODY = json.dumps(
    {
        "requestType": "callStatus",
        "callId": "CA" + "a" * 40,
        "accountId": ACCOUNT_ID,
        "callStatus": "completed",
        "direction": "inbound",
        "from": "+13121000109",
        "to": "+13121000096",
        "conferenceId": None,
        "queueId": None,
    }
).encode()


class InstantPublisher:
    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        return None

    async def ready(self) -> bool:
        return True


async def bare(request: Request) -> Response:
    await request.body()
    return Response(b'{"ok":true}', status_code=202, media_type="application/json")


async def per_request_us(
    app: ASGIApp,
    n: int,
    path: str = "/v1/call-status",
    secret: str = SECRET,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Microseconds per request by ``clock``: wall time, or CPU with process_time."""
    header = sign(secret, int(time.time()), BODY).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8080), "state": {},
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"freeclimb-signature", header),
        ],
    }  # fmt: skip
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = clock()
    for _ in range(n):
        await app(dict(scope), receive, send)
    elapsed = clock() - start
    assert set(statuses) == {202}, set(statuses)
    return elapsed / n * 1e6


ROTATED = "sigsec_" + "1" * 40  # every account's second secret: the one signing


def book_of(accounts: int) -> AccountBook:
    """``accounts`` accounts of two secrets each, the body's among them (in the middle)."""
    ids = ["AC" + f"{i:040x}" for i in range(accounts - 1)]
    ids.insert(len(ids) // 2, ACCOUNT_ID)
    return AccountBook(
        [Account(i, (SecretStr(f"sigsec_{i[2:]}"), SecretStr(ROTATED))) for i in ids]
    )


async def accounts_cost(n: int, rounds: int = 5) -> dict[str, float]:
    """CPU µs per request (best of ``rounds``, alternating) with 1 and 1,000 accounts,
    on ``/v1/call-status`` (the body's accountId found in the raw bytes) and on
    ``/v1/call-status/{accountId}``."""
    # The shorthand's secret only lets the settings validate: the book judges.
    settings = Settings.model_validate({"signing_secrets": (SECRET,)})
    apps = {
        size: create_app(settings, InstantPublisher(), accounts=StaticAccounts(book_of(size)))
        for size in (1, 1000)
    }
    paths = {"body": "/v1/call-status", "path": f"/v1/call-status/{ACCOUNT_ID}"}
    best: dict[str, float] = {}
    for round_ in range(rounds + 1):  # the first is the warm-up
        for size, app in apps.items():
            for kind, path in paths.items():
                cpu = await per_request_us(
                    app, n if round_ else 500, path, ROTATED, time.process_time
                )
                if round_:
                    key = f"accounts_{size}_{kind}_cpu_us"
                    best[key] = min(best.get(key, cpu), cpu)
    return best


async def main(n: int = 20000, only_accounts: bool = False) -> dict[str, float]:
    logs.configure("INFO", "json")
    if only_accounts:
        return await accounts_cost(n)
    settings = Settings.model_validate({"signing_secrets": (SECRET,)})
    ours = create_app(settings, InstantPublisher())
    baseline = Starlette(routes=[Route("/v1/call-status", bare, methods=["POST"])])
    await per_request_us(ours, 500)  # warm up
    await per_request_us(baseline, 500)
    b = min([await per_request_us(baseline, n) for _ in range(3)])
    o = min([await per_request_us(ours, n) for _ in range(3)])
    return {"bare_us": b, "ingest_us": o, **await accounts_cost(max(1, n // 4))}


if __name__ == "__main__":
    args = sys.argv[1:]
    only = "--accounts" in args
    counts = [a for a in args if a != "--accounts"]
    # The access log goes to /dev/null: rendering it is part of the cost we measure.
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        result = asyncio.run(main(int(counts[0]) if counts else 20000, only))
    print(json.dumps(result), file=sys.stdout)
