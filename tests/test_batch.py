"""The pure batch planner (service/batch.py): records and states in, a plan out."""

from __future__ import annotations

import base64
import itertools
import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.call import Call, CallStatus
from schemas.messages import (
    UNPROCESSABLE_KEEP_BYTES,
    RejectReason,
    Source,
    UnprocessableMessage,
    encode_ingest,
)
from service.batch import (
    NO_RECORD,
    BatchPlan,
    Narrowing,
    Retention,
    Target,
    plan_batch,
    unprocessed,
)
from service.fsm import CallState, mark
from service.statecodec import pack, unpack

S = CallStatus
T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TARGET = Target("in", "changes", "rejected", "state", 0)
HOUR = timedelta(hours=1)
SKEW = timedelta(seconds=300)
RETENTION = Retention(terminal=HOUR, idle=6 * HOUR, max_clock_skew=SKEW)


def cid(n: int) -> str:
    return "CA" + f"{n:040x}"


def record(offset: int, value: bytes, key: bytes | None = None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="in",
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=[],
    )


def event(
    offset: int,
    call_id: str,
    status: CallStatus,
    at: datetime,
    revision: int | None = None,
    event_id: str | None = None,
) -> ConsumerRecord[bytes, bytes]:
    call = Call.model_validate({"callId": call_id, "status": status, "revision": revision})
    eid = event_id or str(uuid.uuid4())
    value = encode_ingest(eid, at, Source.WEBHOOK, None, call, call.to_json())
    return record(offset, value, call_id.encode())


def run(
    records: list[ConsumerRecord[bytes, bytes]],
    states: dict[str, bytes] | None = None,
    **kw: object,
) -> BatchPlan:
    args: dict[str, object] = {
        "watermark": None,
        "swept_at": None,
        "target": TARGET,
        "retention": RETENTION,
        "processed_at": T + 10 * HOUR,
    }
    args.update(kw)
    return plan_batch(records, states or {}, **args)  # type: ignore[arg-type]


def topics(p: BatchPlan) -> list[tuple[str, int]]:
    return [(o.topic, o.offset) for o in p.outputs]


def test_accepted_events_write_a_change_and_a_state_rejected_ones_a_rejection() -> None:
    p = run(
        [
            event(0, cid(1), S.RINGING, T),
            event(1, cid(1), S.QUEUED, T),  # late
            event(2, cid(1), S.RINGING, T),  # duplicate: no change, no rejection
        ]
    )
    # Every verdict also writes the call's state: it remembers the eventIds judged.
    # One state record for the call, after its verdicts: it remembers every eventId.
    assert topics(p) == [("changes", 0), ("rejected", 1), ("state", 2)]
    assert p.next_offset == 3
    assert p.events == {
        ("webhook", "accepted", ""): 1,
        ("webhook", "rejected", "out_of_order"): 1,
        ("webhook", "duplicate", ""): 1,
    }
    packed = p.states[cid(1)]
    assert packed is not None and unpack(packed).updated_at == T  # event, not processing, time
    # The state record's value is the packed state itself, and nothing else.
    assert p.outputs[-1].value == packed and p.outputs[-1].headers == []


def test_records_before_the_position_are_skipped() -> None:
    records = [event(0, cid(1), S.RINGING, T), event(1, cid(2), S.RINGING, T)]
    assert [r.offset for r in unprocessed(records, 1)] == [1]
    assert unprocessed(records, 0) == records and unprocessed(records, 2) == []


def test_the_input_states_are_not_touched() -> None:
    states: dict[str, bytes] = {}
    run([event(0, cid(1), S.RINGING, T)], states)
    assert states == {}


def test_events_are_counted_by_their_source() -> None:
    # What the reconciler's metrics read: did an api-sourced resource change the call?
    call = Call.model_validate({"callId": cid(1), "status": S.COMPLETED, "revision": 4})
    api = encode_ingest(str(uuid.uuid4()), T, Source.API, None, call, call.to_json())
    fetched = record(1, api, cid(1).encode())
    p = run([event(0, cid(1), S.RINGING, T), fetched, record(2, fetched.value, fetched.key)])
    assert p.events == {
        ("webhook", "accepted", ""): 1,
        ("api", "accepted", ""): 1,  # it changed something
        ("api", "duplicate", ""): 1,  # the same resource fetched again: it did not
    }
    # A record that is no event has no source.
    junk = run([record(0, b"\x00 not json", b"k")])
    assert junk.events == {("", "rejected", "undecodable"): 1}


def test_an_undecodable_record_becomes_a_rejection_with_its_bytes() -> None:
    p = run([record(0, b"\x00 not json", b"k"), event(1, cid(1), S.QUEUED, T)])
    assert topics(p) == [("rejected", 0), ("changes", 1), ("state", 1)]
    out = p.outputs[0]
    msg = UnprocessableMessage.model_validate_json(out.value or b"")
    assert msg.reason is RejectReason.UNDECODABLE
    assert base64.b64decode(msg.value) == b"\x00 not json" and not msg.truncated
    assert out.key == b"k"
    headers = dict(out.headers)
    assert "ce_subject" not in headers
    # A stable id: planning the same record again gives the same ce_id.
    again = run([record(0, b"\x00 not json", b"k")]).outputs[0]
    assert dict(again.headers)["ce_id"] == headers["ce_id"]
    assert p.next_offset == 2


def test_an_unwritable_record_is_rejected_truncated_and_changes_no_state() -> None:
    big = event(0, cid(1), S.QUEUED, T)
    p = run([big, event(1, cid(1), S.RINGING, T)], unwritable={0})
    assert topics(p) == [("rejected", 0), ("changes", 1), ("state", 1)]
    msg = UnprocessableMessage.model_validate_json(p.outputs[0].value or b"")
    assert msg.reason is RejectReason.UNWRITABLE and msg.callId == cid(1)
    assert msg.valueBytes == len(big.value or b"")
    assert base64.b64decode(msg.value) == (big.value or b"")[:UNPROCESSABLE_KEEP_BYTES]
    # The next event of the call is its first: the refused one left no state behind.
    assert json.loads(p.outputs[1].value or b"")["previousStatus"] is None


def test_expiry_follows_the_watermark_not_the_processing_time() -> None:
    done = {cid(1): pack(CallState(S.COMPLETED, None, T))}
    # Processed ten hours later, but only ten minutes later in event time: a duplicate.
    redelivery = run([event(0, cid(1), S.COMPLETED, T + timedelta(minutes=10))], done)
    assert redelivery.events == {("webhook", "duplicate", ""): 1}
    # Only the state, remembering the redelivery's eventId; nothing was swept.
    assert topics(redelivery) == [("state", 0)]
    # Past the terminal retention in event time: forgotten, so a new first event.
    late = run([event(0, cid(1), S.COMPLETED, T + 2 * HOUR)], done)
    assert late.events == {("webhook", "accepted", ""): 1}


def test_a_batch_cut_differently_decides_the_same() -> None:
    records = [
        event(0, cid(1), S.COMPLETED, T),
        event(1, cid(2), S.QUEUED, T + 50 * timedelta(minutes=1)),
        event(2, cid(2), S.RINGING, T + 70 * timedelta(minutes=1)),
        event(3, cid(1), S.COMPLETED, T + 71 * timedelta(minutes=1)),
    ]
    whole = run(records)
    states: dict[str, bytes] = {}
    parts: list[BatchPlan] = []
    watermark, swept = None, None
    for r in records:
        p = run([r], states, watermark=watermark, swept_at=swept)
        parts.append(p)
        for k, v in p.states.items():
            if v is None:
                states.pop(k, None)
            else:
                states[k] = v
        watermark, swept = p.watermark, p.swept_at

    # The verdicts (changes, rejections) are the same, and so is the state they leave;
    # how many state records carry it depends on the cut (one per call per batch).
    def judged(plans: list[BatchPlan]) -> list[tuple[str, int]]:
        return [
            (o.topic, o.offset)
            for p in plans
            for o in p.outputs
            if o.offset != NO_RECORD and o.topic != "state"
        ]

    assert judged([whole]) == judged(parts)
    assert {k: v for k, v in whole.states.items() if v is not None} == states
    assert whole.events == sum((p.events for p in parts), start=whole.events.__class__())


def test_the_sweep_tombstones_expired_states_once_the_watermark_moved_on() -> None:
    old = {cid(1): pack(CallState(S.COMPLETED, None, T))}
    p = run([event(0, cid(2), S.QUEUED, T + 2 * HOUR)], old)
    assert (p.outputs[-1].topic, p.outputs[-1].key, p.outputs[-1].value) == (
        "state",
        cid(1).encode(),
        None,
    )
    assert p.states[cid(1)] is None and p.swept_at == T + 2 * HOUR
    # Not again until the watermark moved sweep_every further.
    q = run([event(1, cid(3), S.QUEUED, T + 2 * HOUR)], old, swept_at=p.swept_at)
    assert [o.topic for o in q.outputs] == ["changes", "state"]


def _apply(states: dict[str, bytes], p: BatchPlan) -> None:
    for k, v in p.states.items():
        if v is None:
            states.pop(k, None)
        else:
            states[k] = v


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # call
            st.sampled_from(list(CallStatus)),
            st.integers(-5, 50),  # minutes since the previous event: skew and gaps
        ),
        max_size=30,
    ),
    st.sets(st.integers(1, 29)),
)
def test_how_a_backlog_is_cut_into_batches_never_changes_a_decision(
    steps: list[tuple[int, CallStatus, int]], cuts: set[int]
) -> None:
    at, records = T, []
    for offset, (call, status, minutes) in enumerate(steps):
        at += timedelta(minutes=minutes)
        records.append(event(offset, cid(call), status, at))
    retention = Retention(timedelta(minutes=30), timedelta(minutes=90), max_clock_skew=SKEW)

    def judged(
        bounds: list[int],
    ) -> tuple[list[tuple[str, int, bytes | None]], dict[str, bytes]]:
        states: dict[str, bytes] = {}
        out: list[tuple[str, int, bytes | None]] = []
        watermark, swept = None, None
        for lo, hi in itertools.pairwise(bounds):
            p = run(
                records[lo:hi],
                states,
                watermark=watermark,
                swept_at=swept,
                retention=retention,
            )
            _apply(states, p)
            # Verdicts only: the number of state records depends on the cut.
            out += [
                (o.topic, o.offset, o.value)
                for o in p.outputs
                if o.offset != NO_RECORD and o.topic != "state"
            ]
            watermark, swept = p.watermark, p.swept_at
        return out, states

    whole = judged([0, len(records)])
    assert judged(sorted({0, len(records), *(c for c in cuts if c < len(records))})) == whole


def test_an_undecodable_record_kafka_refused_is_cut_like_an_unwritable_one() -> None:
    raw = b"x" * (3 * UNPROCESSABLE_KEEP_BYTES)
    p = run([record(0, raw, b"k")], unwritable={0})
    msg = UnprocessableMessage.model_validate_json(p.outputs[0].value or b"")
    assert msg.reason is RejectReason.UNWRITABLE and msg.truncated
    assert base64.b64decode(msg.value) == raw[:UNPROCESSABLE_KEEP_BYTES]
    assert "not an ingest event" in msg.detail


def test_an_event_judged_before_is_dropped_without_any_output() -> None:
    # The same request replayed (same bytes, so the same eventId) after a later status:
    # without rule 0 it would be rejected out_of_order, a second record for one event.
    p = run(
        [
            event(0, cid(1), S.RINGING, T, event_id="ring"),
            event(1, cid(1), S.COMPLETED, T),
            event(2, cid(1), S.RINGING, T, event_id="ring"),
        ]
    )
    assert topics(p) == [("changes", 0), ("changes", 1), ("state", 1)]
    assert p.events[("webhook", "duplicate", "")] == 1


def test_outputs_go_to_the_ingest_partitions_number_only_when_the_counts_match() -> None:
    records = [event(0, cid(1), S.RINGING, T), event(1, cid(1), S.QUEUED, T)]
    records.append(record(2, b"\x00", b"k"))
    aligned = Target("in", "changes", "rejected", "state", 3, aligned=True)
    p = run(records, target=aligned)
    assert [(o.topic, o.partition) for o in p.outputs] == [
        ("changes", 3),
        ("rejected", 3),
        ("rejected", 3),
        ("state", 3),
    ]
    # Other counts: the producer hashes the key; the state still follows ingest.
    q = run(records, target=Target("in", "changes", "rejected", "state", 3))
    assert [o.partition for o in q.outputs] == [None, None, None, 3]


def resource(
    offset: int, status: CallStatus, revision: int, uris: dict[str, str]
) -> ConsumerRecord[bytes, bytes]:
    call = Call.model_validate(
        {"callId": cid(1), "status": status, "revision": revision, "subresourceUris": uris}
    )
    value = encode_ingest(str(uuid.uuid4()), T, Source.RESOURCE, None, call, call.to_json())
    return record(offset, value, cid(1).encode())


def test_the_same_revision_with_its_keys_reordered_is_a_duplicate() -> None:
    # The processor's own path: the call's JSON as the ingest record carries it.
    uris = {"recordings": "/r", "notifications": "/n", "logs": "/l"}
    swapped = dict(reversed(uris.items()))
    p = run([resource(0, S.RINGING, 3, uris), resource(1, S.RINGING, 3, swapped)])
    assert p.events == {("resource", "accepted", ""): 1, ("resource", "duplicate", ""): 1}


def test_replays_of_one_event_leave_the_earlier_ones_remembered() -> None:
    replays = [event(2 + n, cid(1), S.IN_PROGRESS, T, event_id="progress") for n in range(40)]
    p = run(
        [
            event(0, cid(1), S.RINGING, T, event_id="ring"),
            event(1, cid(1), S.IN_PROGRESS, T, event_id="progress"),
            *replays,
            event(42, cid(1), S.RINGING, T, event_id="ring"),
        ]
    )
    assert p.events == {("webhook", "accepted", ""): 2, ("webhook", "duplicate", ""): 41}


FORGED = datetime(9999, 12, 31, tzinfo=UTC)
NOW = T + 10 * HOUR  # the processor's clock in run()


def test_a_record_from_the_far_future_does_not_move_the_watermark() -> None:
    done = {cid(1): pack(CallState(S.COMPLETED, None, NOW, judged=mark("done")))}
    p = run([event(0, cid(2), S.QUEUED, FORGED)], done, watermark=NOW)
    # Judged as usual (the first event of its call), counted, but time stands still:
    # nothing swept, the finished call still known.
    assert p.events == {("webhook", "accepted", ""): 1} and p.ahead_of_clock == 1
    assert p.watermark == NOW and cid(1) not in p.states
    assert topics(p) == [("changes", 0), ("state", 0)]
    # Its own state is kept at the bound, not in 9999, so it expires like any other.
    packed = p.states[cid(2)]
    assert packed is not None and unpack(packed).updated_at == NOW + SKEW
    # A replay of the finished call's event afterwards is still dropped by rule 0.
    replay = run([event(1, cid(1), S.COMPLETED, NOW, event_id="done")], done,
                 watermark=p.watermark, swept_at=p.swept_at)  # fmt: skip
    assert replay.events == {("webhook", "duplicate", ""): 1} and replay.outputs == []


def test_a_receivedat_within_the_skew_still_moves_the_watermark() -> None:
    p = run([event(0, cid(1), S.QUEUED, NOW + SKEW)])
    assert (p.watermark, p.ahead_of_clock) == (NOW + SKEW, 0)
    q = run([event(0, cid(1), S.QUEUED, NOW + SKEW + timedelta(milliseconds=1))])
    assert (q.watermark, q.ahead_of_clock) == (None, 1)


def test_a_watermark_ahead_of_the_clock_is_clamped() -> None:
    # Restored from a state written before the bound (its updatedAt in 9999): clamped to
    # the bound, so sweeps and expiry work again instead of retiring everything.
    live = {cid(1): pack(CallState(S.RINGING, None, NOW))}
    p = run([event(0, cid(2), S.QUEUED, NOW)], live, watermark=FORGED, swept_at=FORGED)
    assert p.watermark == NOW + SKEW and p.swept_at is not None and p.swept_at <= p.watermark
    assert p.watermark_clamped_from == FORGED
    assert cid(1) not in p.states  # ringing five minutes ahead: not retired
    # An empty batch clamps too: the worker takes the plan's watermark either way.
    assert run([], watermark=FORGED).watermark == NOW + SKEW


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),  # decodable
            st.integers(0, 3),  # call
            st.sampled_from(list(CallStatus)),
            st.integers(-30, 240),  # minutes since the previous record
        ),
        max_size=25,
    ),
    st.sets(st.integers(0, 24)),  # offsets Kafka refused
    st.integers(0, 3000),  # the clock, in minutes after T
)
def test_every_record_gets_one_verdict_and_only_events_within_the_bound_move_time(
    steps: list[tuple[bool, int, CallStatus, int]], refused: set[int], clock: int
) -> None:
    """Undecodable, refused, ahead-of-clock and ordinary records mixed in one batch: the
    rules that make each of them what it is are applied in the planner's order (event
    time is taken before the refusal is answered, so a refused event moves it too)."""
    at, records, received = T, [], {}
    for offset, (decodable, call, status, minutes) in enumerate(steps):
        at += timedelta(minutes=minutes)
        if decodable:
            records.append(event(offset, cid(call), status, at))
            received[offset] = at
        else:
            records.append(record(offset, b"\x00 not an event"))
    now = T + timedelta(minutes=clock)
    p = run(records, processed_at=now, unwritable=refused)
    bound = now + SKEW
    assert sum(p.events.values()) == len(records)
    assert p.watermark == max((t for t in received.values() if t <= bound), default=None)
    assert p.ahead_of_clock == sum(t > bound for t in received.values())
    rejected_for = {
        o.offset: UnprocessableMessage.model_validate_json(o.value or b"").reason
        for o in p.outputs
        if o.topic == "rejected" and (o.offset in refused or o.offset not in received)
    }
    for offset in range(len(records)):
        if offset in refused:
            assert rejected_for[offset] is RejectReason.UNWRITABLE
            assert [o.topic for o in p.outputs if o.offset == offset] == ["rejected"]
        elif offset not in received:
            assert rejected_for[offset] is RejectReason.UNDECODABLE
    assert p.next_offset == (len(records) or None)


Kafka = Callable[[int, int, bool, set[int]], int | None]


def _search(n: int, refuses: Kafka) -> tuple[list[int], int]:
    """Drive a :class:`Narrowing` over ``n`` records as the worker does. ``refuses(start,
    size, singly, blamed)`` is Kafka: None to commit, -1 for a refusal that names nobody,
    else the offset it names (written singly); ``blamed`` records are answered as
    unwritable, which Kafka takes. The offsets committed, in order, and how many
    transactions it took."""
    search, start, transactions = Narrowing(n), 0, 0
    done: list[int] = []
    blamed: set[int] = set()
    while start < n:
        transactions += 1
        assert transactions < 10 * n + 10, "the search does not end"
        size = search.size
        assert search.singly <= (size == 1)  # outputs go singly only for one record
        offset = refuses(start, size, search.singly, blamed)
        if offset is not None:
            if offset == -1:
                search.refused()
            else:
                blamed.add(offset)
                search.found()
            continue
        done += range(start, start + size)
        start += size
        search.committed()
    return done, transactions


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6000), st.data())
def test_a_refused_record_is_found_in_about_two_log2_n_transactions(
    n: int, data: st.DataObject
) -> None:
    culprit = data.draw(st.integers(0, n - 1))

    def kafka(start: int, size: int, singly: bool, blamed: set[int]) -> int | None:
        if culprit in blamed or not start <= culprit < start + size:
            return None
        return culprit if singly else -1

    done, transactions = _search(n, kafka)
    assert done == list(range(n))  # each record committed once, in order
    # Whole batch, then at most two tries a halving, the single write, the rest.
    assert transactions <= 2 * math.ceil(math.log2(n)) + 3


@given(st.integers(2, 3000), st.integers(1, 50))
def test_refused_batching_of_records_that_each_fit_still_gets_everything_through(
    n: int, limit: int
) -> None:
    """A topic's limit lowered under a record batch: every transaction of more than
    ``limit`` records is refused, yet each record alone fits."""
    done, _ = _search(n, lambda start, size, singly, blamed: -1 if size > limit else None)
    assert done == list(range(n))
