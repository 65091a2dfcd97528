"""The service against a broker that demands SASL credentials: ingest and processor
both connect with the configured security settings, and refuse to work without them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from service.app import create_app
from service.kafka import client_options, ensure_topics
from service.processor import Processor
from service.producer import IngestProducer
from service.settings import Settings
from testkit import private_broker, settings_for

USER, PASSWORD = "callstatus", "s3cret-pw"
BODY = b'{"requestType":"callStatus","callId":"CA' + b"9" * 40 + b'","callStatus":"queued"}'


@pytest.fixture
async def sasl_settings(unique: str) -> AsyncIterator[Settings]:
    # aiokafka warns about PLAIN without TLS on every connection; expected on loopback.
    logging.getLogger("aiokafka.conn").setLevel(logging.ERROR)
    async with private_broker(19692, KAFKA_SASL_PLAIN=f"{USER}:{PASSWORD}") as broker:
        yield settings_for(
            broker["address"],
            unique,
            role="all",
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_username=USER,
            kafka_sasl_password=PASSWORD,
        )


async def test_ingest_and_processor_work_with_sasl(sasl_settings: Settings) -> None:
    settings = sasl_settings
    await ensure_topics(settings)
    producer = IngestProducer(settings)
    await producer.start()
    processor = Processor(settings)
    task = asyncio.create_task(processor.run())
    try:
        app = create_app(settings, producer)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            response = await c.post(
                "/v1/call-status", content=BODY, headers={"content-type": "application/json"}
            )
        assert response.status_code == 202
        event_id = response.json()["eventId"]

        consumer = AIOKafkaConsumer(
            **client_options(settings), isolation_level="read_committed", enable_auto_commit=False
        )
        await consumer.start()
        try:
            tps = [
                TopicPartition(settings.topic_changes, p) for p in range(settings.topic_partitions)
            ]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 60
            seen: list[str] = []
            while not seen:
                assert loop.time() < give_up, "no change arrived over SASL"
                for records in (await consumer.getmany(timeout_ms=250)).values():
                    seen += [json.loads(r.value or b"")["eventId"] for r in records]
        finally:
            await consumer.stop()
        assert seen == [event_id]
    finally:
        await processor.stop()
        await asyncio.wait_for(task, 60)
        await producer.stop()


async def test_without_credentials_the_broker_refuses(sasl_settings: Settings) -> None:
    plain = Settings.model_validate(
        {
            **sasl_settings.model_dump(),
            "kafka_security_protocol": "PLAINTEXT",
            "kafka_sasl_username": None,
            "kafka_sasl_password": None,
        }
    )
    with pytest.raises(KafkaError):
        await ensure_topics(plain)
