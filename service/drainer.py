"""The spool drainer's loop: sends spooled events to Kafka in spool order, through the
one ingest producer, and releases each batch from the spool only once Kafka acknowledged
it. :class:`service.publisher.SpoolingPublisher` runs it under supervision and decides,
from what the drainer tells it, which events may go to Kafka directly.

How each failure is met (every failed step is logged with its stage, counted in
``callstatus_spool_drain_errors_total{stage}`` and retried with backoff; the loop itself
never ends while the publisher runs):

* *No usable producer* (it is being rebuilt): wait for it. That is Kafka's turn, not
  the spool's, so it counts as progress for the stall check.
* *Kafka does not acknowledge* (away, or the producer is being replaced): the
  producer's own supervision deals with that; back off and send again. Nothing is
  released, so nothing is lost.
* *Kafka acknowledged, but the release failed* (the checkpoint's write): the release is
  retried, not the send, so a disk fault does not multiply the records in Kafka (a crash
  before the release still re-sends them: at least once).
* *Kafka refuses a record for good*: a refused produce request fails every record
  batched with the culprit, so the records from the first unacknowledged one on are
  sent one at a time; the one refused on its own goes to the dead-letter directory
  (:mod:`service.deadletter`) and the drain goes on behind it.
* *The last run stopped between a batch's ack and its checkpoint* (the spool noted the
  batch in ``sending``, with the time of its first attempt): before the first send,
  Kafka is asked which of that batch it has, and those are left out until the drain
  has passed them (a refusal or a failed send among them included), so a call's
  retired state does not see them twice.
* *Reading the spool, noting the batch, writing a dead letter fail* (a disk fault): the
  step is retried after the backoff; the records stay where they are.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from service import deadletter, metrics
from service.backoff import Backoff, sleep_or_stop
from service.headers import event_id_of
from service.producer import BatchResult, IngestProducer
from service.spool import Spool
from service.spoolfiles import Sending
from service.spoolformat import SpooledRecord

# The publisher's logger name, as before the drainer had a module of its own: log
# queries written for the drain's lines keep finding them.
log = structlog.get_logger(logger_name="callstatus.publisher")

DRAIN_BATCH = 500


class Drainer:
    """Moves the spool's events to Kafka, in order, until ``stopping`` is set.

    ``release`` takes records out of the spool once Kafka (or the dead-letter directory)
    has them; ``kafka_takes_writes`` is called whenever Kafka acknowledged a drained
    batch. ``progress_at`` and ``sending`` are for the publisher's stall check."""

    def __init__(
        self,
        producer: IngestProducer,
        spool: Spool,
        stopping: asyncio.Event,
        release: Callable[[Sequence[SpooledRecord]], Awaitable[None]],
        kafka_takes_writes: Callable[[], None],
    ) -> None:
        self.producer = producer
        self.spool = spool
        self.dead_letters = deadletter.directory_of(spool.directory)
        self._stopping = stopping
        self._release = release
        self._kafka_takes_writes = kafka_takes_writes
        # When the drain last moved, or last waited for something that is not the
        # spool's fault (no events, no usable producer, Kafka not acknowledging).
        self.progress_at = time.monotonic()
        # True while a send waits for its acks: the producer's watchdog bounds that wait
        # (retiring the producer past the delivery timeout), so it is never a stall.
        self.sending = False
        self._begin()

    def _begin(self) -> None:
        """The state of one run of the loop: a restarted run starts afresh."""
        self._backoff = Backoff(first=0.2, cap=5.0)
        # After a refusal, how many records to send one at a time: a refused produce
        # request fails every record batched with the culprit, so only a record refused
        # on its own is known to be the one Kafka will never take.
        self._solo = 0
        # Records Kafka acknowledged whose release failed (the checkpoint's write): the
        # release is retried, not the send, so a disk fault does not multiply them in
        # Kafka (a crash before the release still re-sends them: at least once).
        self._unreleased: list[SpooledRecord] = []
        # The eventIds of the spool's head that Kafka had already when this process
        # started (see _already_in_kafka): not sent again.
        self._skip: set[str] = set()
        # Which step the loop is at, so that a failure is counted and logged by it.
        self._stage = "release"

    def moved(self) -> None:
        self.progress_at = time.monotonic()

    async def run(self) -> None:
        """Send spooled events to Kafka in order; release each batch only after its ack.
        A record Kafka refuses for good goes to the dead-letter directory, and the drain
        goes on behind it."""
        self._begin()
        while not self._stopping.is_set():
            self._stage = "release"
            try:
                if await self._step():
                    continue
            except Exception as exc:
                metrics.SPOOL_DRAIN_ERRORS.labels(self._stage).inc()
                log.error(
                    "spool drain step failed; retrying",
                    stage=self._stage,
                    error=repr(exc),
                    exc_info=None if isinstance(exc, OSError) else exc,
                )
            await sleep_or_stop(self._backoff.next_delay(), self._stopping)

    async def _step(self) -> bool:
        """One turn of the loop. True: go on at once; False: back off first."""
        if self._unreleased:
            await self._release(self._unreleased)
            self._forget_skipped(self._unreleased)
            self._solo = max(0, self._solo - len(self._unreleased))
            self._unreleased = []
            self.moved()
            self._backoff.reset()
        if not self.spool.nonempty.is_set():
            await self.spool.nonempty.wait()
            self.moved()
        if not self.producer.usable:
            self.moved()  # waiting for the rebuilt producer: Kafka's turn, not ours
            await sleep_or_stop(0.2, self._stopping)
            return True
        if self.spool.unconfirmed is not None:
            self._stage = "confirm"
            self._skip = await self._already_in_kafka(self.spool.unconfirmed)
            self.spool.unconfirmed = None
        self._stage = "read"
        batch = await self.spool.next_batch(1 if self._solo else DRAIN_BATCH)
        if not batch:
            await sleep_or_stop(0.05, self._stopping)  # appended but not yet fsync'd
            return True
        self._stage = "mark"
        await self.spool.mark_sending(batch)
        self._stage = "send"
        skip = self._skip
        # Only the batches after an unclean stop have anything to leave out.
        sending = [r for r in batch if event_id_of(r.headers) not in skip] if skip else batch
        self.sending = True
        try:
            result = await self.producer.send_batch([(r.key, r.value, r.headers) for r in sending])
        finally:
            self.sending = False
            self.moved()
        if skip:
            result = self._in_batch_terms(batch, result)
        return await self._settle(batch, result)

    def _in_batch_terms(self, batch: list[SpooledRecord], result: BatchResult) -> BatchResult:
        """``result`` counted over ``batch`` rather than over what was sent of it: the
        records left out (Kafka has them) count as acknowledged, up to the first sent
        record Kafka did not acknowledge. So the usual settling releases them with the
        rest, and a refusal among them is dead-lettered on the usual path, with the skip
        list kept: the records Kafka had are still not sent again (before, a refusal
        in the first batch after a crash cleared it, and they were)."""
        acked_sent, covered = result.acked, 0
        for record in batch:
            if event_id_of(record.headers) not in self._skip:
                if not acked_sent:
                    break
                acked_sent -= 1
            covered += 1
        return BatchResult(covered, result.error)

    def _forget_skipped(self, released: Sequence[SpooledRecord]) -> None:
        """Released records leave the skip list: it empties as the drain passes them."""
        if not self._skip:
            return
        passed = {eid for r in released if (eid := event_id_of(r.headers)) in self._skip}
        metrics.SPOOL_RESENDS_AVOIDED.inc(len(passed))
        self._skip -= passed

    async def _settle(self, batch: list[SpooledRecord], result: BatchResult) -> bool:
        """Release what Kafka acknowledged of ``batch``, and deal with why the rest was
        not."""
        if result.acked:
            self._kafka_takes_writes()  # Kafka takes writes: direct for calls not spooled
            self._stage = "release"
            self._unreleased = batch[: result.acked]
            await self._release(self._unreleased)
            self._forget_skipped(self._unreleased)
            self._solo = max(0, self._solo - result.acked)
            self._unreleased = []
        if result.error is None:
            self._backoff.reset()
            return True
        if result.refused_for_good:
            unsent = batch[result.acked :]
            # The records before it were acknowledged, so a refused last record was
            # alone in its produce batch: it is the one Kafka refuses.
            if len(unsent) == 1:
                await self._dead_letter(unsent[0], type(result.error).__name__)
                self._solo = max(0, self._solo - 1)
                self.moved()
            else:
                self._solo = len(unsent)
            return True  # the producer is being rebuilt: the loop waits for it
        # Otherwise Kafka did not acknowledge (away, or the producer is being replaced):
        # the producer's own supervision deals with that; back off.
        return False

    async def _already_in_kafka(self, sending: Sending) -> set[str]:
        """The eventIds of the spool's head that Kafka has already, after a crash
        between a drained batch's ack and the checkpoint (the spool noted the batch and
        its time before sending it). Sent again, such a copy is dropped by the processor
        as a duplicate while its call's state is held, but becomes a second change once
        the state was retired meanwhile (a long downtime). Kafka is
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

    async def _dead_letter(self, record: SpooledRecord, reason: str) -> None:
        """Move a record Kafka refused on its own, for good, out of the drain's way:
        durable in the dead-letter directory first, released from the spool after. Once
        the letter is written, a failed release is retried as a release (the record is
        in ``_unreleased``), never by sending the record again: that would cost one
        more refusal, one more producer rebuild and one more letter of it."""
        self._stage = "dead_letter"
        path = await asyncio.to_thread(deadletter.write, self.dead_letters, record, reason)
        metrics.SPOOL_DEAD_LETTERS.labels(reason).inc()
        log.error(
            "kafka refuses a spooled event for good; moved it to the dead-letter directory",
            eventId=event_id_of(record.headers),
            error=reason,
            bytes=len(record.value),
            file=str(path),
        )
        self._stage = "release"
        self._unreleased = [record]
        await self._release(self._unreleased)
        self._unreleased = []
