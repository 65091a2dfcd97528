"""The processor: a consumer-group member that supervises one
:class:`~service.worker.PartitionWorker` per assigned ingest partition. What goes into a
transaction is decided by :mod:`service.batch` (pure), written by :mod:`service.worker`;
states are rebuilt by :mod:`service.restore`. The reasoning is in docs/architecture.md,
sections 5 and 8:

* Partitions are independent (own producer, own transaction): their batches run
  concurrently, each under a deadline.
* Anything that fails (fenced, broker gone, coordinator errors) restarts the whole
  processor from what Kafka committed, with backoff; only cancellation ends it, and a
  corrupt state topic on a processor-only node (which a restart cannot mend).
* Rebalances: a batch holds the lock for its whole transaction and revocation takes the
  same lock; a worker is kept across a rebalance only while nobody else wrote for its
  partition (committed offset and state partition end both unchanged).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeAlias

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from service import metrics
from service.backoff import Backoff, sleep_or_stop
from service.batch import CE_SOURCE, CE_TYPE_CHANGED, CE_TYPE_REJECTED
from service.kafka import client_options
from service.restore import CorruptState, restore
from service.settings import Settings
from service.worker import PartitionWorker, open_producer, transactional_id

log = structlog.get_logger(logger_name="callstatus.processor")

Clock = Callable[[], datetime]
Record: TypeAlias = "ConsumerRecord[bytes, bytes]"

# Upper bound on one partition's batch, transaction included. aiokafka waits without end
# for a coordinator that does not answer; past aiokafka's transaction timeout (60 s) the
# broker aborts the transaction anyway, so waiting longer only hides a stuck producer.
BATCH_DEADLINE_SECONDS = 90.0


def utc_now() -> datetime:
    return datetime.now(UTC)


async def _seek_committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """Point the consumer at the group's committed offset (the start when there is none)
    and return it: the next record this partition's worker must judge."""
    committed = await consumer.committed(tp)
    if committed is None:
        await consumer.seek_to_beginning(tp)
        position: int = await consumer.position(tp)
        return position
    consumer.seek(tp, committed)
    return int(committed)


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
            "compression_type": (
                None if settings.processor_compression == "none" else settings.processor_compression
            ),
        }
        self._workers: dict[int, PartitionWorker] = {}
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._settled = False
        self._progressed = False
        # aiokafka logs and swallows exceptions raised in rebalance callbacks; we keep
        # the first one here and re-raise it from the main loop, which restarts us.
        self._failure: BaseException | None = None

    def ready(self) -> bool:
        """True once joined and every assigned partition is restored."""
        return self._settled

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
        cause = "stopped"
        try:
            consumer.subscribe([s.topic_ingest], listener=self)
            await consumer.start()
            while not self._stopping.is_set():
                batches = await self._fetch(consumer)
                if self._failure is not None:
                    raise self._failure
                async with self._lock:
                    if not self._settled:
                        continue  # mid-rebalance: records fetched now are re-read later
                    now = self.clock()
                    workers = list(self._workers.values())
                    # Partitions are independent (own producer, own transaction), so
                    # their commits overlap instead of queueing behind each other. All
                    # are awaited before a failure is raised: none may still be running
                    # when the restart tears the producers down.
                    results = await asyncio.gather(
                        *(
                            asyncio.wait_for(
                                w.process(batches.get(w.tp, []), now), BATCH_DEADLINE_SECONDS
                            )
                            for w in workers
                        ),
                        return_exceptions=True,
                    )
                    for worker, result in zip(workers, results, strict=True):
                        if isinstance(result, BaseException):
                            log.warning(
                                "partition batch failed",
                                partition=worker.partition,
                                error=repr(result),
                            )
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result
                        if result:
                            self._progressed = True
                    for worker in workers:
                        self._record_lag(consumer, worker)
                    metrics.PROCESSOR_CALLS.set(sum(len(w.states) for w in workers))
        except BaseException as exc:
            cause = type(exc).__name__
            raise
        finally:
            self._settled = False
            async with self._lock:
                await self._drop_workers(cause)
            # Leaving the group lets the others take our partitions at once.
            await _stop_consumer(consumer)
            self._consumer = None

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

    # -- ConsumerRebalanceListener -------------------------------------------------

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Taking the lock waits for an in-flight batch; _settled=False then keeps the
        # main loop from starting another until the new assignment is in place.
        self._settled = False
        async with self._lock:
            pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        consumer = self._consumer
        assert consumer is not None
        async with self._lock:
            partitions = sorted(tp.partition for tp in assigned)
            previous, self._workers = self._workers, {}
            kept: dict[int, PartitionWorker] = {}
            fresh: dict[int, PartitionWorker] = {}
            try:
                while previous:
                    partition, worker = previous.popitem()
                    if partition in partitions and await self._still_current(consumer, worker):
                        kept[partition] = worker
                    else:
                        await worker.close()
                for partition in partitions:
                    if partition not in kept:
                        fresh[partition] = await self._open_worker(consumer, partition)
                restored = await restore(self._options, self.settings.topic_state, sorted(fresh))
                for partition, r in restored.items():
                    worker = fresh[partition]
                    worker.states, worker.watermark, worker.state_end = r.states, r.watermark, r.end
            except Exception as exc:
                # Without workers these partitions would sit idle; fail loudly instead.
                # Every producer is closed, also those of workers not yet looked at.
                for worker in (*previous.values(), *kept.values(), *fresh.values()):
                    with contextlib.suppress(Exception):
                        await worker.close()
                self._failure = self._failure or exc
                return
            self._workers = {**kept, **fresh}
            self._settled = True
            log.info("partitions assigned", partitions=partitions, kept=sorted(kept))

    async def _still_current(self, consumer: AIOKafkaConsumer, worker: PartitionWorker) -> bool:
        """Whether a worker we had before this rebalance may go on as it is: nobody
        committed an offset for its partition since we did, and nobody wrote to its
        state partition either (a transaction with only sweep tombstones moves no
        offset, but changes the states)."""
        if await _seek_committed(consumer, worker.tp) != worker.next_offset:
            return False
        if worker.state_end is None:
            return False
        state_tp = TopicPartition(self.settings.topic_state, worker.partition)
        ends = await consumer.end_offsets([state_tp])
        return bool(ends[state_tp] == worker.state_end)

    async def _open_worker(self, consumer: AIOKafkaConsumer, partition: int) -> PartitionWorker:
        s = self.settings
        txn_id = transactional_id(s.consumer_group, s.topic_ingest, partition)
        producer = await open_producer(self._producer_options, txn_id)
        tp = TopicPartition(s.topic_ingest, partition)
        try:
            position = await _seek_committed(consumer, tp)
            counts = {
                len(await producer.partitions_for(topic))
                for topic in (s.topic_ingest, s.topic_changes, s.topic_rejected)
            }
        except BaseException:
            await producer.stop()
            raise
        aligned = len(counts) == 1
        return PartitionWorker(s, partition, producer, position, self._producer_options, aligned)


__all__ = [
    "CE_SOURCE",
    "CE_TYPE_CHANGED",
    "CE_TYPE_REJECTED",
    "PartitionWorker",
    "Processor",
    "transactional_id",
]
