"""The processor rides through a broker restart: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from service.kafka import ensure_topics
from service.processor import Processor
from testkit import (
    by_call,
    expected_outcomes,
    kafka,
    private_broker,
    produce,
    read_committed,
    settings_for,
)
from tests.integration.test_processor import scenario


@pytest.fixture
async def own_broker() -> AsyncIterator[dict[str, str]]:
    async with private_broker(19292) as broker:
        yield broker


async def test_processor_survives_a_broker_restart(own_broker: dict[str, str], unique: str) -> None:
    bootstrap = own_broker["address"]
    settings = settings_for(bootstrap, unique, topic_partitions=3, processor_batch_max=20)
    await ensure_topics(settings)
    events = scenario(random.Random(5), calls=90)
    before, during, after = events[:120], events[120:200], events[200:]

    processor = Processor(settings)
    task = asyncio.create_task(processor.run())
    try:
        await produce(bootstrap, settings.topic_ingest, before)
        await read_committed(bootstrap, settings.topic_changes, 1, settle_s=0)
        # Stop the broker while the processor is busy with the next events.
        await produce(bootstrap, settings.topic_ingest, during)
        await asyncio.to_thread(kafka, "down", own_broker)
        await asyncio.to_thread(kafka, "up", own_broker)
        await produce(bootstrap, settings.topic_ingest, after)

        expected = expected_outcomes(events)
        n_changes = sum(map(len, expected.changes.values()))
        n_rejected = sum(map(len, expected.rejected.values()))
        changes = await read_committed(bootstrap, settings.topic_changes, n_changes, 240, 3)
        rejected = await read_committed(bootstrap, settings.topic_rejected, n_rejected, 60, 1)
    finally:
        await processor.stop()
        await asyncio.wait_for(task, 90)
    assert by_call(changes) == expected.changes
    assert by_call(rejected) == {c: [e for e, _ in r] for c, r in expected.rejected.items()}
