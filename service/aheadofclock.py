"""One warning a window about ingest events whose receivedAt was past the processor's
clock bound (:class:`service.batch.BatchPlan` counts them; docs/architecture.md, section
7): the metric counts every one, the log says it once per window, with the count, the
partitions and the furthest time since the last line."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from service import metrics

# The worker's logger, as before this moved here: filters on it keep working.
log = structlog.get_logger(logger_name="callstatus.worker")

# At most one log line this often about events ahead of the clock, with the count since
# the last one: whoever can write forged records to ingest must not be able to write our
# logs at the same rate. The metric counts every one.
AHEAD_REPORT_SECONDS = 60.0


class AheadOfClock:
    """Aggregates the events whose receivedAt was past the clock's bound (batch.BatchPlan)
    of all partitions into one warning per ``window`` seconds."""

    def __init__(
        self, window: float = AHEAD_REPORT_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.clock = clock
        self._logged_at: float | None = None
        self._held = 0
        self._partitions: set[int] = set()
        self._furthest: datetime | None = None

    def note(self, partition: int, count: int, furthest: datetime, max_skew: timedelta) -> None:
        metrics.PROCESSOR_AHEAD_OF_CLOCK.inc(count)
        self._held += count
        self._partitions.add(partition)
        if self._furthest is None or furthest > self._furthest:
            self._furthest = furthest
        now = self.clock()
        if self._logged_at is not None and now - self._logged_at < self.window:
            return
        self._logged_at = now
        log.warning(
            "ingest events ahead of the clock judged without moving the watermark",
            events=self._held,
            partitions=sorted(self._partitions),
            furthest_received_at=self._furthest.isoformat(),
            max_clock_skew_seconds=max_skew.total_seconds(),
            window_seconds=self.window,
        )
        self._held, self._partitions, self._furthest = 0, set(), None


__all__ = ["AHEAD_REPORT_SECONDS", "AheadOfClock"]
