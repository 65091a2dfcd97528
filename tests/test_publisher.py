"""The spool drainer's supervision without a broker: a drainer that ends with an error
is logged, counted and started again, and stopping ends it for good."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from service import metrics
from service.producer import IngestProducer
from service.publisher import SpoolingPublisher
from service.spool import Spool
from tests.conftest import make_settings


async def test_a_drainer_that_crashes_is_logged_counted_and_restarted(tmp_path: Path) -> None:
    publisher = SpoolingPublisher(IngestProducer(make_settings()), Spool(tmp_path, 1 << 20), 1.0)
    runs = 0
    second_run = asyncio.Event()

    async def drain() -> None:
        # A stand-in for a bug that escapes every step's own handling, once.
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("a bug in the drain loop")
        second_run.set()
        await publisher._stopping.wait()

    restarts = metrics.SPOOL_DRAINER_RESTARTS._value.get()
    with capture_logs() as logs:
        task = asyncio.create_task(publisher._supervise(drain))
        await asyncio.wait_for(second_run.wait(), 10)
        assert not task.done()
        publisher._stopping.set()
        await asyncio.wait_for(task, 10)
    assert runs == 2 and task.exception() is None
    assert metrics.SPOOL_DRAINER_RESTARTS._value.get() == restarts + 1
    [crash] = [e for e in logs if e["event"] == "spool drainer crashed; restarting it"]
    assert "a bug in the drain loop" in crash["error"] and crash["log_level"] == "error"
