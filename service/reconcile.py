"""What the reconciler fetches and when, as pure functions: the held calls due for a
fetch (and each call's backoff), the sweep's window, and the ingest record of a fetched
Call resource (docs/architecture.md, section 12). Time is always an argument."""

from __future__ import annotations

import heapq
from collections.abc import Container, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.call import Call
from schemas.messages import RecordHeaders, Source, event_id_for, ingest_record

# The longest wait between two fetches of one call that stays non-terminal (a call
# FreeClimb still shows in progress, or that our fetches keep failing for).
MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """A held call's fetches so far: ``since`` is the time of the call's last event when
    they began (an event of the call since then starts the count over), ``due`` when the
    next one may go."""

    since: float
    attempts: int
    due: float


def due_calls(
    held: Mapping[str, float],
    attempts: Mapping[str, Attempt],
    given_up: Container[str],
    *,
    now: float,
    after: float,
    limit: int,
) -> list[str]:
    """The calls to fetch now, oldest last event first, at most ``limit``: held (``held``:
    call -> time of its last event, non-terminal ones with an account only) for at least
    ``after`` seconds since their last event, not given up, and not waiting out the
    backoff of an earlier fetch for that same last event."""
    due: list[tuple[float, str]] = []
    for call_id, since in held.items():
        if now - since < after or call_id in given_up:
            continue
        attempt = attempts.get(call_id)
        if attempt is not None and attempt.since == since and attempt.due > now:
            continue
        due.append((since, call_id))
    return [call_id for _, call_id in heapq.nsmallest(limit, due)]


def next_attempt(previous: Attempt | None, since: float, *, now: float, after: float) -> Attempt:
    """The backoff after a fetch (or a failed one) of a call last heard of at ``since``:
    ``after``, doubling for each further fetch while no new event of the call comes,
    capped at MAX_BACKOFF_SECONDS. A resource identical to one already published is
    dropped by rule 0 and moves nothing, so without this a call FreeClimb still shows
    in progress would be fetched on every round."""
    n = previous.attempts + 1 if previous is not None and previous.since == since else 1
    wait = min(MAX_BACKOFF_SECONDS, after * 2.0 ** min(n - 1, 30))
    return Attempt(since, n, now + wait)


def sweep_window(
    now: datetime,
    *,
    sweep: float,
    lookback: float,
    terminal_retention: float,
    max_clock_skew: float,
) -> tuple[datetime, datetime]:
    """The sweep lists the calls that started at or after the first time and ended by
    the second (FreeClimb's filters: ``startTime`` at or after, ``endTime`` at or by).

    A call lasting up to ``lookback`` seconds is found by the first sweep after it
    ended: it started at most ``lookback + sweep`` before that sweep (one sweep more for
    a late one). The window is also kept shorter than the terminal retention (less the
    clock skew and a sweep): a call listed there still has its state held, so listing
    it again (another sweep, another node after a rebalance) is a duplicate, never a
    first event and a second change."""
    span = min(lookback + 2 * sweep, terminal_retention - max_clock_skew - sweep)
    return now - timedelta(seconds=max(span, sweep)), now


def api_record(
    body: bytes, call: Call, received_at: datetime, max_bytes: int
) -> tuple[bytes, bytes, RecordHeaders]:
    """(key, value, headers) of a fetched resource on the ingest topic, written as ingest
    writes an event (:func:`~schemas.messages.ingest_record`, its size check included:
    :class:`~schemas.messages.RecordTooLarge`), its eventId derived from the resource's
    bytes, so the same resource fetched twice is one event (rule 0)."""
    return ingest_record(event_id_for(body), received_at, Source.API, None, call, body, max_bytes)


__all__ = [
    "MAX_BACKOFF_SECONDS",
    "Attempt",
    "api_record",
    "due_calls",
    "next_attempt",
    "sweep_window",
]
