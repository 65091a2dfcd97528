"""The processor: ingest topic in, one Kafka transaction per partition batch out.

Exactly-once, reasoned through
------------------------------
Each assigned ingest partition ``p`` is owned by one :class:`PartitionWorker`, which owns
everything that must move together: a transactional producer whose id is derived from
(group, topic, p), the in-memory states of the calls in ``p``, and ``p``'s position. For
one batch it writes, in ONE transaction: the accepted changes, the rejections, the new
states (to state partition ``p``) and the input offset. Either all of it becomes visible
to ``read_committed`` readers, or none of it does.

* Crash anywhere before the commit: the open transaction is aborted when the next owner
  of ``p`` initialises a producer with the same transactional id (classic zombie
  fencing: aiokafka has no KIP-447). The next owner then reads the committed offset and
  the committed states, which agree with each other because they were written together,
  and redoes the batch. Nothing visible was written twice.
* Crash after the commit: offsets and outputs are both committed; the batch is not redone.
* A zombie (a worker that lost ``p`` without knowing it) is fenced the moment the new
  owner initialises; its next commit fails with ``ProducerFenced``.
* Any error we cannot reason about locally (fenced, commit failure, broker gone for
  longer than the transaction timeout) tears the whole processor down and starts it
  again: every worker is rebuilt from what Kafka committed, which is the one truth.

In-memory states change only after a commit succeeds, so an aborted batch leaves no trace.

Rebalances
----------
aiokafka rebalances eagerly: every partition is revoked, then the new set assigned. A
batch holds ``_lock`` for its whole transaction, and revocation takes the same lock, so
a partition is never handed over mid-transaction; between revocation and assignment no
batch runs at all.

A new worker is built in this order: fence (init the producer), then read the committed
offset, then restore states. Fencing first waits for a zombie's pending transaction to
end, so the offset and states read afterwards are final.

Most rebalances hand a member back the partitions it already had, so a worker is kept
across one when the committed offset is still its own position: nobody else committed
in between, and its states are current. Restoring every partition on every rebalance
would stall processing for as long as the state topic takes to read. Keeping is safe
even if another member did own the partition meanwhile: it initialised the same
transactional id, which fenced our producer, so our next commit fails before anything
becomes visible, and the restart rebuilds from Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from prometheus_client import Counter
from pydantic import ValidationError

from schemas.call import CallStatus, format_rfc3339
from schemas.messages import (
    IngestEnvelope,
    RejectReason,
    StateMessage,
    encode_outcome,
    encode_state,
)
from service import metrics
from service.fsm import CallState, Decision, Outcome, decide, expired
from service.kafka import client_options
from service.settings import Settings

log = structlog.get_logger(logger_name="callstatus.processor")

CE_SOURCE = b"urn:callstatus:processor"
CE_TYPE_CHANGED = b"com.freeclimb.call.status.changed"
CE_TYPE_REJECTED = b"com.freeclimb.call.status.rejected"
# How often each partition looks for states past their retention.
SWEEP_INTERVAL = timedelta(seconds=30)
RESTORE_DEADLINE_SECONDS = 300.0

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def transactional_id(group: str, topic: str, partition: int) -> str:
    """Stable per input partition, so the next owner of a partition fences the last."""
    return f"{group}.{topic}.{partition}"


@dataclass(slots=True)
class _Output:
    topic: str
    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None = None


def _headers(
    event: IngestEnvelope, kind: bytes, processed: str, trace: bytes | None
) -> list[tuple[str, bytes]]:
    # CloudEvents Kafka binding, binary mode: the attributes travel as ce_* headers.
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", event.eventId.encode()),
        ("ce_source", CE_SOURCE),
        ("ce_type", kind),
        ("ce_subject", event.call.callId.encode()),
        ("ce_time", processed.encode()),
        ("content-type", b"application/json"),
    ]
    if trace is not None:
        headers.append(("traceparent", trace))
    return headers


# Label children are looked up once per combination, not once per event.
@cache
def _event_counter(outcome: Outcome, reason: RejectReason | None) -> Counter:
    return metrics.PROCESSOR_EVENTS.labels(outcome.value, reason.value if reason else "")


@cache
def _transition_counter(before: CallStatus | None, after: CallStatus) -> Counter:
    return metrics.PROCESSOR_TRANSITIONS.labels(before.value if before else "", after.value)


class CorruptState(Exception):
    """A state-topic record is not a StateMessage. Restoring around it could re-accept
    old events for that call, so the processor stops and says how to repair it."""


def _state_from_record(record: ConsumerRecord[bytes, bytes]) -> CallState:
    try:
        m = StateMessage.model_validate_json(record.value or b"")
    except ValidationError as exc:
        raise CorruptState(
            f"record {record.topic}/{record.partition}@{record.offset} (key {record.key!r}) "
            f"is not a call state ({exc.error_count()} errors); write a tombstone for "
            "that key to drop it, and the call's next event starts it afresh"
        ) from None
    return CallState(m.status, m.revision, m.call, m.eventId, m.updatedAt)


@dataclass
class PartitionWorker:
    """Owns one ingest partition: its producer, its call states and its position."""

    settings: Settings
    partition: int
    producer: AIOKafkaProducer
    next_offset: int
    states: dict[str, CallState] = field(default_factory=dict)
    last_sweep: datetime | None = None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.settings.topic_ingest, self.partition)

    def _judge(
        self, records: Iterable[ConsumerRecord[bytes, bytes]], now: datetime
    ) -> tuple[list[_Output], dict[str, CallState | None], int | None]:
        """Run the FSM over a batch; return the outputs, the state changes and the next
        offset. Pure apart from metrics: nothing is written and ``states`` is untouched."""
        s = self.settings
        outputs: list[_Output] = []
        overlay: dict[str, CallState | None] = {}
        processed = format_rfc3339(now)
        last: int | None = None
        for record in records:
            if record.offset < self.next_offset:
                continue  # fetched before a rebalance re-seeked us; already committed
            last = record.offset
            try:
                event = IngestEnvelope.model_validate_json(record.value or b"")
            except ValidationError as exc:
                # Only our ingest writes this topic, so this is a foreign or corrupt
                # record. It cannot be judged; skip it loudly rather than block the
                # partition forever.
                metrics.PROCESSOR_EVENTS.labels("undecodable", "").inc()
                log.error("undecodable ingest record", offset=record.offset, error=str(exc))
                continue
            call = event.call
            key = call.callId.encode()
            state = overlay[call.callId] if call.callId in overlay else self.states.get(call.callId)
            decision: Decision = decide(state, call, event.eventId, now)
            _event_counter(decision.outcome, decision.reason).inc()
            if decision.outcome is Outcome.DUPLICATE:
                continue
            trace = next((v for k, v in record.headers if k == "traceparent"), None)
            value = encode_outcome(
                event_id=event.eventId,
                call=call,
                previous_status=state.status if state else None,
                previous_revision=state.revision if state else None,
                source=event.source,
                request_type=event.requestType,
                received_at=event.receivedAt,
                processed_at=now,
                reason=decision.reason,
                detail=decision.detail,
            )
            if decision.outcome is Outcome.ACCEPTED:
                assert decision.state is not None
                new = decision.state
                outputs.append(
                    _Output(
                        s.topic_changes,
                        key,
                        value,
                        _headers(event, CE_TYPE_CHANGED, processed, trace),
                    )
                )
                outputs.append(
                    _Output(
                        s.topic_state,
                        key,
                        encode_state(call, new.revision, new.event_id, new.updated_at),
                        [("content-type", b"application/json")],
                        self.partition,
                    )
                )
                overlay[call.callId] = new
                _transition_counter(state.status if state else None, call.status).inc()
            else:
                outputs.append(
                    _Output(
                        s.topic_rejected,
                        key,
                        value,
                        _headers(event, CE_TYPE_REJECTED, processed, trace),
                    )
                )
        return outputs, overlay, None if last is None else last + 1

    def _sweep(self, overlay: dict[str, CallState | None], now: datetime) -> list[_Output]:
        """Tombstones for states past their retention (rule 5), at most every SWEEP_INTERVAL."""
        if self.last_sweep is not None and now - self.last_sweep < SWEEP_INTERVAL:
            return []
        self.last_sweep = now
        merged = {**self.states, **overlay}
        live = ((cid, st) for cid, st in merged.items() if st is not None)
        gone = expired(
            live,
            now,
            timedelta(seconds=self.settings.state_terminal_retention_seconds),
            timedelta(seconds=self.settings.state_idle_retention_seconds),
        )
        for call_id in gone:
            overlay[call_id] = None
        return [
            _Output(self.settings.topic_state, cid.encode(), None, [], self.partition)
            for cid in gone
        ]

    async def process(self, records: list[ConsumerRecord[bytes, bytes]], now: datetime) -> None:
        """Judge a batch and commit its effects in one transaction."""
        outputs, overlay, next_offset = self._judge(records, now)
        outputs += self._sweep(overlay, now)
        if not outputs and next_offset is None:
            return
        started = time.perf_counter()
        producer = self.producer
        sent: list[asyncio.Future[Any]] = []
        await producer.begin_transaction()
        try:
            for out in outputs:
                # send() only enqueues; the commit below flushes and waits for every ack.
                sent.append(
                    await producer.send(
                        out.topic,
                        value=out.value,
                        key=out.key,
                        headers=out.headers,
                        partition=out.partition,
                    )
                )
            if next_offset is not None:
                await producer.send_offsets_to_transaction(
                    {self.tp: next_offset}, self.settings.consumer_group
                )
            commit_started = time.perf_counter()
            await producer.commit_transaction()
        except BaseException:
            # Abort if the producer still can (it cannot once fenced); either way the
            # caller restarts from what Kafka committed, so our memory is not trusted.
            for future in sent:  # their errors are this one; don't log each at GC
                future.add_done_callback(_retrieve)
            await _abort_quietly(producer)
            raise
        metrics.PROCESSOR_COMMIT_SECONDS.observe(time.perf_counter() - commit_started)
        metrics.PROCESSOR_BATCH_SECONDS.observe(time.perf_counter() - started)
        # Committed: only now does memory follow.
        for call_id, state in overlay.items():
            if state is None:
                self.states.pop(call_id, None)
            else:
                self.states[call_id] = state
        if next_offset is not None:
            self.next_offset = next_offset


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

    def __init__(self, settings: Settings, clock: Clock = utc_now) -> None:
        self.settings = settings
        self.clock = clock
        self._options = client_options(settings)
        self._workers: dict[int, PartitionWorker] = {}
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._settled = False
        # aiokafka logs and swallows exceptions raised in rebalance callbacks; we keep
        # the first one here and re-raise it from the main loop, which restarts us.
        self._failure: BaseException | None = None

    def ready(self) -> bool:
        """True once joined and every assigned partition is restored."""
        return self._settled

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; restart from Kafka's committed truth after a failure."""
        backoff = 1.0
        while not self._stopping.is_set():
            try:
                await self._run_once()
                return
            except (KafkaError, OSError, TimeoutError) as exc:
                metrics.PROCESSOR_RESTARTS.labels(type(exc).__name__).inc()
                log.warning("processor restarting", error=repr(exc), backoff_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, 30.0)

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
        consumer.subscribe([s.topic_ingest], listener=self)
        await consumer.start()
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=s.processor_batch_max)
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
                        *(w.process(batches.get(w.tp, []), now) for w in workers),
                        return_exceptions=True,
                    )
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result
                    for worker in workers:
                        self._record_lag(consumer, worker)
                    metrics.PROCESSOR_CALLS.set(sum(len(w.states) for w in workers))
        finally:
            self._settled = False
            async with self._lock:
                await self._drop_workers()
            # Leaving the group lets the others take our partitions at once.
            await consumer.stop()
            self._consumer = None

    def _record_lag(self, consumer: AIOKafkaConsumer, worker: PartitionWorker) -> None:
        high = consumer.highwater(worker.tp)
        if high is not None:
            metrics.PROCESSOR_LAG.labels(str(worker.partition)).set(
                max(0, high - worker.next_offset)
            )

    async def _drop_workers(self) -> None:
        workers, self._workers = self._workers, {}
        for worker in workers.values():
            await worker.producer.stop()

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
            workers: dict[int, PartitionWorker] = {}
            fresh: dict[int, PartitionWorker] = {}
            try:
                for partition, worker in previous.items():
                    if partition in partitions and await self._still_current(consumer, worker):
                        workers[partition] = worker
                    else:
                        await worker.producer.stop()
                for partition in partitions:
                    if partition not in workers:
                        fresh[partition] = await self._open_worker(consumer, partition)
                await self._restore(fresh)
            except Exception as exc:
                # Without workers these partitions would sit idle; fail loudly instead.
                for worker in (*workers.values(), *fresh.values()):
                    await worker.producer.stop()
                self._failure = self._failure or exc
                return
            self._workers = {**workers, **fresh}
            self._settled = True
            log.info("partitions assigned", partitions=partitions, kept=sorted(workers))

    async def _still_current(self, consumer: AIOKafkaConsumer, worker: PartitionWorker) -> bool:
        """Whether a worker we had before this rebalance may go on as it is."""
        return await _seek_committed(consumer, worker.tp) == worker.next_offset

    async def _open_worker(self, consumer: AIOKafkaConsumer, partition: int) -> PartitionWorker:
        s = self.settings
        producer = AIOKafkaProducer(
            **self._options,
            transactional_id=transactional_id(s.consumer_group, s.topic_ingest, partition),
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
        )
        await producer.start()
        try:
            # An empty transaction returns only after InitProducerId: the previous owner
            # is fenced and its open transaction finished, so the offset below is final.
            await producer.begin_transaction()
            await producer.abort_transaction()
        except BaseException:
            await producer.stop()
            raise
        tp = TopicPartition(s.topic_ingest, partition)
        return PartitionWorker(s, partition, producer, await _seek_committed(consumer, tp))

    async def _restore(self, workers: dict[int, PartitionWorker]) -> None:
        """Rebuild each worker's states from its partition of the compacted state topic."""
        if not workers:
            return
        started = time.perf_counter()
        s = self.settings
        reader = AIOKafkaConsumer(
            **self._options,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await reader.start()
        try:
            tps = [TopicPartition(s.topic_state, p) for p in workers]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            loop = asyncio.get_running_loop()
            give_up = loop.time() + RESTORE_DEADLINE_SECONDS
            pending = {tp for tp in tps if ends[tp] > 0}
            while pending:
                if loop.time() > give_up:
                    raise TimeoutError(f"state restore did not finish for {sorted(pending)}")
                batches = await reader.getmany(*pending, timeout_ms=500)
                for tp, records in batches.items():
                    states = workers[tp.partition].states
                    for record in records:
                        call_id = (record.key or b"").decode()
                        if record.value is None:
                            states.pop(call_id, None)
                        else:
                            states[call_id] = _state_from_record(record)
                for tp in list(pending):
                    if await reader.position(tp) >= ends[tp]:
                        pending.discard(tp)
        finally:
            await reader.stop()
        elapsed = time.perf_counter() - started
        metrics.PROCESSOR_RESTORE_SECONDS.observe(elapsed)
        log.info(
            "states restored",
            partitions=sorted(workers),
            calls=sum(len(w.states) for w in workers.values()),
            seconds=round(elapsed, 3),
        )


__all__ = ["PartitionWorker", "Processor", "transactional_id"]
