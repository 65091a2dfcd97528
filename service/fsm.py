"""The per-call state machine (architecture section 3), as pure functions.

``decide`` takes the current state of one call (or ``None``) and one event, and returns a
verdict plus the state to keep. It reads no clock and does no I/O: the processor passes
the processing time in, and does all the Kafka work around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from schemas.call import Call, CallStatus
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


@dataclass(frozen=True, slots=True)
class CallState:
    """What the processor remembers about one call between events."""

    status: CallStatus
    revision: int | None
    call: Call
    event_id: str
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    # The state to keep: the new one when accepted, the unchanged one otherwise.
    state: CallState | None
    reason: RejectReason | None = None
    detail: str = ""


def _accept(state: CallState | None, call: Call, event_id: str, now: datetime) -> Decision:
    # Rule 4: an event without a revision leaves the state's revision as it was.
    revision = call.revision
    if revision is None and state is not None:
        revision = state.revision
    new = CallState(call.status, revision, call, event_id, now)
    return Decision(Outcome.ACCEPTED, new)


def _reject(state: CallState, reason: RejectReason, detail: str) -> Decision:
    return Decision(Outcome.REJECTED, state, reason, detail)


def decide(state: CallState | None, call: Call, event_id: str, now: datetime) -> Decision:
    """Apply the rules of architecture section 3 to one event of one call."""
    if state is None:  # Rule 1: the first event we hold for a call is accepted.
        return _accept(None, call, event_id, now)

    current, new = state.status, call.status
    if call.revision is not None and state.revision is not None:  # Rule 2
        if call.revision < state.revision:
            return _reject(
                state,
                RejectReason.STALE_REVISION,
                f"revision {call.revision} is older than the current {state.revision}",
            )
        if call.revision == state.revision:
            if call == state.call:
                return Decision(Outcome.DUPLICATE, state)
            return _reject(
                state,
                RejectReason.CONFLICTING_REVISION,
                f"revision {call.revision} was already seen with different content",
            )
        if new == current or new in REACHABLE[current]:
            return _accept(state, call, event_id, now)
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
        return _accept(state, call, event_id, now)
    if current in REACHABLE[new]:
        return _reject(
            state,
            RejectReason.OUT_OF_ORDER,
            f"{new} is an earlier step than the current {current}; it arrived late",
        )
    return _reject(state, RejectReason.ILLEGAL_TRANSITION, f"{current} cannot become {new}")


def expired(
    states: Iterable[tuple[str, CallState]],
    now: datetime,
    terminal_retention: timedelta,
    idle_retention: timedelta,
) -> list[str]:
    """The calls whose state may be forgotten (rule 5): terminal for longer than the
    terminal retention, or without an accepted event for longer than the idle one."""
    terminal_before, idle_before = now - terminal_retention, now - idle_retention
    return [
        call_id
        for call_id, state in states
        if state.updated_at < idle_before
        or (state.status in TERMINAL and state.updated_at < terminal_before)
    ]
