"""What the processor will make of events, predicted by running the service's own state
machine over them in ingest order: the one oracle behind ``callstatus simulate``'s
accounting, the integration tests' expectations and the benchmark's counts.

Each call's events must come in the order the processor sees them (one partition, the
call's own order); events of different calls may interleave.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from schemas.call import CallLike
from schemas.messages import RejectReason, WebhookBody
from service.fsm import CallState, Outcome, decide


@dataclass(frozen=True, slots=True)
class Prediction:
    """One event's predicted outcome, and the reason when it is a rejection."""

    outcome: Outcome
    reason: RejectReason | None


def predict(events: Iterable[tuple[str, CallLike]]) -> list[Prediction]:
    """The outcome of each (eventId, call), in order, each call judged against its own
    state so far."""
    states: dict[str, CallState | None] = {}
    now = datetime.now(UTC)  # only stored in the state; no rule reads it
    out: list[Prediction] = []
    for event_id, call in events:
        decision = decide(states.get(call.callId), call, event_id, now)
        states[call.callId] = decision.state
        out.append(Prediction(decision.outcome, decision.reason))
    return out


def expected_outcomes(bodies: Sequence[bytes]) -> list[Prediction]:
    """What the processor will make of one call's webhook bodies, ingested in this
    order. Each body counts as an event of its own (a repeat of the same bytes, which
    ingest gives the same eventId, is the caller's to leave out)."""
    return predict(
        (str(n), WebhookBody.model_validate_json(body).to_call()) for n, body in enumerate(bodies)
    )
