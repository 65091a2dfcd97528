"""Plan one batch of one ingest partition: records and states in, a plan out.

Pure: no producer, no clock of its own, no metrics. The transactional shell (``worker.py``)
writes a plan in one Kafka transaction and, only once it committed, makes the plan's
states its own and counts its tallies. Everything that decides what the outputs are
lives here, so it is tested without a broker (``tests/test_batch.py``).

Time is event time (docs/architecture.md, section 7): each partition has a watermark,
the highest ``receivedAt`` it has seen. A state is judged expired against the watermark
when an event of its call arrives, and swept (tombstoned) when the watermark has moved
on by ``Retention.sweep_every``. So a backlog replayed hours later makes the same
decisions as live processing did, however it is cut into batches. The one wall-clock
input is ``processed_at``, the processor's clock: event time may not run further ahead
of it than ``Retention.max_clock_skew``, so that one forged record cannot move a
partition's watermark into the future and retire all its states.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import chain
from typing import TypeAlias

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from schemas.call import CallStatus, format_rfc3339
from schemas.messages import (
    IngestView,
    RejectReason,
    encode_outcome,
    encode_unprocessable,
    read_ingest,
)
from service.fsm import CallState, Decision, Outcome, decide, expired, is_expired
from service.statecodec import NO_ACCOUNT, account_bytes, account_of, pack, peek, unpack

CE_SOURCE = b"urn:callstatus:processor"
CE_TYPE_CHANGED = b"com.freeclimb.call.status.changed"
CE_TYPE_REJECTED = b"com.freeclimb.call.status.rejected"
JSON = ("content-type", b"application/json")
# Offset of outputs that answer no ingest record (sweep tombstones).
NO_RECORD = -1
# ce_id of an undecodable record: stable per (topic, partition, offset), so a reader can
# deduplicate it like any other event.
_UNDECODABLE_NS = uuid.UUID("6f1b7f64-8d0c-4d5e-9a57-3c1ad0c7b1e1")

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


@dataclass(frozen=True, slots=True)
class Target:
    """Where one ingest partition's outputs go."""

    ingest: str
    changes: str
    rejected: str
    state: str
    partition: int  # the ingest partition, and the state partition of its calls
    # Whether changes and rejected have as many partitions as ingest. Then a call's
    # outputs go to the partition numbered like its ingest partition, which is the one
    # the key's hash picks anyway (ingest was partitioned by the same murmur2 of the
    # callId), without hashing every output again. Otherwise the producer hashes.
    aligned: bool = False

    @property
    def output_partition(self) -> int | None:
        return self.partition if self.aligned else None


@dataclass(frozen=True, slots=True)
class Retention:
    terminal: timedelta
    idle: timedelta
    # How far ahead of the processor's clock a receivedAt still moves the watermark
    # (CALLSTATUS_MAX_CLOCK_SKEW_SECONDS, docs/architecture.md section 7). No default
    # here: the setting is its one source.
    max_clock_skew: timedelta
    # How far the watermark moves between two sweeps for tombstones.
    sweep_every: timedelta = timedelta(seconds=30)


@dataclass(slots=True)  # one or two per event: not frozen, see fsm.Decision
class Output:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None
    offset: int  # the ingest record it answers, or NO_RECORD


@dataclass(slots=True)
class BatchPlan:
    """What one batch writes, in one transaction, and what memory becomes once it committed."""

    outputs: list[Output] = field(default_factory=list)
    # Calls whose state changes: the new state (packed, see statecodec), or None to
    # forget it.
    states: dict[str, bytes | None] = field(default_factory=dict)
    next_offset: int | None = None  # None: no record of this batch was new
    watermark: datetime | None = None
    swept_at: datetime | None = None
    # (source, outcome, reason) -> count, and (from, to) -> count, for the metrics.
    events: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Events whose receivedAt was past the clock's bound (judged, watermark not moved),
    # and the furthest such receivedAt, for the metric and the log.
    ahead_of_clock: int = 0
    furthest_ahead: datetime | None = None
    # The watermark this plan was given, when it was past the bound and clamped (a
    # state restored from before the bound existed); None otherwise.
    watermark_clamped_from: datetime | None = None

    @property
    def empty(self) -> bool:
        return not self.outputs and self.next_offset is None


def _ce_headers(
    event_id: str, subject: str | None, kind: bytes, processed: bytes, trace: bytes | None
) -> list[tuple[str, bytes]]:
    # CloudEvents Kafka binding, binary mode: the attributes travel as ce_* headers.
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", event_id.encode()),
        ("ce_source", CE_SOURCE),
        ("ce_type", kind),
    ]
    if subject is not None:
        headers.append(("ce_subject", subject.encode()))
    headers += [("ce_time", processed), JSON]
    if trace is not None:
        headers.append(("traceparent", trace))
    return headers


def _trace(record: Record) -> bytes | None:
    # A plain loop: next() over a generator expression cost about four times as much.
    headers: Sequence[tuple[str, bytes]] = record.headers
    for key, value in headers:
        if key == "traceparent":
            return value
    return None


def unprocessed(records: Sequence[Record], position: int) -> Sequence[Record]:
    """The records at or after ``position``: those before it were fetched before a
    rebalance re-seeked us, and are already committed. Records come in offset order,
    so the new ones are a tail."""
    first = next((i for i, r in enumerate(records) if r.offset >= position), len(records))
    return records[first:]


def plan_batch(
    records: Iterable[Record],
    states: Mapping[str, bytes],
    *,
    watermark: datetime | None,
    swept_at: datetime | None,
    target: Target,
    retention: Retention,
    processed_at: datetime,
    unwritable: Set[int] = frozenset(),
) -> BatchPlan:
    """Judge ``records`` (from :func:`unprocessed`) against ``states`` (packed, left
    untouched).

    ``unwritable`` holds offsets whose outputs Kafka refused for good on an earlier try
    of this batch: each becomes an ``unwritable`` rejection and changes no state.
    ``processed_at`` is the processor's clock: it fills ``processedAt``/``ce_time`` and
    bounds event time (``Retention.max_clock_skew``). No verdict depends on it: a record
    past the bound is judged as usual, it only does not move the watermark.
    """
    out = _clamped(watermark, swept_at, processed_at + retention.max_clock_skew)
    judge = _Judge(out, states, target, retention, processed_at, unwritable)
    last: int | None = None
    for record in records:
        last = record.offset
        judge.record(record)
    judge.write_states()
    out.next_offset = None if last is None else last + 1
    _sweep(out, states, target, retention)
    return out


@dataclass(slots=True)
class Narrowing:
    """Which records of a partition's fetched batch the next transaction takes, while
    Kafka refuses one of their outputs for good and does not say which.

    A refused produce request fails every record batched with the culprit, so a
    refusal only says "somewhere in this transaction". Writing the whole batch again
    one output at a time would find it, but one acknowledgement after another: ~12,000
    outputs for a batch of 6,000 events, long past a batch's deadline on a slow link.
    Instead the transaction takes half as many records after each such refusal, and
    keeps that size as it commits its way forward; at one record its few outputs are
    written singly, which names the culprit. So about 2 log2(n) short transactions find
    it (cutting a backlog differently never changes a decision: tests/test_batch.py),
    and the rest go on in whole batches once it is known.

    Pure: the worker reports each outcome, this says what to try next."""

    rest: int  # records not committed yet
    take: int = 0  # records the next transaction takes; 0: all of ``rest``
    singly: bool = False  # write the next transaction's outputs one at a time

    @property
    def size(self) -> int:
        return self.take or self.rest

    def refused(self) -> None:
        """A transaction of batched outputs was refused, culprit unknown: fewer records,
        down to one, whose outputs are then written singly."""
        if self.size <= 1:
            self.singly = True
        else:
            self.take = self.size // 2

    def found(self) -> None:
        """The culprit is known (and answered as unwritable from now on): whole batches."""
        self.take, self.singly = 0, False

    def committed(self) -> None:
        """The transaction committed: its records are done, and a search goes on at the
        same size over the rest. Unless its outputs went singly: then each fitted and
        only their batching was refused (a topic's limit lowered under a record batch),
        so whole batches again; the next refusal narrows again."""
        self.rest -= self.size
        self.take = 0 if self.singly else min(self.take, self.rest)
        self.singly = False


def _clamped(watermark: datetime | None, swept_at: datetime | None, bound: datetime) -> BatchPlan:
    """An empty plan holding the partition's clock as given, but never past ``bound``.

    Event time is what the records say, but never more than the skew ahead of our own
    clock: only so much of it can a forger (any writer to ingest) or an ingest pod whose
    clock jumped move. A watermark already past it (restored from a state written
    before this bound, or the clock stepped back) is pulled back to it."""
    out = BatchPlan(watermark=watermark, swept_at=swept_at)
    if watermark is not None and watermark > bound:
        out.watermark_clamped_from = watermark
        out.watermark = bound
    if out.swept_at is not None and out.watermark is not None and out.swept_at > out.watermark:
        out.swept_at = out.watermark  # else no sweep until the clock caught up with it
    return out


class _Judge:
    """Judges one batch's records in order into ``out``. It keeps the calls this batch
    judged so far: their state after the batch so far, unpacked once, and the offset
    of their last event, for the one state record per call that ends the batch."""

    __slots__ = (
        "accounts",
        "bound",
        "last_at",
        "out",
        "processed",
        "processed_at",
        "processed_b",
        "retention",
        "states",
        "target",
        "touched",
        "unwritable",
    )

    def __init__(
        self,
        out: BatchPlan,
        states: Mapping[str, bytes],
        target: Target,
        retention: Retention,
        processed_at: datetime,
        unwritable: Set[int],
    ) -> None:
        self.out, self.states, self.target, self.retention = out, states, target, retention
        self.processed_at, self.unwritable = processed_at, unwritable
        self.bound = processed_at + retention.max_clock_skew
        self.processed = format_rfc3339(processed_at)
        self.processed_b = self.processed.encode()
        self.touched: dict[str, CallState] = {}
        self.last_at: dict[str, int] = {}
        # The account id events of a touched call named: the state keeps it, so the
        # reconciler can build the call's URL (service/statecodec.py, version 3).
        self.accounts: dict[str, str] = {}

    def record(self, record: Record) -> None:
        """One record: a rejection if it is not an event or Kafka refused its outputs,
        else its call's verdict."""
        offset = record.offset
        try:
            event = read_ingest(record.value or b"")
        except ValidationError as exc:
            # Ingest answered 202 for whatever is here, so it must not vanish: it goes
            # to rejected, in this transaction, bytes and all.
            first = exc.errors()[0]["msg"]
            detail = f"not an ingest event ({exc.error_count()} errors): {first}"
            # Whole, unless Kafka already refused that: then cut, as for unwritable.
            cut = offset in self.unwritable
            reason = RejectReason.UNWRITABLE if cut else RejectReason.UNDECODABLE
            self._unprocessable(record, reason, detail, None)
            return
        received = self._event_time(event.receivedAt)
        if offset in self.unwritable:
            detail = "Kafka refused this event's outputs for good (too large for the topic?)"
            self._unprocessable(record, RejectReason.UNWRITABLE, detail, event)
            return
        self._judge(record, event, received)

    def _event_time(self, received: datetime) -> datetime:
        """The time the event is judged at; moves the watermark unless it is past the
        clock's bound (then it is judged all the same, but at the bound: the state keeps
        a time it can expire by, as one kept in 9999 would never be retired)."""
        out = self.out
        if received > self.bound:
            out.ahead_of_clock += 1
            if out.furthest_ahead is None or received > out.furthest_ahead:
                out.furthest_ahead = received
            return self.bound
        if out.watermark is None or received > out.watermark:
            out.watermark = received
        return received

    def _judge(self, record: Record, event: IngestView, received: datetime) -> None:
        out, retention = self.out, self.retention
        call = event.call
        cid = call.callId
        state = self.touched.get(cid)
        if state is None and (packed := self.states.get(cid)) is not None:
            state = unpack(packed)
        w = out.watermark  # None only while every record so far was ahead of the clock
        if (
            state is not None
            and w is not None
            and is_expired(state.status, state.updated_at, w, retention.terminal, retention.idle)
        ):
            state = None  # forgotten (rule 5): whether or not a sweep got to it yet
        decision = decide(state, call, event.eventId, received)
        reason = decision.reason.value if decision.reason else ""
        out.events[event.source.value, decision.outcome.value, reason] += 1
        new = decision.state
        if new is None or new is state:
            return  # rule 0: this very event was judged before; nothing changes
        if decision.outcome is not Outcome.DUPLICATE:
            self._verdict(record, event, state, decision)
        # Every verdict changes the state, if only by remembering the eventId (rule 0),
        # so a replay of this event is recognised after a restore too.
        self.touched[cid] = new
        self.last_at[cid] = record.offset
        if (account := call.accountId) is not None:
            self.accounts[cid] = account

    def _verdict(
        self, record: Record, event: IngestView, state: CallState | None, decision: Decision
    ) -> None:
        """The change (accepted) or rejection that answers the event."""
        out, target, call = self.out, self.target, event.call
        accepted = decision.outcome is Outcome.ACCEPTED
        topic, kind = (
            (target.changes, CE_TYPE_CHANGED) if accepted else (target.rejected, CE_TYPE_REJECTED)
        )
        value = encode_outcome(
            event_id=event.eventId,
            call=call,
            previous_status=state.status if state else None,
            previous_revision=state.revision if state else None,
            source=event.source,
            request_type=event.requestType,
            received_at=event.receivedText,
            processed_at=self.processed,
            reason=decision.reason,
            detail=decision.detail,
        )
        headers = _ce_headers(event.eventId, call.callId, kind, self.processed_b, _trace(record))
        key = call.callId.encode()
        out.outputs.append(
            Output(topic, key, value, headers, target.output_partition, record.offset)
        )
        if accepted:
            out.transitions[_status(state.status if state else None), call.status.value] += 1

    def write_states(self) -> None:
        """One state record per call per batch, its last: on a compacted topic only the
        last one counts, and a backlog often holds several steps of a call in one
        batch. It is tagged with the offset of the call's last event, which an
        unwritable search blames."""
        out, target, accounts, states = self.out, self.target, self.accounts, self.states
        for cid, offset in self.last_at.items():
            account = accounts.get(cid)
            if account is not None:
                kept = account_bytes(account)
            else:  # no event of this batch named one: keep the state's, if any
                kept = account_of(packed) if (packed := states.get(cid)) else b""
            # Always version 3: zeros when no event named an account.
            value = out.states[cid] = pack(self.touched[cid], kept or NO_ACCOUNT)
            out.outputs.append(
                Output(target.state, cid.encode(), value, [], target.partition, offset)
            )

    def _unprocessable(
        self, record: Record, reason: RejectReason, detail: str, event: IngestView | None
    ) -> None:
        _unprocessable(self.out, self.target, record, reason, detail, event, self.processed_at)


def _status(status: CallStatus | None) -> str:
    return status.value if status else ""


def _unprocessable(
    out: BatchPlan,
    target: Target,
    record: Record,
    reason: RejectReason,
    detail: str,
    event: IngestView | None,
    processed_at: datetime,
) -> None:
    raw = record.value or b""
    value = encode_unprocessable(
        reason=reason,
        detail=detail,
        raw=raw,
        partition=record.partition,
        offset=record.offset,
        processed_at=processed_at,
        event=event,
    )
    if event is not None:
        event_id, subject = event.eventId, event.call.callId
    else:
        name = f"{target.ingest}/{record.partition}/{record.offset}"
        event_id, subject = str(uuid.uuid5(_UNDECODABLE_NS, name)), None
    processed = format_rfc3339(processed_at).encode()
    headers = _ce_headers(event_id, subject, CE_TYPE_REJECTED, processed, _trace(record))
    out.outputs.append(
        Output(target.rejected, record.key, value, headers, target.output_partition, record.offset)
    )
    out.events["" if event is None else event.source.value, "rejected", reason.value] += 1


def _sweep(out: BatchPlan, states: Mapping[str, bytes], target: Target, r: Retention) -> None:
    """Tombstones for the states past their retention at the watermark (rule 5), once
    the watermark has moved ``sweep_every`` past the last sweep. Only memory and the
    state topic's size depend on it: decisions already treat an expired state as gone."""
    w = out.watermark
    if w is None or (out.swept_at is not None and w - out.swept_at < r.sweep_every):
        return
    out.swept_at = w
    changed = out.states
    kept = ((cid, packed) for cid, packed in states.items() if cid not in changed)
    live = (
        (cid, *peek(packed)) for cid, packed in chain(kept, changed.items()) if packed is not None
    )
    for cid in expired(live, w, r.terminal, r.idle):
        changed[cid] = None
        out.outputs.append(
            Output(target.state, cid.encode(), None, [], target.partition, NO_RECORD)
        )


__all__ = [
    "NO_RECORD",
    "BatchPlan",
    "Narrowing",
    "Output",
    "Retention",
    "Target",
    "plan_batch",
    "unprocessed",
]
