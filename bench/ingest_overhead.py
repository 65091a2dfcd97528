"""How much the ingest handler costs next to a bare Starlette endpoint, in process.

Drives both ASGI apps directly (no sockets, no Kafka: the publisher returns at once),
with a realistic signed webhook, and prints microseconds per request and the ratio.
It measures our per-event work: size cap, HMAC, one JSON parse, validation, encoding,
metrics and the JSON access-log line. ``make bench`` runs it as one of its figures
(``python -m bench.ingest_overhead [N]`` prints one JSON object).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from service import logs
from service.app import create_app
from service.settings import Settings
from service.signature import sign

SECRET = "sigsec_" + "0" * 40
BODY = json.dumps(
    {
        "requestType": "callStatus",
        "callId": "CA" + "a" * 40,
        "accountId": "AC" + "b" * 40,
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


async def per_request_us(app: ASGIApp, n: int) -> float:
    header = sign(SECRET, int(time.time()), BODY).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/call-status", "raw_path": b"/v1/call-status",
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

    start = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    elapsed = time.perf_counter() - start
    assert set(statuses) == {202}, set(statuses)
    return elapsed / n * 1e6


async def main(n: int = 20000) -> dict[str, float]:
    logs.configure("INFO", "json")
    settings = Settings.model_validate({"signing_secrets": (SECRET,)})
    ours = create_app(settings, InstantPublisher())
    baseline = Starlette(routes=[Route("/v1/call-status", bare, methods=["POST"])])
    await per_request_us(ours, 500)  # warm up
    await per_request_us(baseline, 500)
    b = min([await per_request_us(baseline, n) for _ in range(3)])
    o = min([await per_request_us(ours, n) for _ in range(3)])
    return {"bare_us": b, "ingest_us": o}


if __name__ == "__main__":
    # The access log goes to /dev/null: rendering it is part of the cost we measure.
    with open(os.devnull, "w") as devnull:
        sys.stderr = devnull
        result = asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
    print(json.dumps(result), file=sys.stdout)
