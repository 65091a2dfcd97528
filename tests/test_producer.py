"""Which errors finish an ingest producer (pure classification, no broker), and the
answer deadlines' and lane sends' handling of an answer that fails."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownProducerId,
)
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from service import partitioner
from service.kafkaerrors import is_fatal
from service.producer import AnswerDeadlines, IngestProducer, Unavailable, _LaneSend
from tests.conftest import make_settings


@pytest.mark.parametrize(
    "error",
    [
        OutOfOrderSequenceNumber(),
        UnknownProducerId(),
        InvalidProducerEpoch(),
        ProducerFenced(),
        TopicAuthorizationFailedError(),  # non-retriable: another producer may do better
    ],
)
def test_sequence_identity_and_other_permanent_errors_finish_the_producer(
    error: KafkaError,
) -> None:
    assert is_fatal(error)


@pytest.mark.parametrize(
    "error",
    [
        KafkaConnectionError(),
        KafkaTimeoutError(),
        NotLeaderForPartitionError(),
        # One record refused: a new producer would be refused the same.
        MessageSizeTooLargeError(),
        RecordTooLargeError(),
    ],
)
def test_transient_and_per_record_errors_keep_the_producer(error: KafkaError) -> None:
    assert not is_fatal(error)


@given(st.binary(max_size=200))
def test_our_murmur2_is_aiokafkas(data: bytes) -> None:
    assert partitioner.murmur2(data) == murmur2(data)


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_a_key_lands_where_aiokafkas_default_partitioner_puts_it(
    key: bytes, partitions: int
) -> None:
    # A call's events must keep their partition across versions (and the processor's
    # state partition follows the ingest one).
    everything = list(range(partitions))
    expected = DefaultPartitioner()(key, everything, everything)
    assert partitioner.partition_for(key, everything, everything) == expected


def test_a_call_id_key_lands_where_it_always_did() -> None:
    # Pinned (computed with aiokafka 0.14's own partitioner): the hash may not drift
    # even if the library's did.
    key = b"CA" + b"0123456789abcdef" * 2 + b"01234567"
    assert partitioner.murmur2(key) == 50342049
    assert partitioner.partition_for(key, list(range(6)), []) == 3


class StuckProducer:
    """Stands in for an AIOKafkaProducer whose sends are never acknowledged (unit level:
    only the request's deadline is under test; the broker itself is in integration)."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.sent = asyncio.Event()

    async def send(self, topic: str, **_: object) -> asyncio.Future[None]:
        self.futures.append(asyncio.get_running_loop().create_future())
        self.sent.set()
        return self.futures[-1]


def stuck_ingest_producer(timeout: float) -> tuple[IngestProducer, StuckProducer]:
    ingest = IngestProducer(make_settings(produce_timeout_seconds=timeout))
    stuck = StuckProducer()
    ingest._producer = cast(AIOKafkaProducer, stuck)
    return ingest, stuck


async def test_an_unacknowledged_send_is_unavailable_after_the_timeout_and_stays_watched() -> None:
    ingest, stuck = stuck_ingest_producer(0.05)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="timeout"):
        await ingest.publish(b"k", b"v", [])
    assert 0.04 <= time.monotonic() - started < 1.0
    # The delivery future runs on for the watchdog: never cancelled by our deadline.
    [future] = stuck.futures
    assert not future.done()
    assert [entry[1] for entry in ingest._overdue] == [future]
    future.set_exception(KafkaTimeoutError())  # a late failure is retrieved, not logged


async def test_a_cancelled_request_leaves_the_delivery_future_alone() -> None:
    ingest, stuck = stuck_ingest_producer(5.0)
    request = asyncio.create_task(ingest.publish(b"k", b"v", []))
    await stuck.sent.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert not stuck.futures[0].done()
    assert ingest._inflight == 0


async def test_an_acknowledged_send_returns_at_once() -> None:
    ingest, stuck = stuck_ingest_producer(5.0)
    request = asyncio.create_task(ingest.publish(b"k", b"v", []))
    await stuck.sent.wait()
    stuck.futures[0].set_result(None)
    await asyncio.wait_for(request, 1.0)


async def test_each_send_gets_its_own_deadline_from_the_shared_timer() -> None:
    # One timer for all requests: a send that is never acknowledged still times out at
    # its own deadline, before a send begun after it, while the acknowledged ones around
    # it return at once, and the woken ones leave the deadline queue instead of piling up
    # in it. (Ordered, not timed: the loop's timers round to the millisecond.)
    ingest, stuck = stuck_ingest_producer(0.2)
    first = asyncio.create_task(ingest.publish(b"k", b"v", []))
    await stuck.sent.wait()
    for _ in range(50):
        stuck.sent.clear()
        acked = asyncio.create_task(ingest.publish(b"k", b"v", []))
        await stuck.sent.wait()
        stuck.futures[-1].set_result(None)
        await asyncio.wait_for(acked, 1.0)
    assert not first.done()
    stuck.sent.clear()
    late = asyncio.create_task(ingest.publish(b"k", b"v", []))
    await stuck.sent.wait()
    done, _ = await asyncio.wait({first, late}, return_when=asyncio.FIRST_COMPLETED)
    assert first in done
    with pytest.raises(Unavailable, match="timeout"):
        await first
    with pytest.raises(Unavailable, match="timeout"):
        await asyncio.wait_for(late, 1.0)
    assert len(ingest._deadlines._queue) <= 1


class SharedBatchProducer(StuckProducer):
    """Every send returns the same future, as append_now returns a batch's."""

    def __init__(self, requests: int) -> None:
        super().__init__()
        self.left = requests

    async def send(self, topic: str, **_: object) -> asyncio.Future[None]:
        if not self.futures:
            self.futures.append(asyncio.get_running_loop().create_future())
        self.left -= 1
        if not self.left:
            self.sent.set()  # every request has its future
        return self.futures[0]


async def test_requests_sharing_a_batch_all_get_its_failure_without_raising_it() -> None:
    ingest = IngestProducer(make_settings(produce_timeout_seconds=5.0))
    shared = SharedBatchProducer(3)
    ingest._producer = cast(AIOKafkaProducer, shared)
    requests = [asyncio.create_task(ingest.publish(b"k", b"v", [])) for _ in range(3)]
    await asyncio.wait_for(shared.sent.wait(), 5)
    refusal = KafkaTimeoutError()
    shared.futures[0].set_exception(refusal)
    for request in requests:
        with pytest.raises(Unavailable, match="KafkaTimeoutError"):
            await asyncio.wait_for(request, 1.0)
    # Read, never raised: one raise per request would have grown its traceback.
    assert refusal.__traceback__ is None
    assert ingest._inflight == 0


async def test_a_delivery_future_failing_with_no_kafka_error_is_a_new_error_per_request() -> None:
    """Not Kafka's answer (a bug): each request raises an error of its own, caused by the
    shared one, never the shared exception object itself."""
    ingest = IngestProducer(make_settings(produce_timeout_seconds=5.0))
    shared = SharedBatchProducer(2)
    ingest._producer = cast(AIOKafkaProducer, shared)
    requests = [asyncio.create_task(ingest.publish(b"k", b"v", [])) for _ in range(2)]
    await asyncio.wait_for(shared.sent.wait(), 5)
    bug = ValueError("not from Kafka")
    shared.futures[0].set_exception(bug)
    raised = []
    for request in requests:
        with pytest.raises(RuntimeError, match="failed unexpectedly") as caught:
            await asyncio.wait_for(request, 1.0)
        assert caught.value.__cause__ is bug
        raised.append(caught.value)
    assert raised[0] is not raised[1]
    assert ingest._inflight == 0


class _Raising:
    """A waiter whose wake-up fails, as a lane answer with a bug in it would."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def done(self) -> bool:
        return False

    def set_result(self, _: None, /) -> None:
        raise RuntimeError("a bug in an answer")

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop


async def test_a_waiter_that_fails_does_not_stop_the_later_deadlines() -> None:
    loop = asyncio.get_running_loop()
    failures: list[object] = []
    loop.set_exception_handler(lambda _, context: failures.append(context.get("exception")))
    try:
        deadlines = AnswerDeadlines(0.01)
        deadlines.watch(_Raising(loop))
        first: asyncio.Future[None] = loop.create_future()
        deadlines.watch(first)
        await asyncio.wait_for(first, 5)
        later: asyncio.Future[None] = loop.create_future()
        deadlines.watch(later)  # a new deadline after the failure still fires
        await asyncio.wait_for(later, 5)
    finally:
        loop.set_exception_handler(None)
    assert [str(f) for f in failures] == ["a bug in an answer"]


async def test_a_lane_answer_that_fails_is_logged_and_frees_its_send() -> None:
    producer = IngestProducer(make_settings(produce_timeout_seconds=0.01))
    batch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sends = [
        _LaneSend(producer, batch, cast(AIOKafkaProducer, None), [], lambda _: None)
        for _ in range(2)
    ]

    def broken(_: object) -> None:
        raise RuntimeError("a bug in an answer")

    sends[0]._done = broken
    answered: list[object] = []
    sends[1]._done = answered.append
    producer._inflight = 2
    with capture_logs() as logs:
        batch.set_result(None)
        for send in sends:
            batch.add_done_callback(send.acked)
        await asyncio.sleep(0)  # the batch future's callbacks run on the next pass
        await asyncio.sleep(0)
    assert producer._inflight == 0
    assert answered == [None], "the batch's other request was not answered"
    [line] = [e for e in logs if e["event"] == "answering a lane request failed"]
    assert line["log_level"] == "error"


async def test_a_cancelled_delivery_future_is_answered_as_a_bug_not_left_hanging() -> None:
    producer = IngestProducer(make_settings())
    batch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    answered: list[object] = []
    send = _LaneSend(producer, batch, cast(AIOKafkaProducer, None), [], answered.append)
    producer._inflight = 1
    batch.add_done_callback(send.acked)
    batch.cancel()
    await asyncio.sleep(0)  # the batch future's callbacks run on the next pass
    [failure] = answered
    assert isinstance(failure, RuntimeError) and "unexpectedly" in str(failure)
    assert producer._inflight == 0
