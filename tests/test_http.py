"""The HTTP API's refusals, one test per status code that needs no broker.

202 and 503 need Kafka and are proven against the real broker in
tests/integration/test_ingest.py. Here the publisher fails the test if it is ever
reached: a refused request must never be written.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from service.app import create_app
from service.signature import sign
from tests.conftest import SECRET, make_settings

CALL_ID = "CA" + "ab" * 20
WEBHOOK = {
    "requestType": "callStatus",
    "callId": CALL_ID,
    "accountId": "AC" + "cd" * 20,
    "callStatus": "completed",
    "direction": "inbound",
    "from": "+13121000109",
    "to": "+13121000096",
}


class MustNotPublish:
    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        raise AssertionError("a refused request reached Kafka")

    async def ready(self) -> bool:
        return True


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(max_body_bytes=4096), MustNotPublish())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def signed(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if at is None else at
    return {"content-type": "application/json", "FreeClimb-Signature": sign(secret, stamp, body)}


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and isinstance(body["detail"], str)
    return body


async def test_400_not_json(client: httpx.AsyncClient) -> None:
    body = b"{not json"
    assert_problem(await client.post("/v1/call-status", content=body, headers=signed(body)), 400)


@pytest.mark.parametrize("body", [b"[1,2]", b'"text"', b"42", b"null"])
async def test_400_json_but_not_an_object(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/v1/call-status", content=body, headers=signed(body))
    assert assert_problem(response, 400)["type"] == "urn:callstatus:problem:not-object"


@pytest.mark.parametrize(
    ("headers", "verdict"),
    [
        ({}, "missing"),
        ({"FreeClimb-Signature": "nonsense"}, "malformed"),
        ({"FreeClimb-Signature": sign("sigsec_" + "9" * 40, int(time.time()), b"{}")}, "mismatch"),
        ({"FreeClimb-Signature": sign(SECRET, int(time.time()) - 3600, b"{}")}, "too_old"),
        ({"FreeClimb-Signature": sign(SECRET, int(time.time()) + 3600, b"{}")}, "too_new"),
    ],
)
async def test_401_signature(
    client: httpx.AsyncClient, headers: dict[str, str], verdict: str
) -> None:
    response = await client.post(
        "/v1/call-status", content=b"{}", headers={"content-type": "application/json", **headers}
    )
    body = assert_problem(response, 401)
    assert verdict in str(body["detail"])
    assert SECRET not in response.text


async def test_401_lowercase_header_name_still_verifies(client: httpx.AsyncClient) -> None:
    body = json.dumps({**WEBHOOK, "callStatus": "bogus"}).encode()
    headers = {
        "content-type": "application/json",
        "freeclimb-signature": signed(body)["FreeClimb-Signature"],
    }
    # A valid signature gets past 401 to validation (422): header names are case-insensitive.
    assert (await client.post("/v1/call-status", content=body, headers=headers)).status_code == 422


async def test_413_declared_length(client: httpx.AsyncClient) -> None:
    body = b"{" + b" " * 5000 + b"}"
    assert_problem(await client.post("/v1/call-status", content=body, headers=signed(body)), 413)


async def test_413_streamed_without_length_is_cut_off_early(client: httpx.AsyncClient) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"a":"'
        for _ in range(50 * 1024):  # 50 MiB if it were all read
            sent += 1024
            yield b"x" * 1024

    response = await client.post(
        "/v1/call-status",
        content=endless(),
        headers={
            "content-type": "application/json",
            # Well-formed and current, so the body is read; its digest is never checked.
            "FreeClimb-Signature": f"t={int(time.time())},v1=" + "0" * 64,
        },
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert sent < 64 * 1024  # refused within a few chunks past the 4 KiB limit


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_415_not_json(client: httpx.AsyncClient, ctype: str) -> None:
    body = json.dumps(WEBHOOK).encode()
    headers = {**signed(body), "content-type": ctype}
    assert_problem(await client.post("/v1/call-status", content=body, headers=headers), 415)


async def test_422_lists_each_field_error(client: httpx.AsyncClient) -> None:
    bad = {**WEBHOOK, "callStatus": "exploded", "callId": "CA123", "callDuration": -1}
    body = json.dumps(bad).encode()
    problem = assert_problem(
        await client.post("/v1/call-status", content=body, headers=signed(body)), 422
    )
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert {e["field"] for e in errors} == {"callStatus", "callId", "callDuration"}


async def test_422_resource_with_inconsistent_durations(client: httpx.AsyncClient) -> None:
    body = json.dumps(
        {"callId": CALL_ID, "status": "completed", "duration": 5, "connectDuration": 9}
    ).encode()
    problem = assert_problem(
        await client.post("/v1/call-status", content=body, headers=signed(body)), 422
    )
    assert "connectDuration" in json.dumps(problem["errors"])


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nope"), 404)
    assert_problem(await client.get("/v1/call-status"), 405)


async def test_healthz_openapi_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    spec = (await client.get("/openapi.json")).json()
    responses = spec["paths"]["/v1/call-status"]["post"]["responses"]
    assert set(responses) == {"202", "400", "401", "408", "413", "415", "422", "503"}
    body = json.dumps(WEBHOOK).encode()
    await client.post("/v1/call-status", content=body, headers={"content-type": "application/json"})
    text = (await client.get("/metrics")).text
    assert 'callstatus_http_requests_total{code="401",route="/v1/call-status"}' in text
    assert 'callstatus_ingest_total{outcome="signature_missing"}' in text
    assert "callstatus_http_request_duration_seconds_bucket" in text


async def test_readyz_reports_the_publisher() -> None:
    class Down(MustNotPublish):
        async def ready(self) -> bool:
            return False

    app = create_app(make_settings(), Down())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["kafka"] is False
