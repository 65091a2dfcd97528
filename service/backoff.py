"""Capped exponential backoff with jitter, and deadlines: the one retry policy every
reconnect, rebuild and restart loop of the service shares."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays of ``first``, doubling up to ``cap``, each with "equal jitter" (half fixed,
    half random) so a fleet of pods that lost the same broker does not retry in step.
    :meth:`reset` after a success starts the sequence over."""

    first: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    _next: float = 0.0

    def __post_init__(self) -> None:
        self._next = self.first

    def next_delay(self) -> float:
        base = self._next
        self._next = min(self._next * 2, self.cap)
        return base / 2 + self.rng.uniform(0, base / 2)

    def reset(self) -> None:
        self._next = self.first


class Deadline:
    """A point on the event loop's clock: ``Deadline(30).expired`` after 30 s."""

    __slots__ = ("_at", "_loop")

    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._at = self._loop.time() + seconds

    @property
    def expired(self) -> bool:
        return self._loop.time() >= self._at

    @property
    def remaining(self) -> float:
        return max(0.0, self._at - self._loop.time())


async def sleep_or_stop(delay: float, stop: asyncio.Event) -> bool:
    """Wait ``delay`` seconds or until ``stop`` is set; True when stop was set."""
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return False
    return True
