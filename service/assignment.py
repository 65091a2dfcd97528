"""The partitions the consumer group gave this processor, as its rebalance callbacks
registered them (for each, since when it has been ours without a break), and opening
workers for them all or none. The processor asks it which workers may be kept and
whether an opening still matches what is ours."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from service.worker import PartitionWorker


@dataclass(slots=True)
class Assignment:
    generation: int = 0  # one per assignment the group made; 0: none yet
    revoked: bool = False  # between a revocation and the next assignment
    # Per partition, the generation since which it has been ours without a break. With
    # the eager protocol (aiokafka's) a partition in two consecutive assignments had no
    # other owner between them; one that left and came back did, and may have been
    # fenced and written for meanwhile.
    since: dict[int, int] = field(default_factory=dict)

    def assign(self, partitions: Iterable[int]) -> None:
        self.generation += 1
        self.since = {p: self.since.get(p, self.generation) for p in partitions}
        self.revoked = False

    def revoke(self) -> None:
        self.revoked = True

    def is_current(self, generation: int) -> bool:
        """Whether the assignment of ``generation`` is still the one in force."""
        return generation == self.generation and not self.revoked

    def ours_since(self, partition: int, generation: int) -> bool:
        """Whether ``partition`` has been ours, without a break, since ``generation``."""
        since = self.since.get(partition)
        return since is not None and since <= generation


async def close_all(workers: Iterable[PartitionWorker]) -> None:
    for worker in workers:
        with contextlib.suppress(Exception):
            await worker.close()


async def open_all_or_none(
    openings: dict[int, Coroutine[Any, Any, PartitionWorker]],
) -> dict[int, PartitionWorker]:
    """Run the openings concurrently (each restore is its own reader) and return every
    worker, or none: on a failure, or our cancellation, the others are cancelled and
    each worker already open is closed before the error goes on, so no producer of a
    partition we may no longer own lingers."""
    tasks = {partition: asyncio.ensure_future(c) for partition, c in openings.items()}
    try:
        await asyncio.gather(*tasks.values())
    except BaseException:
        for task in tasks.values():
            task.cancel()
        await asyncio.wait(tasks.values())
        # Retrieving each failure keeps asyncio from logging it again at GC.
        done = [t for t in tasks.values() if not t.cancelled() and t.exception() is None]
        await close_all(t.result() for t in done)
        raise
    return {partition: task.result() for partition, task in tasks.items()}


__all__ = ["Assignment", "close_all", "open_all_or_none"]
