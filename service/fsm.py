"""The per-call state machine (docs/architecture.md, section 3), as pure functions.

``decide`` takes the current state of one call (or ``None``) and one event, and returns a
verdict plus the state to keep. It reads no clock and does no I/O: the processor passes
the event's time (its ``receivedAt``) in, and does all the Kafka work around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from hashlib import blake2b
from typing import Any

import pydantic_core

from schemas.call import CallLike, CallStatus
from schemas.messages import RejectReason

S = CallStatus

# The direct edges, defined here and nowhere else. Terminal statuses have no edges.
TRANSITIONS: Mapping[CallStatus, frozenset[CallStatus]] = {
    S.QUEUED: frozenset({S.RINGING, S.CANCELED, S.FAILED, S.BUSY}),
    S.RINGING: frozenset({S.IN_PROGRESS, S.CANCELED, S.FAILED, S.BUSY, S.NO_ANSWER}),
    S.IN_PROGRESS: frozenset({S.COMPLETED}),
    S.CANCELED: frozenset(),
    S.COMPLETED: frozenset(),
    S.BUSY: frozenset(),
    S.FAILED: frozenset(),
    S.NO_ANSWER: frozenset(),
}

TERMINAL: frozenset[CallStatus] = frozenset(s for s, edges in TRANSITIONS.items() if not edges)


def _closure(start: CallStatus) -> frozenset[CallStatus]:
    seen: set[CallStatus] = set()
    todo = list(TRANSITIONS[start])
    while todo:
        status = todo.pop()
        if status not in seen:
            seen.add(status)
            todo.extend(TRANSITIONS[status])
    return frozenset(seen)


# Statuses reachable in one or more steps: gaps are normal (queued -> completed is fine).
REACHABLE: Mapping[CallStatus, frozenset[CallStatus]] = {s: _closure(s) for s in TRANSITIONS}


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


# How many judged eventIds a call remembers. A call has a handful of statuses; a replay
# of an event older than the last 32 of its call would be judged again.
MAX_JUDGED = 32

# Rule 0 remembers an 8-byte mark of each eventId, not the id: a 36-character string
# costs ~90 bytes of memory per id. Two different events of one call share a mark with a
# chance of about 32 in 2**64, so no event is ever dropped by mistake in practice.
MARK_BYTES = 8


def mark(event_id: str) -> bytes:
    """The mark rule 0 remembers for an eventId."""
    return blake2b(event_id.encode(), digest_size=MARK_BYTES).digest()


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def canonical_json(raw: bytes) -> bytes:
    """The JSON ``raw`` holds with every object's keys sorted, compact: equal content,
    equal bytes, whatever order the sender wrote its keys in (arrays keep theirs)."""
    return pydantic_core.to_json(_sorted(pydantic_core.from_json(raw)))


def content_digest(call: CallLike) -> bytes:
    """A digest of a call's whole content: rule 2 tells a duplicate (same revision, same
    content) from a conflict (same revision, other content) by it, without keeping the
    call. Of the canonical JSON, not of the bytes as they came: nested objects such as
    ``subresourceUris`` keep the sender's key order, and a resource fetched twice may list
    them differently. Only revisioned calls need one, so the ~5 us of parsing and sorting
    (against ~1 us for hashing the bytes as they are) is not paid per callback."""
    return blake2b(canonical_json(call.to_json()), digest_size=MARK_BYTES).digest()


def _legacy_digest(call: CallLike) -> bytes:
    # The digest that earlier releases kept: of the call's JSON as written, keys in
    # the sender's order. States on the state topic still carry it until their call's
    # next revisioned accept (or retention) replaces them. Equal bytes are equal
    # content, so a match is a true duplicate: the check is sound for ever, and only
    # costs anything when the canonical digest did not match (a conflict, or such a
    # state), never on the way to an accept.
    return blake2b(call.to_json(), digest_size=MARK_BYTES).digest()


@dataclass(frozen=True, slots=True)
class CallState:
    """What the processor remembers about one call between events: only what the rules
    read, so a state packs into a few dozen bytes (service/statecodec.py)."""

    status: CallStatus
    # The highest revision accepted so far; an event without one leaves it as it was.
    revision: int | None
    # Event time: the receivedAt of the call's last event of any verdict (retention is
    # judged on it).
    updated_at: datetime
    # The status and content digest of the last accepted call that carried a revision:
    # rule 2 compares a revisioned event with it, not with a callback without revision
    # that may have come after it. None and b"" until a revisioned call was accepted.
    revised_status: CallStatus | None = None
    revised_digest: bytes = b""
    # The marks of this call's eventIds already judged, whatever the verdict (rule 0),
    # oldest first, the last MAX_JUDGED of them. The eventId is derived from the signed
    # body, so a replayed request or a repeat from the spool is recognised and dropped.
    judged: bytes = b""

    def remembers(self, event_mark: bytes) -> bool:
        """Whether an event with this mark was judged already."""
        judged, at = self.judged, self.judged.find(event_mark)
        while at != -1 and at % MARK_BYTES:  # a match must start on a mark's boundary
            at = judged.find(event_mark, at + 1)
        return at != -1


# Not frozen, unlike CallState: one is made per event, and a frozen dataclass's
# __init__ costs four times a plain one's. Nothing keeps a Decision.
@dataclass(slots=True)
class Decision:
    outcome: Outcome
    # The state to keep: the new one when accepted; otherwise the one before, which
    # also remembers this event (rule 0) and its time, unless this event is a repeat.
    state: CallState | None
    reason: RejectReason | None = None
    detail: str = ""


def _accept(state: CallState | None, call: CallLike, at: datetime, judged: bytes) -> Decision:
    # Rule 4: an event without a revision leaves the state's revision (and what rule 2
    # compares with) as they were.
    if call.revision is not None:
        digest = content_digest(call)
        new = CallState(call.status, call.revision, at, call.status, digest, judged)
    elif state is not None:
        revised, digest = state.revised_status, state.revised_digest
        new = CallState(call.status, state.revision, at, revised, digest, judged)
    else:
        new = CallState(call.status, None, at, judged=judged)
    return Decision(Outcome.ACCEPTED, new)


def _reject(state: CallState, reason: RejectReason, detail: str) -> Decision:
    return Decision(Outcome.REJECTED, state, reason, detail)


def decide(state: CallState | None, call: CallLike, event_id: str, at: datetime) -> Decision:
    """Apply the rules of docs/architecture.md section 3 to one event of one call.
    ``at`` is the event's time (its receivedAt); the state's ``updated_at`` follows the
    latest event judged, so retention counts from a call's last event of any verdict."""
    event_mark = mark(event_id)
    if state is not None and state.remembers(event_mark):
        # Rule 0: this very event was judged already (a replay, a retry with the same
        # bytes, a repeat from the spool): drop it, whatever it would say now.
        return Decision(Outcome.DUPLICATE, state)
    marks = state.judged if state is not None else b""
    judged = (marks + event_mark)[-MAX_JUDGED * MARK_BYTES :]
    decision = _decide(state, call, at, judged)
    if decision.outcome is Outcome.ACCEPTED or decision.state is not state:
        return decision  # its state is new, and remembers this event already
    assert state is not None  # only a first event has none, and it is accepted
    # Refused or a duplicate: the state as it was, remembering this event and its time.
    decision.state = CallState(
        state.status,
        state.revision,
        max(state.updated_at, at),
        state.revised_status,
        state.revised_digest,
        judged,
    )
    return decision


def _decide(state: CallState | None, call: CallLike, at: datetime, judged: bytes) -> Decision:
    if state is None:  # Rule 1: the first event we hold for a call is accepted.
        return _accept(None, call, at, judged)

    current, new = state.status, call.status
    if call.revision is not None and state.revision is not None:  # Rule 2
        # Revisioned events are ordered among themselves: compare with the last call
        # that had a revision, not with a webhook (no revision) that came after it.
        last_status = state.revised_status or current
        if call.revision < state.revision:
            return _reject(
                state,
                RejectReason.STALE_REVISION,
                f"revision {call.revision} is older than the current {state.revision}",
            )
        if call.revision == state.revision:
            kept = state.revised_digest
            if content_digest(call) == kept or _legacy_digest(call) == kept:
                return Decision(Outcome.DUPLICATE, state)
            return _reject(
                state,
                RejectReason.CONFLICTING_REVISION,
                f"revision {call.revision} was already seen with different content",
            )
        if new == current and last_status != current:
            # A callback brought this status after the last revisioned event: the
            # resource (the reconciler's fetch, the sweep) confirms a change already
            # published. Accepting it would publish the same change twice (each change
            # exactly once, as rule 3 keeps it when neither side has a revision yet).
            # Its revision is taken in all the same, so the revisions that follow are
            # still ordered by it: an older one is stale_revision, this one again with
            # other content conflicting_revision (with the old revision kept, an older
            # one read as merely out_of_order).
            confirmed = CallState(
                current,
                call.revision,
                max(state.updated_at, at),
                current,
                content_digest(call),
                judged,
            )
            return Decision(Outcome.DUPLICATE, confirmed)
        if new == current or new in REACHABLE[current]:
            return _accept(state, call, at, judged)
        after_last = new == last_status or new in REACHABLE[last_status]
        if last_status != current and after_last and current in REACHABLE[new]:
            # A webhook (no revision) moved the call past this status after the last
            # revisioned event: a newer revision of an earlier step, late as in rule 3.
            return _reject(
                state,
                RejectReason.OUT_OF_ORDER,
                f"revision {call.revision} ({new}) arrived after a callback moved the call "
                f"on to {current}",
            )
        return _reject(
            state,
            RejectReason.ILLEGAL_TRANSITION,
            f"revision {call.revision} moves {current} to {new}, which the state machine "
            "does not allow",
        )

    # Rule 3: no revision to order by, so the status order decides.
    if new == current:
        return Decision(Outcome.DUPLICATE, state)
    if new in REACHABLE[current]:
        return _accept(state, call, at, judged)
    if current in REACHABLE[new]:
        return _reject(
            state,
            RejectReason.OUT_OF_ORDER,
            f"{new} is an earlier step than the current {current}; it arrived late",
        )
    return _reject(state, RejectReason.ILLEGAL_TRANSITION, f"{current} cannot become {new}")


def is_expired(
    status: CallStatus,
    updated_at: datetime,
    watermark: datetime,
    terminal_retention: timedelta,
    idle_retention: timedelta,
) -> bool:
    """Rule 5: a state is forgotten once it has been terminal for longer than the
    terminal retention, or without an event for longer than the idle one, both measured
    in event time: against the partition's watermark, never the wall clock."""
    age = watermark - updated_at
    return age > idle_retention or (status in TERMINAL and age > terminal_retention)


def expired(
    states: Iterable[tuple[str, CallStatus, datetime]],
    watermark: datetime,
    terminal_retention: timedelta,
    idle_retention: timedelta,
) -> list[str]:
    """The calls (id, status, updated_at) whose state may be forgotten at this watermark
    (see :func:`is_expired`)."""
    return [
        call_id
        for call_id, status, updated_at in states
        if is_expired(status, updated_at, watermark, terminal_retention, idle_retention)
    ]
