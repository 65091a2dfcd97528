"""The processor's transactional shell: ingest topic in, one Kafka transaction per
partition batch out. What goes into a transaction is decided by :mod:`service.batch`
(pure); states are rebuilt by :mod:`service.restore`. The reasoning is in
docs/architecture.md, sections 5 and 8; the short of it:

* Each assigned ingest partition ``p`` has one :class:`PartitionWorker`: a transactional
  producer whose id is derived from (group, topic, p), the call states of ``p`` and its
  position. A batch's changes, rejections, states and input offset go in ONE
  transaction, so ``read_committed`` readers see all of it or none.
* Every output of a batch is awaited before the offsets go in: aiokafka commits after
  a flush that ignores delivery errors, so an unchecked refusal would commit the offset
  without the output.
* A record Kafka refuses for good (too large) is found by writing the batch again one
  output at a time, and then answered with an ``unwritable`` rejection instead: the
  partition neither stalls nor loses it. Memory changes only after a commit, so after
  an abort it still equals what Kafka holds and the batch is simply planned again.
* Anything else (fenced, broker gone, coordinator errors) restarts the whole processor
  from what Kafka committed, with backoff; only cancellation and a corrupt state topic
  (which a restart cannot mend) end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeAlias

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from aiokafka.structs import RecordMetadata
from prometheus_client import Counter

from service import metrics
from service.backoff import Backoff, sleep_or_stop
from service.batch import (
    CE_SOURCE,
    CE_TYPE_CHANGED,
    CE_TYPE_REJECTED,
    NO_RECORD,
    Output,
    Plan,
    Retention,
    Target,
    plan,
)
from service.fsm import CallState
from service.kafka import client_options
from service.restore import CorruptState, restore
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.processor")

Clock = Callable[[], datetime]
Record: TypeAlias = "ConsumerRecord[bytes, bytes]"

# Errors that say "this record can never be written", whatever we retry: the record is
# then answered with an ``unwritable`` rejection. Everything else is the broker's or the
# producer's trouble and restarts the processor.
REFUSED_FOR_GOOD: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    InvalidTimestampError,
    PolicyViolationError,
)


# Upper bound on one partition's batch, transaction included. aiokafka waits without end
# for a coordinator that does not answer; past aiokafka's transaction timeout (60 s) the
# broker aborts the transaction anyway, so waiting longer only hides a stuck producer.
BATCH_DEADLINE_SECONDS = 90.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def transactional_id(group: str, topic: str, partition: int) -> str:
    """Stable per input partition, so the next owner of a partition fences the last."""
    return f"{group}.{topic}.{partition}"


@cache
def _event_counter(outcome: str, reason: str) -> Counter:
    return metrics.PROCESSOR_EVENTS.labels(outcome, reason)


@cache
def _transition_counter(before: str, after: str) -> Counter:
    return metrics.PROCESSOR_TRANSITIONS.labels(before, after)


class Refused(Exception):
    """Kafka refused an output of this batch for good; the transaction was aborted.
    ``offset`` is the ingest record it answers, when known (one-by-one writing)."""

    def __init__(self, offset: int | None, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.offset = offset
        self.cause = cause


async def open_producer(options: dict[str, Any], txn_id: str) -> AIOKafkaProducer:
    """A started transactional producer that has fenced every earlier one with its id."""
    producer = AIOKafkaProducer(
        **options, transactional_id=txn_id, enable_idempotence=True, acks="all", linger_ms=5
    )
    try:
        # start() can fail with the broker away: the producer must be closed then too.
        await producer.start()
        # An empty transaction returns only after InitProducerId: the previous owner
        # is fenced and its open transaction finished, so what we read next is final.
        await producer.begin_transaction()
        await producer.abort_transaction()
    except BaseException:
        await producer.stop()
        raise
    return producer


@dataclass
class PartitionWorker:
    """Owns one ingest partition: its producer, its call states and its position."""

    settings: Settings
    partition: int
    producer: AIOKafkaProducer
    next_offset: int
    options: dict[str, Any]
    states: dict[str, CallState] = field(default_factory=dict)
    watermark: datetime | None = None
    swept_at: datetime | None = None
    # The state partition's end offset after our last commit; None when unknown (after
    # an abort). Another owner's transaction moves it, even one without an offset.
    state_end: int | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.tp = TopicPartition(s.topic_ingest, self.partition)
        self.target = Target(
            s.topic_ingest, s.topic_changes, s.topic_rejected, s.topic_state, self.partition
        )
        self.retention = Retention(
            timedelta(seconds=s.state_terminal_retention_seconds),
            timedelta(seconds=s.state_idle_retention_seconds),
        )

    async def process(self, records: list[Record], processed_at: datetime) -> bool:
        """Judge a batch and commit its effects in one transaction; True if it did."""
        unwritable: set[int] = set()
        one_by_one = False
        while True:
            p = plan(
                records,
                self.states,
                position=self.next_offset,
                watermark=self.watermark,
                swept_at=self.swept_at,
                target=self.target,
                retention=self.retention,
                processed_at=processed_at,
                unwritable=unwritable,
            )
            if p.empty:
                self.watermark, self.swept_at = p.watermark, p.swept_at
                return False
            try:
                await self._commit(p, one_by_one)
            except Refused as refused:
                await self._renew_producer(type(refused.cause).__name__)
                if refused.offset is None or refused.offset == NO_RECORD:
                    if one_by_one:  # a tombstone refused: nothing we can answer for
                        raise refused.cause from None
                    one_by_one = True  # which record? write one output at a time
                elif refused.offset in unwritable:
                    # Even the cut rejection is refused (a rejected topic that takes
                    # less than ~2 KiB): nothing smaller to write, so stop and say so.
                    raise refused.cause from None
                else:
                    unwritable.add(refused.offset)
                    log.error(
                        "ingest record unwritable, answering it on rejected",
                        partition=self.partition,
                        offset=refused.offset,
                        error=repr(refused.cause),
                    )
                continue
            self._adopt(p)
            return True

    async def _commit(self, p: Plan, one_by_one: bool) -> None:
        started = time.perf_counter()
        producer = self.producer
        await producer.begin_transaction()
        futures: list[asyncio.Future[RecordMetadata]] = []
        state_offsets: list[int] = []
        try:
            for out in p.outputs:
                try:
                    future = await self._send(out)
                    if one_by_one:
                        meta = await future
                        if out.topic == self.target.state:
                            state_offsets.append(meta.offset)
                    else:
                        futures.append(future)
                except REFUSED_FOR_GOOD as exc:
                    raise Refused(out.offset, exc) from exc
            if futures:
                # Every output acknowledged before the offset goes in: the commit below
                # would otherwise succeed without a refused record.
                results = await asyncio.gather(*futures, return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    if all(isinstance(e, REFUSED_FOR_GOOD) for e in errors):
                        # A refused produce request fails every record batched with the
                        # culprit: which one it was, only writing them singly tells.
                        raise Refused(None, errors[0])
                    raise errors[0]
                state_offsets = [
                    meta.offset
                    for out, meta in zip(p.outputs, results, strict=True)
                    if out.topic == self.target.state and isinstance(meta, RecordMetadata)
                ]
            if p.next_offset is not None:
                await producer.send_offsets_to_transaction(
                    {self.tp: p.next_offset}, self.settings.consumer_group
                )
            commit_started = time.perf_counter()
            await producer.commit_transaction()
        except BaseException:
            for future in futures:  # their errors are this one; don't log each at GC
                future.add_done_callback(_retrieve)
            self.state_end = None
            await _abort_quietly(producer)
            raise
        metrics.PROCESSOR_COMMIT_SECONDS.observe(time.perf_counter() - commit_started)
        metrics.PROCESSOR_BATCH_SECONDS.observe(time.perf_counter() - started)
        if state_offsets and self.state_end is not None:
            # Our records, then the commit marker: the end is one past the marker.
            self.state_end = max(state_offsets) + 2

    async def _send(self, out: Output) -> asyncio.Future[RecordMetadata]:
        future: asyncio.Future[RecordMetadata] = await self.producer.send(
            out.topic, value=out.value, key=out.key, headers=out.headers, partition=out.partition
        )
        return future

    def _adopt(self, p: Plan) -> None:
        """Committed: only now does memory follow."""
        for call_id, state in p.states.items():
            if state is None:
                self.states.pop(call_id, None)
            else:
                self.states[call_id] = state
        if p.next_offset is not None:
            self.next_offset = p.next_offset
        self.watermark, self.swept_at = p.watermark, p.swept_at
        for (outcome, reason), n in p.events.items():
            _event_counter(outcome, reason).inc(n)
        for (before, after), n in p.transitions.items():
            _transition_counter(before, after).inc(n)

    async def _renew_producer(self, cause: str) -> None:
        """Replace the producer after a refused write: its failed batch used sequence
        numbers the broker never took, so only a new epoch writes cleanly again."""
        old = self.producer
        await old.stop()
        s = self.settings
        txn_id = transactional_id(s.consumer_group, s.topic_ingest, self.partition)
        self.producer = await open_producer(self.options, txn_id)
        metrics.PRODUCER_REBUILDS.labels("processor", cause).inc()

    async def close(self) -> None:
        await self.producer.stop()
        with contextlib.suppress(KeyError):
            metrics.PROCESSOR_LAG.remove(str(self.partition))


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


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _abort_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.abort_transaction(), 10)
    except Exception as exc:
        log.warning("abort failed", error=repr(exc))


class Processor(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer group member, supervising one :class:`PartitionWorker` per partition."""

    def __init__(
        self, settings: Settings, clock: Clock = utc_now, backoff: Backoff | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._backoff = backoff or Backoff(first=0.5, cap=30.0)
        self._options = client_options(settings)
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
            except Exception as exc:
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
            await consumer.stop()
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
        producer = await open_producer(self._options, txn_id)
        tp = TopicPartition(s.topic_ingest, partition)
        try:
            position = await _seek_committed(consumer, tp)
        except BaseException:
            await producer.stop()
            raise
        return PartitionWorker(s, partition, producer, position, self._options)


__all__ = [
    "CE_SOURCE",
    "CE_TYPE_CHANGED",
    "CE_TYPE_REJECTED",
    "PartitionWorker",
    "Processor",
    "transactional_id",
]
