"""A restore of many call states, measured directly rather than extrapolated: N packed
states (a whole lifecycle's each, as the processor writes them: lz4, one record per call,
spread over the topic's partitions) are written to a compacted state topic, then
``service.restore.restore`` reads them all back, as a processor does on assignment."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from bench.data import call_id
from schemas.call import CallStatus
from service.fsm import MARK_BYTES, CallState
from service.restore import restore
from service.statecodec import pack
from testkit import create_topics

PARTITIONS = 6


async def run(bootstrap: str, calls: int) -> dict[str, float]:
    topic = f"bench-restore-{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, [topic], PARTITIONS, compact=[topic])
    s = CallStatus.COMPLETED
    at = datetime.now(UTC)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, compression_type="lz4", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        pending = []
        for n in range(calls):
            judged = os.urandom(4 * MARK_BYTES)  # four events, each its own mark
            state = CallState(s, 4, at, s, os.urandom(MARK_BYTES), judged)
            key = call_id("restore", n).encode()
            pending.append(await producer.send(topic, pack(state), key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    started = time.perf_counter()
    restored = await restore({"bootstrap_servers": bootstrap}, topic, list(range(PARTITIONS)))
    seconds = time.perf_counter() - started
    count = sum(len(r.states) for r in restored.values())
    if count != calls:
        raise RuntimeError(f"restored {count} of {calls} states")
    return {"calls": calls, "seconds": seconds}
