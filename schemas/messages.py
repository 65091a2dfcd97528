"""The webhook body, and every message the service writes to Kafka (docs/architecture.md,
sections 2 and 4)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import pydantic_core
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from schemas.call import (
    AccountId,
    Call,
    CallDirection,
    CallId,
    CallLike,
    CallStatus,
    Count,
    Direction,
    Revision,
    Rfc3339,
    empty_strings_as_absent,
    format_rfc3339,
)

# Where the webhooks are POSTed: part of the wire contract, so a client (the simulator,
# the image check) can name it without importing the HTTP app.
INGEST_PATH = "/v1/call-status"


class Source(StrEnum):
    WEBHOOK = "webhook"  # a FreeClimb callback: callStatus, no revision, no dates
    RESOURCE = "resource"  # a Call resource body: status, usually revision and dates
    # A Call resource the reconciler fetched from FreeClimb's REST API (service/
    # reconciler.py): judged like ``resource`` (revisioned), told apart for consumers.
    API = "api"


class RejectReason(StrEnum):
    ILLEGAL_TRANSITION = "illegal_transition"
    OUT_OF_ORDER = "out_of_order"
    STALE_REVISION = "stale_revision"
    CONFLICTING_REVISION = "conflicting_revision"
    # Not verdicts of the state machine: the processor could not judge or not write the
    # event. Carried by an UnprocessableMessage, with the ingest record's bytes.
    UNDECODABLE = "undecodable"  # the ingest record is not an IngestEvent
    UNWRITABLE = "unwritable"  # Kafka refuses the outputs for good (e.g. too large)


UNPROCESSABLE_REASONS = frozenset({RejectReason.UNDECODABLE, RejectReason.UNWRITABLE})


# The text of each member of the enums ingest writes per request: a dict lookup costs
# a fraction of the ``.value`` property (an enum descriptor call), and pydantic-core
# writes a plain str at a fifth of a member's cost.
_TEXT: dict[StrEnum, str] = {m: m.value for e in (CallStatus, CallDirection, Source) for m in e}


class WebhookBody(BaseModel):
    """What FreeClimb POSTs to a status callback URL (docs/architecture.md, section 2).

    Only the fields the service relies on are declared; the rest (conferenceId, queueId,
    recording fields, and whatever FreeClimb adds later) are tolerated.
    """

    # (This docstring is the OpenAPI schema's description.) The undeclared fields are
    # tolerated but not kept: the ingest record carries the body's own bytes, so nothing
    # reads them from here, and keeping them cost ~1.7 us a request (a dict of their own,
    # built by every validation). The published schema still says they are accepted.
    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        validate_by_alias=True,
        json_schema_extra={"additionalProperties": True},
    )

    requestType: str = Field(min_length=1)
    callId: CallId
    accountId: AccountId | None = None
    callStatus: CallStatus
    direction: Direction | None = None
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    parentCallId: CallId | None = None
    callEndedReason: str | None = None
    callDuration: Count | None = None

    _absent = model_validator(mode="before")(empty_strings_as_absent)

    def to_call(self) -> Call:
        """The callback as a :class:`Call` (ingest's handler uses :meth:`call_view`)."""
        # Validating again costs less than pydantic's pure-Python model_construct.
        return Call.model_validate(
            {
                "callId": self.callId,
                "parentCallId": self.parentCallId,
                "accountId": self.accountId,
                "to": self.to,
                "from": self.from_,
                "status": self.callStatus,
                "direction": self.direction,
                "duration": self.callDuration,
            }
        )

    def call_view(self) -> CallView:
        """What :meth:`to_call` gives, as the ingest record needs it: the ids, the status
        and the call's JSON, written straight from the fields validated here. Building
        the :class:`Call` and serialising it cost three times as much per request, and
        cannot refuse what this model accepted: the same field types, and none of the
        fields ``Call``'s own checks compare. ``tests/test_models.py`` holds the JSON
        to ``to_call().to_json()``."""
        # Call's fields in its JSON's order, absent ones left out (Call.to_json's
        # exclude_none); the enums as their text (_TEXT).
        fields: dict[str, Any] = {"callId": self.callId}
        if self.parentCallId is not None:
            fields["parentCallId"] = self.parentCallId
        if self.accountId is not None:
            fields["accountId"] = self.accountId
        if self.to is not None:
            fields["to"] = self.to
        if self.from_ is not None:
            fields["from"] = self.from_
        fields["status"] = _TEXT[self.callStatus]
        if self.callDuration is not None:
            fields["duration"] = self.callDuration
        if self.direction is not None:
            fields["direction"] = _TEXT[self.direction]
        encoded = pydantic_core.to_json(fields)
        return CallView(self.callId, self.accountId, self.callStatus, None, encoded)


def _is_webhook(body: dict[str, Any]) -> bool:
    return "requestType" in body or "callStatus" in body


def normalise_body(body: dict[str, Any]) -> tuple[Source, str | None, Call]:
    """Read either accepted body shape into one Call. Raises pydantic's ValidationError,
    whose entries name the offending field in the body's own vocabulary."""
    if _is_webhook(body):
        hook = WebhookBody.model_validate(body)
        return Source.WEBHOOK, hook.requestType, hook.to_call()
    return Source.RESOURCE, None, Call.model_validate(body)


def ingest_call(body: dict[str, Any]) -> tuple[Source, str | None, CallLike]:
    """:func:`normalise_body` as ingest's handler needs it, per request: the same
    validation and refusals, a webhook's call as a :class:`CallView`
    (:meth:`WebhookBody.call_view`) rather than a built :class:`Call`."""
    if _is_webhook(body):
        hook = WebhookBody.model_validate(body)
        return Source.WEBHOOK, hook.requestType, hook.call_view()
    return Source.RESOURCE, None, Call.model_validate(body)


class IngestEnvelope(BaseModel):
    """What the processor reads of an ingest message: everything but the original body,
    which it never needs and so never builds into Python objects."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    eventId: str = Field(description="assigned once at ingest; never changes downstream")
    receivedAt: Rfc3339
    source: Source
    requestType: str | None
    call: Call


def _written_time(value: object) -> object:
    # receivedAt as the ingest stage writes it (format_rfc3339): the standard parser
    # reads that form at a tenth of the strict one's cost; a time without offset is
    # refused, so no record is judged in the reader's local time.
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("a time without offset")
        return parsed.astimezone(UTC)
    return value


class _CallFacts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    callId: CallId
    accountId: AccountId | None = None
    status: CallStatus
    revision: Revision | None = None


class _IngestFacts(BaseModel):
    # By name too: only so that the model's signature (for type checkers) has one
    # parameter per field; records are read by alias.
    model_config = ConfigDict(frozen=True, extra="ignore", validate_by_name=True)

    eventId: str
    receivedAt: Annotated[datetime, BeforeValidator(_written_time)]
    written: str = Field(validation_alias="receivedAt")  # the same, as text
    source: Source
    requestType: str | None
    # The same "call" object twice: its checked facts, and its values as they are.
    facts: _CallFacts = Field(validation_alias="call")
    values: dict[str, Any] = Field(validation_alias="call")


# CallView and IngestView are made per event, so not frozen: a frozen dataclass's
# __init__ costs four times a plain one's. Treat them as read-only all the same.
@dataclass(slots=True)
class CallView:
    """An ingest record's call as the processor holds it: the fields the rules and the
    outcome messages read, and the call's JSON as the ingest stage wrote it."""

    callId: str
    accountId: str | None
    status: CallStatus
    revision: int | None
    json: bytes

    def to_json(self) -> bytes:
        return self.json


@dataclass(slots=True)
class IngestView:
    """What the processor reads of an ingest record (see :func:`read_ingest`)."""

    eventId: str
    receivedAt: datetime
    # receivedAt as RFC 3339 text in format_rfc3339's form, for the outputs: the
    # record's own text when ingest wrote it so (always, but for foreign writers).
    receivedText: str
    source: Source
    requestType: str | None
    call: CallView


def read_ingest(raw: bytes) -> IngestView:
    """The processor's decoder of an ingest record; pydantic's ValidationError when the
    record is not one.

    The ingest stage validated the whole call before writing it, so this checks what the
    processor decides and keys on (callId, accountId, status, revision, eventId, times)
    with the same rules, and carries the call's other fields as JSON values, serialised
    back byte for byte: a third of the cost of building a :class:`Call` and writing it
    again. The original body is skipped by the JSON parser, never built into objects."""
    m = _IngestFacts.model_validate_json(raw)
    f = m.facts
    view = CallView(f.callId, f.accountId, f.status, f.revision, pydantic_core.to_json(m.values))
    text = m.written
    # "2026-01-01T00:00:05.123Z": parsed already, so the shape is all left to check.
    if not (len(text) == 24 and text[10] == "T" and text[19] == "." and text[23] == "Z"):
        text = format_rfc3339(m.receivedAt)
    return IngestView(m.eventId, m.receivedAt, text, m.source, m.requestType, view)


class IngestEvent(IngestEnvelope):
    """One validated callback, as written to the ingest topic."""

    body: dict[str, Any] = Field(description="the request body exactly as received")


def _head(fields: dict[str, Any]) -> bytes:
    # The object without its closing brace, so the call can be spliced in after it.
    return pydantic_core.to_json(fields)[:-1]


def event_id_for(raw: bytes) -> str:
    """The event's id, derived from the signed body bytes alone: a replay, and
    FreeClimb's own retries (same body, new ``t=``), carry the same id, so consumers can
    deduplicate on it. A UUID of version 8 (RFC 9562, custom) over SHA-256."""
    h = hashlib.sha256(raw).hexdigest()
    # str(uuid.UUID(...))'s canonical form of the first 16 bytes, written from the hex
    # digest without building a UUID (or a bytearray to set bits in) per request: the
    # version nibble (13th digit) set to 8, the variant's two high bits (17th) to 10.
    return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


# A hex digit with its two high bits set to 10 (RFC 9562's variant): 0-3 -> 8-b, ...
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def encode_ingest(
    event_id: str,
    received_at: datetime | str,
    source: Source,
    request_type: str | None,
    call: CallLike,
    raw_body: bytes,
) -> bytes:
    """Serialise an :class:`IngestEvent` without re-serialising the body: the raw bytes
    (already proven to be a JSON object) are spliced in as they came. ``received_at``
    may come as RFC 3339 text in :func:`format_rfc3339`'s form already (ingest's
    handler keeps a clock that writes it)."""
    head = _head(
        {
            "eventId": event_id,
            "receivedAt": _rfc3339(received_at),
            "source": _TEXT[source],
            "requestType": request_type,
        }
    )
    return b"".join((head, b',"call":', call.to_json(), b',"body":', raw_body, b"}"))


# An ingest record's headers: what ingest and the reconciler put on each event.
RecordHeaders = list[tuple[str, bytes]]
# The longest W3C traceparent header kept (55 bytes today; room for a future version).
MAX_TRACEPARENT_BYTES = 128


class RecordTooLarge(ValueError):
    """The ingest record of an event would exceed the configured size: the producer would
    refuse it on every retry, so it is refused before being sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the ingest record would be {size} bytes, over {limit}")
        self.size = size
        self.limit = limit


def ingest_record(
    event_id: str,
    received_at: datetime | str,
    source: Source,
    request_type: str | None,
    call: CallLike,
    raw_body: bytes,
    max_bytes: int,
    traceparent: bytes | None = None,
) -> tuple[bytes, bytes, RecordHeaders]:
    """(key, value, headers) of an event on the ingest topic, the one way ingest's
    handler and the reconciler write one: keyed by callId (its partition), the value of
    :func:`encode_ingest`, headers ``content-type`` and ``ce_id`` (and ``traceparent``
    when given and not oversized). Raises :class:`RecordTooLarge` when key and value
    exceed ``max_bytes`` (the setting MAX_INGEST_VALUE_BYTES)."""
    value = encode_ingest(event_id, received_at, source, request_type, call, raw_body)
    key = call.callId.encode()
    if len(value) + len(key) > max_bytes:
        raise RecordTooLarge(len(value) + len(key), max_bytes)
    headers = [("content-type", b"application/json"), ("ce_id", event_id.encode())]
    if traceparent is not None and len(traceparent) <= MAX_TRACEPARENT_BYTES:
        headers.append(("traceparent", traceparent))
    return key, value, headers


class _Outcome(BaseModel):
    """Fields shared by the changes and rejected messages."""

    model_config = ConfigDict(frozen=True, serialize_by_alias=True)

    eventId: str
    callId: str
    accountId: str | None
    previousStatus: CallStatus | None = Field(description="null for the first event of a call")
    status: CallStatus
    previousRevision: int | None
    revision: int | None
    source: Source
    requestType: str | None
    receivedAt: Rfc3339
    processedAt: Rfc3339
    call: Call


class ChangeMessage(_Outcome):
    """An accepted change of a call, on the changes topic."""


class RejectedMessage(_Outcome):
    """An event the state machine refused, on the rejected topic."""

    reason: RejectReason
    detail: str


class StateMessage(BaseModel):
    """Version 1 of a call's state on the state topic, JSON, written before the packed
    version 2 (service/statecodec.py). Only read, to convert the states of a topic
    written by an older release on restore."""

    model_config = ConfigDict(frozen=True, serialize_by_alias=True)

    callId: str
    status: CallStatus
    revision: int | None
    eventId: str = Field(description="the last accepted event")
    updatedAt: Rfc3339 = Field(
        description="receivedAt of the call's last event, whatever its verdict: retention "
        "runs in event time"
    )
    call: Call
    revisedCall: Call | None = Field(
        default=None,
        description="the last accepted call that had a revision, when `call` has none "
        "(a callback without revision came after it); revisions are compared with it",
    )
    judged: list[str] = Field(
        default_factory=list,
        description="the eventIds of this call already judged (the last 32), so a replay "
        "of one of them is dropped instead of judged again",
    )


class UnprocessableMessage(BaseModel):
    """An ingest record the processor could not judge (``undecodable``) or whose
    outputs Kafka refuses for good (``unwritable``), on the rejected topic. It carries
    the ingest record's value, base64, cut to ``UNPROCESSABLE_KEEP_BYTES`` when the
    reason is ``unwritable`` (the full record is still on the ingest topic)."""

    model_config = ConfigDict(frozen=True)

    reason: RejectReason
    detail: str
    eventId: str | None = Field(description="null when the record could not be decoded")
    callId: str | None
    status: CallStatus | None
    receivedAt: Rfc3339 | None
    processedAt: Rfc3339
    ingestPartition: int
    ingestOffset: int
    value: str = Field(description="the ingest record's value, base64 (cut, see truncated)")
    valueBytes: int = Field(description="length of the whole ingest record's value")
    truncated: bool


def _rfc3339(value: datetime | str) -> str:
    return value if isinstance(value, str) else format_rfc3339(value)


def encode_outcome(
    *,
    event_id: str,
    call: CallLike,
    previous_status: CallStatus | None,
    previous_revision: int | None,
    source: Source,
    request_type: str | None,
    received_at: datetime | str,
    processed_at: datetime | str,
    reason: RejectReason | None = None,
    detail: str = "",
) -> bytes:
    """Serialise a :class:`ChangeMessage`, or a :class:`RejectedMessage` when ``reason``
    is given. Built by hand because it runs per event; tests hold it to the models.
    The times may come as RFC 3339 text already (see :func:`format_rfc3339`): the
    processor formats its batch's time once, and passes receivedAt through.
    The enums go in as their values: pydantic_core serialises an enum member at five
    times the cost of a string, which made this head ~2.7 µs of every event."""
    fields: dict[str, Any] = {
        "eventId": event_id,
        "callId": call.callId,
        "accountId": call.accountId,
        "previousStatus": None if previous_status is None else previous_status.value,
        "status": call.status.value,
        "previousRevision": previous_revision,
        "revision": call.revision,
        "source": source.value,
        "requestType": request_type,
        "receivedAt": _rfc3339(received_at),
        "processedAt": _rfc3339(processed_at),
    }
    if reason is not None:
        fields["reason"] = reason.value
        fields["detail"] = detail
    return b"".join((_head(fields), b',"call":', call.to_json(), b"}"))


# How much of an unwritable record's value an UnprocessableMessage keeps: small enough
# for any sane max.message.bytes, large enough to recognise the event.
UNPROCESSABLE_KEEP_BYTES = 1024


def encode_unprocessable(
    *,
    reason: RejectReason,
    detail: str,
    raw: bytes,
    partition: int,
    offset: int,
    processed_at: datetime,
    event: IngestView | None,
) -> bytes:
    """Serialise an :class:`UnprocessableMessage` (a rare path: the model does it)."""
    keep = raw if reason is RejectReason.UNDECODABLE else raw[:UNPROCESSABLE_KEEP_BYTES]
    message = UnprocessableMessage(
        reason=reason,
        detail=detail,
        eventId=event.eventId if event else None,
        callId=event.call.callId if event else None,
        status=event.call.status if event else None,
        receivedAt=event.receivedAt if event else None,
        processedAt=processed_at,
        ingestPartition=partition,
        ingestOffset=offset,
        value=base64.b64encode(keep).decode("ascii"),
        valueBytes=len(raw),
        truncated=len(keep) < len(raw),
    )
    return message.model_dump_json().encode()
