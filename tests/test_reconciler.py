"""The reconciler's rounds (service/reconciler.py) against the FreeClimb API stand-in on
loopback, with the processor and Kafka stood in for: which calls are fetched, what is
published, the backoff between fetches, a 404 given up, the sweep owned per account."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from structlog.testing import capture_logs

from schemas.call import Call, CallStatus
from schemas.messages import Source, read_ingest
from service.accounts import AccountsWatcher, Reload
from service.freeclimb import ClientOptions, FetchedCall, FreeClimbClient
from service.fsm import CallState
from service.partitioner import partition_for
from service.producer import Unavailable, Unwritable
from service.reconciler import BookKeys, Reconciler, Sweep, client_for, publish_fetched
from service.server import Node
from service.settings import Settings
from service.standin import StandIn, serve
from service.statecodec import NO_ACCOUNT, account_bytes, held_since, pack
from tests.test_accounts import SecretVolume

S = CallStatus
ACCOUNT = "AC" + "7a" * 20
KEY = "k"
NOW = datetime.now(UTC)


def cid(n: int) -> str:
    return "CA" + f"{n:040x}"


@dataclass
class FakeWorker:
    states: dict[str, bytes] = field(default_factory=dict)

    @property
    def held(self) -> Mapping[str, float]:
        return {c: t for c, b in self.states.items() if (t := held_since(b)) is not None}


@dataclass
class FakeOwner:
    workers: dict[int, FakeWorker]
    partitions: list[int]

    def owned(self) -> Mapping[int, FakeWorker]:
        return self.workers

    def ingest_partitions(self) -> list[int] | None:
        return self.partitions


@pytest.fixture
async def api() -> AsyncIterator[tuple[StandIn, str]]:
    standin = StandIn({ACCOUNT: KEY}, page_size=2)
    async with serve(standin) as url:
        yield standin, url


class Published(list[bytes]):
    """A publish that keeps each record's key, in order: what the reconciler sent."""

    async def __call__(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.append(key)


def held_state(status: CallStatus, at: datetime, account: str | None = ACCOUNT) -> bytes:
    return pack(CallState(status, None, at), account_bytes(account) if account else NO_ACCOUNT)


async def test_due_calls_are_fetched_published_once_backed_off_and_404_given_up(
    api: tuple[StandIn, str],
) -> None:
    standin, url = api
    settings = Settings(verify_signatures=False, freeclimb_api_url=url, reconcile_after_seconds=60)
    standin.put_call(ACCOUNT, cid(1), S.IN_PROGRESS, at=NOW - timedelta(minutes=5))
    standin.advance(ACCOUNT, cid(1), S.COMPLETED, at=NOW - timedelta(minutes=4))
    old = NOW - timedelta(minutes=5)
    worker = FakeWorker(
        {
            cid(1): held_state(S.IN_PROGRESS, old),  # its end was lost: due
            cid(2): held_state(S.IN_PROGRESS, old),  # FreeClimb does not know it: 404
            cid(3): held_state(S.IN_PROGRESS, NOW),  # heard of just now: not due
            cid(4): held_state(S.IN_PROGRESS, old, None),  # no account: not fetchable
            cid(5): held_state(S.COMPLETED, old),  # ended: nothing to ask
        }
    )
    published: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []

    async def publish(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        published.append((key, value, headers))

    owner = FakeOwner({0: worker}, [0])
    reconciler = Reconciler(settings, owner, {ACCOUNT: SecretStr(KEY)}, publish)
    async with client_for(settings, reconciler.credentials) as client:
        now = NOW.timestamp()
        assert await reconciler.held_round(client, now) == 2
        [(key, value, headers)] = published
        view = read_ingest(value)
        assert key == cid(1).encode() and view.source is Source.API
        assert (view.call.status, view.call.revision) == (S.COMPLETED, 2)
        assert dict(headers)["ce_id"] == view.eventId.encode()
        fetched = sorted(s.path.rsplit("/", 1)[1] for s in standin.seen)
        assert fetched == [cid(1), cid(2)]
        # The next round, still before the backoff: nothing; cid(2) is given up for good.
        assert await reconciler.held_round(client, now + 30) == 0
        # Past the backoff: cid(1) again, cid(3) now due too; never cid(2) again.
        assert await reconciler.held_round(client, now + 61) == 2
        fetched = sorted(s.path.rsplit("/", 1)[1] for s in standin.seen)
        assert fetched == [cid(1), cid(1), cid(2), cid(3)]
        # A rebalance: for a while nothing is owned. The backoffs and the given-up call
        # outlive it: right after, nothing is due again yet, and cid(2) is still given up.
        owner.workers = {}
        assert await reconciler.held_round(client, now + 62) == 0
        owner.workers = {0: worker}
        assert await reconciler.held_round(client, now + 63) == 0
        assert len(standin.seen) == 4


async def test_the_sweep_lists_only_owned_accounts_and_publishes_each_call_once(
    api: tuple[StandIn, str],
) -> None:
    standin, url = api
    settings = Settings(verify_signatures=False, freeclimb_api_url=url)
    for n in range(3):
        standin.put_call(ACCOUNT, cid(n), S.RINGING, at=NOW - timedelta(minutes=10))
        standin.advance(ACCOUNT, cid(n), S.NO_ANSWER, at=NOW - timedelta(minutes=9))
    standin.put_call(ACCOUNT, cid(9), S.RINGING, at=NOW - timedelta(minutes=10))  # going on
    published = Published()
    partitions = [0, 1, 2]
    mine = partition_for(ACCOUNT.encode(), partitions, partitions)
    others = FakeOwner({p: FakeWorker() for p in partitions if p != mine}, partitions)
    owner = FakeOwner({mine: FakeWorker()}, partitions)
    credentials = {ACCOUNT: SecretStr(KEY)}
    async with client_for(settings, credentials) as client:
        elsewhere = Reconciler(settings, others, credentials, published)
        assert await elsewhere.sweep_round(client, NOW.timestamp()) == Sweep("done", 0)
        assert standin.seen == []  # not this node's account: not even listed
        reconciler = Reconciler(settings, owner, credentials, published)
        assert await reconciler.sweep_round(client, NOW.timestamp()) == Sweep("done", 3)
        assert sorted(published) == sorted(cid(n).encode() for n in range(3))
        assert len(standin.seen) == 2  # two pages of two
        # Listed again by the next sweep, unchanged: not published again.
        assert await reconciler.sweep_round(client, NOW.timestamp() + 300) == Sweep("done", 0)
        assert len(published) == 3


# --- the API keys follow the accounts file ---------------------------------------------

OTHER = "AC" + "3c" * 20


def accounts_text(keys: Mapping[str, str]) -> str:
    lines = ["accounts:"]
    for n, (account, key) in enumerate(keys.items()):
        lines += [f"  {account}:", f"    signingSecrets: [sigsec_{str(n) * 40}]"]
        if key:
            lines.append(f"    apiKey: {key}")
    return "\n".join(lines) + "\n"


def watched_accounts(
    tmp_path: Path, keys: Mapping[str, str], **settings: object
) -> tuple[SecretVolume, AccountsWatcher, Settings]:
    """An accounts file (a mounted Secret) with these API keys, its watcher, and settings
    that read it."""
    volume = SecretVolume(tmp_path / "accounts")
    volume.publish(accounts_text(keys))
    watcher = AccountsWatcher.open(volume.path, 60)
    values = {"verify_signatures": False, "accounts_file": volume.path, **settings}
    return volume, watcher, Settings.model_validate(values)


async def test_a_reloaded_accounts_file_rotates_adds_and_removes_api_keys(
    api: tuple[StandIn, str], tmp_path: Path
) -> None:
    standin, url = api
    volume, watcher, settings = watched_accounts(
        tmp_path, {ACCOUNT: KEY}, freeclimb_api_url=url, reconcile_after_seconds=60
    )
    old = NOW - timedelta(minutes=5)
    standin.put_call(ACCOUNT, cid(1), S.IN_PROGRESS, at=old)
    worker = FakeWorker({cid(1): held_state(S.IN_PROGRESS, old)})
    published = Published()
    owner = FakeOwner({0: worker}, [0])  # one partition: every account is ours
    reconciler = Reconciler(settings, owner, BookKeys(watcher), published)
    now = NOW.timestamp()
    async with client_for(settings, reconciler.credentials) as client:
        assert await reconciler.held_round(client, now) == 1
        assert [s.status for s in standin.seen] == [200]
        # FreeClimb rotates the key, and the Secret follows: the old key is refused from
        # now on, and the next fetch must go with the new one, without a restart.
        # (add_account replaces the account with its calls: the call is put back.)
        standin.add_account(ACCOUNT, "rotated-key")
        standin.put_call(ACCOUNT, cid(1), S.IN_PROGRESS, at=old)
        volume.publish(accounts_text({ACCOUNT: "rotated-key"}))
        assert watcher.poll() is Reload.RELOADED
        assert await reconciler.held_round(client, now + 61) == 1
        assert [s.status for s in standin.seen] == [200, 200]
        assert published == [cid(1).encode()] * 2
        # A new account is swept; the account removed from the file is not even listed.
        standin.add_account(OTHER, "other-key")
        standin.put_call(OTHER, cid(7), S.RINGING, at=NOW - timedelta(minutes=10))
        standin.advance(OTHER, cid(7), S.BUSY, at=NOW - timedelta(minutes=9))
        volume.publish(accounts_text({OTHER: "other-key", ACCOUNT: ""}))
        assert watcher.poll() is Reload.RELOADED
        standin.seen.clear()
        assert await reconciler.sweep_round(client, now) == Sweep("done", 1)
        assert {s.path.split("/")[3] for s in standin.seen} == {OTHER}
        assert all(s.status == 200 for s in standin.seen)
        # Nor is its held call fetched any more: no key to ask with.
        assert await reconciler.held_round(client, now + 10_000) == 0


async def test_a_reloaded_key_ends_the_backoff_the_old_key_built_up(
    api: tuple[StandIn, str], tmp_path: Path
) -> None:
    """Fetches refused 401 with a stale key back the call off, doubling each time (up to
    an hour). Once the Secret carries the new key, the call is fetched at the next
    round, not when the old backoff runs out."""
    standin, url = api
    volume, watcher, settings = watched_accounts(
        tmp_path, {ACCOUNT: "stale"}, freeclimb_api_url=url, reconcile_after_seconds=60
    )
    old = NOW - timedelta(minutes=5)
    standin.put_call(ACCOUNT, cid(1), S.IN_PROGRESS, at=old)
    owner = FakeOwner({0: FakeWorker({cid(1): held_state(S.IN_PROGRESS, old)})}, [0])
    published = Published()
    reconciler = Reconciler(settings, owner, BookKeys(watcher), published)
    now = NOW.timestamp()
    async with client_for(settings, reconciler.credentials) as client:
        assert await reconciler.held_round(client, now) == 1
        assert [s.status for s in standin.seen] == [401]
        assert await reconciler.held_round(client, now + 1) == 0  # backed off
        volume.publish(accounts_text({ACCOUNT: KEY}))
        assert watcher.poll() is Reload.RELOADED
        assert await reconciler.held_round(client, now + 2) == 1
        assert standin.seen[-1].status == 200 and published == [cid(1).encode()]


def test_the_node_shares_its_accounts_watcher_with_the_reconciler(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "accounts")
    for role in ("processor", "all"):
        volume.publish(accounts_text({ACCOUNT: KEY}))
        node = Node(Settings(role=role, verify_signatures=False, accounts_file=volume.path))
        # A processor-only node watches the file too: it holds the API keys.
        assert isinstance(node.accounts, AccountsWatcher)
        assert node.reconciler is not None
        assert {a: k.get_secret_value() for a, k in node.reconciler.credentials.items()} == {
            ACCOUNT: KEY
        }
        volume.publish(accounts_text({ACCOUNT: f"{role}-key", OTHER: "k"}))
        assert node.accounts.poll() is Reload.RELOADED
        keys = {a: k.get_secret_value() for a, k in node.reconciler.credentials.items()}
        assert keys == {ACCOUNT: f"{role}-key", OTHER: "k"}
    # Without an accounts file or a key, a processor node has no reconciler and no watcher.
    bare = Node(Settings(role="processor", verify_signatures=False))
    assert bare.accounts is None and bare.reconciler is None


# --- failures: a sweep that cannot list, a publish that cannot be made ---------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def no_sleep(_: float) -> None:
    return None


def quick_client(url: str, credentials: Mapping[str, SecretStr]) -> FreeClimbClient:
    """The client the node builds, but its backoff between retries not waited out."""
    return FreeClimbClient(dict(credentials), ClientOptions(base_url=url), sleep=no_sleep)


def ended_calls(standin: StandIn, n: int) -> None:
    for i in range(n):
        standin.put_call(ACCOUNT, cid(i), S.RINGING, at=NOW - timedelta(minutes=10))
        standin.advance(ACCOUNT, cid(i), S.NO_ANSWER, at=NOW - timedelta(minutes=9))


async def test_a_sweep_skipped_mid_rebalance_is_due_again_at_the_next_round(
    api: tuple[StandIn, str],
) -> None:
    standin, url = api
    settings = Settings(verify_signatures=False, freeclimb_api_url=url)
    ended_calls(standin, 1)
    published = Published()
    owner = FakeOwner({}, [0])  # mid-rebalance: nothing owned yet
    t = [NOW.timestamp()]
    reconciler = Reconciler(
        settings, owner, {ACCOUNT: SecretStr(KEY)}, published, clock=lambda: t[0]
    )
    async with client_for(settings, reconciler.credentials) as client:
        await reconciler.round(client)
        assert standin.seen == [] and published == []
        # The partition is ours a moment later: the sweep runs at the next round, not a
        # whole RECONCILE_SWEEP_SECONDS later.
        owner.workers = {0: FakeWorker()}
        t[0] += 1
        await reconciler.round(client)
        assert published == [cid(0).encode()]
        # Done now: the next one waits its period.
        t[0] += 1
        await reconciler.round(client)
        assert len(standin.seen) == 1
        t[0] += settings.reconcile_sweep_seconds
        await reconciler.round(client)
        assert len(standin.seen) == 2


async def test_a_sweep_the_api_fails_is_counted_and_tried_again_backed_off(
    api: tuple[StandIn, str],
) -> None:
    standin, url = api
    settings = Settings(verify_signatures=False, freeclimb_api_url=url)
    ended_calls(standin, 1)
    published = Published()
    credentials = {ACCOUNT: SecretStr(KEY)}
    t = [NOW.timestamp()]
    owner = FakeOwner({0: FakeWorker()}, [0])
    reconciler = Reconciler(settings, owner, credentials, published, clock=lambda: t[0])
    sweeps_failed = sample("callstatus_reconcile_sweeps_total", outcome="failed")
    fetches_failed = sample("callstatus_reconcile_fetches_total", trigger="sweep", outcome="failed")
    answered_500 = sample(
        "callstatus_freeclimb_api_requests_total",
        operation="list_calls",
        code="500",
        outcome="failed",
    )
    attempts = ClientOptions().max_retries + 1
    standin.fail_next(500, times=attempts)  # every attempt of the first listing
    async with quick_client(url, credentials) as client:
        await reconciler.round(client)  # logged and counted, not raised
        assert [s.status for s in standin.seen] == [500] * attempts and published == []
        # What the alert and the dashboard read: the sweep failed, and the API's 500.
        assert sample("callstatus_reconcile_sweeps_total", outcome="failed") == sweeps_failed + 1
        assert (
            sample("callstatus_reconcile_fetches_total", trigger="sweep", outcome="failed")
            == fetches_failed + 1
        )
        assert (
            sample(
                "callstatus_freeclimb_api_requests_total",
                operation="list_calls",
                code="500",
                outcome="failed",
            )
            == answered_500 + 1
        )
        # Not at once (the API is unwell), but well before a whole sweep period.
        t[0] += 0.1
        await reconciler.round(client)
        assert len(standin.seen) == attempts
        t[0] += 31  # past the sweep backoff's cap
        await reconciler.round(client)
        assert standin.seen[-1].status == 200 and published == [cid(0).encode()]


async def test_a_failing_sweep_warns_once_and_says_when_it_works_again(
    api: tuple[StandIn, str],
) -> None:
    """An API away for a while (or `make run` with no simulate serving the stand-in)
    gave the same warning at every retried sweep. Now one warning when the account's
    sweep starts failing, and one info line once it works again; the metrics count
    each failure."""
    standin, url = api
    settings = Settings(verify_signatures=False, freeclimb_api_url=url)
    ended_calls(standin, 1)

    credentials = {ACCOUNT: SecretStr(KEY)}
    t = [NOW.timestamp()]
    owner = FakeOwner({0: FakeWorker()}, [0])
    reconciler = Reconciler(settings, owner, credentials, Published(), clock=lambda: t[0])
    failed = sample("callstatus_reconcile_sweeps_total", outcome="failed")
    attempts = ClientOptions().max_retries + 1
    standin.fail_next(500, times=3 * attempts)  # three sweeps in a row fail
    async with quick_client(url, credentials) as client:
        with capture_logs() as logs:
            for _ in range(4):  # three failures, then one that works
                await reconciler.round(client)
                t[0] += 31  # past the sweep backoff's cap
    assert sample("callstatus_reconcile_sweeps_total", outcome="failed") == failed + 3
    said = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("sweep")]
    assert said == [
        ("sweep failed; retried backed off, logged again once it works", "warning"),
        ("sweep works again", "info"),
    ]


async def test_only_the_account_whose_sweep_failed_is_listed_again_at_the_retry(
    api: tuple[StandIn, str],
) -> None:
    """One account's listing refused (its key rotated at FreeClimb, the Secret not
    updated yet) made the whole sweep due again within seconds, so every other account
    was listed again at each retry: ten times the API requests. Now the retry lists only
    the account that failed; the next full sweep lists them all."""
    standin, url = api
    other, other_key = "AC" + "5b" * 20, "k2"
    standin.add_account(other, other_key)
    settings = Settings(verify_signatures=False, freeclimb_api_url=url)

    # The service holds a stale key for ACCOUNT: every listing of it is a 401.
    credentials = {ACCOUNT: SecretStr("stale"), other: SecretStr(other_key)}
    t = [NOW.timestamp()]
    owner = FakeOwner({0: FakeWorker()}, [0])
    reconciler = Reconciler(settings, owner, credentials, Published(), clock=lambda: t[0])

    def listed() -> list[str]:
        """Whose listings the stand-in answered since the last look, by the path."""
        out = [ACCOUNT if ACCOUNT in s.path else other for s in standin.seen]
        standin.seen.clear()
        return out

    async with quick_client(url, credentials) as client:
        await reconciler.round(client)
        assert sorted(set(listed())) == sorted([ACCOUNT, other])
        t[0] += 31  # past the sweep backoff's cap, well within the sweep period
        await reconciler.round(client)
        assert set(listed()) == {ACCOUNT}
        t[0] += settings.reconcile_sweep_seconds  # the next full sweep
        await reconciler.round(client)
        assert sorted(set(listed())) == sorted([ACCOUNT, other])


async def test_a_publish_kafka_refuses_is_counted_and_the_call_tried_again_later(
    api: tuple[StandIn, str],
) -> None:
    standin, url = api
    settings = Settings(verify_signatures=False, freeclimb_api_url=url, reconcile_after_seconds=60)
    old = NOW - timedelta(minutes=5)
    standin.put_call(ACCOUNT, cid(1), S.IN_PROGRESS, at=old)
    standin.advance(ACCOUNT, cid(1), S.COMPLETED, at=old)
    refusals: list[Exception] = [Unwritable("MessageSizeTooLargeError"), Unavailable("timeout")]
    published: list[bytes] = []

    async def publish(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        if refusals:
            raise refusals.pop(0)
        published.append(key)

    def count(outcome: str) -> float:
        return sample("callstatus_reconcile_fetches_total", trigger="held", outcome=outcome)

    before = {o: count(o) for o in ("unwritable", "unpublished", "published")}
    owner = FakeOwner({0: FakeWorker({cid(1): held_state(S.IN_PROGRESS, old)})}, [0])
    reconciler = Reconciler(settings, owner, {ACCOUNT: SecretStr(KEY)}, publish)
    now = NOW.timestamp()
    async with client_for(settings, reconciler.credentials) as client:
        assert await reconciler.held_round(client, now) == 1  # refused for good: no crash
        assert count("unwritable") == before["unwritable"] + 1
        assert await reconciler.held_round(client, now + 30) == 0  # backed off
        assert await reconciler.held_round(client, now + 61) == 1  # Kafka away: not now
        assert count("unpublished") == before["unpublished"] + 1
        # Fetched again after the doubled backoff, and published this time.
        assert await reconciler.held_round(client, now + 61 + 119) == 0
        assert await reconciler.held_round(client, now + 61 + 121) == 1
        assert published == [cid(1).encode()]
        assert count("published") == before["published"] + 1


async def test_a_sweep_stops_while_kafka_takes_no_writes_and_publishes_the_rest_later(
    api: tuple[StandIn, str],
) -> None:
    standin, url = api
    settings = Settings(verify_signatures=False, freeclimb_api_url=url)
    ended_calls(standin, 5)  # three pages of two
    down = [True]
    published: list[bytes] = []

    async def publish(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        if down[0]:
            raise Unavailable("timeout")
        published.append(key)

    owner = FakeOwner({0: FakeWorker()}, [0])
    reconciler = Reconciler(settings, owner, {ACCOUNT: SecretStr(KEY)}, publish)
    async with client_for(settings, reconciler.credentials) as client:
        # The first publish fails: the sweep stops there, not one produce timeout per
        # call; nothing is remembered as published.
        failed = await reconciler.sweep_round(client, NOW.timestamp())
        assert failed == Sweep("failed", 0, frozenset({ACCOUNT}))
        assert len(standin.seen) == 1
        down[0] = False
        assert await reconciler.sweep_round(client, NOW.timestamp() + 5) == Sweep("done", 5)
        assert sorted(published) == sorted(cid(i).encode() for i in range(5))


async def test_a_fetched_resource_too_large_for_ingest_is_refused_before_sending() -> None:
    call = Call.model_validate({"callId": cid(1), "accountId": ACCOUNT, "status": "completed"})
    fetched = FetchedCall(call.to_json(), {}, call)
    sent: list[bytes] = []

    async def publish(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        sent.append(key)

    before = sample("callstatus_reconcile_fetches_total", trigger="backfill", outcome="too_large")
    assert await publish_fetched(publish, "backfill", fetched, 1 << 20) == "published"
    assert await publish_fetched(publish, "backfill", fetched, 100) == "too_large"
    assert sent == [cid(1).encode()]
    after = sample("callstatus_reconcile_fetches_total", trigger="backfill", outcome="too_large")
    assert after == before + 1


async def test_an_accounts_file_without_keys_says_off_until_a_reload_adds_one(
    api: tuple[StandIn, str], tmp_path: Path
) -> None:
    standin, url = api
    # What `make run` writes: no apiKey.
    volume, watcher, settings = watched_accounts(tmp_path, {ACCOUNT: ""}, freeclimb_api_url=url)
    ended_calls(standin, 1)
    published = Published()
    reconciler = Reconciler(
        settings, FakeOwner({0: FakeWorker()}, [0]), BookKeys(watcher), published
    )
    with capture_logs() as logs:
        reconciler._say(reconciler.credentials)  # what run() says first
        async with client_for(settings, reconciler.credentials) as client:
            assert await reconciler.sweep_round(client, NOW.timestamp()) == Sweep("done", 0)
            assert standin.seen == []  # no key: nothing asked
            volume.publish(accounts_text({ACCOUNT: KEY}))
            assert watcher.poll() is Reload.RELOADED
            assert await reconciler.sweep_round(client, NOW.timestamp()) == Sweep("done", 1)
    said = [e["event"].split(":")[0] for e in logs if e["event"].startswith("reconciliation")]
    assert said == ["reconciliation off", "reconciliation on"]


def test_a_sweep_window_cut_by_the_retention_is_warned_about_when_keys_come_from_a_file(
    tmp_path: Path,
) -> None:
    """With only an accounts file the settings cannot refuse it (the file may hold no
    key); the reconciler says so once it turns on, naming the settings."""
    settings = Settings(
        verify_signatures=False,
        accounts_file=tmp_path / "accounts.yaml",
        state_terminal_retention_seconds=900,
    )
    owner = FakeOwner({0: FakeWorker()}, [0])

    reconciler = Reconciler(settings, owner, {ACCOUNT: SecretStr(KEY)}, Published())
    with capture_logs() as logs:
        reconciler._say(reconciler.credentials)
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert "CALLSTATUS_STATE_TERMINAL_RETENTION_SECONDS (900)" in warning["event"]
