"""The hand-written encoders and decoder of schemas/messages.py held to their pydantic
models field by field: a field a model gains that ``encode_ingest`` or
``encode_outcome`` does not write, or that ``read_ingest`` does not read, fails here."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel

from schemas.call import Call, CallLike, CallStatus
from schemas.messages import (
    ChangeMessage,
    IngestEnvelope,
    IngestEvent,
    RejectedMessage,
    RejectReason,
    Source,
    encode_ingest,
    encode_outcome,
    read_ingest,
)

RECEIVED = datetime(2026, 1, 1, 0, 0, 5, 123000, tzinfo=UTC)
PROCESSED = datetime(2026, 1, 1, 0, 0, 6, 456000, tzinfo=UTC)
# Every field the contract's checks read set to something other than its default.
CALL = Call.model_validate(
    {
        "callId": "CA" + "1" * 40,
        "accountId": "AC" + "2" * 40,
        "parentCallId": "CA" + "3" * 40,
        "status": CallStatus.IN_PROGRESS,
        "revision": 7,
        "from": "+13125550101",
        "to": "+13125550102",
        "direction": "outboundAPI",
        "duration": 42,
    }
)
BODY = json.dumps({"callId": CALL.callId, "status": "inProgress", "revision": 7}).encode()


def written_names(model: type[BaseModel]) -> set[str]:
    """The keys of the model's JSON: each field's serialisation name."""
    return {
        info.serialization_alias or info.alias or name for name, info in model.model_fields.items()
    }


def test_encode_ingest_writes_every_field_of_an_ingest_event() -> None:
    raw = encode_ingest("evt-1", RECEIVED, Source.RESOURCE, "callStatus", CALL, BODY)
    assert set(json.loads(raw)) == written_names(IngestEvent)
    event = IngestEvent.model_validate_json(raw)
    assert (event.eventId, event.receivedAt, event.source, event.requestType) == (
        "evt-1",
        RECEIVED,
        Source.RESOURCE,
        "callStatus",
    )
    assert event.call == CALL
    assert event.body == json.loads(BODY)


def test_read_ingest_reads_every_field_of_the_envelope() -> None:
    raw = encode_ingest("evt-2", RECEIVED, Source.WEBHOOK, "callStatus", CALL, BODY)
    envelope = IngestEnvelope.model_validate_json(raw)
    view = read_ingest(raw)
    for name in IngestEnvelope.model_fields:
        assert hasattr(view, name), f"read_ingest does not read the envelope's {name}"
        if name != "call":
            assert getattr(view, name) == getattr(envelope, name), name
    # The call: what the rules and the outputs read of it, and its JSON as written.
    members = [m for m in CallLike.__dict__ if not m.startswith("_") and m != "to_json"]
    assert members, "CallLike declares what is read of a call"
    for member in members:
        assert getattr(view.call, member) == getattr(envelope.call, member), member
    assert json.loads(view.call.to_json()) == json.loads(envelope.call.to_json())


@pytest.mark.parametrize(
    ("model", "reason"),
    [(ChangeMessage, None), (RejectedMessage, RejectReason.OUT_OF_ORDER)],
)
def test_encode_outcome_writes_every_field_of_its_message(
    model: type[ChangeMessage | RejectedMessage], reason: RejectReason | None
) -> None:
    raw = encode_outcome(
        event_id="evt-3",
        call=CALL,
        previous_status=CallStatus.RINGING,
        previous_revision=6,
        source=Source.RESOURCE,
        request_type=None,
        received_at=RECEIVED,
        processed_at=PROCESSED,
        reason=reason,
        detail="late" if reason else "",
    )
    assert set(json.loads(raw)) == written_names(model)
    message = model.model_validate_json(raw)
    assert message.call == CALL
    assert (message.previousStatus, message.previousRevision) == (CallStatus.RINGING, 6)
