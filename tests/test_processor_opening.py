"""Opening an assignment from the processor's main loop (service/processor.py,
service/assignment.py): the rebalance callbacks only register and pause; a revocation
stops an opening under way, an assignment that came while one was under way keeps only
the workers whose partition stayed ours, and nothing opened is left behind on a
failure. (Fencing, seek and restore themselves are proven against the broker in
tests/integration.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from service.assignment import Assignment
from service.processor import Processor
from service.worker import PartitionWorker
from tests.conftest import make_settings

TOPIC = make_settings().topic_ingest


class FakeWorker:
    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.tp = TopicPartition(TOPIC, partition)
        self.closed = False
        self.current = True
        self.closing = asyncio.Event()  # set: close() returns at once
        self.closing.set()
        self.close_began = asyncio.Event()

    async def still_current(self, consumer: object) -> bool:
        return self.current

    async def close(self) -> None:
        self.close_began.set()
        await self.closing.wait()  # a producer's stop takes a while
        self.closed = True


class FakeConsumer:
    def __init__(self) -> None:
        self.paused_tps: set[TopicPartition] = set()

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_tps |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_tps -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps)


class Opener:
    """Stands in for PartitionWorker.open: each opening waits at a gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered: list[int] = []
        self.opened: list[FakeWorker] = []
        self.failing: set[int] = set()
        self.slow: set[int] = set()  # these wait at a second gate, never opened here
        self.opened_one = asyncio.Event()

    async def __call__(self, settings: object, partition: int, *_: object, **__: object) -> Any:
        self.entered.append(partition)
        await self.gate.wait()
        if partition in self.slow:
            await asyncio.Event().wait()
        if partition in self.failing:
            raise RuntimeError(f"cannot open {partition}")
        worker = FakeWorker(partition)
        self.opened.append(worker)
        self.opened_one.set()
        return worker


def tps(*partitions: int) -> set[TopicPartition]:
    return {TopicPartition(TOPIC, p) for p in partitions}


@pytest.fixture
def opener(monkeypatch: pytest.MonkeyPatch) -> Opener:
    fake = Opener()
    monkeypatch.setattr(PartitionWorker, "open", staticmethod(fake))
    return fake


def processor() -> tuple[Processor, FakeConsumer]:
    p = Processor(make_settings())
    consumer = FakeConsumer()
    p._consumer = consumer
    return p, consumer


async def opening_done(p: Processor) -> None:
    assert p._opening is not None
    await asyncio.wait([p._opening])


async def test_the_assignment_callback_only_registers_and_pauses(opener: Opener) -> None:
    p, consumer = processor()
    await p.on_partitions_assigned(tps(0, 1))
    assert opener.entered == [] and consumer.paused_tps == tps(0, 1) and not p.ready()
    p._tend_opening(consumer)
    opener.gate.set()
    await opening_done(p)
    assert sorted(p._workers) == [0, 1] and p.ready() and consumer.paused_tps == set()


async def test_a_revocation_stops_the_opening_and_closes_what_it_opened(opener: Opener) -> None:
    p, consumer = processor()
    await p.on_partitions_assigned(tps(0, 1))
    opener.slow = {1}  # a long restore
    opener.gate.set()
    p._tend_opening(consumer)
    await opener.opened_one.wait()  # 0 is open, 1 still restoring
    await p.on_partitions_revoked(tps(0, 1))
    await opening_done(p)
    assert p._workers == {} and not p.ready()
    assert [(w.partition, w.closed) for w in opener.opened] == [(0, True)]
    opener.slow = set()
    p._tend_opening(consumer)
    assert p._opening is None  # nothing to open between revocation and assignment
    await p.on_partitions_assigned(tps(1))
    p._tend_opening(consumer)
    await opening_done(p)
    assert sorted(p._workers) == [1] and p.ready()


async def test_the_run_ending_after_a_revocation_does_not_cut_the_openings_cleanup(
    opener: Opener,
) -> None:
    p, consumer = processor()
    await p.on_partitions_assigned(tps(0, 1))
    opener.slow = {1}
    opener.gate.set()
    p._tend_opening(consumer)
    await opener.opened_one.wait()  # 0 is open, 1 still restoring
    opener.opened[0].closing.clear()  # closing 0 will take a while
    revoked = asyncio.create_task(p.on_partitions_revoked(tps(0, 1)))
    await opener.opened[0].close_began.wait()  # the opening's cleanup is under way
    stopping = asyncio.create_task(p._stop_opening())  # and the run ends meanwhile
    await asyncio.wait([stopping], timeout=0.05)  # (a bounded look: it must not finish)
    opener.opened[0].closing.set()
    await asyncio.gather(revoked, stopping)
    assert [(w.partition, w.closed) for w in opener.opened] == [(0, True)]


async def test_an_assignment_during_an_opening_keeps_only_partitions_that_stayed_ours(
    opener: Opener,
) -> None:
    p, consumer = processor()
    await p.on_partitions_assigned(tps(0, 1))
    p._tend_opening(consumer)
    await p.on_partitions_assigned(tps(1, 2))  # a second generation, while opening
    opener.gate.set()
    await opening_done(p)
    assert not p.ready()  # opened for an assignment that is gone
    first = {w.partition: w for w in opener.opened}
    assert first[0].closed and not first[1].closed
    p._tend_opening(consumer)
    await opening_done(p)
    assert p.ready() and sorted(p._workers) == [1, 2]
    assert p._workers[1] is first[1]  # type: ignore[comparison-overlap]  # kept: current
    assert not consumer.paused_tps & tps(1, 2)


async def test_a_worker_not_current_any_more_is_closed_and_opened_anew(opener: Opener) -> None:
    p, consumer = processor()
    opener.gate.set()
    await p.on_partitions_assigned(tps(0))
    p._tend_opening(consumer)
    await opening_done(p)
    old = p._workers[0]
    await p.on_partitions_revoked(tps(0))
    await p.on_partitions_assigned(tps(0))
    old.current = False  # type: ignore[attr-defined]  # someone else wrote for it
    p._tend_opening(consumer)
    await opening_done(p)
    assert old.closed and p._workers[0] is not old and p.ready()  # type: ignore[attr-defined]


async def test_a_failed_opening_closes_every_worker_and_fails_after_a_fetch(
    opener: Opener,
) -> None:
    p, consumer = processor()
    opener.failing = {1}
    await p.on_partitions_assigned(tps(0, 1, 2))
    p._tend_opening(consumer)
    opener.gate.set()
    await opening_done(p)
    p._tend_opening(consumer)
    assert isinstance(p._failure, RuntimeError) and not p.ready() and p._workers == {}
    assert opener.opened and all(w.closed for w in opener.opened)
    # Resumed for the one fetch before the restart: an unreadable batch shows as such.
    assert consumer.paused_tps == set()


async def test_a_worker_whose_partition_left_us_in_between_is_not_kept(
    opener: Opener,
) -> None:
    p, consumer = processor()
    opener.gate.set()
    await p.on_partitions_assigned(tps(0))
    p._tend_opening(consumer)
    await opening_done(p)
    old = p._workers[0]
    # Two rebalances before the main loop looks again: 0 went elsewhere and came back.
    for assignment in (tps(1), tps(0)):
        await p.on_partitions_revoked(set())
        await p.on_partitions_assigned(assignment)
    p._tend_opening(consumer)
    await opening_done(p)
    assert old.closed and p._workers[0] is not old and p.ready()  # type: ignore[attr-defined]


def test_a_partition_is_ours_since_the_assignment_that_gave_it_without_a_break() -> None:
    a = Assignment()
    a.assign([0, 1])  # generation 1
    a.revoke()
    assert not a.is_current(1)
    a.assign([1, 2])  # 2: 1 stayed, 0 left, 2 came
    a.assign([0, 1, 2])  # 3: 0 came back
    assert [a.ours_since(p, 1) for p in (0, 1, 2)] == [False, True, False]
    assert [a.ours_since(p, 2) for p in (0, 1, 2)] == [False, True, True]
    assert a.is_current(3) and not a.is_current(2)
