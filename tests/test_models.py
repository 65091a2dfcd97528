"""The Call model and the message models: both body shapes, dates, every validation rule,
and the hand-built encoders held to the pydantic models they claim to produce."""

from __future__ import annotations

import calendar
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.call import (
    RFC1123_PATTERN,
    RFC3339_PATTERN,
    AnsweredBy,
    Call,
    CallDirection,
    CallStatus,
)
from schemas.messages import (
    ChangeMessage,
    IngestEvent,
    RejectedMessage,
    RejectReason,
    Source,
    encode_ingest,
    encode_outcome,
    event_id_for,
    ingest_call,
    normalise_body,
    read_ingest,
)

# The SDK's own documented webhook example (docs/freeclimb.md section 2), verbatim.
SDK_WEBHOOK = (
    b'{"accountId":"AC1334ffb694cd8d969f51cddf5f7c9b478546d50c",'
    b'"callId":"CAccb0b00506553cda09b51c5477f672a49e0b2213","callStatus":"ringing",'
    b'"conferenceId":null,"direction":"inbound","from":"+13121000109","parentCallId":null,'
    b'"queueId":null,"requestType":"inboundCall","to":"+13121000096"}'
)

ACCOUNT_ID = "AC1334ffb694cd8d969f51cddf5f7c9b478546d50c"
CALL_ID = "CAccb0b00506553cda09b51c5477f672a49e0b2213"
PARENT_ID = "CA5f3c2e9b0d7a4816c0ffee00deadbeef12345678"
PHONE_ID = "PN0aa1bb2cc3dd4ee5ff60718293a4b5c6d7e8f901"
HEX40 = "0123456789abcdef0123456789abcdef01234567"

# Every property of the seed's Call resource table, plus the SDK's applicationId.
RESOURCE: dict[str, Any] = {
    "uri": f"/Accounts/{ACCOUNT_ID}/Calls/{CALL_ID}",
    "dateCreated": "Wed, 09 Oct 2024 15:05:03 GMT",
    "dateUpdated": "Wed, 09 Oct 2024 15:06:41 GMT",
    "dateCreatedISO": "2024-10-09T15:05:03.358Z",
    "dateUpdatedISO": "2024-10-09T15:06:41.007Z",
    "revision": 4,
    "callId": CALL_ID,
    "parentCallId": PARENT_ID,
    "accountId": ACCOUNT_ID,
    "to": "+13121000096",
    "from": "+13121000109",
    "phoneNumberId": PHONE_ID,
    "status": "completed",
    "startTime": "Wed, 09 Oct 2024 15:05:04 GMT",
    "connectTime": "Wed, 09 Oct 2024 15:05:11 GMT",
    "endTime": "Wed, 09 Oct 2024 15:06:40 GMT",
    "connectDuration": 89,
    "duration": 96,
    "direction": "outboundDial",
    "answeredBy": "human",
    "subresourceUris": {
        "logs": f"/Accounts/{ACCOUNT_ID}/Calls/{CALL_ID}/Logs",
        "recordings": f"/Accounts/{ACCOUNT_ID}/Calls/{CALL_ID}/Recordings",
    },
    "applicationId": "AP" + HEX40,
}

WEBHOOK: dict[str, Any] = json.loads(SDK_WEBHOOK)

MINIMAL: dict[str, Any] = {"callId": CALL_ID, "status": "inProgress"}


class _Drop:
    """In an edit: remove the key. Its repr is stable, as test ids must be the same in
    every pytest-xdist worker."""

    def __repr__(self) -> str:
        return "<drop>"


_DROP = _Drop()


def edit(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **changes}
    return {k: v for k, v in merged.items() if v is not _DROP}


def locs(exc: ValidationError) -> list[tuple[int | str, ...]]:
    return [error["loc"] for error in exc.errors()]


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# --- the two body shapes ----------------------------------------------------------------


def test_sdk_webhook_example_is_a_webhook() -> None:
    source, request_type, call = normalise_body(json.loads(SDK_WEBHOOK))
    assert source is Source.WEBHOOK
    assert request_type == "inboundCall"
    assert call.callId == CALL_ID
    assert call.accountId == ACCOUNT_ID
    assert call.status is CallStatus.RINGING  # from callStatus
    assert call.direction is CallDirection.INBOUND
    assert call.from_ == "+13121000109"
    assert call.to == "+13121000096"
    assert call.parentCallId is None
    assert call.revision is None
    # Written back in FreeClimb's names; nulls and webhook-only fields left out.
    assert json.loads(call.to_json()) == {
        "callId": CALL_ID,
        "accountId": ACCOUNT_ID,
        "status": "ringing",
        "direction": "inbound",
        "from": "+13121000109",
        "to": "+13121000096",
    }


def test_full_call_resource_is_a_resource() -> None:
    source, request_type, call = normalise_body(dict(RESOURCE))
    assert source is Source.RESOURCE
    assert request_type is None
    assert call.uri == RESOURCE["uri"]
    assert call.dateCreated == utc(2024, 10, 9, 15, 5, 3)
    assert call.dateUpdated == utc(2024, 10, 9, 15, 6, 41)
    assert call.dateCreatedISO == utc(2024, 10, 9, 15, 5, 3, 358000)
    assert call.dateUpdatedISO == utc(2024, 10, 9, 15, 6, 41, 7000)
    assert call.revision == 4
    assert call.callId == CALL_ID
    assert call.parentCallId == PARENT_ID
    assert call.accountId == ACCOUNT_ID
    assert call.to == "+13121000096"
    assert call.from_ == "+13121000109"
    assert call.phoneNumberId == PHONE_ID
    assert call.status is CallStatus.COMPLETED
    assert call.startTime == utc(2024, 10, 9, 15, 5, 4)
    assert call.connectTime == utc(2024, 10, 9, 15, 5, 11)
    assert call.endTime == utc(2024, 10, 9, 15, 6, 40)
    assert call.connectDuration == 89
    assert call.duration == 96
    assert call.direction is CallDirection.OUTBOUND_DIAL
    assert call.answeredBy is AnsweredBy.HUMAN
    assert call.subresourceUris == RESOURCE["subresourceUris"]
    assert call.applicationId == RESOURCE["applicationId"]
    # Every field, both date formats included, is written back exactly as it came.
    assert json.loads(call.to_json()) == RESOURCE


@pytest.mark.parametrize("base", [WEBHOOK, RESOURCE], ids=["webhook", "resource"])
def test_outbound_is_read_as_outbound_api(base: dict[str, Any]) -> None:
    _, _, call = normalise_body(edit(base, {"direction": "outbound"}))
    assert call.direction is CallDirection.OUTBOUND_API
    assert json.loads(call.to_json())["direction"] == "outboundAPI"


def test_webhook_extra_fields_are_tolerated() -> None:
    body = edit(
        WEBHOOK,
        {
            "requestType": "callStatus",
            "callStatus": "completed",
            "direction": "outboundAPI",
            "parentCallId": PARENT_ID,
            "conferenceId": "CF" + HEX40,
            "queueId": "QU" + HEX40,
            "callEndedReason": "farEndHangup",
            "callDuration": 42,
            "recordingId": "RE" + HEX40,
            "recordingUrl": "/Accounts/x/Recordings/y/Download",
            "recordingSize": "73216",
            "recordingFormat": "audio/wav",
            "recordingDurationSec": 4,
            "someFutureField": {"nested": [1, None, "x"]},
        },
    )
    source, request_type, call = normalise_body(body)
    assert source is Source.WEBHOOK
    assert request_type == "callStatus"
    assert call.status is CallStatus.COMPLETED
    assert call.parentCallId == PARENT_ID
    assert call.duration == 42  # callDuration
    written = json.loads(call.to_json())
    assert not {"conferenceId", "queueId", "recordingId", "someFutureField"} & written.keys()


def test_resource_unknown_field_is_tolerated_and_dropped() -> None:
    source, _, call = normalise_body(edit(RESOURCE, {"someFutureField": {"a": [1, 2]}}))
    assert source is Source.RESOURCE
    assert json.loads(call.to_json()) == RESOURCE


# --- dates --------------------------------------------------------------------------------


RFC1123_FIELDS = ["dateCreated", "dateUpdated", "startTime", "connectTime", "endTime"]
RFC3339_FIELDS = ["dateCreatedISO", "dateUpdatedISO"]


@pytest.mark.parametrize("field", RFC1123_FIELDS)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mon, 15 Jun 2009 20:45:30 GMT", utc(2009, 6, 15, 20, 45, 30)),
        ("Sat, 29 Feb 2020 00:00:00 GMT", utc(2020, 2, 29)),
        ("Fri, 31 Dec 1999 23:59:59 GMT", utc(1999, 12, 31, 23, 59, 59)),
        ("Thu, 10 Oct 2024 09:05:03 GMT", utc(2024, 10, 10, 9, 5, 3)),
    ],
)
def test_rfc1123_parsed_and_written_back_identically(
    field: str, text: str, expected: datetime
) -> None:
    call = Call.model_validate({**MINIMAL, field: text})
    value = getattr(call, field)
    assert value == expected
    assert value.utcoffset() == timedelta(0)
    assert json.loads(call.to_json())[field] == text


@pytest.mark.parametrize("field", RFC3339_FIELDS)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-10-09T15:05:03.358Z", utc(2024, 10, 9, 15, 5, 3, 358000)),
        ("2024-10-09T15:05:03.007Z", utc(2024, 10, 9, 15, 5, 3, 7000)),
        ("2024-10-09T15:05:03.000Z", utc(2024, 10, 9, 15, 5, 3)),
    ],
)
def test_rfc3339_millis_round_trip(field: str, text: str, expected: datetime) -> None:
    call = Call.model_validate({**MINIMAL, field: text})
    assert getattr(call, field) == expected
    assert json.loads(call.to_json())[field] == text


@pytest.mark.parametrize("field", RFC3339_FIELDS)
def test_rfc3339_offset_is_written_as_utc_z(field: str) -> None:
    call = Call.model_validate({**MINIMAL, field: "2024-10-09T20:35:03.358+05:30"})
    assert getattr(call, field).utcoffset() == timedelta(0)
    assert json.loads(call.to_json())[field] == "2024-10-09T15:05:03.358Z"


def test_rfc3339_year_below_1000_is_written_with_four_digits() -> None:
    # Accepted on the way in, so it must be readable again from the ingest topic
    # (strftime("%Y") wrote "999-...", which the processor then could not decode).
    body = {**MINIMAL, "dateCreatedISO": "0999-01-02T03:04:05.006Z"}
    raw = json.dumps(body).encode()
    source, request_type, call = normalise_body(body)
    assert json.loads(call.to_json())["dateCreatedISO"] == "0999-01-02T03:04:05.006Z"
    event = IngestEvent.model_validate_json(
        encode_ingest("evt-0", utc(2024, 1, 1), source, request_type, call, raw)
    )
    assert event.call == call


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("dateCreatedISO", "9999-12-31T23:59:59.000-01:00"),
        ("dateUpdatedISO", "0001-01-01T00:00:00.000+01:00"),
        ("startTime", "Fri, 31 Dec 9999 23:59:59 -0100"),
    ],
)
def test_dates_out_of_range_in_utc_are_field_errors(field: str, text: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Call.model_validate({**MINIMAL, field: text})
    assert locs(exc.value) == [(field,)]


@pytest.mark.parametrize("field", ["startTime", "dateCreatedISO"])
def test_dates_must_be_strings_not_numbers(field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Call.model_validate({**MINIMAL, field: 1234})
    assert locs(exc.value) == [(field,)]


@pytest.mark.parametrize("field", RFC1123_FIELDS)
@pytest.mark.parametrize("text", ["Thu, 01 Jan 0099 00:00:00 GMT", "Sat, 31 Dec 0999 23:59:59 GMT"])
def test_rfc1123_year_below_1000_is_refused_not_moved(field: str, text: str) -> None:
    # Python's parser reads "0099" as 1999: accepted, it would move by 1900 years.
    with pytest.raises(ValidationError) as exc:
        Call.model_validate({**MINIMAL, field: text})
    assert locs(exc.value) == [(field,)]
    assert "1000" in exc.value.errors()[0]["msg"]


@pytest.mark.parametrize("field", RFC3339_FIELDS)
@pytest.mark.parametrize(
    "text",
    [
        "2024-10-09T15:05:03.3581Z",  # sub-millisecond: would be written back changed
        "2024-10-09t15:05:03.358z",  # lowercase separators
        "2024-10-09 15:05:03.358Z",  # space instead of T
        "20241009T150503Z",  # ISO 8601 basic format, which fromisoformat takes
        "2024-10-09T23:59:60Z",  # leap second: no datetime holds it
    ],
)
def test_rfc3339_outside_the_published_grammar_is_refused(field: str, text: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Call.model_validate({**MINIMAL, field: text})
    assert locs(exc.value) == [(field,)]


@pytest.mark.parametrize("field", RFC1123_FIELDS)
def test_rfc1123_day_of_one_digit_is_read_and_written_with_two(field: str) -> None:
    # RFC 1123 takes the day in one or two digits, and Java's RFC_1123_DATE_TIME writes
    # one: a resource from the REST API dated the 1st to the 9th must validate.
    call = Call.model_validate({**MINIMAL, field: "Tue, 1 Dec 2026 12:00:00 GMT"})
    assert getattr(call, field) == utc(2026, 12, 1, 12)
    assert json.loads(call.to_json())[field] == "Tue, 01 Dec 2026 12:00:00 GMT"
    assert re.fullmatch(RFC1123_PATTERN, "Tue, 1 Dec 2026 12:00:00 GMT")
    for text in ("Tue, 001 Dec 2026 12:00:00 GMT", "Tue,  1 Dec 2026 12:00:00 GMT"):
        assert not _accepted(field, text), text


def test_rfc1123_day_name_is_written_back_correctly() -> None:
    call = Call.model_validate({**MINIMAL, "startTime": "Sun, 15 Jun 2009 20:45:30 GMT"})
    assert json.loads(call.to_json())["startTime"] == "Mon, 15 Jun 2009 20:45:30 GMT"


def _accepted(field: str, text: str) -> bool:
    try:
        Call.model_validate({**MINIMAL, field: text})
    except ValidationError:
        return False
    return True


def test_published_date_patterns_follow_the_calendar() -> None:
    # Every day of a leap year, a common year, and 29 February of every year the
    # patterns admit: the pattern and the service agree on each.
    rfc1123 = re.compile(RFC1123_PATTERN)
    rfc3339 = re.compile(RFC3339_PATTERN)
    day = timedelta(days=1)
    for start in (datetime(2000, 1, 1), datetime(1900, 1, 1), datetime(2023, 1, 1)):
        for n in range(366):
            d = start + n * day
            text = format_datetime(d.replace(tzinfo=UTC), usegmt=True)
            assert rfc1123.fullmatch(text) and _accepted("startTime", text), text
            iso = d.strftime("%Y-%m-%dT00:00:00Z")
            assert rfc3339.fullmatch(iso) and _accepted("dateCreatedISO", iso), iso
    for year in range(1, 10000):
        leap = calendar.isleap(year)
        iso = f"{year:04d}-02-29T12:00:00Z"
        assert bool(rfc3339.fullmatch(iso)) == leap == _accepted("dateCreatedISO", iso), iso
        if year >= 1000:
            text = f"Mon, 29 Feb {year} 12:00:00 GMT"
            assert bool(rfc1123.fullmatch(text)) == leap == _accepted("startTime", text), text


_SHAPE_1123 = (
    r"\A[A-Z][a-z]{2}, [0-3][0-9] (Jan|Feb|Apr|Jun|Sep|Nov|Dec|Aaa) [0-9]{4} "
    r"[0-2][0-9]:[0-6][0-9]:[0-6][0-9] (GMT|UTC)\Z"
)
_SHAPE_3339 = (
    r"\A[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-6][0-9]:[0-6][0-9](\.[0-9]{1,4})?"
    r"(Z|[+-][0-2][0-9]:[0-6][0-9])\Z"
)


@given(st.from_regex(_SHAPE_1123))
def test_rfc1123_pattern_accepts_exactly_what_the_service_accepts(text: str) -> None:
    assert bool(re.fullmatch(RFC1123_PATTERN, text)) == _accepted("startTime", text), text


@given(st.from_regex(_SHAPE_3339))
def test_rfc3339_pattern_accepts_exactly_what_the_service_accepts(text: str) -> None:
    # Only the very ends of datetime's range may leave it when moved to UTC.
    if text.startswith(("0001-01-01", "9999-12-31")):
        return
    assert bool(re.fullmatch(RFC3339_PATTERN, text)) == _accepted("dateCreatedISO", text), text


def test_the_pattern_schemathesis_found_is_gone() -> None:
    # The old published pattern admitted this; the service refused it with 422.
    assert not re.fullmatch(RFC1123_PATTERN, "Aaa, 00 Aaa 0000 00:00:00 GMT")


@pytest.mark.parametrize("field", ["revision", "duration", "connectDuration"])
@pytest.mark.parametrize("value", ["5", True, "", 5.0])
def test_integers_are_json_integers(field: str, value: object) -> None:
    # The published schema says type: integer; "5" and true are not, 5.0 is, and "" is
    # FreeClimb's "not yet".
    if value in ("", 5.0) and not isinstance(value, bool):
        call = Call.model_validate({**MINIMAL, field: value})
        assert getattr(call, field) == (None if value == "" else 5)
        return
    with pytest.raises(ValidationError) as exc:
        Call.model_validate({**MINIMAL, field: value})
    assert locs(exc.value) == [(field,)]


def test_subresource_links_of_any_shape_are_tolerated() -> None:
    call = Call.model_validate({**MINIMAL, "subresourceUris": {"logs": None, "new": {"a": 1}}})
    assert call.subresourceUris == {"logs": None, "new": {"a": 1}}


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("dateCreated", "2009-06-15T20:45:30Z"),  # RFC 3339 in an RFC 1123 field
        ("dateUpdated", "Mon, 15 Jun 2009 20:45:30"),  # no zone
        ("startTime", "yesterday"),
        ("connectTime", "Mon, 15 Jun 2009 25:45:30 GMT"),  # hour 25
        ("endTime", "Mon, 31 Jun 2009 20:45:30 GMT"),  # 31 June
        ("endTime", "Mon, 15 Jun 2009 20:45:30 -0000"),  # "-0000" means zone unknown
        ("dateCreatedISO", "Mon, 15 Jun 2009 20:45:30 GMT"),  # RFC 1123 in an ISO field
        ("dateCreatedISO", "2024-10-09T15:05:03.358"),  # no zone
        ("dateUpdatedISO", "2024-13-09T15:05:03.358Z"),  # month 13
        ("dateUpdatedISO", "2024-10-09"),  # a date without a time has no zone
    ],
)
def test_bad_dates_are_refused_naming_the_field(field: str, text: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Call.model_validate({**MINIMAL, field: text})
    assert locs(exc.value) == [(field,)]


# --- empty strings ------------------------------------------------------------------------


def test_resource_empty_strings_are_absent() -> None:
    body = edit(
        RESOURCE,
        {
            "status": "inProgress",
            "endTime": "",
            "duration": "",
            "connectDuration": "",
            "answeredBy": "",
            "parentCallId": "",
            "phoneNumberId": "",
            "dateUpdatedISO": "",
        },
    )
    _, _, call = normalise_body(body)
    assert call.endTime is None
    assert call.duration is None
    assert call.connectDuration is None
    assert call.answeredBy is None
    assert call.parentCallId is None
    assert call.phoneNumberId is None
    assert call.dateUpdatedISO is None
    written = json.loads(call.to_json())
    for absent in ("endTime", "duration", "connectDuration", "answeredBy", "dateUpdatedISO"):
        assert absent not in written


def test_webhook_empty_strings_are_absent() -> None:
    body = edit(WEBHOOK, {"callDuration": "", "direction": "", "parentCallId": "", "from": ""})
    _, _, call = normalise_body(body)
    assert call.duration is None
    assert call.direction is None
    assert call.parentCallId is None
    assert call.from_ is None


# --- validation rules, each naming its field ------------------------------------------------


RESOURCE_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"status": "answered"}, "status"),
    ({"status": "InProgress"}, "status"),
    ({"status": "callStatus"}, "status"),
    ({"direction": "sideways"}, "direction"),
    ({"direction": "Inbound"}, "direction"),
    ({"answeredBy": "robot"}, "answeredBy"),
    ({"callId": "CA123"}, "callId"),
    ({"callId": "AC" + HEX40}, "callId"),
    ({"callId": "CA" + "g" * 40}, "callId"),
    ({"callId": "CA" + HEX40 + "0"}, "callId"),
    ({"callId": "CA" + HEX40 + "\n"}, "callId"),
    ({"accountId": "AC" + HEX40[:-1]}, "accountId"),
    ({"accountId": "CA" + HEX40}, "accountId"),
    ({"phoneNumberId": "PN-1"}, "phoneNumberId"),
    ({"phoneNumberId": "AC" + HEX40}, "phoneNumberId"),
    ({"parentCallId": "PN" + HEX40}, "parentCallId"),
    ({"parentCallId": "CA" + "z" * 40}, "parentCallId"),
    ({"revision": 0}, "revision"),
    ({"revision": -1}, "revision"),
    ({"revision": 1.5}, "revision"),
    ({"duration": -1}, "duration"),
    ({"connectDuration": -1}, "connectDuration"),
    ({"callId": _DROP}, "callId"),
    ({"callId": None}, "callId"),
    ({"status": _DROP}, "status"),
    ({"status": ""}, "status"),
]


WEBHOOK_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"callStatus": "answered"}, "callStatus"),
    ({"callStatus": _DROP}, "callStatus"),
    ({"callStatus": _DROP, "status": "ringing"}, "callStatus"),
    ({"callStatus": ""}, "callStatus"),
    ({"requestType": ""}, "requestType"),
    ({"requestType": None}, "requestType"),
    ({"requestType": _DROP}, "requestType"),  # callStatus alone makes it a webhook
    ({"direction": "sideways"}, "direction"),
    ({"callId": "CA123"}, "callId"),
    ({"callId": _DROP}, "callId"),
    ({"accountId": "AC"}, "accountId"),
    ({"parentCallId": "CA" + "x" * 40}, "parentCallId"),
    ({"callDuration": -5}, "callDuration"),
]


FIELD_ERRORS = [(RESOURCE, c, f) for c, f in RESOURCE_ERRORS] + [
    (WEBHOOK, c, f) for c, f in WEBHOOK_ERRORS
]


@pytest.mark.parametrize(
    ("base", "changes", "field"),
    FIELD_ERRORS,
    ids=[
        f"{'webhook' if base is WEBHOOK else 'resource'}:{field}={changes[field]!r}"[:50]
        for base, changes, field in FIELD_ERRORS
    ],
)
def test_validation_names_the_field(
    base: dict[str, Any], changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        normalise_body(edit(base, changes))
    assert locs(exc.value) == [(field,)]


def test_revision_one_is_accepted() -> None:
    assert Call.model_validate({**MINIMAL, "revision": 1}).revision == 1


def test_connect_duration_may_equal_duration_but_not_exceed_it() -> None:
    assert Call.model_validate({**MINIMAL, "duration": 7, "connectDuration": 7}).duration == 7
    with pytest.raises(ValidationError) as exc:
        Call.model_validate({**MINIMAL, "duration": 7, "connectDuration": 8})
    [error] = exc.value.errors()
    assert "connectDuration" in error["msg"]
    assert "duration" in error["msg"].replace("connectDuration", "")


@pytest.mark.parametrize(
    ("changes", "later", "earlier"),
    [
        (
            {"connectTime": _DROP, "endTime": "Wed, 09 Oct 2024 15:05:03 GMT"},
            "endTime",
            "startTime",
        ),
        ({"connectTime": "Wed, 09 Oct 2024 15:05:03 GMT"}, "connectTime", "startTime"),
        ({"endTime": "Wed, 09 Oct 2024 15:05:10 GMT"}, "endTime", "connectTime"),
    ],
)
def test_times_out_of_order_are_refused_naming_both(
    changes: dict[str, Any], later: str, earlier: str
) -> None:
    body = edit(RESOURCE, {"duration": _DROP, "connectDuration": _DROP, **changes})
    with pytest.raises(ValidationError) as exc:
        normalise_body(body)
    [error] = exc.value.errors()
    assert later in error["msg"]
    assert earlier in error["msg"]
    assert error["msg"].index(later) < error["msg"].index(earlier)


def test_equal_times_are_in_order() -> None:
    same = "Wed, 09 Oct 2024 15:05:04 GMT"
    call = Call.model_validate({**MINIMAL, "startTime": same, "connectTime": same, "endTime": same})
    assert call.startTime == call.connectTime == call.endTime


# --- property: any valid Call round-trips through its own JSON ----------------------------


_ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
_INSTANTS = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1), timezones=_ZONES
)
_SECONDS = _INSTANTS.map(lambda d: d.replace(microsecond=0))
_MILLIS = _INSTANTS.map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
_HEX = "0123456789abcdefABCDEF"


def _ids(prefix: str) -> st.SearchStrategy[str]:
    return st.text(alphabet=_HEX, min_size=40, max_size=40).map(lambda h: prefix + h)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


@st.composite
def calls(draw: st.DrawFn) -> Call:
    start, connect, end = sorted(draw(st.lists(_SECONDS, min_size=3, max_size=3)))
    duration = draw(_maybe(st.integers(min_value=0, max_value=2**40)))
    cap = 2**40 if duration is None else duration
    fields: dict[str, Any] = {
        "uri": draw(_maybe(st.text())),
        "dateCreated": draw(_maybe(_SECONDS)),
        "dateUpdated": draw(_maybe(_SECONDS)),
        "dateCreatedISO": draw(_maybe(_MILLIS)),
        "dateUpdatedISO": draw(_maybe(_MILLIS)),
        "revision": draw(_maybe(st.integers(min_value=1, max_value=2**53))),
        "callId": draw(_ids("CA")),
        "parentCallId": draw(_maybe(_ids("CA"))),
        "accountId": draw(_maybe(_ids("AC"))),
        "to": draw(_maybe(st.text())),
        "from": draw(_maybe(st.text())),
        "phoneNumberId": draw(_maybe(_ids("PN"))),
        "status": draw(st.sampled_from(CallStatus)),
        "startTime": draw(_maybe(st.just(start))),
        "connectTime": draw(_maybe(st.just(connect))),
        "endTime": draw(_maybe(st.just(end))),
        "duration": duration,
        "connectDuration": draw(_maybe(st.integers(min_value=0, max_value=cap))),
        "direction": draw(_maybe(st.sampled_from(CallDirection))),
        "answeredBy": draw(_maybe(st.sampled_from(AnsweredBy))),
        "subresourceUris": draw(_maybe(st.dictionaries(st.text(), st.text(), max_size=3))),
        "applicationId": draw(_maybe(st.text())),
    }
    return Call.model_validate(fields)


@given(calls())
def test_any_valid_call_round_trips(call: Call) -> None:
    assert Call.model_validate_json(call.to_json()) == call


# --- encoders held to the models -----------------------------------------------------------


RECEIVED = utc(2024, 10, 9, 15, 6, 42, 123000)
PROCESSED = utc(2024, 10, 9, 15, 6, 42, 456000)

# Odd whitespace, raw UTF-8, escapes (incl. a surrogate pair), nesting, a trailing newline:
# all of it must reach the ingest topic untouched.
RAW_BODY = (
    "{\n"
    '  "requestType" : "callStatus",\n'
    f'\t"callId":"{CALL_ID}", "accountId": "{ACCOUNT_ID}",\n'
    '  "callStatus": "completed", "direction": "outbound",\n'
    '  "from": "+13121000109", "to": "+13121000096",\n'
    '  "callEndedReason": "farEndHangup", "callDuration": 42,\n'
    '  "conferenceId": null, "queueId": null,\n'
    '  "note": "café ☎ \\u00e9 \\ud83d\\ude00 \\"quoted\\" \\\\",\n'
    '  "future": {"list": [1, 2.5, true, null], "empty": ""}\n'
    "}\n"
).encode()


def test_encode_ingest_is_an_ingest_event_with_the_raw_body_spliced() -> None:
    body = json.loads(RAW_BODY)
    source, request_type, call = normalise_body(body)
    # A clock in another zone is still written in UTC with a Z.
    local = RECEIVED.astimezone(timezone(-timedelta(hours=7)))
    encoded = encode_ingest("evt-1", local, source, request_type, call, RAW_BODY)
    assert RAW_BODY in encoded  # the bytes as received, not a re-serialisation
    event = IngestEvent.model_validate_json(encoded)
    assert event.eventId == "evt-1"
    assert event.receivedAt == RECEIVED
    assert event.source is Source.WEBHOOK
    assert event.requestType == "callStatus"
    assert event.call == call
    assert event.body == body
    assert json.loads(encoded)["receivedAt"] == "2024-10-09T15:06:42.123Z"


@st.composite
def webhooks(draw: st.DrawFn) -> dict[str, Any]:
    """Webhook bodies with every field the call takes from absent, null, empty (read as
    absent) or set, texts with escapes and non-ASCII, directions in both vocabularies."""

    def maybe(values: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.just(_ABSENT), st.none(), st.just(""), values))

    fields: dict[str, Any] = {
        "requestType": draw(st.sampled_from(["callStatus", "inboundCall", "x"])),
        "callId": draw(_ids("CA")),
        "callStatus": draw(st.sampled_from(CallStatus)).value,
        "accountId": maybe(_ids("AC")),
        "parentCallId": maybe(_ids("CA")),
        "to": maybe(st.text()),
        "from": maybe(st.text()),
        "direction": maybe(st.sampled_from(["outbound", *(d.value for d in CallDirection)])),
        "callDuration": maybe(st.one_of(st.integers(0, 2**63 - 1), st.just(7.0))),
        "callEndedReason": maybe(st.text()),
        "queueId": maybe(st.text()),
    }
    return {k: v for k, v in fields.items() if v is not _ABSENT}


_ABSENT = object()


@given(webhooks())
def test_ingest_calls_view_of_a_webhook_is_the_call_normalise_body_builds(
    body: dict[str, Any],
) -> None:
    # The handler's lean path must write the very bytes of the Call it skips building.
    source, request_type, call = normalise_body(body)
    lean_source, lean_type, view = ingest_call(body)
    assert (lean_source, lean_type) == (source, request_type)
    assert view.to_json() == call.to_json()
    assert (view.callId, view.accountId, view.status, view.revision) == (
        call.callId,
        call.accountId,
        call.status,
        call.revision,
    )
    at = RECEIVED
    assert encode_ingest("e", at, lean_source, lean_type, view, b"{}") == encode_ingest(
        "e", at, source, request_type, call, b"{}"
    )


def test_ingest_call_refuses_what_normalise_body_refuses() -> None:
    for body in ({"callStatus": "completed"}, {"status": "x", "callId": CALL_ID}):
        with pytest.raises(ValidationError) as lean:
            ingest_call(body)
        with pytest.raises(ValidationError) as full:
            normalise_body(body)
        assert lean.value.errors() == full.value.errors()


def test_encode_ingest_takes_received_at_as_text_in_the_written_form() -> None:
    _, _, call = normalise_body(dict(RESOURCE))
    text = "2024-10-09T15:06:42.123Z"
    assert encode_ingest("e", text, Source.RESOURCE, None, call, b"{}") == encode_ingest(
        "e", RECEIVED, Source.RESOURCE, None, call, b"{}"
    )


def test_encode_ingest_of_a_resource_has_null_request_type() -> None:
    raw = json.dumps(RESOURCE, indent=1, ensure_ascii=False).encode()
    source, request_type, call = normalise_body(json.loads(raw))
    encoded = encode_ingest("evt-2", RECEIVED, source, request_type, call, raw)
    event = IngestEvent.model_validate_json(encoded)
    assert event.source is Source.RESOURCE
    assert event.requestType is None
    assert json.loads(encoded)["requestType"] is None
    assert event.call == call
    assert event.body == RESOURCE


def test_encode_outcome_without_reason_is_a_change_message() -> None:
    _, request_type, call = normalise_body(json.loads(SDK_WEBHOOK))
    encoded = encode_outcome(
        event_id="evt-3",
        call=call,
        previous_status=CallStatus.QUEUED,
        previous_revision=None,
        source=Source.WEBHOOK,
        request_type=request_type,
        received_at=RECEIVED,
        processed_at=PROCESSED,
    )
    message = ChangeMessage.model_validate_json(encoded)
    assert message.eventId == "evt-3"
    assert message.callId == CALL_ID
    assert message.accountId == ACCOUNT_ID
    assert message.previousStatus is CallStatus.QUEUED
    assert message.status is CallStatus.RINGING
    assert message.previousRevision is None
    assert message.revision is None
    assert message.source is Source.WEBHOOK
    assert message.requestType == "inboundCall"
    assert message.receivedAt == RECEIVED
    assert message.processedAt == PROCESSED
    assert message.call == call
    raw = json.loads(encoded)
    assert "reason" not in raw
    assert "detail" not in raw
    # The call is in FreeClimb's own names.
    assert raw["call"]["from"] == "+13121000109"
    # Without a reason it is not a rejected message.
    with pytest.raises(ValidationError) as exc:
        RejectedMessage.model_validate_json(encoded)
    assert sorted(locs(exc.value)) == [("detail",), ("reason",)]


@pytest.mark.parametrize("reason", list(RejectReason))
def test_encode_outcome_with_reason_is_a_rejected_message(reason: RejectReason) -> None:
    _, _, call = normalise_body(dict(RESOURCE))
    detail = 'revision 4 is not above 5; status "completed" ≠ café \\ end'
    encoded = encode_outcome(
        event_id="evt-4",
        call=call,
        previous_status=CallStatus.COMPLETED,
        previous_revision=5,
        source=Source.RESOURCE,
        request_type=None,
        received_at=RECEIVED,
        processed_at=PROCESSED,
        reason=reason,
        detail=detail,
    )
    message = RejectedMessage.model_validate_json(encoded)
    assert message.reason is reason
    assert message.detail == detail
    assert message.eventId == "evt-4"
    assert message.callId == CALL_ID
    assert message.accountId == ACCOUNT_ID
    assert message.previousStatus is CallStatus.COMPLETED
    assert message.status is CallStatus.COMPLETED
    assert message.previousRevision == 5
    assert message.revision == 4
    assert message.source is Source.RESOURCE
    assert message.requestType is None
    assert message.receivedAt == RECEIVED
    assert message.processedAt == PROCESSED
    assert message.call == call
    assert json.loads(encoded)["call"] == RESOURCE


# -- the processor's decoder ----------------------------------------------------------


def _record(**changes: object) -> bytes:
    record: dict[str, object] = {
        "eventId": "e1",
        "receivedAt": "2026-01-01T00:00:05.123Z",
        "source": "resource",
        "requestType": None,
        "call": RESOURCE,
        "body": {"anything": [1, 2, {"deep": True}]},
    }
    record.update(changes)
    return json.dumps(record).encode()


def test_read_ingest_keeps_the_call_as_ingest_wrote_it() -> None:
    call = Call.model_validate(RESOURCE)
    body = json.dumps(RESOURCE).encode()
    value = encode_ingest("e1", RECEIVED, Source.RESOURCE, None, call, body)
    view = read_ingest(value)
    assert view.call.to_json() == call.to_json()  # byte for byte: passed through
    assert (view.call.callId, view.call.status, view.call.revision) == (
        call.callId,
        call.status,
        call.revision,
    )
    assert (view.eventId, view.receivedAt, view.source) == ("e1", RECEIVED, Source.RESOURCE)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"receivedAt": "2026-01-01T00:00:05"}, "receivedAt"),  # no offset
        ({"receivedAt": "yesterday"}, "receivedAt"),
        ({"source": "fax"}, "source"),
        ({"call": {"callId": "CA1", "status": "ringing"}}, "callId"),
        ({"call": {"callId": "CA" + "0" * 40, "status": "dialing"}}, "status"),
        ({"call": {"callId": "CA" + "0" * 40, "status": "ringing", "revision": 0}}, "revision"),
        ({"call": {"callId": "CA" + "0" * 40, "status": "ringing", "revision": True}}, "revision"),
        ({"call": "CA" + "0" * 40}, "call"),
    ],
)
def test_read_ingest_checks_what_the_processor_decides_on(
    changes: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        read_ingest(_record(**changes))
    assert field in str(refused.value)


def test_read_ingest_gives_received_at_as_text_in_one_form() -> None:
    assert read_ingest(_record()).receivedText == "2026-01-01T00:00:05.123Z"  # as written
    # A foreign writer's other forms of the same instant come out in the one form.
    for other in ("2026-01-01T02:00:05.123+02:00", "2026-01-01 00:00:05.123Z"):
        view = read_ingest(_record(receivedAt=other))
        assert view.receivedText == "2026-01-01T00:00:05.123Z"
        assert view.receivedAt == datetime(2026, 1, 1, 0, 0, 5, 123000, tzinfo=UTC)


def test_event_ids_are_version_8_uuids_pinned_to_the_body_bytes() -> None:
    # Consumers deduplicate on eventId across releases: its derivation may never drift.
    import uuid

    assert event_id_for(b"{}") == "44136fa3-55b3-878a-9146-ad16f7e8649e"
    assert event_id_for(b'{"a":1}') == "015abd7f-5cc5-8a2d-994b-7590f04ad808"
    for n in range(64):  # every variant digit the hash can give
        parsed = uuid.UUID(event_id_for(b"%d" % n))
        assert (parsed.version, parsed.variant) == (8, uuid.RFC_4122)
