"""The committed JSON Schemas in schemas/ match the models, and carry the contract's fields."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from schemas.export import HERE, MESSAGES, path_for, schema_text

REGENERATE = "run `make schemas` (python -m schemas.export) and commit the result"


@pytest.mark.parametrize(("name", "model"), list(MESSAGES.items()), ids=list(MESSAGES))
def test_committed_schema_matches_the_model(name: str, model: type[BaseModel]) -> None:
    path = path_for(name)
    assert path.is_file(), f"schemas/{path.name} is missing: {REGENERATE}"
    committed = path.read_text(encoding="utf-8")
    assert committed == schema_text(model), f"schemas/{path.name} is out of date: {REGENERATE}"


def test_no_stray_schema_files() -> None:
    committed = sorted(p.name for p in HERE.glob("*.schema.json"))
    expected = sorted(path_for(name).name for name in MESSAGES)
    assert committed == expected, f"schema files and models disagree: {REGENERATE}"


def _committed(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(path_for(name).read_text(encoding="utf-8"))
    return schema


# Architecture section 4: changes and rejected values carry at least these fields.
OUTCOME_FIELDS = [
    "eventId",
    "callId",
    "accountId",
    "previousStatus",
    "status",
    "previousRevision",
    "revision",
    "source",
    "requestType",
    "receivedAt",
    "processedAt",
    "call",
]
REQUIRED = {
    "changes": OUTCOME_FIELDS,
    "rejected": [*OUTCOME_FIELDS, "reason", "detail"],
    "ingest": ["eventId", "receivedAt", "source", "requestType", "call", "body"],
}
# The first contract's state message (callId, status, revision, eventId, updatedAt,
# call) became the packed state of service/statecodec.py (issue 10: ~100 bytes a call
# instead of ~600); tests/test_statecodec.py holds it to what the rules need.


@pytest.mark.parametrize(("name", "fields"), list(REQUIRED.items()), ids=list(REQUIRED))
def test_schema_requires_the_contract_fields(name: str, fields: list[str]) -> None:
    required = set(_committed(name)["required"])
    missing = [field for field in fields if field not in required]
    assert not missing, f"{name}.schema.json does not require {missing}"


def test_changes_do_not_carry_a_reason() -> None:
    properties = _committed("changes")["properties"]
    assert "reason" not in properties
    assert "detail" not in properties


@pytest.mark.parametrize("name", ["ingest", "changes", "rejected"])
def test_source_and_call_use_freeclimb_vocabulary(name: str) -> None:
    defs = _committed(name)["$defs"]
    call = defs["Call"]
    assert set(call["required"]) == {"callId", "status"}
    assert "from" in call["properties"]
    assert "from_" not in call["properties"]
    assert defs["CallStatus"]["enum"] == [
        "queued",
        "ringing",
        "inProgress",
        "canceled",
        "completed",
        "busy",
        "failed",
        "noAnswer",
    ]
    assert defs["CallDirection"]["enum"] == ["inbound", "outboundAPI", "outboundDial"]
    if name != "state":
        assert defs["Source"]["enum"] == ["webhook", "resource", "api"]


def test_rejected_reasons_are_the_six_of_the_contract() -> None:
    # Four verdicts of the state machine, two for records it could not judge or write.
    for name in ("rejected", "unprocessable"):
        defs = _committed(name)["$defs"]
        assert sorted(defs["RejectReason"]["enum"]) == sorted(
            [
                "illegal_transition",
                "out_of_order",
                "stale_revision",
                "conflicting_revision",
                "undecodable",
                "unwritable",
            ]
        )


def test_an_ingest_record_is_built_once_for_ingest_and_the_reconciler() -> None:
    from datetime import UTC, datetime

    from schemas.call import Call
    from schemas.messages import RecordTooLarge, Source, ingest_record, read_ingest

    call = Call.model_validate({"callId": "CA" + "1" * 40, "status": "ringing"})
    body = call.to_json()
    at = datetime(2026, 12, 1, tzinfo=UTC)
    trace = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    key, value, headers = ingest_record("e1", at, Source.API, None, call, body, 1 << 20, trace)
    assert key == call.callId.encode() and read_ingest(value).eventId == "e1"
    assert headers == [
        ("content-type", b"application/json"),
        ("ce_id", b"e1"),
        ("traceparent", trace),
    ]
    # An oversized traceparent is dropped, not sent.
    _, _, headers = ingest_record("e1", at, Source.API, None, call, body, 1 << 20, b"x" * 129)
    assert [name for name, _ in headers] == ["content-type", "ce_id"]
    # The size check counts key and value, to the byte.
    size = len(key) + len(value)
    ingest_record("e1", at, Source.API, None, call, body, size)
    with pytest.raises(RecordTooLarge) as raised:
        ingest_record("e1", at, Source.API, None, call, body, size - 1)
    assert (raised.value.size, raised.value.limit) == (size, size - 1)
