"""The FreeClimb Call resource (docs/freeclimb.md section 1; FreeClimb's own page for it is
kept in docs/freeclimb/call-resource.txt)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from enum import StrEnum
from functools import lru_cache
from itertools import pairwise
from typing import Annotated, Any, Literal, Protocol

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


def _json_integer(value: object) -> object:
    # A JSON integer only: pydantic's lax int would also take "5" and true, which the
    # published schema (type: integer) refuses. Integral floats (5.0) stay accepted, as
    # JSON Schema counts them as integers.
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    return value


# Integers as JSON writes them (the bounds first, so the schema says "minimum" and
# "maximum"): a signed 64-bit integer at most, what Java, Go and SQL consumers can read.
Count = Annotated[int, Field(ge=0, le=2**63 - 1), BeforeValidator(_json_integer)]
# Revisions are counters; the upper bound is a signed 64-bit integer's (what Kafka, most
# databases and the state's packed form hold), so a hostile 10**30 is a 422 at the door.
Revision = Annotated[int, Field(ge=1, le=2**63 - 1), BeforeValidator(_json_integer)]


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. year 9999 at -01:00: past datetime's range in UTC
        raise ValueError("date is out of range") from None


# The published patterns below are the whole grammar, calendar included (day 31 only in
# long months, 29 February only in leap years), so /openapi.json accepts exactly what the
# service accepts. The only dates they admit that we refuse are the few at the very ends
# of datetime's range that leave it when moved to UTC (year 1 east of UTC, 9999 west).
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MULTIPLE_OF_4 = "(0[48]|[2468][048]|[13579][26])"  # as two digits, 00 excluded
_TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"

# RFC 1123 (after RFC 822) writes the day in one or two digits: Java's RFC_1123_DATE_TIME,
# for one, writes "Tue, 1 Dec 2026". Years 1000-9999 only: Python's date parser reads a
# year below 100 as 19xx or 20xx, so "0099" would silently become 1999; four significant
# digits cannot.
_YEAR_1123 = "[1-9][0-9]{3}"
_LEAP_1123 = f"([1-9][0-9]{_MULTIPLE_OF_4}|(1[26]|[2468][048]|[3579][26])00)"
_DATE_1123 = (
    "("
    f"(0?[1-9]|1[0-9]|2[0-8]) ({'|'.join(_MONTHS)}) {_YEAR_1123}"
    f"|(29|30) ({'|'.join(m for m in _MONTHS if m != 'Feb')}) {_YEAR_1123}"
    f"|31 (Jan|Mar|May|Jul|Aug|Oct|Dec) {_YEAR_1123}"
    f"|29 Feb {_LEAP_1123}"
    ")"
)
RFC1123_PATTERN = f"^({'|'.join(_DAYS)}), {_DATE_1123} {_TIME} GMT$"
_RFC1123 = re.compile(
    r"[A-Z][a-z]{2}, (?P<day>\d{1,2}) (?P<month>[A-Z][a-z]{2}) (?P<year>\d{4}) "
    r"(?P<hour>\d\d):(?P<minute>\d\d):(?P<second>\d\d) GMT",
    re.ASCII,
)
_RFC1123_EXACT = re.compile(RFC1123_PATTERN)

# RFC 3339 as the ISO fields use it: years 0001-9999, at most milliseconds (what the
# service writes back, so a value read is the value written), an offset or Z.
_YEAR_3339 = "(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP_3339 = f"([0-9]{{2}}{_MULTIPLE_OF_4}|{_MULTIPLE_OF_4}00)"
_DATE_3339 = (
    "("
    f"{_YEAR_3339}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
    f"|{_YEAR_3339}-(0[13-9]|1[0-2])-(29|30)"
    f"|{_YEAR_3339}-(0[13578]|1[02])-31"
    f"|{_LEAP_3339}-02-29"
    ")"
)
RFC3339_PATTERN = f"^{_DATE_3339}T{_TIME}(\\.[0-9]{{1,3}})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
_RFC3339 = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d\d)-(?P<day>\d\d)T(?P<hour>\d\d):(?P<minute>\d\d):"
    r"(?P<second>\d\d)(?:\.(?P<fraction>\d{1,3}))?(?:Z|(?P<sign>[+-])(?P<oh>\d\d):(?P<om>\d\d))",
    re.ASCII,
)
_RFC3339_EXACT = re.compile(RFC3339_PATTERN)

_EXAMPLE_1123 = "'Mon, 15 Jun 2009 20:45:30 GMT'"
_EXAMPLE_3339 = "'2024-10-09T15:05:03.358Z'"


def _parse_rfc1123(value: object) -> object:
    if isinstance(value, datetime):  # built in Python, not read from JSON
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a string like {_EXAMPLE_1123}")
    match = _RFC1123.fullmatch(value)
    if match is None or _RFC1123_EXACT.fullmatch(value) is None:
        year = match["year"] if match else ""
        if year and year < "1000":
            raise ValueError("RFC 1123 dates need a year from 1000 to 9999")
        raise ValueError(f"not an RFC 1123 date like {_EXAMPLE_1123} (a real date, in GMT)")
    # The day name is not checked against the date: it is written back correctly.
    return datetime(
        int(match["year"]),
        _MONTHS.index(match["month"]) + 1,
        int(match["day"]),
        int(match["hour"]),
        int(match["minute"]),
        int(match["second"]),
        tzinfo=UTC,
    )


def _format_rfc1123(value: datetime) -> str:
    return format_datetime(value.astimezone(UTC), usegmt=True)


def _parse_rfc3339(value: object) -> object:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a string like {_EXAMPLE_3339}")
    match = _RFC3339.fullmatch(value)
    if match is None or _RFC3339_EXACT.fullmatch(value) is None:
        raise ValueError(
            f"not an RFC 3339 date like {_EXAMPLE_3339} (a real date, at most milliseconds, "
            "with Z or an offset)"
        )
    offset = timedelta(0)
    if match["sign"]:
        offset = timedelta(hours=int(match["oh"]), minutes=int(match["om"]))
        offset = -offset if match["sign"] == "-" else offset
    parsed = datetime(
        int(match["year"]),
        int(match["month"]),
        int(match["day"]),
        int(match["hour"]),
        int(match["minute"]),
        int(match["second"]),
        int((match["fraction"] or "0").ljust(3, "0")) * 1000,
        tzinfo=timezone(offset),
    )
    return _to_utc(parsed)


@lru_cache(maxsize=8)  # the processor stamps a whole batch with the same time
def format_rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# A date written and read in FreeClimb's RFC 1123 form ("Mon, 15 Jun 2009 20:45:30 GMT").
Rfc1123 = Annotated[
    datetime,
    BeforeValidator(_parse_rfc1123),
    PlainSerializer(_format_rfc1123, return_type=str),
    WithJsonSchema({"type": "string", "pattern": RFC1123_PATTERN}),
]
# A date written and read in RFC 3339 UTC with milliseconds ("2024-10-09T15:05:03.358Z").
Rfc3339 = Annotated[
    datetime,
    BeforeValidator(_parse_rfc3339),
    PlainSerializer(format_rfc3339, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}),
]

# Identifier shapes: two-letter prefix + 40 hex digits, defined here once: the models,
# the OpenAPI document, the URL paths of ingest and of the REST API client, the CLI.
CALL_ID_PATTERN = "CA[0-9a-fA-F]{40}"
ACCOUNT_ID_PATTERN = "AC[0-9a-fA-F]{40}"
CALL_ID = re.compile(CALL_ID_PATTERN, re.ASCII)
ACCOUNT_ID = re.compile(ACCOUNT_ID_PATTERN, re.ASCII)
CallId = Annotated[str, Field(pattern=f"^{CALL_ID_PATTERN}$")]
AccountId = Annotated[str, Field(pattern=f"^{ACCOUNT_ID_PATTERN}$")]
PhoneNumberId = Annotated[str, Field(pattern=r"^PN[0-9a-fA-F]{40}$")]
Direction = Annotated[
    CallDirection,
    BeforeValidator(
        _direction,
        # What a request may say, "outbound" included; messages only ever carry the three.
        json_schema_input_type=Literal["inbound", "outbound", "outboundAPI", "outboundDial"],
    ),
]


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
    revision: Revision | None = None
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
    connectDuration: Count | None = None
    duration: Count | None = None
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


class CallLike(Protocol):
    """What the state machine and the outcome messages read of a call: a parsed
    :class:`Call`, or the processor's lean view of an ingest record's call."""

    @property
    def callId(self) -> str: ...
    @property
    def accountId(self) -> str | None: ...
    @property
    def status(self) -> CallStatus: ...
    @property
    def revision(self) -> int | None: ...
    def to_json(self) -> bytes: ...
