"""The reconciler's pure side (service/reconcile.py) and what the processor makes of its
``api`` events: which held calls are due (``now`` an argument), the per-call backoff,
the sweep's window, the record, the state's account (service/statecodec.py version 3),
and the FSM on fetched resources (stale, behind a newer callback, identical)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from schemas.call import Call, CallStatus
from schemas.messages import ChangeMessage, RejectReason, Source, event_id_for, read_ingest
from service.batch import BatchPlan, Retention, Target, plan_batch
from service.fsm import CallState, Decision, Outcome, decide
from service.reconcile import (
    MAX_BACKOFF_SECONDS,
    Attempt,
    api_record,
    due_calls,
    next_attempt,
    sweep_window,
)
from service.statecodec import (
    ACCOUNT_BYTES,
    NO_ACCOUNT,
    BadState,
    account_bytes,
    account_id,
    account_of,
    held_since,
    load,
    pack,
    peek,
    unpack,
)
from service.worker import PartitionWorker

S = CallStatus
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ACCOUNT = "AC" + "ab" * 20
CALL = "CA" + "12" * 20


# --- due calls and backoff ----------------------------------------------------------


def test_a_call_is_due_once_held_longer_than_after_its_last_event() -> None:
    held = {"a": 100.0, "b": 150.0, "c": 195.0}
    assert due_calls(held, {}, set(), now=200.0, after=50.0, limit=10) == ["a", "b"]
    assert due_calls(held, {}, set(), now=149.0, after=50.0, limit=10) == []


def test_due_calls_come_oldest_first_within_the_limit() -> None:
    held = {f"c{n}": float(n) for n in range(10, 0, -1)}
    assert due_calls(held, {}, set(), now=1000.0, after=1.0, limit=3) == ["c1", "c2", "c3"]


def test_a_call_waits_out_its_backoff_and_given_up_ones_are_skipped() -> None:
    held = {"a": 100.0, "b": 100.0, "c": 100.0}
    attempts = {"a": Attempt(100.0, 1, 300.0), "b": Attempt(100.0, 1, 180.0)}
    assert due_calls(held, attempts, {"c"}, now=200.0, after=50.0, limit=10) == ["b"]
    # A new event of the call (its last-event time moved) makes the old backoff moot.
    held["a"] = 140.0
    assert due_calls(held, attempts, {"c"}, now=200.0, after=50.0, limit=10) == ["b", "a"]


def test_the_backoff_doubles_while_nothing_new_comes_and_starts_over_after_an_event() -> None:
    first = next_attempt(None, 100.0, now=200.0, after=50.0)
    assert first == Attempt(100.0, 1, 250.0)
    second = next_attempt(first, 100.0, now=250.0, after=50.0)
    assert second == Attempt(100.0, 2, 350.0)
    assert next_attempt(second, 300.0, now=400.0, after=50.0) == Attempt(300.0, 1, 450.0)
    late = Attempt(100.0, 40, 0.0)
    assert next_attempt(late, 100.0, now=0.0, after=50.0).due == MAX_BACKOFF_SECONDS


# --- the sweep window ---------------------------------------------------------------


def test_the_sweep_window_covers_the_lookback_and_two_sweeps() -> None:
    start, end = sweep_window(
        T0, sweep=300, lookback=2400, terminal_retention=3600, max_clock_skew=300
    )
    assert (start, end) == (T0 - timedelta(seconds=3000), T0)


def test_the_sweep_window_stays_within_the_terminal_retention() -> None:
    # Listed again past the retention, a call would be a first event: a second change.
    start, _ = sweep_window(
        T0, sweep=300, lookback=7200, terminal_retention=3600, max_clock_skew=300
    )
    assert T0 - start == timedelta(seconds=3600 - 300 - 300)


# --- the record ---------------------------------------------------------------------


def _resource(status: str = "inProgress", revision: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "callId": CALL,
        "accountId": ACCOUNT,
        "status": status,
        "revision": revision,
        "subresourceUris": {"logs": "/l", "recordings": "/r"},
        **extra,
    }


def _record(data: dict[str, Any], at: datetime = T0, **dumps: Any) -> tuple[bytes, bytes]:
    body = json.dumps(data, **dumps).encode()
    key, value, headers = api_record(body, Call.model_validate(data), at, 1 << 20)
    assert key == CALL.encode()
    assert dict(headers)["ce_id"] == event_id_for(body).encode()
    assert dict(headers)["content-type"] == b"application/json"
    return body, value


def test_a_fetched_resource_is_an_api_event_keyed_by_its_call() -> None:
    body, value = _record(_resource())
    view = read_ingest(value)
    assert view.source is Source.API
    assert view.eventId == event_id_for(body)
    assert view.requestType is None
    assert (view.call.callId, view.call.status, view.call.revision) == (CALL, S.IN_PROGRESS, 2)
    assert json.loads(value)["body"] == _resource()


# --- the state's account ------------------------------------------------------------


def test_a_state_with_an_account_round_trips_as_version_3() -> None:
    state = CallState(S.RINGING, 4, T0, S.RINGING, b"d" * 8, b"m" * 16)
    packed = pack(state, account_bytes(ACCOUNT))
    assert packed[0] == 3 and len(packed) == 27 + ACCOUNT_BYTES + 16
    assert unpack(packed) == state
    assert load(packed) == packed
    assert peek(packed) == (S.RINGING, T0)
    assert account_id(account_of(packed)) == ACCOUNT
    assert held_since(packed) == T0.timestamp()


def test_a_version_2_state_still_decodes_and_has_no_account() -> None:
    state = CallState(S.IN_PROGRESS, None, T0, judged=b"m" * 8)
    old = pack(state)  # no account: the version-2 layout, as written before
    assert old[0] == 2 and len(old) == 27 + 8
    assert unpack(load(old)) == state
    assert account_of(old) == b"" and account_id(b"") is None
    assert held_since(old) is None  # not reconcilable: no URL without an account


def test_terminal_states_and_states_without_an_account_are_not_held() -> None:
    assert held_since(pack(CallState(S.COMPLETED, 3, T0), account_bytes(ACCOUNT))) is None
    none = pack(CallState(S.RINGING, 3, T0), NO_ACCOUNT)
    assert none[0] == 3 and account_of(none) == b"" and held_since(none) is None


@pytest.mark.parametrize(
    "value",
    [
        pack(CallState(S.QUEUED, None, T0), account_bytes(ACCOUNT))[:40],  # account cut
        b"\x04" + pack(CallState(S.QUEUED, None, T0), account_bytes(ACCOUNT))[1:],
    ],
)
def test_bytes_that_are_no_version_3_state_are_refused(value: bytes) -> None:
    with pytest.raises(BadState):
        load(value)


# --- through the planner: the account is kept, the source is told ------------------


def _consumer_record(offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="in",
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=CALL.encode(),
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=[],
    )


RETENTION = Retention(timedelta(hours=1), timedelta(hours=6), max_clock_skew=timedelta(seconds=300))


def _plan_one(value: bytes) -> BatchPlan:
    """The planner over one ingest record, at offset 0 of partition 0, no states held."""
    return plan_batch(
        [_consumer_record(0, value)],
        {},
        watermark=None,
        swept_at=None,
        target=Target("in", "changes", "rejected", "state", 0),
        retention=RETENTION,
        processed_at=T0,
    )


def test_the_planner_keeps_the_account_and_writes_the_api_source_on_changes() -> None:
    _, value = _record(_resource("inProgress", 2))
    plan = _plan_one(value)
    packed = plan.states[CALL]
    assert packed is not None and account_id(account_of(packed)) == ACCOUNT
    change = next(o for o in plan.outputs if o.topic == "changes")
    assert change.value is not None
    assert ChangeMessage.model_validate_json(change.value).source is Source.API


def test_the_planner_writes_version_3_for_a_call_without_an_account() -> None:
    _, value = _record({"callId": CALL, "status": "inProgress", "revision": 2})
    plan = _plan_one(value)
    packed = plan.states[CALL]
    assert packed is not None and packed[0] == 3 and account_of(packed) == b""


def test_an_event_without_an_account_keeps_the_states_account() -> None:
    before = pack(CallState(S.RINGING, None, T0), account_bytes(ACCOUNT))
    _, value = _record({"callId": CALL, "status": "inProgress", "revision": 2})
    plan = plan_batch(
        [_consumer_record(0, value)],
        {CALL: before},
        watermark=T0,
        swept_at=T0,
        target=Target("in", "changes", "rejected", "state", 0),
        retention=RETENTION,
        processed_at=T0,
    )
    packed = plan.states[CALL]
    assert packed is not None and account_id(account_of(packed)) == ACCOUNT


# --- the worker's index of held calls ----------------------------------------------


def test_the_workers_held_index_follows_its_states() -> None:
    from service.batch import BatchPlan
    from service.settings import Settings

    held = pack(CallState(S.IN_PROGRESS, None, T0), account_bytes(ACCOUNT))
    ended = pack(CallState(S.COMPLETED, None, T0), account_bytes(ACCOUNT))
    worker = PartitionWorker(
        Settings(verify_signatures=False),
        0,
        producer=None,  # never used: no commit here
        next_offset=0,
        options={},
        transactional_id="t",
        states={"a": held, "b": ended, "c": pack(CallState(S.RINGING, None, T0))},
    )
    assert worker.held == {"a": T0.timestamp()}
    worker._adopt(BatchPlan(states={"a": ended, "b": held, "d": held, "c": None}))
    assert worker.held == {"b": T0.timestamp(), "d": T0.timestamp()}


# --- the FSM on api events -------------------------------------------------------


def _judge(state: CallState | None, value: bytes, at: datetime = T0) -> Decision:
    view = read_ingest(value)
    return decide(state, view.call, view.eventId, at)


def _webhook(status: CallStatus) -> Call:
    return Call(callId=CALL, accountId=ACCOUNT, status=status)


def test_a_stale_api_resource_is_rejected_stale_revision() -> None:
    first = _judge(None, _record(_resource("inProgress", 3))[1])
    assert first.outcome is Outcome.ACCEPTED
    late = _judge(first.state, _record(_resource("ringing", 2))[1])
    assert (late.outcome, late.reason) == (Outcome.REJECTED, RejectReason.STALE_REVISION)
    assert late.state is not None and late.state.status is S.IN_PROGRESS


def test_a_resource_fetched_after_a_newer_callback_does_not_move_the_call_back() -> None:
    # Callbacks only (no revision): the status order decides.
    state = decide(None, _webhook(S.IN_PROGRESS), "e1", T0).state
    state = decide(state, _webhook(S.COMPLETED), "e2", T0).state
    late = _judge(state, _record(_resource("inProgress", 2))[1])
    assert (late.outcome, late.reason) == (Outcome.REJECTED, RejectReason.OUT_OF_ORDER)
    assert late.state is not None and late.state.status is S.COMPLETED
    # A revisioned resource accepted first, then the callback, then the same revision
    # fetched again (written otherwise: another eventId): a duplicate, still completed.
    d = _judge(None, _record(_resource("inProgress", 2))[1])
    d = decide(d.state, _webhook(S.COMPLETED), "e3", T0)
    again = _judge(d.state, _record(_resource("inProgress", 2), indent=1)[1])
    assert again.outcome is Outcome.DUPLICATE
    assert again.state is not None and again.state.status is S.COMPLETED


def test_an_identical_resource_is_a_duplicate() -> None:
    _, value = _record(_resource("completed", 4))
    first = _judge(None, value)
    assert first.outcome is Outcome.ACCEPTED
    # The same bytes: the same eventId (rule 0), dropped without a state change.
    same = _judge(first.state, value)
    assert same.outcome is Outcome.DUPLICATE and same.state is first.state
    # The same content with its keys in another order: rule 2's digest says duplicate.
    reordered = dict(reversed(list(_resource("completed", 4).items())))
    other = _judge(first.state, _record(reordered)[1])
    assert other.outcome is Outcome.DUPLICATE


# --- the settings -----------------------------------------------------------------


def test_one_accounts_api_key_comes_with_its_account_and_may_come_from_a_file(
    tmp_path: Any,
) -> None:
    from pydantic import ValidationError

    from service.reconciler import api_credentials
    from service.settings import Settings

    base = {"verify_signatures": False}
    assert api_credentials(Settings.model_validate(base)) == {}  # reconciliation off
    key = tmp_path / "key"
    key.write_text("secret-key\n")
    settings = Settings.model_validate(
        {**base, "freeclimb_account_id": ACCOUNT, "freeclimb_api_key_file": key}
    )
    credentials = api_credentials(settings)
    assert list(credentials) == [ACCOUNT]
    assert credentials[ACCOUNT].get_secret_value() == "secret-key"
    assert "secret-key" not in repr(settings)
    with pytest.raises(ValidationError, match="go together"):
        Settings.model_validate({**base, "freeclimb_account_id": ACCOUNT})
    with pytest.raises(ValidationError, match="not both"):
        Settings.model_validate({**base, "freeclimb_api_key": "k", "freeclimb_api_key_file": key})
    for url in ("www.freeclimb.com/apiserver", "ftp://x/apiserver", "https://x/a?b=1"):
        with pytest.raises(ValidationError, match="http\\(s\\) URL without a query"):
            Settings.model_validate({**base, "freeclimb_api_url": url})


def test_several_accounts_take_their_api_keys_from_the_accounts_file(tmp_path: Any) -> None:
    from service.reconciler import api_credentials
    from service.settings import Settings

    other = "AC" + "cd" * 20
    path = tmp_path / "accounts.yaml"
    path.write_text(
        "accounts:\n"
        f"  {ACCOUNT}:\n    signingSecrets: [sigsec_{'1' * 40}]\n    apiKey: k1\n"
        f"  {other}:\n    signingSecrets: [sigsec_{'2' * 40}]\n"
    )
    credentials = api_credentials(Settings.model_validate({"accounts_file": path}))
    assert {a: k.get_secret_value() for a, k in credentials.items()} == {ACCOUNT: "k1"}


# --- callstatus backfill's arguments -------------------------------------------------


def test_backfill_refuses_bad_arguments_and_an_account_without_a_key(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import logs
    from service.cli import main

    # The command configures logging to the captured stream, which closes after this
    # test: later tests' log lines would fail on it.
    monkeypatch.setattr(logs, "configure", lambda *_: None)
    for key in [k for k in os.environ if k.startswith("CALLSTATUS_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .callstatus.env: the environment alone
    monkeypatch.setenv("CALLSTATUS_VERIFY_SIGNATURES", "false")
    window = ["--since", "2026-03-01T00:00:00", "--until", "2026-03-01T06:00:00Z"]
    assert main(["backfill", "--account", "AC1", *window]) == 2
    assert "--account is AC followed by 40 hex digits" in capsys.readouterr().err
    backwards = ["--since", "2026-03-02T00:00:00Z", "--until", "2026-03-01T00:00:00Z"]
    assert main(["backfill", "--account", ACCOUNT, *backwards]) == 2
    assert "--until must be after --since" in capsys.readouterr().err
    assert main(["backfill", "--account", ACCOUNT, *window]) == 2
    assert f"no API key for account {ACCOUNT}" in capsys.readouterr().err
