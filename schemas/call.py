"""The FreeClimb Call resource (shared/seeds and shared/reference/freeclimb.md section 1)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from enum import StrEnum
from functools import lru_cache
from itertools import pairwise
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)


class CallStatus(StrEnum):
    QUEUED = "queued"
    RINGING = "ringing"
    IN_PROGRESS = "inProgress"
    CANCELED = "canceled"
    COMPLETED = "completed"
    BUSY = "busy"
    FAILED = "failed"
    NO_ANSWER = "noAnswer"


class CallDirection(StrEnum):
    INBOUND = "inbound"
    OUTBOUND_API = "outboundAPI"
    OUTBOUND_DIAL = "outboundDial"


class AnsweredBy(StrEnum):
    HUMAN = "human"
    MACHINE = "machine"


def _direction(value: object) -> object:
    # FreeClimb's webhook docs sometimes say "outbound" for what the resource calls
    # "outboundAPI"; read both as the same direction.
    return CallDirection.OUTBOUND_API if value == "outbound" else value


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. year 9999 at -01:00: past datetime's range in UTC
        raise ValueError("date is out of range") from None


def _parse_rfc1123(value: object) -> object:
    if isinstance(value, datetime):  # built in Python, not read from JSON
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string like 'Mon, 15 Jun 2009 20:45:30 GMT'")
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise ValueError("not an RFC 1123 date like 'Mon, 15 Jun 2009 20:45:30 GMT'") from None
    if parsed.tzinfo is None:
        raise ValueError("RFC 1123 date must say GMT")
    return _to_utc(parsed)


def _format_rfc1123(value: datetime) -> str:
    return format_datetime(value.astimezone(UTC), usegmt=True)


def _parse_rfc3339(value: object) -> object:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string like '2024-10-09T15:05:03.358Z'")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("not an RFC 3339 date like '2024-10-09T15:05:03.358Z'") from None
    if parsed.tzinfo is None:
        raise ValueError("RFC 3339 date needs a UTC offset or Z")
    return _to_utc(parsed)


@lru_cache(maxsize=8)  # the processor stamps a whole batch with the same time
def format_rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_RFC1123_PATTERN = r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$"

# A date written and read in FreeClimb's RFC 1123 form ("Mon, 15 Jun 2009 20:45:30 GMT").
Rfc1123 = Annotated[
    datetime,
    BeforeValidator(_parse_rfc1123),
    PlainSerializer(_format_rfc1123, return_type=str),
    WithJsonSchema({"type": "string", "pattern": _RFC1123_PATTERN}),
]
# A date written and read in RFC 3339 UTC with milliseconds ("2024-10-09T15:05:03.358Z").
Rfc3339 = Annotated[
    datetime,
    BeforeValidator(_parse_rfc3339),
    PlainSerializer(format_rfc3339, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]

# Identifier shapes: two-letter prefix + 40 hex digits.
CallId = Annotated[str, Field(pattern=r"^CA[0-9a-fA-F]{40}$")]
AccountId = Annotated[str, Field(pattern=r"^AC[0-9a-fA-F]{40}$")]
PhoneNumberId = Annotated[str, Field(pattern=r"^PN[0-9a-fA-F]{40}$")]
Direction = Annotated[CallDirection, BeforeValidator(_direction)]


def empty_strings_as_absent(data: Any) -> Any:
    """FreeClimb writes "" for fields not reached yet (endTime, duration, ...)."""
    if isinstance(data, dict) and "" in data.values():
        return {k: v for k, v in data.items() if v != ""}
    return data


class Call(BaseModel):
    """A Call resource, in FreeClimb's own field names; every field but the id and status
    may be absent. Unknown fields are tolerated and dropped (the ingest message keeps the
    original body)."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        validate_by_alias=True,
        validate_by_name=True,
        serialize_by_alias=True,
    )

    uri: str | None = None
    dateCreated: Rfc1123 | None = None
    dateUpdated: Rfc1123 | None = None
    dateCreatedISO: Rfc3339 | None = None
    dateUpdatedISO: Rfc3339 | None = None
    revision: int | None = Field(default=None, ge=1)
    callId: CallId
    parentCallId: CallId | None = None
    accountId: AccountId | None = None
    to: str | None = None
    from_: str | None = Field(default=None, alias="from")
    phoneNumberId: PhoneNumberId | None = None
    status: CallStatus
    startTime: Rfc1123 | None = None
    connectTime: Rfc1123 | None = None
    endTime: Rfc1123 | None = None
    connectDuration: int | None = Field(default=None, ge=0)
    duration: int | None = Field(default=None, ge=0)
    direction: Direction | None = None
    answeredBy: AnsweredBy | None = None
    # Links as FreeClimb sends them; their shape is FreeClimb's business, not ours.
    subresourceUris: dict[str, Any] | None = None
    applicationId: str | None = None

    _absent = model_validator(mode="before")(empty_strings_as_absent)

    @model_validator(mode="after")
    def _consistent(self) -> Call:
        if (
            self.connectDuration is not None
            and self.duration is not None
            and self.connectDuration > self.duration
        ):
            raise ValueError("connectDuration must not exceed duration")
        order = [
            (name, value)
            for name, value in (
                ("startTime", self.startTime),
                ("connectTime", self.connectTime),
                ("endTime", self.endTime),
            )
            if value is not None
        ]
        for (earlier, a), (later, b) in pairwise(order):
            if b < a:
                raise ValueError(f"{later} must not be before {earlier}")
        return self

    def to_json(self) -> bytes:
        """The resource as FreeClimb writes it: its field names and date formats."""
        return self.model_dump_json(exclude_none=True).encode()
