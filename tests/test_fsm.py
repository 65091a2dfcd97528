"""The call state machine: every pair of statuses, every revision rule, and properties."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from hashlib import blake2b

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.call import Call, CallStatus
from schemas.messages import RejectReason
from service.fsm import (
    MARK_BYTES,
    MAX_JUDGED,
    REACHABLE,
    TERMINAL,
    TRANSITIONS,
    CallState,
    Decision,
    Outcome,
    content_digest,
    decide,
    expired,
    mark,
)

S = CallStatus
CALL_ID = "CA" + "0" * 40
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# The contract's table, written out independently of the code (docs/architecture.md, 3).
EDGES = {
    (S.QUEUED, S.RINGING), (S.QUEUED, S.CANCELED), (S.QUEUED, S.FAILED), (S.QUEUED, S.BUSY),
    (S.RINGING, S.IN_PROGRESS), (S.RINGING, S.CANCELED), (S.RINGING, S.FAILED),
    (S.RINGING, S.BUSY), (S.RINGING, S.NO_ANSWER),
    (S.IN_PROGRESS, S.COMPLETED),
}  # fmt: skip


def call(status: CallStatus, revision: int | None = None, **fields: object) -> Call:
    return Call.model_validate(
        {"callId": CALL_ID, "status": status, "revision": revision, **fields}
    )


def judged(state: CallState | None, event_id: str) -> CallState:
    """``state`` after judging ``event_id`` without accepting it (rule 0's memory)."""
    assert state is not None
    return replace(state, judged=(state.judged + mark(event_id))[-MAX_JUDGED * MARK_BYTES :])


def state_of(status: CallStatus, revision: int | None = None) -> CallState:
    if revision is None:
        return CallState(status, None, T0)
    return CallState(status, revision, T0, status, content_digest(call(status, revision)))


def test_table_matches_the_contract() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == EDGES
    assert frozenset({S.CANCELED, S.COMPLETED, S.BUSY, S.FAILED, S.NO_ANSWER}) == TERMINAL
    assert set(TRANSITIONS) == set(CallStatus)


def test_reachability_includes_gaps_and_nothing_backwards() -> None:
    assert S.COMPLETED in REACHABLE[S.QUEUED]  # queued -> completed is a normal gap
    assert S.NO_ANSWER in REACHABLE[S.QUEUED]
    assert S.QUEUED not in REACHABLE[S.RINGING]
    assert S.BUSY not in REACHABLE[S.IN_PROGRESS]
    for status in TERMINAL:
        assert REACHABLE[status] == frozenset()
    for status in CallStatus:
        assert status not in REACHABLE[status]


@pytest.mark.parametrize("status", list(CallStatus))
def test_first_event_is_accepted_whatever_its_status(status: CallStatus) -> None:
    d = decide(None, call(status), "e1", T0)
    assert d.outcome is Outcome.ACCEPTED
    assert d.state == CallState(status, None, T0, judged=mark("e1"))


def _expected_without_revision(
    current: CallStatus, new: CallStatus
) -> tuple[Outcome, RejectReason | None]:
    if new == current:
        return Outcome.DUPLICATE, None
    if new in REACHABLE[current]:
        return Outcome.ACCEPTED, None
    if current in REACHABLE[new]:
        return Outcome.REJECTED, RejectReason.OUT_OF_ORDER
    return Outcome.REJECTED, RejectReason.ILLEGAL_TRANSITION


@pytest.mark.parametrize(("current", "new"), list(itertools.product(CallStatus, repeat=2)))
def test_every_pair_without_revisions(current: CallStatus, new: CallStatus) -> None:
    d = decide(state_of(current), call(new), "e1", T0)
    outcome, reason = _expected_without_revision(current, new)
    assert (d.outcome, d.reason) == (outcome, reason)
    if outcome is Outcome.ACCEPTED:
        assert d.state is not None and d.state.status is new and d.state.remembers(mark("e1"))
    else:
        # Refused events leave the state as it was, but for remembering they were judged.
        assert d.state == judged(state_of(current), "e1")


@pytest.mark.parametrize(
    ("current", "new", "reason"),
    [
        (S.IN_PROGRESS, S.RINGING, RejectReason.OUT_OF_ORDER),
        (S.COMPLETED, S.QUEUED, RejectReason.OUT_OF_ORDER),
        (S.IN_PROGRESS, S.BUSY, RejectReason.ILLEGAL_TRANSITION),
        (S.CANCELED, S.COMPLETED, RejectReason.ILLEGAL_TRANSITION),
        (S.BUSY, S.NO_ANSWER, RejectReason.ILLEGAL_TRANSITION),
    ],
)
def test_examples_from_the_contract(
    current: CallStatus, new: CallStatus, reason: RejectReason
) -> None:
    d = decide(state_of(current), call(new), "e1", T0)
    assert d.outcome is Outcome.REJECTED
    assert d.reason is reason
    assert current.value in d.detail and new.value in d.detail


class TestRevisions:
    def test_lower_revision_is_stale(self) -> None:
        d = decide(state_of(S.RINGING, 3), call(S.COMPLETED, 2), "e1", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.STALE_REVISION)

    def test_equal_revision_same_content_is_a_duplicate(self) -> None:
        d = decide(state_of(S.RINGING, 3), call(S.RINGING, 3), "e1", T0)
        assert d.outcome is Outcome.DUPLICATE
        assert d.state == judged(state_of(S.RINGING, 3), "e1")

    def test_equal_revision_different_content_conflicts(self) -> None:
        d = decide(state_of(S.RINGING, 3), call(S.RINGING, 3, to="+15550001111"), "e1", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.CONFLICTING_REVISION)
        d = decide(state_of(S.RINGING, 3), call(S.IN_PROGRESS, 3), "e1", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.CONFLICTING_REVISION)

    def test_higher_revision_same_status_is_an_update(self) -> None:
        newer = call(S.COMPLETED, 5, endTime="Mon, 15 Jun 2009 20:45:30 GMT")
        d = decide(state_of(S.COMPLETED, 4), newer, "e1", T0)
        assert d.outcome is Outcome.ACCEPTED
        digest = content_digest(newer)
        assert d.state == CallState(S.COMPLETED, 5, T0, S.COMPLETED, digest, judged=mark("e1"))

    def test_higher_revision_reachable_is_accepted_even_with_gaps(self) -> None:
        d = decide(state_of(S.QUEUED, 1), call(S.COMPLETED, 7), "e1", T0)
        assert d.outcome is Outcome.ACCEPTED and d.state is not None and d.state.revision == 7

    @pytest.mark.parametrize(
        ("current", "new"), [(S.IN_PROGRESS, S.RINGING), (S.COMPLETED, S.BUSY)]
    )
    def test_higher_revision_backwards_or_sideways_is_illegal(
        self, current: CallStatus, new: CallStatus
    ) -> None:
        d = decide(state_of(current, 2), call(new, 3), "e1", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.ILLEGAL_TRANSITION)

    def test_event_without_revision_keeps_the_states_revision(self) -> None:
        d = decide(state_of(S.RINGING, 4), call(S.IN_PROGRESS), "e1", T0)
        assert d.outcome is Outcome.ACCEPTED and d.state is not None and d.state.revision == 4

    def test_state_without_revision_uses_status_order(self) -> None:
        d = decide(state_of(S.IN_PROGRESS), call(S.RINGING, 9), "e1", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.OUT_OF_ORDER)
        d = decide(state_of(S.RINGING), call(S.IN_PROGRESS, 9), "e1", T0)
        assert d.outcome is Outcome.ACCEPTED and d.state is not None and d.state.revision == 9


class TestRevisionsAfterACallback:
    """Rule 2 compares a revisioned event with the last revisioned call, not with a
    callback (no revision) that replaced it: issue 8's redelivery sequence."""

    def after_callback(self) -> CallState:
        d = decide(state_of(S.RINGING, 5), call(S.IN_PROGRESS), "e1", T0)
        assert d.outcome is Outcome.ACCEPTED and d.state is not None
        assert (d.state.status, d.state.revision) == (S.IN_PROGRESS, 5)
        return d.state

    def test_the_same_revision_redelivered_is_a_duplicate(self) -> None:
        state = self.after_callback()
        d = decide(state, call(S.RINGING, 5), "e2", T0)
        assert d.outcome is Outcome.DUPLICATE
        assert d.state == judged(state, "e2")

    def test_the_same_revision_with_other_content_still_conflicts(self) -> None:
        d = decide(self.after_callback(), call(S.RINGING, 5, to="+15550001111"), "e2", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.CONFLICTING_REVISION)

    def test_a_newer_revision_of_an_earlier_step_is_late_not_illegal(self) -> None:
        d = decide(self.after_callback(), call(S.RINGING, 6), "e2", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.OUT_OF_ORDER)

    def test_a_newer_revision_behind_the_last_revisioned_status_is_illegal(self) -> None:
        d = decide(self.after_callback(), call(S.QUEUED, 6), "e2", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.ILLEGAL_TRANSITION)

    def test_a_newer_revision_of_the_status_a_callback_brought_is_a_duplicate(self) -> None:
        # The reconciler's case: a resource moved the call (revision 5, ringing), a
        # callback then brought inProgress, and a later fetch or sweep shows inProgress
        # at revision 6. That change is on `changes` already: publishing it again would
        # give the call two inProgress changes (issue 19: each change exactly once).
        state = self.after_callback()
        confirming = call(S.IN_PROGRESS, 6)
        d = decide(state, confirming, "e2", T0)
        assert d.outcome is Outcome.DUPLICATE
        # Its revision is taken in, so what follows is still ordered by revisions.
        assert d.state == replace(
            judged(state, "e2"),
            revision=6,
            revised_status=S.IN_PROGRESS,
            revised_digest=content_digest(confirming),
        )
        confirmed = d.state
        d = decide(confirmed, call(S.RINGING, 5), "e3", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.STALE_REVISION)
        d = decide(confirmed, call(S.IN_PROGRESS, 6, to="+15550001111"), "e4", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.CONFLICTING_REVISION)
        assert decide(confirmed, confirming, "e5", T0).outcome is Outcome.DUPLICATE
        # Onwards from there is still a change.
        d = decide(confirmed, call(S.COMPLETED, 7), "e6", T0)
        assert d.outcome is Outcome.ACCEPTED

    def test_a_newer_revision_onwards_is_accepted_and_becomes_the_revised_call(self) -> None:
        newer = call(S.COMPLETED, 6)
        d = decide(self.after_callback(), newer, "e2", T0)
        assert d.outcome is Outcome.ACCEPTED and d.state is not None
        revised = (d.state.revision, d.state.revised_status, d.state.revised_digest)
        assert revised == (6, S.COMPLETED, content_digest(newer))


class TestRetention:
    def test_terminal_and_idle_states_expire(self) -> None:
        states = [
            ("done-old", S.COMPLETED, T0),
            ("done-new", S.COMPLETED, T0 + timedelta(minutes=90)),
            ("live-old", S.RINGING, T0),
            ("live-new", S.RINGING, T0 + timedelta(hours=2)),
        ]
        now = T0 + timedelta(hours=3)
        gone = expired(states, now, timedelta(hours=2), timedelta(hours=2, minutes=30))
        assert sorted(gone) == ["done-old", "live-old"]

    def test_the_boundary_is_exclusive(self) -> None:
        st8 = [("x", S.COMPLETED, T0)]
        hour = timedelta(hours=1)
        assert expired(st8, T0 + hour, hour, 2 * hour) == []
        assert expired(st8, T0 + hour + timedelta(seconds=1), hour, 2 * hour) == ["x"]


# -- properties -------------------------------------------------------------------

events = st.lists(
    st.tuples(st.sampled_from(list(CallStatus)), st.one_of(st.none(), st.integers(1, 6))),
    max_size=25,
)


def run(sequence: list[tuple[CallStatus, int | None]]) -> list[tuple[Call, Decision]]:
    state: CallState | None = None
    out = []
    for i, (status, revision) in enumerate(sequence):
        c = call(status, revision)
        d = decide(state, c, f"e{i}", T0)
        out.append((c, d))
        state = d.state
    return out


@settings(max_examples=400)
@given(events)
def test_accepted_statuses_form_a_path_and_revisions_increase(
    sequence: list[tuple[CallStatus, int | None]],
) -> None:
    accepted = [c for c, d in run(sequence) if d.outcome is Outcome.ACCEPTED]
    for before, after in itertools.pairwise(accepted):
        assert after.status == before.status or after.status in REACHABLE[before.status]
    revisions = [c.revision for c in accepted if c.revision is not None]
    assert revisions == sorted(set(revisions))  # strictly increasing


@settings(max_examples=400)
@given(events)
def test_redelivering_each_accepted_event_yields_only_duplicates(
    sequence: list[tuple[CallStatus, int | None]],
) -> None:
    state: CallState | None = None
    for i, (status, revision) in enumerate(sequence):
        c = call(status, revision)
        d = decide(state, c, f"e{i}", T0)
        state = d.state
        if d.outcome is Outcome.ACCEPTED:
            again = decide(state, c, f"e{i}-again", T0)
            assert again.outcome is Outcome.DUPLICATE
            assert again.state == judged(state, f"e{i}-again")


@settings(max_examples=400)
@given(events)
def test_replaying_accepted_output_never_reaccepts(
    sequence: list[tuple[CallStatus, int | None]],
) -> None:
    results = run(sequence)
    final = results[-1][1].state if results else None
    for c, d in results:
        if d.outcome is Outcome.ACCEPTED:
            replay = decide(final, c, "replay", T0)
            assert replay.outcome is not Outcome.ACCEPTED
            assert replay.state == judged(final, "replay")


@given(events)
def test_redelivering_any_revisioned_accepted_event_later_is_never_a_data_error(
    sequence: list[tuple[CallStatus, int | None]],
) -> None:
    # Redeliveries are ordinary: none of them may raise illegal/conflicting alerts.
    results = run(sequence)
    final = results[-1][1].state if results else None
    for c, d in results:
        if d.outcome is Outcome.ACCEPTED and c.revision is not None:
            replay = decide(final, c, "replay", T0)
            assert replay.reason not in (
                RejectReason.CONFLICTING_REVISION,
                RejectReason.ILLEGAL_TRANSITION,
            ), (c, final, replay)


@given(events)
def test_decide_is_pure(sequence: list[tuple[CallStatus, int | None]]) -> None:
    assert [d for _, d in run(sequence)] == [d for _, d in run(sequence)]


class TestRuleZeroTheSameEventOnce:
    """An eventId is derived from the signed body: the same request again (a replay, a
    retry, a repeat from the spool) is dropped, whatever it would be judged now."""

    def test_a_replay_of_an_earlier_step_after_a_later_one_is_dropped(self) -> None:
        ringing = decide(None, call(S.RINGING), "ring", T0)
        done = decide(ringing.state, call(S.COMPLETED), "done", T0 + timedelta(seconds=5))
        replay = decide(done.state, call(S.RINGING), "ring", T0 + timedelta(seconds=9))
        assert replay.outcome is Outcome.DUPLICATE  # not out_of_order: judged once already
        assert replay.state is done.state

    def test_a_replay_of_a_rejected_event_is_not_rejected_twice(self) -> None:
        done = decide(None, call(S.COMPLETED), "done", T0)
        late = decide(done.state, call(S.RINGING), "late", T0)
        assert late.reason is RejectReason.OUT_OF_ORDER
        again = decide(late.state, call(S.RINGING), "late", T0)
        assert again.outcome is Outcome.DUPLICATE and again.state is late.state

    def test_retention_counts_from_the_last_event_of_any_verdict(self) -> None:
        done = decide(None, call(S.COMPLETED), "done", T0)
        later = T0 + timedelta(minutes=7)
        late = decide(done.state, call(S.RINGING), "late", later)
        assert late.state is not None and late.state.updated_at == later

    def test_only_the_last_max_judged_events_are_remembered(self) -> None:
        d = decide(None, call(S.QUEUED), "first", T0)
        for n in range(MAX_JUDGED):
            d = decide(d.state, call(S.QUEUED), f"dup-{n}", T0)
        assert d.state is not None and not d.state.remembers(mark("first"))
        assert len(d.state.judged) == MAX_JUDGED * MARK_BYTES
        assert d.state.remembers(mark(f"dup-{MAX_JUDGED - 1}"))

    def test_a_mark_only_counts_on_its_own_boundary(self) -> None:
        # Two marks side by side contain 7 other 8-byte windows: none of them is judged.
        a, b = mark("a"), mark("b")
        state = CallState(S.QUEUED, None, T0, judged=a + b)
        assert state.remembers(a) and state.remembers(b)
        assert not any(state.remembers((a + b)[i : i + 8]) for i in range(1, 8))

    def test_replays_of_one_event_do_not_push_another_out_of_the_window(self) -> None:
        # Issue 17: the window holds distinct eventIds. A rule-0 duplicate adds no mark,
        # however often it comes, so the ringing judged before is still remembered.
        ringing = decide(None, call(S.RINGING), "ring", T0)
        d = decide(ringing.state, call(S.IN_PROGRESS), "progress", T0)
        for _ in range(2 * MAX_JUDGED):
            d = decide(d.state, call(S.IN_PROGRESS), "progress", T0)
            assert d.outcome is Outcome.DUPLICATE
        assert d.state is not None and len(d.state.judged) == 2 * MARK_BYTES
        replay = decide(d.state, call(S.RINGING), "ring", T0)
        assert (replay.outcome, replay.reason) == (Outcome.DUPLICATE, None)
        assert replay.state is d.state


URIS = {"recordings": "/Calls/x/Recordings", "notifications": "/Calls/x/Notifications"}


class TestContentDigest:
    """Rule 2 tells a duplicate from a conflict by a digest of the content: the content,
    not the order its keys happened to be written in (issue 17)."""

    def test_reordered_keys_are_the_same_content(self) -> None:
        first = call(S.RINGING, 3, subresourceUris=URIS)
        swapped = call(S.RINGING, 3, subresourceUris=dict(reversed(URIS.items())))
        assert first.to_json() != swapped.to_json()  # the bytes really differ
        assert content_digest(first) == content_digest(swapped)
        state = decide(None, first, "e1", T0).state
        d = decide(state, swapped, "e2", T0)
        assert (d.outcome, d.reason) == (Outcome.DUPLICATE, None)

    def test_nested_objects_are_ordered_too(self) -> None:
        a = call(S.RINGING, 3, subresourceUris={"x": {"b": 1, "a": [{"d": 1, "c": 2}]}})
        b = call(S.RINGING, 3, subresourceUris={"x": {"a": [{"c": 2, "d": 1}], "b": 1}})
        assert content_digest(a) == content_digest(b)
        # Arrays keep their order: that is content.
        c = call(S.RINGING, 3, subresourceUris={"x": {"a": [{"c": 2}, {"d": 1}], "b": 1}})
        d = call(S.RINGING, 3, subresourceUris={"x": {"a": [{"d": 1}, {"c": 2}], "b": 1}})
        assert content_digest(c) != content_digest(d)

    def test_other_content_still_conflicts(self) -> None:
        state = decide(None, call(S.RINGING, 3, subresourceUris=URIS), "e1", T0).state
        other = call(S.RINGING, 3, subresourceUris={**URIS, "recordings": "/elsewhere"})
        d = decide(state, other, "e2", T0)
        assert (d.outcome, d.reason) == (Outcome.REJECTED, RejectReason.CONFLICTING_REVISION)

    def test_a_digest_written_before_the_upgrade_still_recognises_its_duplicate(self) -> None:
        # States already on the state topic carry the digest of the bytes as written
        # (blake2b of to_json, not canonicalised): the same content again is a duplicate,
        # not a conflict, right after the upgrade too.
        ringing = call(S.RINGING, 3, subresourceUris=URIS)
        legacy = blake2b(ringing.to_json(), digest_size=MARK_BYTES).digest()
        assert legacy != content_digest(ringing)
        old = CallState(S.RINGING, 3, T0, S.RINGING, legacy, mark("e1"))
        assert decide(old, ringing, "e2", T0).outcome is Outcome.DUPLICATE
        other = call(S.RINGING, 3, to="+15550001111")
        assert decide(old, other, "e2", T0).reason is RejectReason.CONFLICTING_REVISION
