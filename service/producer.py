"""The ingest producer, supervised: writes events to the ingest topic, and replaces its
Kafka producer when that producer can no longer deliver.

Why supervision
---------------
An idempotent producer numbers its batches per partition. When a broker restarts under
load, the numbers it holds and those the broker kept can disagree for good
(``OutOfOrderSequenceNumber``, ``UnknownProducerId``, an invalid epoch): every later
send fails, and before this module existed the front door stayed shut until the
process was restarted. aiokafka also retries an idempotent batch *without end*, so an
event answered 503 could land in Kafka at any later time.

So every error is sorted into one of two kinds (:func:`service.kafkaerrors.is_fatal`):

* *the same producer will manage*: a timeout, a lost connection, a leader election.
  The request gets 503; the producer keeps retrying in the background.
* *this producer is finished*: sequence, producer-id, epoch and fencing errors, the
  sender task dying, any other non-retriable error, or a send that is still not
  acknowledged ``delivery_timeout`` after it began. The producer is taken out of
  service at once (requests get 503 without waiting), whatever it still holds is
  failed, and a new producer (a new producer id) is built with capped, jittered
  backoff. One rebuild runs at a time.

The delivery bound
------------------
A 503 means "maybe stored". Failing a finished producer's batches bounds the "maybe":
an event answered 503 is in Kafka within ``delivery_timeout`` (+ the watchdog's tick
and the close) of its arrival, or never. The README states the bound; a test holds us
to it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, ProducerClosed

from service import aiokafka_internals, metrics
from service.backoff import Backoff, sleep_or_stop
from service.headers import Headers, event_id_of
from service.kafka import client_options, event_ids_written
from service.kafkaerrors import is_fatal, is_refused_for_good, retrieve
from service.partitioner import partition_for
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.producer")

# How often the watchdog looks for sends past their delivery deadline.
WATCHDOG_TICK_SECONDS = 0.5
# Bound on closing a retired producer (its in-flight requests end with their timeout).
CLOSE_SECONDS = 10.0
# More than a record batch's and a record's framing (61 bytes and a few varints): a
# record within max_request_size minus this fits whatever aiokafka adds to it.
_FRAMING_BYTES = 1024


class Unavailable(Exception):
    """Kafka did not take the event in time; the caller answers 503."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unwritable(Unavailable):
    """Kafka refuses this event for good (:func:`service.kafkaerrors.is_refused_for_good`): no
    retry and no spool can ever deliver it, so it must be refused, never answered 202.
    A subclass of :class:`Unavailable` so that a caller that knows only that still
    refuses it; ``reason`` is ``unwritable``, ``cause`` the Kafka error's name."""

    def __init__(self, cause: str) -> None:
        super().__init__("unwritable")
        self.cause = cause


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What :meth:`IngestProducer.send_batch` achieved: how many records, from the
    first, Kafka acknowledged, and why the next one was not (None: all were)."""

    acked: int
    error: BaseException | None = None

    @property
    def refused_for_good(self) -> bool:
        return is_refused_for_good(self.error)


# What a send without a coroutine calls once (publish_now): None when the broker
# acknowledged, else what publish() would have raised.
SendDone = Callable[[Unavailable | RuntimeError | None], None]


class Waiter(Protocol):
    """What waits for a send's ack or its answer deadline: a request's future, or a
    lane send (:class:`_LaneSend`), which answers when resolved."""

    def done(self) -> bool: ...
    def set_result(self, result: None, /) -> None: ...
    def get_loop(self) -> asyncio.AbstractEventLoop: ...


def _wake(waiter: Waiter, _: object = None) -> None:
    """Resolve a request's waiter: the send's ack (or failure) came, or its deadline."""
    if not waiter.done():
        waiter.set_result(None)


class AnswerDeadlines:
    """The answer deadlines of all requests' sends, kept by one timer instead of one
    each: a uvloop timer set and cancelled per request cost ~1.5 us of the ~2 us the
    wait took (in process), every request pays it, and almost none fires.

    Every send gets the same timeout, so deadlines come in the order the sends began:
    a queue, whose front is the next to expire. The timer is set for the front's
    deadline; the waiters already woken by their ack are dropped from the front as new
    sends join, so the queue holds about as many as are in flight."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._queue: deque[tuple[float, Waiter]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, waiter: Waiter) -> None:
        """Wake ``waiter`` once its send is ``timeout`` old, unless its ack woke it."""
        loop = waiter.get_loop()
        if loop is not self._loop:
            # Waiters of a loop that has ended (tests run one loop after another) are
            # nobody's: start over on this one.
            self._queue.clear()
            self._timer = None
            self._loop = loop
        queue = self._queue
        while queue and queue[0][1].done():
            queue.popleft()
        queue.append((loop.time() + self.timeout, waiter))
        if self._timer is None:
            self._timer = loop.call_at(queue[0][0], self._expire)

    def _expire(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        queue = self._queue
        try:
            while queue and (queue[0][1].done() or queue[0][0] <= now):
                _wake(queue.popleft()[1])
        finally:
            # Whatever a waiter did, the next deadline is kept: a timer left pointing at
            # this one, which has fired, would stop every later deadline.
            self._timer = self._loop.call_at(queue[0][0], self._expire) if queue else None


class _LaneSend:
    """A lane request's send (:meth:`IngestProducer.publish_now`): answered once, by
    its ack or by its answer deadline, whichever comes first. A :class:`Waiter` to the
    deadlines, which resolve it with ``set_result``."""

    __slots__ = ("_done", "_future", "_headers", "_over", "_owner", "_producer", "_started")

    def __init__(
        self,
        owner: IngestProducer,
        future: asyncio.Future[Any],
        producer: AIOKafkaProducer,
        headers: Headers,
        done: SendDone,
    ) -> None:
        self._owner = owner
        self._future = future
        self._producer = producer
        self._headers = headers
        self._done = done
        self._started = time.monotonic()
        self._over = False

    def done(self) -> bool:
        return self._over

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._future.get_loop()

    def set_result(self, _: None, /) -> None:
        if self._over:
            return
        self._over = True
        owner = self._owner
        owner._inflight -= 1
        failure: Unavailable | RuntimeError | None = None
        try:
            owner._outcome(self._future, self._producer, self._headers, self._started)
        except (Unavailable, RuntimeError) as exc:
            failure = exc
        except (asyncio.CancelledError, Exception) as exc:
            # A bug (only one cancels a delivery future: aiokafka fails them). publish()
            # would raise it into its request; here nobody would answer: a 500 does.
            failure = RuntimeError(f"the send's outcome failed unexpectedly: {exc!r}")
        try:
            self._done(failure)
        except Exception:
            # A bug in the answer: logged here, so it cannot stop the deadlines' other
            # waiters or the batch's other requests (whose callbacks run after this one).
            log.exception("answering a lane request failed")

    def acked(self, _: asyncio.Future[Any]) -> None:
        self.set_result(None)


class IngestProducer:
    """Writes validated events to the ingest topic and waits for the broker's ack.

    ``acks=all`` with idempotence: a 202 means every in-sync replica has the event, and
    the producer's own retries cannot write it twice. In-flight sends are capped so a
    slow or absent broker turns into quick 503s instead of an ever-growing queue.
    """

    def __init__(self, settings: Settings) -> None:
        self._topic = settings.topic_ingest
        self._timeout = settings.produce_timeout_seconds
        self._deadlines = AnswerDeadlines(self._timeout)
        self._delivery_timeout = settings.produce_delivery_timeout_seconds
        self._max_inflight = settings.max_inflight_produces
        self._options = client_options(settings)
        # Sized for the largest record a body under MAX_BODY_BYTES can make (the handler
        # refuses bigger ones with 413), so no accepted event is refused for its size.
        self._max_request_size = settings.producer_max_request_bytes
        self._inflight = 0
        # Created in start(): aiokafka objects must be made inside the running loop.
        self._producer: AIOKafkaProducer | None = None
        self._last_ack = time.monotonic()
        # Sends that outlived the request's answer: (started, future, producer). Only the
        # late ones are tracked, so the hot path pays nothing for the watchdog.
        self._overdue: deque[tuple[float, asyncio.Future[Any], AIOKafkaProducer]] = deque()
        self._rebuild: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._backoff = Backoff(first=0.5, cap=10.0)
        metrics.PRODUCER_LAST_ACK_AGE.set_function(lambda: time.monotonic() - self._last_ack)
        metrics.PRODUCER_USABLE.set(0)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Build the first producer; raises while Kafka is unreachable (the caller
        retries at start-up)."""
        self._producer = await self._build()
        self._last_ack = time.monotonic()
        metrics.PRODUCER_USABLE.set(1)
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="producer-watchdog")

    async def stop(self) -> None:
        """Flush what is buffered and close. Callers bound this with their own deadline
        (with the broker gone a flush cannot finish)."""
        self._stopping.set()
        for task in (self._watchdog, self._rebuild):
            if task is not None:
                task.cancel()
        producer, self._producer = self._producer, None
        metrics.PRODUCER_USABLE.set(0)
        if producer is not None:
            await producer.stop()  # flushes: every send already answered 202 was acked
        if self._retiring:
            await asyncio.wait(self._retiring)

    @property
    def usable(self) -> bool:
        return self._producer is not None

    async def ready(self) -> bool:
        """True when there is a usable producer and a broker answers it now."""
        producer = self._producer
        if producer is None:
            return False
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), 2.0)
        except (TimeoutError, KafkaError, OSError):
            return False
        return True

    # -- the hot path ---------------------------------------------------------------

    async def publish(self, key: bytes, value: bytes, headers: Headers) -> None:
        """Return once the broker acknowledged, or raise :class:`Unavailable`.

        A 202 for an event Kafka lacks cannot happen. After a timeout the event may still
        land, within the delivery bound (module docstring); a sender's retry of it is then
        dropped downstream as a duplicate.
        """
        producer = self._admit()
        self._inflight += 1
        started = time.monotonic()
        try:
            # Straight into the buffer when send() would not wait (its coroutines cost
            # ~3 us a record); otherwise send(), which enqueues and returns the delivery
            # future (waiting only while the partition's buffer is full, bounded by the
            # producer's request timeout).
            future = self._append_now(producer, key, value, headers) or await producer.send(
                self._topic, value=value, key=key, headers=list(headers)
            )
            await self._waiter(future)
        except KafkaError as exc:
            # send() itself refused the record: no sequence number was spent on it.
            raise self._failed(exc, producer, headers, sent=False) from None
        finally:
            self._inflight -= 1
        self._outcome(future, producer, headers, started)

    def publish_now(
        self,
        key: bytes,
        value: bytes,
        headers: Headers,
        done: SendDone,
    ) -> bool:
        """:meth:`publish` without a coroutine, for a caller with no task of its own
        (the ingest lane, ``service.lane``): ``done(None)`` once the broker acknowledged,
        or ``done(error)`` with what :meth:`publish` would have raised, called from the
        ack's own callback or the answer deadline's. False, having done nothing, when
        the record cannot go straight into the buffer: the caller then awaits
        :meth:`publish`, which refuses, waits or sends as it always did."""
        producer = self._producer
        if producer is None or self._inflight >= self._max_inflight:
            return False
        future = self._append_now(producer, key, value, headers)
        if future is None:
            return False
        self._inflight += 1
        send = _LaneSend(self, future, producer, headers, done)
        # No future of our own in between, so the answer goes out in the ack's callback
        # itself: a hop through a waiter's callback costs a loop pass per batch and
        # ~12 us per request in all (measured, wrk against ROLE=ingest).
        future.add_done_callback(send.acked)
        self._deadlines.watch(send)
        return True

    def _admit(self) -> AIOKafkaProducer:
        """The producer a new send goes to, or :class:`Unavailable` without one or with
        too many sends in flight."""
        producer = self._producer
        if producer is None:
            metrics.PRODUCE_ERRORS.labels("no_producer").inc()
            raise Unavailable("no_producer")
        if self._inflight >= self._max_inflight:
            metrics.PRODUCE_ERRORS.labels("buffer_full").inc()
            raise Unavailable("buffer_full")
        return producer

    def _waiter(self, future: asyncio.Future[Any]) -> asyncio.Future[None]:
        """A future of our own that the send's ack (or failure) or its answer deadline
        resolves, whichever comes first. Requests wait on it, never on the delivery
        future itself: a cancelled request (or asyncio.timeout) would cancel that, and
        the watchdog must see whether a late send is ever acknowledged. asyncio.wait does
        the same for ~3.6 us over a bare await (sets, a closure, result sets); a timer per
        request ~1.5 us; the shared deadlines a fraction of that (uvloop, measured)."""
        waiter: asyncio.Future[None] = future.get_loop().create_future()
        future.add_done_callback(partial(_wake, waiter))
        self._deadlines.watch(waiter)
        return waiter

    def _outcome(
        self,
        future: asyncio.Future[Any],
        producer: AIOKafkaProducer,
        headers: Headers,
        started: float,
    ) -> None:
        """Once a send's waiter is resolved: return if the broker acknowledged it, or
        raise what the request is answered with."""
        if not future.done():
            # Its outcome no longer reaches anyone; the watchdog reads it, and the
            # callback keeps a late failure from being logged as unretrieved.
            future.add_done_callback(retrieve)
            self._overdue.append((started, future, producer))
            metrics.PRODUCE_ERRORS.labels("timeout").inc()
            raise Unavailable("timeout")
        # Read, not raised: the future may be its batch's, shared by every request in
        # it, and raising one exception object from each would grow its traceback by
        # each raise (aiokafka copies it per record for that reason).
        failure = future.exception()
        if failure is not None:
            if not isinstance(failure, KafkaError):
                # A bug, not Kafka's answer: the 500 path logs it. A new exception, so the
                # shared one is not raised from every request of the batch.
                error = RuntimeError(f"the delivery future failed unexpectedly: {failure!r}")
                raise error from failure
            # The broker refused a record that spent a sequence number.
            raise self._failed(failure, producer, headers, sent=True) from None
        self._last_ack = time.monotonic()

    def _append_now(
        self, producer: AIOKafkaProducer, key: bytes, value: bytes, headers: Headers
    ) -> asyncio.Future[Any] | None:
        # Records that may be near max_request_size go through send(), which measures
        # them exactly and refuses one too large; the bound leaves room for the batch
        # and record framing, and an accepted event is far below it anyway.
        size = len(key) + len(value) + _FRAMING_BYTES
        for name, header in headers:  # per request: cheaper than sum() over a generator
            size += len(name) + len(header)
        if size > self._max_request_size:
            return None
        return aiokafka_internals.append_now(
            producer, self._topic, key, value, headers, partition_for
        )

    def _failed(
        self, exc: KafkaError, producer: AIOKafkaProducer, headers: Headers, sent: bool
    ) -> Unavailable:
        """Count a request's failed send, do what its error calls for (retire the
        producer when the error finished it), and return what the request raises."""
        reason = type(exc).__name__
        metrics.PRODUCE_ERRORS.labels(reason).inc()
        if is_refused_for_good(exc):
            # Answered with a refusal, never spooled: a 202 for it would promise a
            # delivery that no retry can make.
            log.error(
                "kafka refuses the event for good; refused, not spooled",
                eventId=event_id_of(headers),
                error=repr(exc),
            )
            if sent:  # the broker refused it, not send() itself
                self._refused(producer, reason)
            return Unwritable(reason)
        if is_fatal(exc):
            self._finish(producer, reason)
        return Unavailable(reason)

    async def written(self, event_ids: set[str], sent_at_ms: int) -> set[str]:
        """Which of ``event_ids`` a send begun at ``sent_at_ms`` put on the ingest topic.
        Its records carry our own clock's timestamps from then on, and were acknowledged
        within the delivery timeout or never (the watchdog drops them after it); the
        window allows a minute more for other writers' clocks, whose records may
        interleave with ours."""
        until_ms = sent_at_ms + int(self._delivery_timeout * 1000) + 60_000
        return await event_ids_written(
            self._options, self._topic, event_ids, sent_at_ms - 1000, until_ms
        )

    async def send_batch(self, records: Sequence[tuple[bytes, bytes, Headers]]) -> BatchResult:
        """Send ``records`` in order and wait for every ack, with no answer deadline (the
        spool drainer's path): the watchdog bounds the wait, since a send older than the
        delivery timeout retires the producer and fails what it holds. Returns how many
        records, from the first, were acknowledged (the rest must be sent again), and
        the error of the first one that was not."""
        producer = self._producer
        if producer is None:
            return BatchResult(0, None if not records else ProducerClosed())
        started = time.monotonic()
        futures: list[asyncio.Future[Any]] = []
        send_error: KafkaError | None = None
        try:
            for key, value, headers in records:
                futures.append(
                    await producer.send(self._topic, value=value, key=key, headers=list(headers))
                )
        except KafkaError as exc:
            # send() itself failed for this record (larger than our max request size,
            # or no room in the buffer in time): no sequence number was spent on it, so
            # a refusal here leaves the producer sound; the rest is not sent, for order.
            send_error = exc
            if is_fatal(exc):
                self._finish(producer, type(exc).__name__)
        self._overdue.extend((started, future, producer) for future in futures)
        results = await asyncio.gather(*futures, return_exceptions=True)
        acked = 0
        for result in results:
            if isinstance(result, BaseException):
                cause = type(result).__name__
                if is_refused_for_good(result):
                    self._refused(producer, cause)
                elif is_fatal(result):
                    self._finish(producer, cause)
                if acked:
                    self._last_ack = time.monotonic()
                return BatchResult(acked, result)
            acked += 1
        if acked:
            self._last_ack = time.monotonic()
        return BatchResult(acked, send_error)

    # -- supervision ----------------------------------------------------------------

    def _refused(self, producer: AIOKafkaProducer, cause: str) -> None:
        """The broker refused a batch of ``producer`` for good. aiokafka has already
        counted that batch's sequence numbers as used, so the partition's next batch
        would be refused as out of order, and so would every one after it: retire the
        producer now rather than fail one more send to find out."""
        self._finish(producer, f"refused_{cause}")

    def _finish(self, producer: AIOKafkaProducer, cause: str) -> None:
        """Take ``producer`` out of service and start building its successor. Called
        by every request that saw it fail, so only the first call for the current
        producer acts."""
        if producer is not self._producer or self._stopping.is_set():
            return
        self._producer = None
        metrics.PRODUCER_USABLE.set(0)
        metrics.PRODUCER_REBUILDS.labels("ingest", cause).inc()
        log.warning("ingest producer finished; rebuilding", cause=cause)
        # Sends that hit the same failure settle within the request timeout; a send past
        # the delivery deadline must be dropped now, or it could land later than promised.
        settle = 0.0 if cause == "delivery_timeout" else self._timeout
        retiring = asyncio.create_task(self._retire(producer, settle), name="producer-retire")
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        if self._rebuild is None or self._rebuild.done():
            self._rebuild = asyncio.create_task(
                self._rebuild_loop(retiring), name="producer-rebuild"
            )

    async def _rebuild_loop(self, retiring: asyncio.Task[None]) -> None:
        # The successor starts only once the old producer's sender has stopped, so
        # nothing the old one held can reach Kafka after the new one's writes: per-call
        # order in the ingest topic stays the order of the acknowledgements.
        await asyncio.wait((retiring,))
        while not self._stopping.is_set():
            if await sleep_or_stop(self._backoff.next_delay(), self._stopping):
                return
            try:
                producer = await self._build()
            except (KafkaError, OSError) as exc:
                log.warning("ingest producer rebuild failed; retrying", error=repr(exc))
                continue
            if self._stopping.is_set():
                await producer.stop()
                return
            self._producer = producer
            metrics.PRODUCER_USABLE.set(1)
            log.info("ingest producer rebuilt")
            return

    async def _watch(self) -> None:
        """Finish the current producer when one of its sends outlives the delivery
        deadline, and start the backoff over once a rebuilt producer is acknowledged."""
        while not await sleep_or_stop(WATCHDOG_TICK_SECONDS, self._stopping):
            now = time.monotonic()
            if now - self._last_ack < WATCHDOG_TICK_SECONDS * 2:
                self._backoff.reset()
            overdue = self._overdue
            while overdue and (overdue[0][1].done() or overdue[0][2] is not self._producer):
                overdue.popleft()
            if overdue and now - overdue[0][0] >= self._delivery_timeout - WATCHDOG_TICK_SECONDS:
                self._finish(overdue[0][2], "delivery_timeout")

    async def _retire(self, producer: AIOKafkaProducer, settle: float) -> None:
        """Close a finished producer: let its in-flight sends settle for ``settle``
        seconds, fail whatever is left (it must never be sent later), then close."""
        try:
            if settle > 0:
                await asyncio.wait_for(producer.flush(), settle)
        except (TimeoutError, KafkaError):
            pass
        # aiokafka's stop() waits until every buffered batch is delivered, which never
        # happens for a producer the broker refuses. So: stop its sender first (nothing
        # more goes on the wire), then fail what it still holds (it must never be sent
        # later), then close. aiokafka offers no public way to do the first two (see
        # service/aiokafka_internals.py).
        try:
            await asyncio.wait_for(aiokafka_internals.stop_sender(producer), CLOSE_SECONDS)
        except Exception as exc:  # the sender's own failure: it is stopped either way
            log.info("retired producer's sender ended", error=repr(exc))
        aiokafka_internals.fail_buffered(producer, ProducerClosed())
        try:
            await asyncio.wait_for(producer.stop(), CLOSE_SECONDS)
        except Exception as exc:
            log.warning("retired producer did not close cleanly", error=repr(exc))

    async def _build(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **self._options,
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
            # aiokafka's murmur2 in pure Python was 3-5 % of a request's CPU.
            partitioner=partition_for,
            max_request_size=self._max_request_size,
            # One produce request may take this long before it is retried; the
            # watchdog, not this, bounds a send's whole life.
            request_timeout_ms=int(self._timeout * 1000),
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer
