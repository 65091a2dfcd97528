"""The shared retry policy: capped, doubling, jittered, resettable."""

from __future__ import annotations

import asyncio
import random

from service.backoff import Backoff, Deadline, sleep_or_stop


def test_delays_double_up_to_the_cap_with_jitter_inside_each_step() -> None:
    backoff = Backoff(first=1.0, cap=8.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base / 2 <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered, not in lockstep


def test_reset_starts_over() -> None:
    backoff = Backoff(first=1.0, cap=8.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0


async def test_deadline_and_sleep_or_stop() -> None:
    assert not Deadline(60).expired
    assert Deadline(0).expired
    stop = asyncio.Event()
    stop.set()
    assert await sleep_or_stop(60, stop)  # returns at once: stop was set
    assert not await sleep_or_stop(0, asyncio.Event())
