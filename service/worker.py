"""One ingest partition's transactional shell and its whole lifecycle: opening it
(fencing, seek, restore), writing each batch plan (:mod:`service.batch`) in one Kafka
transaction, telling whether it is still current after a rebalance, and closing it. The
reasoning is in docs/architecture.md, sections 5 and 8:

* Opening fences before it reads: the partition's transactional producer is initialised
  first, which aborts or finishes the previous owner's open transaction, so the
  committed offset and the state partition read next are final (:meth:`PartitionWorker.open`).

* A batch's changes, rejections, states and input offset go in ONE transaction, so
  ``read_committed`` readers see all of it or none.
* Every output of a batch is awaited before the offsets go in: aiokafka commits after
  a flush that ignores delivery errors, so an unchecked refusal would commit the offset
  without the output.
* A record Kafka refuses for good (too large) is found by transactions of ever fewer
  of the batch's records, down to one whose outputs go singly (:class:`Narrowing`), and
  then answered with an ``unwritable`` rejection instead: the partition neither stalls
  nor loses it. Memory changes only after a commit, so after an abort it still equals
  what Kafka holds and the records are simply planned again.
* Any other error is raised: the processor (:mod:`service.processor`) restarts from
  what Kafka committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import RecordMetadata
from prometheus_client import Counter

from service import metrics
from service.aheadofclock import AheadOfClock
from service.aiokafka_internals import sender_failure
from service.batch import (
    NO_RECORD,
    BatchPlan,
    Narrowing,
    Output,
    Record,
    Retention,
    Target,
    plan_batch,
    unprocessed,
)
from service.kafkaerrors import REFUSED_FOR_GOOD, is_refused_for_good, retrieve
from service.restore import restore
from service.settings import Settings
from service.statecodec import held_since

log = structlog.get_logger(logger_name="callstatus.worker")

# A record Kafka refuses for good (service/kafkaerrors.py, shared with ingest and the
# spool) is answered with an ``unwritable`` rejection. Everything else is the broker's
# or the producer's trouble and restarts the processor.


def transactional_id(group: str, topic: str, partition: int) -> str:
    """Stable per input partition, so the next owner of a partition fences the last."""
    return f"{group}.{topic}.{partition}"


# What send() says of a record over the producer's max request size; the batched write
# refuses such a record the same way (PartitionWorker._write_batched).
_TOO_LARGE = "The message is larger than the maximum request size (max_request_size)"

_AHEAD = AheadOfClock()  # one for all partitions: one warning a window


@cache
def _event_counter(source: str, outcome: str, reason: str) -> Counter:
    return metrics.PROCESSOR_EVENTS.labels(source, outcome, reason)


@cache
def _transition_counter(before: str, after: str) -> Counter:
    return metrics.PROCESSOR_TRANSITIONS.labels(before, after)


class Unwritable(Exception):
    """Kafka refused an output of this batch for good; the transaction was aborted.
    ``offset`` is the ingest record it answers, when known (one-by-one writing)."""

    def __init__(self, offset: int | None, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.offset = offset
        self.cause = cause


async def open_producer(options: dict[str, Any], txn_id: str) -> AIOKafkaProducer:
    """A started transactional producer that has fenced every earlier one with its id."""
    producer = AIOKafkaProducer(
        **options,
        transactional_id=txn_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
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


@dataclass
class PartitionWorker:
    """Owns one ingest partition: its producer, its call states and its position.
    Made by :meth:`open`, never by hand: only that order of steps makes it safe."""

    settings: Settings
    partition: int
    producer: AIOKafkaProducer
    next_offset: int
    options: dict[str, Any]  # the producer's, for a renewal
    transactional_id: str
    aligned: bool = False  # see Target.aligned
    states: dict[str, bytes] = field(default_factory=dict)  # packed (statecodec)
    watermark: datetime | None = None
    swept_at: datetime | None = None
    # The state partition's end offset after our last commit (restore's end, then moved
    # by each commit that wrote states); None when unknown (after an abort). Another
    # owner's transaction moves it, even one without an offset: see still_current.
    state_end: int | None = None
    # The reconciler's index (service/reconciler.py): per call held non-terminal with an
    # account, the time of its last event (Unix seconds). Kept by each commit for the
    # calls it changed, so the reconciler reads the calls it may fetch without scanning
    # every state, and the batch path pays one struct read per changed state.
    held: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        self.held = {
            cid: since
            for cid, blob in self.states.items()
            if (since := held_since(blob)) is not None
        }
        self.tp = TopicPartition(s.topic_ingest, self.partition)
        self.target = Target(
            s.topic_ingest,
            s.topic_changes,
            s.topic_rejected,
            s.topic_state,
            self.partition,
            self.aligned,
        )
        self.retention = Retention(
            timedelta(seconds=s.state_terminal_retention_seconds),
            timedelta(seconds=s.state_idle_retention_seconds),
            timedelta(seconds=s.max_clock_skew_seconds),
        )

    @classmethod
    async def open(
        cls,
        settings: Settings,
        partition: int,
        consumer: AIOKafkaConsumer,
        *,
        options: dict[str, Any],
        producer_options: dict[str, Any],
    ) -> PartitionWorker:
        """The worker for ``partition``, ready to process from the committed offset.

        The order is what makes it exactly-once, so it lives here and nowhere else:

        1. Fence: init the producer of the partition's transactional id. This returns
           once the previous owner is fenced and its open transaction finished
           (committed or aborted), so nothing it still writes can become visible.
        2. Seek ``consumer`` (which has the partition assigned, paused) to the
           committed offset: final now, since no transaction can still add to it.
        3. Restore the calls' states from the state partition, read_committed, to its
           end. Aborted transactions (a zombie's, or our own failed batches) are
           skipped by the reader, and after step 1 none is still open, so the end is
           not held back by one and what we read is everything committed (the restore
           checks it: it waits while the partition's last stable offset is short of
           its high watermark, see docs/architecture.md, "Fencing").

        A failure at any step (fenced by yet another owner, the broker away, a corrupt
        state, our cancellation by a revocation) closes the producer and raises: no
        half-opened worker exists. ``options`` are the client's (for the restore
        reader), ``producer_options`` those of the partition's producers.
        """
        s = settings
        txn_id = transactional_id(s.consumer_group, s.topic_ingest, partition)
        producer = await open_producer(producer_options, txn_id)
        try:
            position = await _seek_committed(consumer, TopicPartition(s.topic_ingest, partition))
            restored = (await restore(options, s.topic_state, [partition]))[partition]
            counts = {
                len(await producer.partitions_for(topic))
                for topic in (s.topic_ingest, s.topic_changes, s.topic_rejected)
            }
        except BaseException:
            await producer.stop()
            raise
        return cls(
            s,
            partition,
            producer,
            position,
            producer_options,
            txn_id,
            aligned=len(counts) == 1,
            states=restored.states,
            watermark=restored.watermark,
            state_end=restored.end,
        )

    async def still_current(self, consumer: AIOKafkaConsumer) -> bool:
        """Whether this worker may go on as it is after a rebalance gave its partition
        back to us: nobody committed an offset for it since we did, and nobody wrote to
        its state partition either (a transaction with only sweep tombstones moves no
        offset, but changes the states). Seeks ``consumer`` to the committed offset on
        the way, as :meth:`open` would."""
        if await _seek_committed(consumer, self.tp) != self.next_offset:
            return False
        if self.state_end is None:
            return False
        state_tp = TopicPartition(self.settings.topic_state, self.partition)
        ends = await consumer.end_offsets([state_tp])
        return bool(ends[state_tp] == self.state_end)

    async def process(self, records: list[Record], processed_at: datetime) -> bool:
        """Judge a batch and commit its effects, in one transaction unless Kafka refuses
        an output for good (then in several, see :class:`~service.batch.Narrowing`);
        True if anything committed."""
        rest = unprocessed(records, self.next_offset)
        unwritable: set[int] = set()
        search = Narrowing(len(rest))
        progressed = False
        while True:
            part = rest[: search.size]
            p = plan_batch(
                part,
                self.states,
                watermark=self.watermark,
                swept_at=self.swept_at,
                target=self.target,
                retention=self.retention,
                processed_at=processed_at,
                unwritable=unwritable,
            )
            if p.empty:
                self._take_time(p)
                return progressed
            try:
                await self._commit(p, search.singly)
            except Unwritable as refused:
                await self._renew_producer(type(refused.cause).__name__)
                if refused.offset is None or refused.offset == NO_RECORD:
                    if search.singly:  # a tombstone refused: nothing we can answer for
                        raise refused.cause from None
                    search.refused()  # which record? fewer at a time until one
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
                    search.found()  # the rest in whole batches again
                continue
            self._adopt(p)
            progressed = True
            search.committed()
            rest = rest[len(part) :]
            if not rest:
                return True

    async def _commit(self, p: BatchPlan, one_by_one: bool) -> None:
        started = time.perf_counter()
        producer = self.producer
        await producer.begin_transaction()
        # Per batch handed over (or record sent): topic, record count, delivery future.
        sent: list[tuple[str, int, asyncio.Future[RecordMetadata]]] = []
        state_offsets: list[int] = []
        try:
            if one_by_one:
                state_offsets = await self._write_singly(p.outputs)
            else:
                await self._write_batched(p.outputs, sent)
                # Every output acknowledged before the offset goes in: the commit below
                # would otherwise succeed without a refused record.
                results = await asyncio.gather(*(f for _, _, f in sent), return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    refused = [e for e in errors if is_refused_for_good(e)]
                    if refused:
                        # A refused produce request fails every record batched with the
                        # culprit: which one it was, only writing them singly tells. The
                        # partition's later batches then fail on the sequence numbers
                        # the refused one used: consequences, not a second cause.
                        raise Unwritable(None, refused[0])
                    raise errors[0]
                state_offsets = [
                    meta.offset + count - 1  # a batch's metadata names its first record
                    for (topic, count, _), meta in zip(sent, results, strict=True)
                    if topic == self.target.state and isinstance(meta, RecordMetadata)
                ]
            if p.next_offset is not None:
                await producer.send_offsets_to_transaction(
                    {self.tp: p.next_offset}, self.settings.consumer_group
                )
            commit_started = time.perf_counter()
            await producer.commit_transaction()
        except BaseException as exc:
            for _, _, future in sent:  # their errors are this one; don't log each at GC
                future.add_done_callback(retrieve)
            self.state_end = None
            await _abort_quietly(producer)
            cause = sender_failure(producer)
            if cause is not None and cause is not exc and not isinstance(exc, Unwritable):
                # aiokafka's sender died (fenced, say) and the next call only says
                # "not in transaction": report why, so restarts are counted by cause.
                raise cause from exc
            raise
        metrics.PROCESSOR_COMMIT_SECONDS.observe(time.perf_counter() - commit_started)
        metrics.PROCESSOR_BATCH_SECONDS.observe(time.perf_counter() - started)
        if state_offsets and self.state_end is not None:
            # Our records, then the commit marker: the end is one past the marker.
            self.state_end = max(state_offsets) + 2

    async def _write_singly(self, outputs: list[Output]) -> list[int]:
        """Each output sent and acknowledged before the next, so a refusal names its
        record (raised as :class:`Unwritable` with its offset). The state records'
        offsets."""
        state_offsets: list[int] = []
        for out in outputs:
            try:
                future = await self._send(out)
                meta = await future
            except REFUSED_FOR_GOOD as exc:
                raise Unwritable(out.offset, exc) from exc
            if out.topic == self.target.state:
                state_offsets.append(meta.offset)
        return state_offsets

    async def _write_batched(
        self, outputs: list[Output], sent: list[tuple[str, int, asyncio.Future[RecordMetadata]]]
    ) -> None:
        """Queue ``outputs`` for the transaction, as record batches we fill ourselves:
        per (topic, partition), in order, a batch handed over when full. Each send()
        costs a delivery future, a metadata lookup and a partition check per record,
        about a fifth of the processor's CPU, for what is here one append per record and
        one future per batch. Outputs whose partition the producer must pick (topics
        not aligned with ingest) still go through send(). Appends to ``sent``, per
        batch (or single record), its topic, its record count and its delivery future.

        A record larger than the producer's max request size is refused here as send()
        would refuse it, so it is blamed on its ingest record straight away."""
        producer = self.producer
        limit = self.options["max_request_size"]
        open_batches: dict[tuple[str, int], BatchBuilder] = {}

        async def hand_over(topic: str, partition: int, batch: BatchBuilder) -> None:
            batch.close()  # nothing more goes in, so the sender need not linger for it
            future = await producer.send_batch(batch, topic, partition=partition)
            sent.append((topic, batch.record_count(), future))

        for out in outputs:
            if out.partition is None:
                sent.append((out.topic, 1, await self._send_checked(out)))
                continue
            headers = out.headers
            if (
                DefaultRecordBatchBuilder.estimate_size_in_bytes(out.key, out.value, headers)
                > limit
            ):
                raise Unwritable(out.offset, MessageSizeTooLargeError(_TOO_LARGE))
            where = (out.topic, out.partition)
            batch = open_batches.get(where)
            if batch is None:
                batch = open_batches[where] = producer.create_batch()
            if batch.append(timestamp=None, key=out.key, value=out.value, headers=headers) is None:
                # Full: hand it over and start the next; an empty batch takes any record.
                await hand_over(out.topic, out.partition, batch)
                batch = open_batches[where] = producer.create_batch()
                batch.append(timestamp=None, key=out.key, value=out.value, headers=headers)
        for (topic, partition), batch in open_batches.items():
            await hand_over(topic, partition, batch)

    async def _send_checked(self, out: Output) -> asyncio.Future[RecordMetadata]:
        try:
            return await self._send(out)
        except REFUSED_FOR_GOOD as exc:
            raise Unwritable(out.offset, exc) from exc

    async def _send(self, out: Output) -> asyncio.Future[RecordMetadata]:
        future: asyncio.Future[RecordMetadata] = await self.producer.send(
            out.topic, value=out.value, key=out.key, headers=out.headers, partition=out.partition
        )
        return future

    def _adopt(self, p: BatchPlan) -> None:
        """Committed: only now does memory follow."""
        held = self.held
        for call_id, state in p.states.items():
            if state is None:
                self.states.pop(call_id, None)
                held.pop(call_id, None)
            else:
                self.states[call_id] = state
                if (since := held_since(state)) is None:
                    held.pop(call_id, None)
                else:
                    held[call_id] = since
        if p.next_offset is not None:
            self.next_offset = p.next_offset
        self._take_time(p)
        if p.ahead_of_clock and p.furthest_ahead is not None:
            # Counted once committed, like every tally: an aborted batch is planned again.
            _AHEAD.note(
                self.partition, p.ahead_of_clock, p.furthest_ahead, self.retention.max_clock_skew
            )
        for (source, outcome, reason), n in p.events.items():
            _event_counter(source, outcome, reason).inc(n)
        for (before, after), n in p.transitions.items():
            _transition_counter(before, after).inc(n)

    def _take_time(self, p: BatchPlan) -> None:
        if p.watermark_clamped_from is not None:
            # Once per restore at most: the clamped watermark is ours from now on.
            log.warning(
                "watermark ahead of the clock clamped",
                partition=self.partition,
                watermark=p.watermark_clamped_from.isoformat(),
                clamped_to=p.watermark.isoformat() if p.watermark else None,
            )
        self.watermark, self.swept_at = p.watermark, p.swept_at

    async def _renew_producer(self, cause: str) -> None:
        """Replace the producer after a refused write: its failed batch used sequence
        numbers the broker never took, so only a new epoch writes cleanly again."""
        old = self.producer
        await old.stop()
        self.producer = await open_producer(self.options, self.transactional_id)
        metrics.PRODUCER_REBUILDS.labels("processor", cause).inc()

    async def close(self) -> None:
        await self.producer.stop()
        with contextlib.suppress(KeyError):
            metrics.PROCESSOR_LAG.remove(str(self.partition))


async def _abort_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.abort_transaction(), 10)
    except Exception as exc:
        log.warning("abort failed", error=repr(exc))


__all__ = [
    "PartitionWorker",
    "Unwritable",
    "open_producer",
    "transactional_id",
]
