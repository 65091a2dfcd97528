"""Rebuild partitions' call states from the compacted state topic (docs/architecture.md,
section 4): read each state partition from its start to its end, read_committed, latest
record per call wins, a tombstone deletes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from service import metrics
from service.backoff import Deadline
from service.statecodec import BadState, load, peek

log = structlog.get_logger(logger_name="callstatus.restore")

RESTORE_DEADLINE_SECONDS = 300.0
# How long the restore waits for a transaction left unfinished on a state partition
# (_stable_ends) before it gives up: the processor then restarts and waits again.
STABLE_DEADLINE_SECONDS = 120.0


class CorruptState(Exception):
    """A state-topic record is not a call state. Restoring around it could re-accept
    old events for that call, so the processor stops and says how to repair it."""


@dataclass(slots=True)
class Restored:
    states: dict[str, bytes] = field(default_factory=dict)  # packed (statecodec)
    end: int = 0  # the state partition's end offset (read_committed) when read

    @property
    def watermark(self) -> datetime | None:
        """A lower bound of the partition's watermark before the restart: the event
        time of the newest state. The next event moves it on."""
        return max((peek(packed)[1] for packed in self.states.values()), default=None)


def state_from_record(record: ConsumerRecord[bytes, bytes]) -> bytes:
    """The record's state, packed; its value is kept as it is unless it was written in
    an older layout (statecodec.load)."""
    try:
        return load(record.value or b"")
    except BadState as exc:
        raise CorruptState(
            f"record {record.topic}/{record.partition}@{record.offset} (key {record.key!r}) "
            f"is not a call state ({exc}); write a tombstone for that key to drop it, and "
            "the call's next event starts it afresh"
        ) from None


async def restore(
    options: dict[str, Any], topic: str, partitions: list[int]
) -> dict[int, Restored]:
    """The states of ``partitions`` of the state ``topic``, with each one's end offset.

    Call only after fencing the partitions' transactional ids: a zombie's open
    transaction is then finished, so what read_committed shows here is final."""
    out = {p: Restored() for p in partitions}
    if not partitions:
        return out
    started = time.perf_counter()
    reader = AIOKafkaConsumer(**options, enable_auto_commit=False, isolation_level="read_committed")
    try:
        await reader.start()  # inside: a failed start must close the reader too
        tps = [TopicPartition(topic, p) for p in partitions]
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await _stable_ends(options, reader, tps, Deadline(STABLE_DEADLINE_SECONDS))
        for tp in tps:
            out[tp.partition].end = ends[tp]
        deadline = Deadline(RESTORE_DEADLINE_SECONDS)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            if deadline.expired:
                raise TimeoutError(f"state restore did not finish for {sorted(pending)}")
            batches = await reader.getmany(*pending, timeout_ms=500)
            for tp, records in batches.items():
                states = out[tp.partition].states
                for record in records:
                    call_id = (record.key or b"").decode()
                    if record.value is None:
                        states.pop(call_id, None)
                    else:
                        states[call_id] = state_from_record(record)
            for tp in list(pending):
                if await reader.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await reader.stop()
    elapsed = time.perf_counter() - started
    metrics.PROCESSOR_RESTORE_SECONDS.observe(elapsed)
    log.info(
        "states restored",
        partitions=partitions,
        calls=sum(len(r.states) for r in out.values()),
        seconds=round(elapsed, 3),
    )
    return out


async def _stable_ends(
    options: dict[str, Any],
    reader: AIOKafkaConsumer,
    tps: list[TopicPartition],
    deadline: Deadline,
) -> dict[TopicPartition, int]:
    """The partitions' ends once no transaction is left unfinished on them: their last
    stable offset (where read_committed stops) equal to their high watermark.

    Fencing should have finished every transaction already (its InitProducerId returns
    only then), so this normally costs one look. It is checked, not assumed: a
    transaction whose commit is still landing would be read as absent, its states
    missed here while its changes become visible a moment later, and the events it
    judged judged again: their changes published twice. (Seen once: docs/architecture.md,
    "Fencing".) Only a fenced partition's own producer writes its state partition, so
    the wait ends when its coordinator finishes the transaction."""
    probe = AIOKafkaConsumer(**options, enable_auto_commit=False)  # read_uncommitted
    try:
        await probe.start()
        waited_on: list[int] = []
        while True:
            stable = await reader.end_offsets(tps)
            written = await probe.end_offsets(tps)
            unfinished = sorted(tp.partition for tp in tps if stable[tp] < written[tp])
            if not unfinished:
                if waited_on:
                    log.warning("state partitions finished their transaction", partitions=waited_on)
                return dict(stable)
            if deadline.expired:
                # Another transactional id's transaction (its timeout can be up to 15
                # minutes), or one the broker left hanging: an operator can find and
                # abort it with kafka-transactions.sh find-hanging / abort.
                raise TimeoutError(
                    f"a transaction stays unfinished on state partitions {unfinished} of "
                    f"{tps[0].topic}; kafka-transactions.sh find-hanging lists it"
                )
            if not waited_on:
                log.warning(
                    "state partitions hold an unfinished transaction; waiting",
                    partitions=unfinished,
                )
                waited_on = unfinished
            await asyncio.sleep(0.1)  # polling interval: its coordinator is finishing it
    finally:
        await probe.stop()


__all__ = ["CorruptState", "Restored", "restore", "state_from_record"]
