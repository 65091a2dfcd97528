"""The reconciler's rounds (service/reconciler.py) against the FreeClimb API stand-in on
loopback, with the processor and Kafka stood in for: which calls are fetched, what is
published, the backoff between fetches, a 404 given up, the sweep owned per account."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from schemas.call import CallStatus
from schemas.messages import Source, read_ingest
from service.fsm import CallState
from service.partitioner import partition_for
from service.reconciler import Reconciler, client_for
from service.settings import Settings
from service.standin import StandIn, serve
from service.statecodec import NO_ACCOUNT, account_bytes, held_since, pack

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
    published: list[bytes] = []

    async def publish(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        published.append(key)

    partitions = [0, 1, 2]
    mine = partition_for(ACCOUNT.encode(), partitions, partitions)
    others = FakeOwner({p: FakeWorker() for p in partitions if p != mine}, partitions)
    owner = FakeOwner({mine: FakeWorker()}, partitions)
    credentials = {ACCOUNT: SecretStr(KEY)}
    async with client_for(settings, credentials) as client:
        elsewhere = Reconciler(settings, others, credentials, publish)
        assert await elsewhere.sweep_round(client, NOW.timestamp()) == 0
        assert standin.seen == []  # not this node's account: not even listed
        reconciler = Reconciler(settings, owner, credentials, publish)
        assert await reconciler.sweep_round(client, NOW.timestamp()) == 3
        assert sorted(published) == sorted(cid(n).encode() for n in range(3))
        assert len(standin.seen) == 2  # two pages of two
        # Listed again by the next sweep, unchanged: not published again.
        assert await reconciler.sweep_round(client, NOW.timestamp() + 300) == 0
        assert len(published) == 3
