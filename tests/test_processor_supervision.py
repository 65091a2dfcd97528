"""The processor's supervision loop: every failure restarts it, except cancellation and
a corrupt state topic; the backoff starts over after progress. (The Kafka side of each
failure is proven in tests/integration; here only the loop's own decisions.)"""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka.errors import IllegalOperation

from service import metrics
from service.backoff import Backoff
from service.processor import Processor, _stop_consumer
from service.restore import CorruptState
from tests.conftest import make_settings


class Scripted(Processor):
    """A processor whose runs follow a script: raise the next error, or return."""

    def __init__(
        self, script: list[BaseException | None], progress: list[bool], role: str = "processor"
    ) -> None:
        super().__init__(
            make_settings(role=role),
            backoff=Backoff(first=0.01, cap=0.04, rng=random.Random(1)),
        )
        self.script = script
        self.progress = progress
        self.runs = 0
        self.delays: list[float] = []
        self.failed_once = asyncio.Event()

    async def _run_once(self) -> None:
        self.runs += 1
        self._progressed = self.progress.pop(0) if self.progress else False
        self.delays.append(self._backoff._next)
        step = self.script.pop(0)
        if step is not None:
            self.failed_once.set()
            raise step


def restarts(reason: str) -> float:
    value: float = metrics.PROCESSOR_RESTARTS.labels(reason)._value.get()
    return value


async def test_every_exception_restarts_including_fenced_illegal_operation() -> None:
    before = restarts("IllegalOperation"), restarts("AssertionError")
    p = Scripted([IllegalOperation("fenced"), AssertionError("aiokafka"), RuntimeError(), None], [])
    await asyncio.wait_for(p.run(), 10)
    assert p.runs == 4
    assert restarts("IllegalOperation") == before[0] + 1
    assert restarts("AssertionError") == before[1] + 1


async def test_a_corrupt_state_topic_ends_a_processor_only_node() -> None:
    p = Scripted([CorruptState("repair me"), None], [])
    with pytest.raises(CorruptState):
        await asyncio.wait_for(p.run(), 10)
    assert p.runs == 1


async def test_a_corrupt_state_topic_is_retried_where_ingest_shares_the_process() -> None:
    p = Scripted([CorruptState("repair me"), CorruptState("repair me"), None], [], role="all")
    await asyncio.wait_for(p.run(), 10)
    assert p.runs == 3


async def test_a_stray_cancellation_restarts_instead_of_ending_the_node() -> None:
    # aiokafka lets a CancelledError of its own escape (a fetch task cancelled in its
    # retry backoff while the consumer stops); nobody cancelled us, so it is a failure
    # like any other. Ending the task instead would take ROLE=all's ingest down.
    p = Scripted([asyncio.CancelledError(), None], [])
    await asyncio.wait_for(p.run(), 10)
    assert p.runs == 2


async def test_a_real_cancellation_ends_the_loop() -> None:
    class Blocking(Scripted):
        async def _run_once(self) -> None:
            self.runs += 1
            self.failed_once.set()
            await asyncio.Event().wait()

    p = Blocking([], [])
    task = asyncio.create_task(p.run())
    await asyncio.wait_for(p.failed_once.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.runs == 1


class StopRaises:
    """A consumer whose stop() raises what aiokafka's can: a stray cancellation."""

    async def stop(self) -> None:
        raise asyncio.CancelledError


async def test_stopping_the_consumer_swallows_a_stray_cancellation_only() -> None:
    await _stop_consumer(StopRaises())  # nobody cancelled us

    async def cancelled_while_stopping() -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        await _stop_consumer(StopRaises())

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(cancelled_while_stopping())


async def test_the_backoff_starts_over_after_progress() -> None:
    errors: list[BaseException | None] = [RuntimeError() for _ in range(5)]
    # Three failures without progress, then one that made progress, then one more.
    p = Scripted([*errors, None], [False, False, False, True, False])
    await asyncio.wait_for(p.run(), 10)
    # The delay grows (0.01, 0.02, 0.04 cap) and is back at the first after progress.
    assert p.delays[:4] == [0.01, 0.02, 0.04, 0.04]
    assert p.delays[4] == 0.02  # reset to 0.01, which that restart then used


async def test_stop_during_the_backoff_ends_the_loop() -> None:
    p = Scripted([RuntimeError()] * 100, [])
    p._backoff = Backoff(first=30, cap=30)
    task = asyncio.create_task(p.run())
    await asyncio.wait_for(p.failed_once.wait(), 5)
    await p.stop()
    await asyncio.wait_for(task, 5)
    assert p.runs == 1
