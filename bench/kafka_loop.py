"""The Kafka floor for one Python process: 64 concurrent ``send_and_wait`` loops with
acks=all and idempotence, the values the size of an ingest record. No HTTP at all."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer

from bench.data import call_id, webhook_body
from schemas.call import CallStatus

CONCURRENCY = 64


async def send_loop(bootstrap: str, topic: str, seconds: float) -> float:
    """Acknowledged messages per second over ``seconds``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    # An ingest record is the body plus ~250 bytes of envelope and parsed call.
    value = webhook_body(call_id("loop", 0), CallStatus.QUEUED, 0) * 2
    try:
        await producer.send_and_wait(topic, value, key=b"warm-up")  # metadata, producer id
        sent = 0
        deadline = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            nonlocal sent
            key = call_id("loop", n).encode()
            while time.perf_counter() < deadline:
                await producer.send_and_wait(topic, value, key=key)
                sent += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
        return sent / (time.perf_counter() - started)
    finally:
        await producer.stop()
