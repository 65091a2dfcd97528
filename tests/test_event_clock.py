"""The log about events ahead of the processor's clock: counted every time, logged once
per window with the count since the last line, so a flood of forged records cannot
flood the log (issue 17)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from structlog.testing import capture_logs

from service import metrics
from service.aheadofclock import AheadOfClock

SKEW = timedelta(seconds=300)


def test_a_flood_of_events_ahead_of_the_clock_is_one_line_per_window() -> None:
    now = [0.0]
    report = AheadOfClock(window=60.0, clock=lambda: now[0])
    counted = metrics.PROCESSOR_AHEAD_OF_CLOCK._value.get()
    forged = datetime(9999, 12, 31, tzinfo=UTC)
    with capture_logs() as logs:
        report.note(0, 1, forged, SKEW)  # the first is said at once
        for n in range(10_000):
            now[0] = n * 0.005  # 10,000 batches in 50 s
            report.note(n % 3, 2, forged - timedelta(days=n), SKEW)
        now[0] = 60.0
        report.note(4, 1, datetime(2030, 1, 1, tzinfo=UTC), SKEW)
    assert [line["events"] for line in logs] == [1, 20_001]
    assert logs[1]["partitions"] == [0, 1, 2, 4]
    assert logs[1]["furthest_received_at"] == forged.isoformat()
    assert logs[1]["max_clock_skew_seconds"] == 300
    assert metrics.PROCESSOR_AHEAD_OF_CLOCK._value.get() == counted + 20_002
