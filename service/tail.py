"""``callstatus tail``: follow the committed changes and rejections, one line each."""

from __future__ import annotations

import sys

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.messages import ChangeMessage, RejectedMessage
from service.kafka import client_options, partition_counts
from service.settings import Settings


def render(topic_is_rejected: bool, value: bytes) -> str:
    """One readable line for a changes or rejected message."""
    if topic_is_rejected:
        r = RejectedMessage.model_validate_json(value)
        return (
            f"{r.processedAt:%H:%M:%S} REJECTED {r.callId} {r.previousStatus} -> {r.status} "
            f"{r.reason.value}: {r.detail}"
        )
    c = ChangeMessage.model_validate_json(value)
    rev = f" rev {c.revision}" if c.revision is not None else ""
    before = c.previousStatus.value if c.previousStatus else "(new)"
    return f"{c.processedAt:%H:%M:%S} CHANGED  {c.callId} {before} -> {c.status.value}{rev}"


async def tail(
    settings: Settings,
    *,
    as_json: bool,
    from_beginning: bool,
    max_messages: int | None,
    idle_timeout: float | None,
) -> int:
    options = client_options(settings)
    consumer = AIOKafkaConsumer(
        **options,
        isolation_level="read_committed",  # never show a change that was rolled back
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        topics = [settings.topic_changes, settings.topic_rejected]
        counts = await partition_counts(options, topics)
        tps = [TopicPartition(topic, p) for topic in topics for p in range(counts.get(topic, 0))]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        seen = 0
        loop_idle = 0.0
        while max_messages is None or seen < max_messages:
            batches = await consumer.getmany(timeout_ms=500)
            if not batches:
                loop_idle += 0.5
                if idle_timeout is not None and loop_idle >= idle_timeout:
                    break
                continue
            loop_idle = 0.0
            records = [r for batch in batches.values() for r in batch]
            if max_messages is not None:
                records = records[: max_messages - seen]
            for record in records:
                value = record.value or b""
                rejected = record.topic == settings.topic_rejected
                print(value.decode() if as_json else render(rejected, value), flush=True)
            seen += len(records)
    finally:
        await consumer.stop()
    sys.stdout.flush()
    return 0
