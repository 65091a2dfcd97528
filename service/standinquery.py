"""The FreeClimb Calls API stand-in's list request (service/standin.py): its filters as a
predicate over held calls, and the opaque ``cursor`` of a ``nextPageUri``. An unparseable
filter or cursor is a ValueError, which the stand-in answers 400. No I/O."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from schemas.call import CallStatus
from service.standincalls import ACTIVE, HeldCall

_FILTER_TIME: Final = "%Y-%m-%d %H:%M:%S"


def filters(query: list[tuple[str, str]]) -> Callable[[HeldCall], bool]:
    """The predicate of a list request's filters; ValueError names a bad one."""
    tests = [test for name, value in query if (test := _filter(name, value)) is not None]
    apps = {value for name, value in query if name == "applicationId"}
    if apps:  # repeated: a call of any of them
        tests.append(lambda c: c.application_id in apps)
    return lambda c: all(test(c) for test in tests)


def _second(value: datetime | None) -> datetime | None:
    # Filters compare what the resource shows: RFC 1123 times have whole seconds.
    return None if value is None else value.replace(microsecond=0)


def _filter(name: str, value: str) -> Callable[[HeldCall], bool] | None:
    if name == "active":
        if value not in ("true", "false"):
            raise ValueError("active is true or false")
        return (lambda c: c.status in ACTIVE) if value == "true" else None
    if name == "status":
        try:
            status = CallStatus(value)
        except ValueError:
            raise ValueError(f"unknown status {value!r}") from None
        return lambda c: c.status is status
    if name in ("startTime", "endTime"):
        try:
            bound = datetime.strptime(value, _FILTER_TIME).replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(f"{name} is YYYY-MM-DD hh:mm:ss") from None
        if name == "startTime":  # started at or after
            return lambda c: (t := _second(c.start_time)) is not None and t >= bound
        return lambda c: (t := _second(c.end_time)) is not None and t <= bound  # ended by
    if name == "to":
        return lambda c: c.to == value
    if name == "from":
        return lambda c: c.from_ == value
    if name == "parentCallId":
        return lambda c: c.parent_call_id == value
    return None  # applicationId (above), cursor, and what FreeClimb may add


def write_cursor(page: int, query: list[tuple[str, str]]) -> str:
    """An opaque ``cursor``: the page number and the first request's filters."""
    filters = [(k, v) for k, v in query if k != "cursor"]
    raw = json.dumps([page, filters], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_cursor(cursor: str) -> tuple[int, list[tuple[str, str]]]:
    """The page number and filters of a ``cursor``; ValueError if it is not one of ours."""
    try:
        page, filters = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        pairs = [(str(k), str(v)) for k, v in filters]
    except (ValueError, TypeError, binascii.Error):
        raise ValueError("invalid cursor") from None
    if not isinstance(page, int) or page < 0:
        raise ValueError("invalid cursor")
    return page, pairs
