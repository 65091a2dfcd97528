"""The spooling publisher without a broker: the drainer's supervision (a drainer that
ends with an error is logged, counted and started again, and stopping ends it for good),
and the ingest lane's fail-over to the spool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from service import metrics
from service.producer import IngestProducer, Unavailable
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


async def test_a_lane_event_that_fails_over_to_the_spool_holds_its_calls_place(
    tmp_path: Path,
) -> None:
    """The lane's send that Kafka did not take goes to the spool by a task; the call's
    next event, arriving before that task first runs, must queue behind it in the spool,
    not overtake it to Kafka (review finding: the count was taken by the task)."""
    spool = Spool(tmp_path, 1 << 20)
    publisher = SpoolingPublisher(IngestProducer(make_settings()), spool, 1.0)
    publisher.open()
    answers: list[Exception | None] = []
    key = b"CA" + b"1" * 40
    assert publisher._direct(key)
    publisher._sent(key, b"{}", [("ce_id", b"e1")], answers.append, Unavailable("timeout"))
    assert not publisher._direct(key), "the call's next event would overtake it"
    assert publisher._direct(b"CA" + b"2" * 40) is False  # Kafka is failing: all spool
    deadline = asyncio.get_running_loop().time() + 10
    while not answers:
        assert asyncio.get_running_loop().time() < deadline, "the spool append never ended"
        await asyncio.sleep(0.01)  # polling interval
    assert answers == [None] and spool.events == 1
    await publisher.stop()


async def test_past_stopping_a_late_lane_failure_is_not_spooled(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    publisher = SpoolingPublisher(IngestProducer(make_settings()), spool, 1.0)
    publisher.open()
    publisher._stopping.set()
    answers: list[Exception | None] = []
    failure = Unavailable("timeout")
    publisher._sent(b"CA" + b"1" * 40, b"{}", [], answers.append, failure)
    assert answers == [failure] and not publisher._spooling and spool.events == 0
    spool.close()


async def test_a_lane_event_the_spool_is_still_taking_at_stop_is_answered_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop cancels a spool append still under way for a lane event: its request is
    answered (Unavailable, a 503 FreeClimb retries), never left without an answer."""
    spool = Spool(tmp_path, 1 << 20)
    publisher = SpoolingPublisher(IngestProducer(make_settings()), spool, 1.0)
    publisher.open()
    never = asyncio.Event()

    async def stuck(key: bytes, value: bytes, headers: object) -> None:
        await never.wait()  # a disk that does not answer before the stop

    monkeypatch.setattr(spool, "append", stuck)
    answers: list[Exception | None] = []
    publisher._sent(b"CA" + b"1" * 40, b"{}", [], answers.append, Unavailable("timeout"))
    assert len(publisher._spooling) == 1 and not answers
    await publisher.stop()
    [answer] = answers
    assert isinstance(answer, Unavailable) and answer.reason == "cancelled"
    assert not publisher._spooling
