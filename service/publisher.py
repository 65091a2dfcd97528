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

The drainer never dies and never stops quietly (issue 16): every failed step (reading
the spool, sending, moving the checkpoint, writing a dead letter) is logged with its
cause, counted in ``callstatus_spool_drain_errors_total{stage}`` and retried with
backoff; the task is supervised and restarted should it end anyway; and a drain that
makes no progress while Kafka takes writes turns ``/readyz`` to 503 and sets
``callstatus_spool_drain_stalled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import structlog

from service import deadletter, metrics
from service.backoff import Backoff, sleep_or_stop
from service.headers import Headers, event_id_of
from service.producer import IngestProducer, Unavailable, Unwritable
from service.spool import Sending, Spool, SpooledRecord, SpoolFull

log = structlog.get_logger(logger_name="callstatus.publisher")

DRAIN_BATCH = 500
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
        self.dead_letters = deadletter.directory_of(spool.directory)
        # When the drain last moved, or last waited for something that is not the
        # spool's fault (no events, no usable producer, Kafka not acknowledging).
        self._progress_at = time.monotonic()
        # True while a send waits for its acks: the producer's watchdog bounds that wait
        # (retiring the producer past the delivery timeout), so it is never a stall.
        self._sending = False
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
            self._progress_at = time.monotonic()
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
            and not self._sending
            and time.monotonic() - self._progress_at > self._stall_seconds
        )
        if stuck and not self._stall_logged:
            log.error(
                "spool drain stalled while Kafka takes writes; /readyz answers 503",
                events=self.spool.events,
                seconds=round(time.monotonic() - self._progress_at),
            )
        elif self._stall_logged and not stuck:
            log.info("spool drain moving again", events=self.spool.events)
        self._stall_logged = stuck
        return stuck

    async def ready(self) -> bool:
        """Ready while events can be taken: Kafka answers, or the spool has room; but
        not while the drain is stalled.

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
        return self.spool.has_room() or await self.producer.ready()

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
        self._spooled[key] += 1
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
        elif not self.spool.events:
            # The earlier run's events are all out: from here on the spool holds only
            # what this process counted.
            self._keys_known = True
            self._spooled.clear()

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
        """Send spooled events to Kafka in order; release each batch only after its ack.
        A record Kafka refuses for good goes to the dead-letter directory, and the drain
        goes on behind it."""
        backoff = Backoff(first=0.2, cap=5.0)
        # After a refusal, how many records to send one at a time: a refused produce
        # request fails every record batched with the culprit, so only a record refused
        # on its own is known to be the one Kafka will never take.
        solo = 0
        # Records Kafka acknowledged whose release failed (the checkpoint's write): the
        # release is retried, not the send, so a disk fault does not multiply them in
        # Kafka (a crash before the release still re-sends them: at least once).
        unreleased: list[SpooledRecord] = []
        # The eventIds of the spool's head that Kafka had already when this process
        # started (see _already_in_kafka): not sent again.
        skip: set[str] = set()
        while not self._stopping.is_set():
            stage = "release"
            try:
                if unreleased:
                    await self._release(unreleased)
                    solo = max(0, solo - len(unreleased))
                    unreleased = []
                    self._moved()
                    backoff.reset()
                if not self.spool.nonempty.is_set():
                    await self.spool.nonempty.wait()
                    self._moved()
                if not self.producer.usable:
                    self._moved()  # waiting for the rebuilt producer: Kafka's turn, not ours
                    await sleep_or_stop(0.2, self._stopping)
                    continue
                if self.spool.unconfirmed is not None:
                    stage = "confirm"
                    skip = await self._already_in_kafka(self.spool.unconfirmed)
                    self.spool.unconfirmed = None
                stage = "read"
                batch = await self.spool.next_batch(1 if solo else DRAIN_BATCH)
                if not batch:
                    await sleep_or_stop(0.05, self._stopping)  # appended but not yet fsync'd
                    continue
                stage = "mark"
                await self.spool.mark_sending(batch)
                stage = "send"
                # Only the first batch after an unclean stop has anything to leave out.
                sending = (
                    [r for r in batch if event_id_of(r.headers) not in skip] if skip else batch
                )
                self._sending = True
                try:
                    result = await self.producer.send_batch(
                        [(r.key, r.value, r.headers) for r in sending]
                    )
                finally:
                    self._sending = False
                    self._moved()
                if skip:
                    # The first batch after a crash mid-drain, with what Kafka had of it
                    # left out: released whole once the rest is in, else tried again
                    # whole (a second fault may then repeat some: at least once).
                    if result.error is None:
                        metrics.SPOOL_RESENDS_AVOIDED.inc(len(batch) - len(sending))
                        skip = set()  # the whole batch is in Kafka now
                        self._kafka_ok = True
                        stage = "release"
                        unreleased = batch
                        await self._release(batch)
                        unreleased = []
                        backoff.reset()
                        continue
                    if result.refused_for_good:
                        skip = set()  # the usual path below finds and dead-letters it
                    await sleep_or_stop(backoff.next_delay(), self._stopping)
                    continue
                if result.acked:
                    self._kafka_ok = True  # Kafka takes writes: direct for calls not spooled
                    stage = "release"
                    unreleased = batch[: result.acked]
                    await self._release(unreleased)
                    solo = max(0, solo - result.acked)
                    unreleased = []
                if result.error is None:
                    backoff.reset()
                    continue
                if result.refused_for_good:
                    unsent = batch[result.acked :]
                    # The records before it were acknowledged, so a refused last record
                    # was alone in its produce batch: it is the one Kafka refuses.
                    if len(unsent) == 1:
                        stage = "dead_letter"
                        await self._dead_letter(unsent[0], type(result.error).__name__)
                        solo = max(0, solo - 1)
                        self._moved()
                    else:
                        solo = len(unsent)
                    continue  # the producer is being rebuilt: the loop waits for it
                # Otherwise Kafka did not acknowledge (away, or the producer is being
                # replaced): the producer's own supervision deals with that; back off.
            except Exception as exc:
                metrics.SPOOL_DRAIN_ERRORS.labels(stage).inc()
                log.error(
                    "spool drain step failed; retrying",
                    stage=stage,
                    error=repr(exc),
                    exc_info=None if isinstance(exc, OSError) else exc,
                )
            await sleep_or_stop(backoff.next_delay(), self._stopping)

    async def _already_in_kafka(self, sending: Sending) -> set[str]:
        """The eventIds of the spool's head that Kafka has already, after a crash
        between a drained batch's ack and the checkpoint (the spool noted the batch and
        its time before sending it). Sent again, such a copy is dropped by the processor
        as a duplicate while its call's state is held, but becomes a second change once
        the state was retired meanwhile (a long downtime; issue 16, finding 4). Kafka is
        asked once, at start, for that one batch's window."""
        end = (sending.end.segment, sending.end.offset)
        window = [
            r
            for r in await self.spool.next_batch(DRAIN_BATCH)
            if (r.end.segment, r.end.offset) <= end
        ]
        wanted = {eid for r in window if (eid := event_id_of(r.headers)) is not None}
        found = await self.producer.written(wanted, sending.at_ms) if wanted else set()
        log.info(
            "spool head checked against Kafka after an unclean stop",
            maybe_sent=len(window),
            already_in_kafka=len(found),
        )
        return found

    def _moved(self) -> None:
        self._progress_at = time.monotonic()

    async def _dead_letter(self, record: SpooledRecord, reason: str) -> None:
        """Move a record Kafka refused on its own, for good, out of the drain's way:
        durable in the dead-letter directory first, released from the spool after."""
        path = await asyncio.to_thread(deadletter.write, self.dead_letters, record, reason)
        await self._release([record])
        metrics.SPOOL_DEAD_LETTERS.labels(reason).inc()
        log.error(
            "kafka refuses a spooled event for good; moved it to the dead-letter directory",
            eventId=event_id_of(record.headers),
            error=reason,
            bytes=len(record.value),
            file=str(path),
        )
