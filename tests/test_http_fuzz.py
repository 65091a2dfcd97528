"""Properties of the ingest endpoint under signed bodies, however strange.

1. No body makes it answer 5xx: bodies are JSON values shaped like webhooks and Call
   resources (the known field names with values of any JSON type), plus arbitrary bytes.
2. A 202 is a promise the processor can keep: bodies come from a grammar that includes
   the hostile shapes (NaN and Infinity, numbers past a double, lone surrogates, bytes
   that are not UTF-8, duplicate keys, deep nesting, dates that do not round-trip), and
   every body answered 202 must decode with the processor's own decoder into the same
   Call. Whatever cannot, gets a 4xx.

Both report how many cases they tried at the end of the pytest run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from schemas.messages import IngestEnvelope, IngestEvent, normalise_body, read_ingest
from service.app import create_app
from service.signature import sign
from tests.conftest import SECRET, count_fuzz_case, make_settings

FIELDS = [
    "requestType", "callId", "accountId", "callStatus", "status", "direction", "from", "to",
    "parentCallId", "revision", "dateCreated", "dateUpdated", "dateCreatedISO",
    "dateUpdatedISO", "startTime", "connectTime", "endTime", "duration", "connectDuration",
    "answeredBy", "phoneNumberId", "subresourceUris", "callDuration", "uri", "conferenceId",
]  # fmt: skip

SAMPLES = [
    "",
    "queued",
    "outbound",
    "CA" + "a" * 40,
    "Mon, 15 Jun 2009 20:45:30 GMT",
    "2024-10-09T15:05:03.358Z",
    "9999-12-31T23:59:59-01:00",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(SAMPLES)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
VALID = {
    "requestType": "callStatus",
    "callId": "CA" + "b" * 40,
    "accountId": "AC" + "c" * 40,
    "callStatus": "completed",
    "direction": "inbound",
}
# A valid webhook with a few fields replaced (reaches the 202 path and every validator),
# any object of known fields, or any bytes at all.
near_valid = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2).map(
    lambda changes: {**VALID, **changes}
)
bodies = (near_valid | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=12)).map(
    lambda d: json.dumps(d).encode()
) | st.binary(max_size=200)


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes]] = []

    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        self.records.append((key, value))

    async def ready(self) -> bool:
        return True


RECORDER = Recorder()
# No replay cache: hypothesis repeats bodies, and every 202 must leave its own record here.
APP = create_app(make_settings(replay_cache_entries=0), RECORDER)


async def _post(body: bytes) -> httpx.Response:
    headers = {
        "content-type": "application/json",
        "FreeClimb-Signature": sign(SECRET, int(time.time()), body),
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as c:
        return await c.post("/v1/call-status", content=body, headers=headers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_no_body_makes_the_endpoint_fail(body: bytes) -> None:
    count_fuzz_case("ingest: never a 5xx")
    response = asyncio.run(_post(body))
    event(f"status {response.status_code}")
    assert response.status_code in (202, 400, 422), response.text
    if response.status_code != 202:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == response.status_code


# --- the grammar of hostile bodies ----------------------------------------------------------


def _enc(value: Any) -> bytes:
    return json.dumps(value).encode()


# Fragments written as raw JSON text, so they can be what json.dumps would never write.
HOSTILE = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"-0",
    b"1E5",
    b"0.1",
    b"9" * 400,
    b"9" * 5000,  # past Python's integer digit limit
    b'"\\ud800"',  # a lone surrogate
    b'"\\udc00x"',
    b'"\\ud83d\\ude00"',  # a proper pair
    b'"\\u0000"',
    b'"\xff"',  # not UTF-8
    b'"caf\xc3\xa9"',
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8
    b"true",
    b"null",
    b'""',
]
DATES = (
    st.from_regex(
        r"\A[A-Z][a-z]{2}, [0-3][0-9] (Jan|Feb|Apr|Sep|Dec) (0[0-9]|1[0-9]|20|99)[0-9]{2} "
        r"[0-2][0-9]:[0-5][0-9]:[0-6][0-9] (GMT|UTC|\+0000|-0000)\Z"
    )
    | st.from_regex(
        r"\A(0[0-9]|1[0-9]|20|99)[0-9]{2}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:"
        r"[0-6][0-9](\.[0-9]{1,6})?(Z|z|[+-][0-2][0-9]:[0-5][0-9])?\Z"
    )
    | st.sampled_from(["Mon, 15 Jun 0099 20:45:30 GMT", "0999-01-02T03:04:05.006Z"])
).map(_enc)
KEYS = st.sampled_from(FIELDS) | st.text(max_size=4)
leaves = st.sampled_from(HOSTILE) | json_values.map(_enc) | DATES


def _object(pairs: list[tuple[str, bytes]]) -> bytes:
    return b"{" + b",".join(_enc(k) + b":" + v for k, v in pairs) + b"}"


fragments = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda xs: b"[" + b",".join(xs) + b"]")
        | st.lists(st.tuples(KEYS, inner), max_size=3).map(_object)
    ),
    max_leaves=6,
)


def _nest(fragment: bytes, depth: int, arrays: bool) -> bytes:
    for _ in range(depth):
        fragment = b"[" + fragment + b"]" if arrays else b'{"x":' + fragment + b"}"
    return fragment


# Depths around our cap and around the processor decoder's recursion limit (200).
DEPTHS = st.integers(min_value=0, max_value=40) | st.sampled_from([196, 197, 198, 199, 200, 300])
deep = st.builds(_nest, fragments, DEPTHS, st.booleans())
RESOURCE = {"callId": "CA" + "d" * 40, "status": "ringing", "revision": 3}


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """A valid webhook or resource with a few fields replaced or added (known names, so
    the validators see them; duplicates allowed), written as raw JSON text."""
    base: dict[str, Any] = draw(st.sampled_from([VALID, RESOURCE]))
    pairs = [(k, _enc(v)) for k, v in base.items()]
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        key, value = draw(KEYS), draw(fragments | deep)
        if draw(st.booleans()):  # replace in place, else add (a duplicate when known)
            pairs = [(k, value if k == key else v) for k, v in pairs]
        else:
            pairs.append((key, value))
    return _object(pairs)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_bodies())
def test_every_202_decodes_in_the_processor_into_the_same_call(body: bytes) -> None:
    count_fuzz_case("ingest: every 202 decodes downstream")
    before = len(RECORDER.records)
    response = asyncio.run(_post(body))
    event(f"status {response.status_code}")
    assert response.status_code in (202, 400, 422), response.text
    if response.status_code != 202:
        assert len(RECORDER.records) == before  # a refusal writes nothing
        return
    key, value = RECORDER.records[-1]
    envelope = IngestEnvelope.model_validate_json(value)  # a full reader's decoder
    IngestEvent.model_validate_json(value)  # the body too, as any full reader decodes it
    # The processor's own decoder: the same facts, and the call's JSON exactly as the
    # ingest stage wrote it (so a change carries the call a full reader would see).
    view = read_ingest(value)
    facts = (view.eventId, view.receivedAt, view.source, view.requestType)
    assert facts == (envelope.eventId, envelope.receivedAt, envelope.source, envelope.requestType)
    assert view.call.to_json() == envelope.call.to_json()
    assert (view.call.callId, view.call.accountId, view.call.status, view.call.revision) == (
        envelope.call.callId,
        envelope.call.accountId,
        envelope.call.status,
        envelope.call.revision,
    )
    record = _strict_loads(value)  # RFC 8259, no duplicate keys: strict consumers read it
    # The same Call as the body means, read independently of the handler.
    _, _, call = normalise_body(json.loads(body))
    assert envelope.call == call
    assert key == call.callId.encode() == envelope.call.callId.encode()
    assert envelope.eventId == response.json()["eventId"]
    assert record["body"] == json.loads(body)  # the body travels unchanged
    # Dates mean what their text says: the year is not moved, nothing is rounded.
    sent = json.loads(body)
    if "requestType" in sent or "callStatus" in sent:
        return  # a webhook: its dates are not read
    for field in ("dateCreated", "dateUpdated", "startTime", "connectTime", "endTime"):
        if isinstance(sent.get(field), str) and sent[field]:
            written = record["call"][field]
            assert written[4:] == sent[field][4:], field  # the day name may be corrected
    for field in ("dateCreatedISO", "dateUpdatedISO"):
        if isinstance(sent.get(field), str) and sent[field]:
            assert getattr(envelope.call, field) == datetime.fromisoformat(sent[field]), field


def _refuse(what: object) -> Any:
    raise ValueError(f"not RFC 8259: {what}")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        _refuse("duplicate key")
    return dict(pairs)


def _strict_loads(value: bytes) -> Any:
    return json.loads(value.decode("utf-8"), parse_constant=_refuse, object_pairs_hook=_unique)
