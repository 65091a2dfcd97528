"""Property: no signed body, however strange, makes the ingest endpoint answer 5xx.

Bodies are drawn from JSON values shaped like webhooks and Call resources (the known
field names with values of any JSON type), plus arbitrary bytes. Every answer must be
202, 400 or 422 with a problem+json body for the refusals.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import httpx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.signature import sign
from tests.conftest import SECRET, make_settings

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
        self.count = 0

    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        self.count += 1

    async def ready(self) -> bool:
        return True


APP = create_app(make_settings(), Recorder())


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
    response = asyncio.run(_post(body))
    event(f"status {response.status_code}")
    assert response.status_code in (202, 400, 422), response.text
    if response.status_code != 202:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == response.status_code
