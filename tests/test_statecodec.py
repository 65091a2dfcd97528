"""A call's packed state: exact round trips, the layout's size, the upgrade from the JSON
states of version 1, and bytes that are no state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.call import Call, CallStatus
from service.fsm import MARK_BYTES, MAX_JUDGED, CallState, content_digest, decide, mark
from service.statecodec import BadState, load, pack, peek, unpack

S = CallStatus
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CALL_ID = "CA" + "1" * 40

states = st.builds(
    CallState,
    st.sampled_from(list(CallStatus)),
    st.one_of(st.none(), st.integers(1, 2**63 - 1)),
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.just(UTC),
    ),
    st.one_of(st.none(), st.sampled_from(list(CallStatus))),
    st.one_of(st.just(b""), st.binary(min_size=8, max_size=8).filter(any)),
    st.lists(st.binary(min_size=8, max_size=8), max_size=MAX_JUDGED).map(b"".join),
)


@given(states)
def test_every_state_packs_and_unpacks_to_itself(state: CallState) -> None:
    packed = pack(state)
    assert unpack(packed) == state
    assert load(packed) == packed  # a restore keeps the bytes as they are
    assert peek(packed) == (state.status, state.updated_at)


def test_a_whole_lifecycle_costs_27_bytes_and_8_per_event() -> None:
    d = decide(None, Call(callId=CALL_ID, status=S.QUEUED, revision=1), "e1", T0)
    for n, status in enumerate((S.RINGING, S.IN_PROGRESS, S.COMPLETED), start=2):
        d = decide(d.state, Call(callId=CALL_ID, status=status, revision=n), f"e{n}", T0)
    assert d.state is not None
    assert len(pack(d.state)) == 27 + 4 * MARK_BYTES


def _v1(**fields: object) -> bytes:
    call = {"callId": CALL_ID, "status": "inProgress", "revision": 4}
    base: dict[str, object] = {
        "callId": CALL_ID,
        "status": "inProgress",
        "revision": 4,
        "eventId": "e4",
        "updatedAt": "2026-01-01T00:00:05.123Z",
        "call": call,
        "judged": ["e1", "e2", "e4"],
    }
    return json.dumps({**base, **fields}).encode()


def test_a_version_1_state_is_converted_with_what_the_rules_need() -> None:
    state = unpack(load(_v1()))
    assert (state.status, state.revision) == (S.IN_PROGRESS, 4)
    assert state.updated_at == T0 + timedelta(seconds=5, milliseconds=123)
    assert state.revised_status is S.IN_PROGRESS
    revised = Call(callId=CALL_ID, status=S.IN_PROGRESS, revision=4)
    assert state.revised_digest == content_digest(revised)
    assert all(state.remembers(mark(e)) for e in ("e1", "e2", "e4"))
    assert not state.remembers(mark("e3"))
    # And it decides as the version-1 state did: the same revision again is a duplicate.
    assert decide(state, revised, "e9", T0).outcome.value == "duplicate"


def test_a_version_1_state_after_a_callback_keeps_the_revised_call() -> None:
    callback = {"callId": CALL_ID, "status": "completed"}
    revised = {"callId": CALL_ID, "status": "ringing", "revision": 4}
    state = unpack(load(_v1(status="completed", call=callback, revisedCall=revised)))
    assert (state.status, state.revised_status) == (S.COMPLETED, S.RINGING)
    assert state.revised_digest == content_digest(Call.model_validate(revised))


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x02",  # version only
        b'{"callId": "x"}',  # JSON, but no state
        pack(CallState(S.QUEUED, None, T0)) + b"\x00",  # judged not whole marks
        b"\x01" + pack(CallState(S.QUEUED, None, T0))[1:],  # unknown version
        b"\x02\x00" + pack(CallState(S.QUEUED, None, T0))[2:],  # no status
        b"\x02\x63" + pack(CallState(S.QUEUED, None, T0))[2:],  # status code 99
        pack(CallState(S.QUEUED, None, T0, judged=b"m" * 8 * (MAX_JUDGED + 1))),
    ],
)
def test_bytes_that_are_no_state_are_refused(value: bytes) -> None:
    with pytest.raises(BadState):
        load(value)
