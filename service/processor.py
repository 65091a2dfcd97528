"""The processor: a consumer-group member that supervises one
:class:`~service.worker.PartitionWorker` per assigned ingest partition. It only asks for
workers and runs their batches: what goes into a transaction is decided by
:mod:`service.batch` (pure); opening a partition (fencing, seek, restore), writing its
transactions and telling whether it is still current belong to :mod:`service.worker`.
The reasoning is in docs/architecture.md, sections 5 and 8:

* Partitions are independent (own producer, own transaction): their batches run
  concurrently, each under a deadline.
* Anything that fails (fenced, broker gone, coordinator errors) restarts the whole
  processor from what Kafka committed, with backoff; only cancellation ends it, and a
  corrupt state topic on a processor-only node (which a restart cannot mend).
* Rebalances: the callbacks only register. Revocation waits for the in-flight batch
  (which holds the lock for its whole transaction) and stops an opening under way;
  assignment records the partitions and pauses them. The main loop then opens the
  workers (restore can take minutes: inside the callback it would hold up the whole
  group's rebalance and, with our heartbeats stopped meanwhile, get us expelled), keeps
  polling while they open, and resumes the partitions once all are open. A worker is
  kept across a rebalance only while its partition stayed ours and nobody else wrote
  for it (:meth:`~service.worker.PartitionWorker.still_current`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from service import heap, metrics
from service.assignment import Assignment, close_all, open_all_or_none
from service.backoff import Backoff, sleep_or_stop
from service.batch import CE_SOURCE, CE_TYPE_CHANGED, CE_TYPE_REJECTED, Record
from service.kafka import client_options
from service.restore import CorruptState
from service.settings import Settings
from service.worker import PartitionWorker, transactional_id

log = structlog.get_logger(logger_name="callstatus.processor")

Clock = Callable[[], datetime]

# Upper bound on one partition's batch, transaction included. aiokafka waits without end
# for a coordinator that does not answer; past aiokafka's transaction timeout (60 s) the
# broker aborts the transaction anyway, so waiting longer only hides a stuck producer.
BATCH_DEADLINE_SECONDS = 90.0


def utc_now() -> datetime:
    return datetime.now(UTC)


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer without letting aiokafka's own cancellations escape: with the
    broker gone, stop() cancels a fetch task sleeping in its retry backoff and that
    CancelledError surfaces here. Escaping, it would end the processor task as if it had
    been cancelled, which in ROLE=all takes ingest down with it. A cancellation of *our*
    task (shutdown) still goes through."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("consumer stop raised a stray cancellation; ignored")
    except Exception as exc:
        log.warning("consumer did not stop cleanly", error=repr(exc))


class Processor(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer group member, supervising one :class:`PartitionWorker` per partition."""

    def __init__(
        self, settings: Settings, clock: Clock = utc_now, backoff: Backoff | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._backoff = backoff or Backoff(first=0.5, cap=30.0)
        self._options = client_options(settings)
        # A change carries the whole call, so the processor's producers take records as
        # large as the biggest accepted ingest record can make.
        self._producer_options = {
            **self._options,
            "max_request_size": settings.producer_max_request_bytes,
            # A record batch (per topic partition, per produce request) of up to half
            # the largest record, instead of aiokafka's 16 KiB: a partition batch's
            # outputs go in a few produce requests rather than tens, which took ~10 of
            # ~51 µs CPU per event off. Half, so a batch of several records stays
            # under the topics' max.message.bytes even if it did not compress.
            "max_batch_size": settings.processor_batch_bytes,
            "compression_type": (
                None if settings.processor_compression == "none" else settings.processor_compression
            ),
        }
        self._workers: dict[int, PartitionWorker] = {}
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        # What the rebalance callbacks register. A worker is only kept while its
        # partition has been ours since the generation it was checked against.
        self._assignment = Assignment()
        self._workers_at = 0
        self._opening: asyncio.Task[None] | None = None
        self._settled = False  # the workers match the assignment, partitions resumed
        self._progressed = False
        # aiokafka logs and swallows exceptions raised in rebalance callbacks; we keep
        # the first one here, or a failed opening's, and re-raise it from the main loop
        # after its next fetch, which restarts us.
        self._failure: BaseException | None = None

    def ready(self) -> bool:
        """True once joined and every assigned partition is restored."""
        return self._settled

    def owned(self) -> dict[int, PartitionWorker]:
        """The workers of the partitions this node owns now (none while a rebalance or
        an opening is under way), for the reconciler: it fetches only their calls, so no
        call is polled from two nodes. A snapshot: read it before the next await."""
        return dict(self._workers) if self._settled else {}

    def ingest_partitions(self) -> list[int] | None:
        """The ingest topic's partitions, as the group member's metadata knows them."""
        consumer = self._consumer
        if consumer is None:
            return None
        found = consumer.partitions_for_topic(self.settings.topic_ingest)
        return sorted(found) if found else None

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; restart from Kafka's committed truth after a failure.

        Every exception restarts (in ROLE=all the ingest endpoint shares this process,
        so the processor must never take it down), except cancellation, and a corrupt
        state topic on a processor-only node (no restart mends it; exiting shows it).
        The backoff starts over once a restart made progress, so a broker restart an
        hour after the last one is retried fast.
        """
        backoff = self._backoff
        while not self._stopping.is_set():
            self._progressed = False
            try:
                await self._run_once()
                return
            except CorruptState as exc:
                if not self.settings.role.runs_ingest:
                    raise  # a processor-only node exits: the supervisor shows it
                # In ROLE=all ingest must keep taking webhooks while someone repairs
                # the state topic; retry (with backoff) and say what to repair.
                log.error("state topic corrupt, processor waiting for repair", error=str(exc))
                metrics.PROCESSOR_RESTARTS.labels(type(exc).__name__).inc()
                delay = backoff.next_delay()
            except (Exception, asyncio.CancelledError) as exc:
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
                    raise  # we are being cancelled: not a failure to restart from
                # A CancelledError nobody asked for is aiokafka's own leaking out: restart.
                if self._progressed:
                    backoff.reset()
                delay = backoff.next_delay()
                metrics.PROCESSOR_RESTARTS.labels(type(exc).__name__).inc()
                log.warning("processor restarting", error=repr(exc), backoff_s=round(delay, 2))
            if await sleep_or_stop(delay, self._stopping):
                return

    async def _run_once(self) -> None:
        s = self.settings
        consumer = AIOKafkaConsumer(
            **self._options,
            group_id=s.consumer_group,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        self._consumer = consumer
        self._failure = None
        self._assignment, self._workers_at = Assignment(), 0
        cause = "stopped"
        try:
            consumer.subscribe([s.topic_ingest], listener=self)
            await consumer.start()
            while not self._stopping.is_set():
                self._tend_opening(consumer)
                # Polling goes on while workers open: it is what keeps us in the group
                # (max_poll_interval), and paused partitions return nothing meanwhile.
                batches = await self._fetch(consumer)
                if self._failure is not None:
                    raise self._failure
                async with self._lock:
                    # Mid-rebalance or opening: records fetched now are re-read, since
                    # opening seeks every partition to its committed offset.
                    if self._settled:
                        await self._process(consumer, batches)
        except BaseException as exc:
            cause = type(exc).__name__
            raise
        finally:
            self._settled = False
            await self._stop_opening()
            async with self._lock:
                await self._drop_workers(cause)
            # Leaving the group lets the others take our partitions at once.
            await _stop_consumer(consumer)
            self._consumer = None

    async def _process(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Record]]
    ) -> None:
        """One batch per worker, under the lock (the caller holds it)."""
        now = self.clock()
        workers = list(self._workers.values())
        # Partitions are independent (own producer, own transaction), so their commits
        # overlap instead of queueing behind each other. All are awaited before a
        # failure is raised: none may still be running when the restart tears the
        # producers down.
        results = await asyncio.gather(
            *(
                asyncio.wait_for(w.process(batches.get(w.tp, []), now), BATCH_DEADLINE_SECONDS)
                for w in workers
            ),
            return_exceptions=True,
        )
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "partition batch failed", partition=worker.partition, error=repr(result)
                )
        for result in results:
            if isinstance(result, BaseException):
                raise result
            if result:
                self._progressed = True
        for worker in workers:
            self._record_lag(consumer, worker)
        metrics.PROCESSOR_CALLS.set(sum(len(w.states) for w in workers))

    async def _fetch(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, list[Record]]:
        try:
            batches: dict[TopicPartition, list[Record]] = await consumer.getmany(
                timeout_ms=200, max_records=self.settings.processor_batch_max
            )
        except KafkaError as exc:
            # E.g. a record batch in a codec we cannot read, or corrupt on disk. Its
            # partition cannot move until it is readable (skipping would lose events
            # ingest acknowledged), so say so loudly; the restart retries with backoff.
            if not exc.retriable:
                metrics.PROCESSOR_UNREADABLE.labels(type(exc).__name__).inc()
                log.error("ingest records unreadable", error=repr(exc))
            raise
        return batches

    def _record_lag(self, consumer: AIOKafkaConsumer, worker: PartitionWorker) -> None:
        high = consumer.highwater(worker.tp)
        if high is not None:
            metrics.PROCESSOR_LAG.labels(str(worker.partition)).set(
                max(0, high - worker.next_offset)
            )

    async def _drop_workers(self, cause: str) -> None:
        workers, self._workers = self._workers, {}
        for worker in workers.values():
            await worker.close()
            if cause != "stopped":
                metrics.PRODUCER_REBUILDS.labels("processor", cause).inc()

    # -- Opening the assignment, from the main loop ----------------------------------

    def _tend_opening(self, consumer: AIOKafkaConsumer) -> None:
        """Start opening the registered assignment when it is new; hand the failure of
        an opening that failed to the main loop (the restart closes everything and
        starts over)."""
        task = self._opening
        if task is not None:
            if not task.done():
                return
            self._opening = None
            # Cancelled: by a revocation, whose assignment is opened afresh below.
            if not task.cancelled() and (exc := task.exception()) is not None:
                # Raised after the next fetch, with the partitions resumed: a batch we
                # cannot read is then reported as that (a node without its codec
                # library fails to build its producer too, and that would hide the
                # cause). Nothing fetched is processed: the restart drops the consumer.
                self._failure = self._failure or exc
                consumer.resume(*consumer.paused())
                return
        a = self._assignment
        if not self._settled and not a.revoked and a.generation > 0:
            self._opening = asyncio.create_task(
                self._open_assignment(consumer, a.generation, sorted(a.since))
            )

    async def _stop_opening(self) -> None:
        task, self._opening = self._opening, None
        if task is None:
            return
        # Once: a revocation may have cancelled it already, and a second cancellation
        # would cut short the cleanup that closes the producers it opened.
        if not task.cancelling():
            task.cancel()
        await asyncio.wait([task])  # its own cleanup closes what it opened
        if not task.cancelled():
            task.exception()  # the run is ending anyway; only keep asyncio quiet

    async def _open_assignment(
        self, consumer: AIOKafkaConsumer, generation: int, partitions: list[int]
    ) -> None:
        """Bring the workers in line with the assignment of ``generation``: keep each
        worker whose partition stayed ours and that is still current, open the rest;
        then, unless a rebalance came meanwhile, resume the partitions and settle.

        The failures, each:

        * Revocation while opening (restore included): the callback cancels this task;
          open_all_or_none closes every worker it opened, and the next assignment is opened
          anew. Nothing was written: an opening only reads and fences.
        * An assignment while opening (without revocation first, or after it): the
          generation moved. Workers whose partition has been ours since ``generation``
          are kept for the next opening to check; the others are closed (another
          owner may have fenced them and written meanwhile). We do not settle.
        * Fenced while opening (a zombie or the next owner initialised the same
          transactional id): open raises, this task fails, the main loop restarts the
          processor from what Kafka committed. Fenced after it (a kept worker's
          producer included): the next commit fails and aborts, and the same restart
          follows; nothing of that batch is visible.
        * A state partition holding aborted transactions: the restore skips them
          (read_committed), and since open fences first none is still open to hold
          the end back (PartitionWorker.open).
        """
        async with self._lock:
            held, self._workers = self._workers, {}
            held_at = self._workers_at
        opened: dict[int, PartitionWorker] = {}
        stayed: dict[int, PartitionWorker] = {}
        try:
            # Only a worker whose partition has been ours since it was last checked
            # may be kept; one that left us in between (another owner may have fenced
            # it and written) is closed, and its partition opened anew.
            ours = self._assignment.ours_since
            fit = {p: w for p, w in held.items() if p in partitions and ours(p, held_at)}
            await close_all(w for p, w in held.items() if p not in fit)
            opened = await open_all_or_none(
                {p: self._worker_for(consumer, p, fit.get(p)) for p in partitions}
            )
            async with self._lock:
                stayed = {p: w for p, w in opened.items() if ours(p, generation)}
                self._workers, self._workers_at = stayed, generation
                if self._assignment.is_current(generation):
                    # The callback paused them all; no await since the check, so the
                    # assignment cannot have changed under us.
                    consumer.resume(*(w.tp for w in stayed.values()))
                    self._settled = True
                    heap.freeze_once("processor")  # once, however often it rebalances
                    kept = sorted(p for p, w in stayed.items() if held.get(p) is w)
                    log.info("partitions assigned", partitions=sorted(stayed), kept=kept)
        except BaseException:
            # Cancelled (revocation) or failed between steps: whatever this opening
            # holds is closed, so no producer of a partition we may have lost lingers.
            await close_all({id(w): w for w in (*held.values(), *opened.values())}.values())
            raise
        await close_all(w for p, w in opened.items() if p not in stayed)

    async def _worker_for(
        self, consumer: AIOKafkaConsumer, partition: int, held: PartitionWorker | None
    ) -> PartitionWorker:
        """``held`` if it is still current, else a newly opened worker."""
        if held is not None:
            try:
                current = await held.still_current(consumer)
            except BaseException:
                await close_all([held])
                raise
            if current:
                return held
            await close_all([held])
        return await PartitionWorker.open(
            self.settings,
            partition,
            consumer,
            options=self._options,
            producer_options=self._producer_options,
        )

    # -- ConsumerRebalanceListener: register only -------------------------------------

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Taking the lock waits for an in-flight batch, whose transaction then ends
        # before the partitions change hands; _settled=False keeps the main loop from
        # starting another. An opening under way is stopped: its partitions may be
        # someone else's in a moment.
        self._settled = False
        self._assignment.revoke()
        if self._opening is not None and not self._opening.cancelling():
            self._opening.cancel()
        async with self._lock:
            pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        consumer = self._consumer
        assert consumer is not None
        self._assignment.assign(tp.partition for tp in assigned)
        self._settled = False
        try:
            # Nothing of a partition is fetched until its worker is open and has
            # seeked it; the main loop resumes them then.
            consumer.pause(*assigned)
        except Exception as exc:
            self._failure = self._failure or exc


__all__ = [
    "CE_SOURCE",
    "CE_TYPE_CHANGED",
    "CE_TYPE_REJECTED",
    "PartitionWorker",
    "Processor",
    "transactional_id",
]
