"""A call's state as bytes: one layout, used both in the processor's memory and as the
value of the call's record on the state topic (docs/architecture.md, section 4).

Why bytes and not objects or JSON: the processor holds the state of every call of its
partitions for the whole retention, often millions. A ``CallState`` object with its
fields costs ~340 bytes a call, the packed form ~90 (plus the callId key), and a restore
keeps each record's value as it comes, without parsing it. The FSM still works on
``CallState``; the planner unpacks a call's state when an event of it arrives and packs
the new one once per batch.

Layout (little-endian), versions 2 and 3 (version 1 was the JSON ``StateMessage``)::

    offset  size  field
    0       1     version (2 or 3)
    1       1     status (code, see _STATUSES)
    2       1     status of the last revisioned call accepted (code; 0 = none)
    3       8     revision (0 = none; FreeClimb revisions start at 1)
    11      8     updated_at, microseconds since the Unix epoch (UTC)
    19      8     content digest of the last revisioned call accepted (zeros = none)
    27      20    version 3 only: the call's account id, its 40 hex digits as bytes
    27|47   8*n   marks of the last n <= 32 eventIds judged, oldest first

Version 3 carries the account id for the reconciler (service/reconciler.py), which
needs it to build the call's URL at FreeClimb's REST API: 20 bytes, not the 42 of the
text; zeros when no event of the call named one. The processor writes version 3 only.
A state of version 2 (written before version 3 existed, or packed without an account)
decodes as before: it has no account, so the reconciler does not fetch it. The FSM
never reads the account.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from schemas.call import CallStatus
from schemas.messages import StateMessage
from service.fsm import MARK_BYTES, MAX_JUDGED, TERMINAL, CallState, content_digest, mark

VERSION = 3
_V2 = 2  # the layout without an account id, still written for calls without one
_HEAD = struct.Struct("<BBBqq8s")
ACCOUNT_BYTES = 20
# Version 3's account field when no event of the call named an account.
NO_ACCOUNT = bytes(ACCOUNT_BYTES)
_NO_DIGEST = bytes(MARK_BYTES)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

S = CallStatus
# Codes are written to the state topic: append new statuses, never reorder.
_STATUSES: tuple[CallStatus, ...] = (
    S.QUEUED, S.RINGING, S.IN_PROGRESS, S.CANCELED, S.COMPLETED, S.BUSY, S.FAILED, S.NO_ANSWER,
)  # fmt: skip
assert set(_STATUSES) == set(CallStatus), "every status needs a code"
_CODE = {status: code for code, status in enumerate(_STATUSES, start=1)}
_MAX_BYTES = _HEAD.size + ACCOUNT_BYTES + MAX_JUDGED * MARK_BYTES


class BadState(ValueError):
    """Bytes that are not a call state of any version this service reads."""


def account_bytes(account_id: str | None) -> bytes:
    """The 20 bytes version 3 keeps of an account id (``AC`` + 40 hex, as the Call model
    validates it); b"" for none."""
    return b"" if account_id is None else bytes.fromhex(account_id[2:])


def pack(state: CallState, account: bytes = b"") -> bytes:
    """``state`` as bytes: with ``account`` (see :func:`account_bytes`, or NO_ACCOUNT) as
    version 3, the processor's; without, in version 2's layout."""
    revised = _CODE[state.revised_status] if state.revised_status is not None else 0
    head = _HEAD.pack(
        VERSION if account else _V2,
        _CODE[state.status],
        revised,
        state.revision or 0,
        (state.updated_at - _EPOCH) // _MICROSECOND,
        state.revised_digest or _NO_DIGEST,
    )
    if account and len(account) != ACCOUNT_BYTES:
        raise ValueError(f"an account is {ACCOUNT_BYTES} bytes")
    return head + account + state.judged


def _marks_at(blob: bytes) -> int:
    """Where the marks start, by the version byte; BadState for any other version."""
    version = blob[0] if blob else 0
    if version == _V2:
        start = _HEAD.size
    elif version == VERSION:
        start = _HEAD.size + ACCOUNT_BYTES
    else:
        raise BadState(f"not a version-{_V2} or -{VERSION} state ({len(blob)} bytes)")
    if len(blob) < start or (len(blob) - start) % MARK_BYTES:
        raise BadState(f"not a version-{version} state ({len(blob)} bytes)")
    if len(blob) - start > MAX_JUDGED * MARK_BYTES:
        raise BadState(f"{len(blob)} bytes is longer than any version-{version} state")
    return start


def unpack(blob: bytes) -> CallState:
    """The state ``blob`` holds; BadState if it is not one (a version-1 JSON state is
    read by :func:`load`, which converts it)."""
    try:
        start = _marks_at(blob)
        _, status, revised, revision, micros, digest = _HEAD.unpack_from(blob)
        return CallState(
            _STATUSES[status - 1] if status else _missing(),
            revision or None,
            _EPOCH + micros * _MICROSECOND,
            _STATUSES[revised - 1] if revised else None,
            b"" if digest == _NO_DIGEST else digest,
            blob[start:],
        )
    except (struct.error, IndexError, OverflowError) as exc:
        raise BadState(f"not a call state: {exc}") from None


def account_of(blob: bytes) -> bytes:
    """The account bytes a packed state keeps; b"" for none (version 2, or zeros)."""
    if blob[0] == VERSION:
        account = blob[_HEAD.size : _HEAD.size + ACCOUNT_BYTES]
        return b"" if account == NO_ACCOUNT else account
    return b""


def account_id(account: bytes) -> str | None:
    """The account id of :func:`account_of`'s bytes, as FreeClimb writes it."""
    return "AC" + account.hex() if account else None


def _missing() -> CallStatus:
    raise BadState("a state without a status")


def peek(blob: bytes) -> tuple[CallStatus, datetime]:
    """Status and updated_at of a packed state, for retention sweeps over every call."""
    _, status, _, _, micros, _ = _HEAD.unpack_from(blob)
    return _STATUSES[status - 1], _EPOCH + micros * _MICROSECOND


_TERMINAL_CODES = frozenset(_CODE[status] for status in TERMINAL)
_FACTS = struct.Struct("<BB9xq")


def held_since(blob: bytes) -> float | None:
    """For the reconciler's index: the time (Unix seconds) of a call's last event when
    its state is non-terminal and has an account (so it can be fetched); else None.
    One struct read, no objects: it runs for each state a batch commits."""
    version, status, micros = _FACTS.unpack_from(blob)
    if version != VERSION or status in _TERMINAL_CODES:
        return None
    if blob[_HEAD.size : _HEAD.size + ACCOUNT_BYTES] == NO_ACCOUNT:
        return None
    return float(micros) / 1e6


def load(value: bytes) -> bytes:
    """A state record's value, checked, in the current layout: kept as it is when it is
    one already; a version-1 JSON ``StateMessage`` (written before version 2) converted,
    so an upgrade keeps every call's state. BadState when it is neither."""
    if value[:1] == b"{":
        try:
            old = StateMessage.model_validate_json(value)
        except ValidationError as exc:
            raise BadState(f"not a call state ({exc.error_count()} errors)") from None
        revised = old.revisedCall or (old.call if old.call.revision is not None else None)
        marks = b"".join(mark(event_id) for event_id in old.judged[-MAX_JUDGED:])
        return pack(
            CallState(
                old.status,
                old.revision,
                old.updatedAt,
                revised.status if revised else None,
                content_digest(revised) if revised else b"",
                marks,
            )
        )
    if len(value) > _MAX_BYTES:
        raise BadState(f"{len(value)} bytes is longer than any state")
    unpack(value)
    return value


__all__ = [
    "ACCOUNT_BYTES",
    "NO_ACCOUNT",
    "VERSION",
    "BadState",
    "account_bytes",
    "account_id",
    "account_of",
    "held_since",
    "load",
    "pack",
    "peek",
    "unpack",
]
