"""The FreeClimb Calls API stand-in's calls (service/standin.py): one call as FreeClimb
holds it, how a status moves its times on, and its resource's JSON with the dates in
the documented formats (docs/freeclimb.md section 1). Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from schemas.call import CallDirection, CallStatus

ACTIVE = frozenset({CallStatus.QUEUED, CallStatus.RINGING, CallStatus.IN_PROGRESS})
TERMINAL = frozenset(CallStatus) - ACTIVE
# The statuses that say the call was dialled, so it has a startTime ("empty while not yet
# reached"): all but queued and canceled (a call canceled while queued never rang). Not
# documented per status; the stand-in's reading: busy, noAnswer and failed ("could not be
# completed as dialed", docs/freeclimb.md) were dialled, even straight from queued. It
# matters to the sweep, which lists by startTime: a call never dialled is not listed.
DIALLED = frozenset(CallStatus) - {CallStatus.QUEUED, CallStatus.CANCELED}


def rfc1123(value: datetime) -> str:
    """An RFC 1123 GMT date, as the resource's ``dateCreated`` and times show."""
    return format_datetime(value.astimezone(UTC), usegmt=True)


def rfc3339(value: datetime) -> str:
    """An RFC 3339 UTC time with milliseconds, as ``dateCreatedISO`` shows."""
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


def millis(value: datetime) -> datetime:
    """``value`` in UTC, cut to the milliseconds the ISO fields show."""
    # What the ISO fields can say: anything finer would make two readings of a call differ.
    if value.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return value.astimezone(UTC).replace(microsecond=value.microsecond // 1000 * 1000)


@dataclass(slots=True)
class HeldCall:
    """One call as FreeClimb holds it; :meth:`resource` is its JSON."""

    account_id: str
    call_id: str
    status: CallStatus
    direction: CallDirection
    from_: str
    to: str
    created: datetime
    updated: datetime
    revision: int = 1
    parent_call_id: str | None = None
    application_id: str | None = None
    phone_number_id: str | None = None
    answered_by: str | None = None
    start_time: datetime | None = None
    connect_time: datetime | None = None
    end_time: datetime | None = None

    def resource(self) -> dict[str, Any]:
        uri = f"/Accounts/{self.account_id}/Calls/{self.call_id}"
        duration: int | str = ""
        connect_duration: int | str = ""
        if self.end_time is not None and self.status in (CallStatus.COMPLETED, CallStatus.CANCELED):
            if self.start_time is not None:
                duration = int((self.end_time - self.start_time).total_seconds())
            if self.connect_time is not None:
                connect_duration = int((self.end_time - self.connect_time).total_seconds())
        return {
            "uri": uri,
            "dateCreated": rfc1123(self.created),
            "dateUpdated": rfc1123(self.updated),
            "dateCreatedISO": rfc3339(self.created),
            "dateUpdatedISO": rfc3339(self.updated),
            "revision": self.revision,
            "callId": self.call_id,
            "parentCallId": self.parent_call_id,
            "accountId": self.account_id,
            "to": self.to,
            "from": self.from_,
            "phoneNumberId": self.phone_number_id,
            "status": str(self.status),
            "startTime": rfc1123(self.start_time) if self.start_time else "",
            "connectTime": rfc1123(self.connect_time) if self.connect_time else "",
            "endTime": rfc1123(self.end_time) if self.end_time else "",
            "connectDuration": connect_duration,
            "duration": duration,
            "direction": str(self.direction),
            "answeredBy": self.answered_by,
            "subresourceUris": {"logs": f"{uri}/Logs", "recordings": f"{uri}/Recordings"},
            "applicationId": self.application_id,
        }

    def reach(self, status: CallStatus, at: datetime) -> None:
        """Move to ``status`` at ``at``, with the times it implies; no revision change."""
        # The times a status implies: dialled (startTime), answered (inProgress), ended.
        if status in DIALLED and self.start_time is None:
            self.start_time = at
        if status is CallStatus.IN_PROGRESS:
            self.connect_time = at
        if status in TERMINAL:
            self.end_time = at
        self.status = status
