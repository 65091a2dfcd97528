"""What the benchmark sends: signed, unique webhook bodies as vegeta targets and as raw
requests for wrk, and realistic call lifecycles for the processor (duplicates, late
steps, reordering).

The bodies are service/traffic.py's FreeClimb callbacks; the lifecycles' mix of faults
is the benchmark's own and stays fixed, because the processor figures of bench/README
are measured over it (``callstatus simulate``'s shares are a user's to choose). Their
outcomes are predicted by the one oracle, service/oracle.py, through testkit."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

from schemas.call import CallStatus
from service.traffic import callback_body
from testkit import Event, make_call

# The signing secret every server under test holds; the benchmark's only secret.
SECRET = "sigsec_bench_" + "0" * 32
# The one account every body is for (the servers' accounts file holds it with SECRET).
ACCOUNT_ID = "AC" + "5" * 40
S = CallStatus

# Final steps of real calls, with their rough shares of traffic.
_ENDINGS: list[tuple[list[CallStatus], float]] = [
    ([S.QUEUED, S.RINGING, S.IN_PROGRESS, S.COMPLETED], 0.6),
    ([S.QUEUED, S.RINGING, S.NO_ANSWER], 0.15),
    ([S.QUEUED, S.RINGING, S.BUSY], 0.1),
    ([S.QUEUED, S.CANCELED], 0.1),
    ([S.QUEUED, S.FAILED], 0.05),
]


def call_id(salt: str, n: int) -> str:
    """A valid, unique callId: CA + 40 hex digits (a SHA-1 is exactly 40)."""
    return "CA" + hashlib.sha1(f"{salt}:{n}".encode(), usedforsecurity=False).hexdigest()


def webhook_body(cid: str, status: CallStatus, n: int) -> bytes:
    """A FreeClimb status callback as FreeClimb sends it, about 400 bytes."""
    return callback_body(
        "callStatus",
        cid,
        ACCOUNT_ID,
        status,
        "outboundAPI",
        (f"+1312{n % 10_000_000:07d}", "+13125550100"),
        applicationId="AP" + "6" * 40,
        privacyMode=False,
        callStatusReason=None,
    )


def signature_header(timestamp: int, body: bytes) -> str:
    # Same scheme as service/signature.py, inlined: ~50,000 of these are made per second.
    message = str(timestamp).encode() + b"." + body
    digest = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def write_targets(path: Path, url: str, count: int, salt: str, timestamp: int) -> Path:
    """``count`` vegeta JSON targets, each a new call (so each is a first event and
    nothing is a duplicate anywhere), signed at ``timestamp``."""
    statuses = list(CallStatus)
    with path.open("w") as f:
        for n in range(count):
            body = webhook_body(call_id(salt, n), statuses[n % len(statuses)], n)
            target = {
                "method": "POST",
                "url": url,
                "body": base64.b64encode(body).decode(),
                "header": {
                    "Content-Type": ["application/json"],
                    "FreeClimb-Signature": [signature_header(timestamp, body)],
                },
            }
            f.write(json.dumps(target, separators=(",", ":")))
            f.write("\n")
    return path


def write_wrk_requests(
    prefix: Path, host: str, path: str, count: int, files: int, salt: str, timestamp: int
) -> list[Path]:
    """``count`` raw HTTP requests for bench/wrk_post.lua, dealt round-robin over
    ``files`` files (``<prefix>.0``, ``<prefix>.1``: one per wrk thread, so no two
    threads send the same one). Each is a new call (a first event, never a duplicate)
    signed at ``timestamp``. Record format: ``<length>\n<request bytes>``.

    The body of each status is built once with a placeholder callId and the id spliced
    in: a closed loop against the Go peer needs ~300,000 requests per round, and building
    each body afresh (~12 µs) would make generating them a phase of its own."""
    statuses = list(CallStatus)
    placeholder = "CA" + "f" * 40
    templates = [webhook_body(placeholder, status, n) for n, status in enumerate(statuses)]
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n").encode()
    outs = [prefix.with_name(f"{prefix.name}.{k}").open("wb") for k in range(files)]
    try:
        for n in range(count):
            template = templates[n % len(templates)]
            body = template.replace(placeholder.encode(), call_id(salt, n).encode(), 1)
            request = b"".join(
                (
                    head,
                    b"FreeClimb-Signature: ",
                    signature_header(timestamp, body).encode(),
                    b"\r\nContent-Length: ",
                    str(len(body)).encode(),
                    b"\r\n\r\n",
                    body,
                )
            )
            out = outs[n % files]
            out.write(b"%d\n" % len(request))
            out.write(request)
    finally:
        for out in outs:
            out.close()
    return [prefix.with_name(f"{prefix.name}.{k}") for k in range(files)]


def _lifecycle(rng: random.Random) -> list[CallStatus]:
    steps = rng.choices([e for e, _ in _ENDINGS], weights=[w for _, w in _ENDINGS])[0]
    steps = list(steps)
    roll = rng.random()
    if roll < 0.10 and len(steps) > 1:  # a redelivered callback: a duplicate
        i = rng.randrange(len(steps))
        steps.insert(i + 1, steps[i])
    elif roll < 0.18 and len(steps) > 2:  # a late step, after a later one: out_of_order
        i = rng.randrange(len(steps) - 2)
        steps.append(steps[i])
    elif roll < 0.25 and len(steps) > 2:  # two steps swapped in flight
        i = rng.randrange(1, len(steps) - 1)
        steps[i], steps[i + 1] = steps[i + 1], steps[i]
    return steps


def lifecycles(calls: int, seed: int = 10) -> list[Event]:
    """Events of ``calls`` calls, interleaved as concurrent calls interleave on a
    partition, each call's own steps in its (possibly disordered) delivery order."""
    rng = random.Random(seed)
    per_call = [(call_id(f"lifecycle-{seed}", n), _lifecycle(rng)) for n in range(calls)]
    cursors = [0] * calls
    live = list(range(calls))
    events: list[Event] = []
    fields: dict[str, object] = {
        "accountId": ACCOUNT_ID,
        "to": "+13125550100",
        "direction": "outboundAPI",
    }
    while live:
        # Many calls are in flight at once: pick the next step among a window of them.
        i = rng.randrange(min(len(live), 500))
        c = live[i]
        cid, steps = per_call[c]
        status = steps[cursors[c]]
        events.append(
            Event(str(uuid.UUID(int=rng.getrandbits(128))), make_call(cid, status, None, **fields))
        )
        cursors[c] += 1
        if cursors[c] == len(steps):
            live[i] = live[-1]
            live.pop()
    return events


def chunks(items: list[Event], size: int) -> Iterator[list[Event]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
