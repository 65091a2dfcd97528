"""Where an accepted event goes: Kafka first, the local spool when Kafka cannot take it
in time, and a drainer that moves spooled events to Kafka as soon as it takes writes.

Per-call order, and back to Kafka fast (docs/architecture.md, section 10): an event of a
call that has events in the spool is spooled behind them, and the drainer sends in spool
order through the one ingest producer; a call's next event goes to Kafka directly only
once the drainer's ack has released its last spooled one. So events of a call reach the
ingest topic in the order they were accepted (events of one call that were in flight at
the same moment have no order). A call with nothing spooled goes straight to Kafka while
the spool drains, so after a failover the spool holds only what it took during the
fault and empties at the drain's pace, instead of every new event queueing behind it.
While Kafka is failing (a direct write just went unacknowledged, and no drained batch
has been acknowledged since) every event goes to the spool at once, without first
waiting out the produce timeout.

The guarantee this gives: a 202 means the event is in Kafka (acks=all) or fsync'd to
the spool volume, and a spooled event reaches Kafka once the broker is back, or, if
Kafka refuses it for good, lands in the spool's dead-letter directory
(:mod:`service.deadletter`) for an operator to replay.

The drainer (:mod:`service.drainer`) never dies and never stops quietly:
every failed step (reading the spool, sending, moving the checkpoint, writing a dead
letter) is logged with its cause, counted in ``callstatus_spool_drain_errors_total{stage}``
and retried with backoff; the task is supervised and restarted should it end anyway
(here); and a drain that makes no progress while Kafka takes writes turns ``/readyz``
to 503 and sets ``callstatus_spool_drain_stalled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import structlog

from service import metrics
from service.backoff import Backoff, sleep_or_stop
from service.drainer import Drainer
from service.headers import Headers
from service.producer import IngestProducer, SendDone, Unavailable, Unwritable
from service.spool import Spool, SpoolFull
from service.spoolformat import SpooledRecord

log = structlog.get_logger(logger_name="callstatus.publisher")

# A spool that holds events while Kafka takes writes, and has not moved for this long,
# is stalled (see SpoolingPublisher.ready). Well above any healthy pause: a producer
# rebuild, a drain-error backoff (capped at 5 s) or one batch's acks.
STALL_SECONDS = 30.0


class SpoolingPublisher:
    """The ingest endpoint's publisher when the spool is on."""

    def __init__(
        self,
        producer: IngestProducer,
        spool: Spool,
        drain_seconds: float,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.producer = producer
        self.spool = spool
        self._drain_seconds = drain_seconds
        self._stall_seconds = stall_seconds
        self._stopping = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        # The drain loop; its progress (and whether it waits for acks) is what stalled()
        # judges.
        self.drainer = Drainer(
            producer, spool, self._stopping, self._release, self._kafka_takes_writes
        )
        self._stall_logged = False
        # Per call (record key), how many of its events the spool holds or is writing:
        # counted before the append starts, so a next event of the call cannot overtake
        # one still being written, and uncounted once the drainer has released it.
        self._spooled: Counter[bytes] = Counter()
        # False while the spool holds events this process did not write (left by an
        # earlier run): their calls are unknown until the spool has emptied once, so
        # until then every event is spooled, as if all calls had events in it.
        self._keys_known = True
        # False from a direct write Kafka did not acknowledge until the drainer's next
        # acknowledged batch: Kafka is failing, so new events go to the spool at once.
        self._kafka_ok = True
        # Spool writes of events the ingest lane sent to Kafka first (publish_now).
        self._spooling: set[asyncio.Task[None]] = set()
        metrics.SPOOL_OLDEST_AGE.set_function(self._oldest_age)
        metrics.SPOOL_DRAIN_STALLED.set_function(lambda: float(self.stalled()))

    def _oldest_age(self) -> float:
        oldest = self.spool.oldest_ms
        return 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)

    def open(self) -> None:
        """Open the spool (cutting a torn tail) and start the drainer, which sends what
        an earlier run left once there is a producer. From here on events are taken."""
        if self._drainer is None:
            self.spool.open()
            self._keys_known = not self.spool.events
            self.drainer.moved()
            self._drainer = asyncio.create_task(self._supervise(self._drain), name="spool-drainer")

    async def start(self) -> None:
        """Open (if not yet), then build the producer. Raises while Kafka is
        unreachable."""
        self.open()
        await self.producer.start()

    async def stop(self) -> None:
        """Give the drainer up to ``drain_seconds`` to empty the spool, then stop. What
        is left stays on the volume for the next start (and is logged)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.spool.empty.wait(), self._drain_seconds)
        self._stopping.set()
        for spooling in list(self._spooling):  # lane events the spool was taking
            spooling.cancel()
        if self._spooling:
            await asyncio.wait(self._spooling)
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.wait((self._drainer,))
        if self.spool.events:
            log.warning(
                "spool not empty at shutdown; the next start drains it",
                events=self.spool.events,
                bytes=self.spool.bytes,
                directory=str(self.spool.directory),
            )
        await self.producer.stop()
        self.spool.close()

    def stalled(self) -> bool:
        """True while the spool holds events, the producer takes writes, and the drain
        has not moved for the stall threshold: the spool itself is stuck (its disk, or
        a drainer that hangs), not Kafka."""
        stuck = (
            self.spool.events > 0
            and self.producer.usable
            and not self.drainer.sending
            and time.monotonic() - self.drainer.progress_at > self._stall_seconds
        )
        if stuck and not self._stall_logged:
            log.error(
                "spool drain stalled while Kafka takes writes; /readyz answers 503",
                events=self.spool.events,
                seconds=round(time.monotonic() - self.drainer.progress_at),
            )
        elif self._stall_logged and not stuck:
            log.info("spool drain moving again", events=self.spool.events)
        self._stall_logged = stuck
        return stuck

    async def ready(self) -> bool:
        """Ready while events can be taken: Kafka answers, or the spool has room and its
        disk takes writes; but not while the drain is stalled.

        Why a stalled drain makes the node unready: once anything is spooled, every new
        event queues behind it (per-call order), so on a node whose drain cannot move
        (a checkpoint the disk refuses, a hung drainer) each new 202 would rest on this
        one disk with no way out, for as long as the fault lasts. Unready, the load
        balancer sends new webhooks to nodes that deliver them; the drain retries on
        its own and the node is ready again the moment it moves. Kafka trouble is not a
        stall (the producer unusable, sends not acknowledged): there the spool does its
        job, and making every node unready would turn a Kafka outage into a full one.
        The alert CallstatusSpoolNotDraining fires on the same condition."""
        if self.stalled():
            return False
        return self.spool.takes_appends(time.monotonic()) or await self.producer.ready()

    async def publish(self, key: bytes, value: bytes, headers: Headers) -> None:
        """Return once the event is in Kafka or durable in the spool; raise
        :class:`Unavailable` only when neither could take it, and :class:`Unwritable`
        when Kafka refuses it for good (spooled, it would be a 202 nothing can keep)."""
        if self._direct(key):
            try:
                await self.producer.publish(key, value, headers)
                self._kafka_ok = True
                return
            except Unwritable:
                raise
            except Unavailable:
                self._kafka_ok = False  # the spool takes it below, and the next ones
        await self._spool(key, value, headers)

    async def _spool(self, key: bytes, value: bytes, headers: Headers) -> None:
        """The event into the spool, durable on return; or :class:`Unavailable`."""
        self._spooled[key] += 1
        await self._append(key, value, headers)

    async def _append(self, key: bytes, value: bytes, headers: Headers) -> None:
        """:meth:`_spool` once the event is counted in ``_spooled``."""
        try:
            await self.spool.append(key, value, headers)
        except SpoolFull:
            self._forget((key,))
            metrics.PRODUCE_ERRORS.labels("spool_full").inc()
            raise Unavailable("spool_full") from None
        except OSError as exc:
            # Not durable, so not in the spool for the drainer to send. (A cancelled
            # append stays counted: it may still land, and over-counting only keeps the
            # call on the spool's path, never lets it overtake.)
            self._forget((key,))
            log.error("spool append failed", error=repr(exc))
            metrics.PRODUCE_ERRORS.labels("spool_error").inc()
            raise Unavailable("spool_error") from None

    def publish_now(
        self,
        key: bytes,
        value: bytes,
        headers: Headers,
        done: SendDone,
    ) -> bool:
        """:meth:`publish` without a coroutine while the event goes straight to Kafka
        (see :meth:`IngestProducer.publish_now`). False, having done nothing, when it
        would go to the spool: the caller then awaits :meth:`publish`. An event that
        Kafka does not take in time goes to the spool as :meth:`publish` sends it there,
        in a task of its own, since the spool's write is a coroutine."""
        if not self._direct(key):
            return False
        sent = partial(self._sent, key, value, headers, done)
        return self.producer.publish_now(key, value, headers, sent)

    def _sent(
        self,
        key: bytes,
        value: bytes,
        headers: Headers,
        done: SendDone,
        failure: Unavailable | RuntimeError | None,
    ) -> None:
        if failure is None:
            self._kafka_ok = True
            done(None)
        elif isinstance(failure, Unwritable) or not isinstance(failure, Unavailable):
            done(failure)
        elif self._stopping.is_set():
            done(failure)  # a late failure at shutdown: the spool is closing
        else:
            self._kafka_ok = False  # the spool takes it, and the next ones
            # Counted now, not when the task first runs: the call's next event, arriving
            # meanwhile, must queue behind this one in the spool (review finding).
            self._spooled[key] += 1
            spooling = asyncio.create_task(self._append(key, value, headers))
            self._spooling.add(spooling)
            spooling.add_done_callback(partial(self._spooled_now, done))

    def _spooled_now(self, done: SendDone, task: asyncio.Task[None]) -> None:
        self._spooling.discard(task)
        if task.cancelled():  # the publisher is stopping
            done(Unavailable("cancelled"))
            return
        failure = task.exception()
        if failure is None or isinstance(failure, Unavailable):
            done(failure)
        else:  # a bug: answered as one
            done(RuntimeError(f"the spool append failed unexpectedly: {failure!r}"))

    def _direct(self, key: bytes) -> bool:
        """Whether this call's next event may go to Kafka directly: the spool holds
        nothing at all, or Kafka is taking writes and the spool holds nothing of it."""
        if not self.spool.bytes and not self._spooled:
            return True
        return self._kafka_ok and self._keys_known and key not in self._spooled

    def _forget(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            left = self._spooled[key] - 1
            if left > 0:
                self._spooled[key] = left
            else:
                del self._spooled[key]

    async def _release(self, records: Sequence[SpooledRecord]) -> None:
        """Release records from the spool once Kafka has them (or the dead-letter
        directory does); their calls may then go to Kafka directly again."""
        await self.spool.release(records)
        if self._keys_known:
            self._forget([r.key for r in records])
        elif not self.spool.bytes:
            # The earlier run's events are all out: from here on the spool holds only
            # what this process counted. (Bytes, not events: an append still being
            # fsync'd is in the bytes already, not yet in the events, and its call's
            # count must not be cleared with the rest.)
            self._keys_known = True
            self._spooled.clear()

    def _kafka_takes_writes(self) -> None:
        """The drainer's batch was acknowledged: calls with nothing spooled go to Kafka
        directly again."""
        self._kafka_ok = True

    async def _supervise(self, drain: Callable[[], Awaitable[None]]) -> None:
        """Run the drainer until stopped; if it ever ends with an error (a bug: every
        step's failure is handled inside it), log it, count it and start it again."""
        backoff = Backoff(first=0.5, cap=30.0)
        while not self._stopping.is_set():
            try:
                await drain()
                if self._stopping.is_set():
                    return
                raise RuntimeError("the spool drainer returned while not stopping")
            except Exception as exc:
                metrics.SPOOL_DRAINER_RESTARTS.inc()
                log.error("spool drainer crashed; restarting it", error=repr(exc), exc_info=exc)
                await sleep_or_stop(backoff.next_delay(), self._stopping)

    async def _drain(self) -> None:
        """The drain loop (:meth:`Drainer.run`), as :meth:`_supervise` runs it."""
        await self.drainer.run()
