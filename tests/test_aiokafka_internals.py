"""The aiokafka internals the service relies on (service/aiokafka_internals.py) are
still there and still behave so, on the aiokafka installed: a new aiokafka that moved
them fails here, by name, instead of in production. No broker needed."""

from __future__ import annotations

import asyncio
import gc
import tomllib
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerClosed, ProducerFenced
from packaging.requirements import Requirement

from service import aiokafka_internals
from service.partitioner import partition_for

ROOT = Path(__file__).resolve().parents[1]
AIOKAFKA = version("aiokafka")
CHANGED = (
    f"aiokafka {AIOKAFKA} changed an internal that service/aiokafka_internals.py relies "
    "on: adapt that module (and only it), then move pyproject.toml's bound on aiokafka"
)


@pytest.fixture
async def producer() -> AsyncIterator[AIOKafkaProducer]:
    # Never started: nothing here may need a broker. Port 1 answers no one.
    made = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    try:
        yield made
    finally:
        await made.stop()


def test_the_installed_aiokafka_is_in_the_range_pyproject_allows() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [spec] = [
        Requirement(d)
        for d in pyproject["project"]["dependencies"]
        if Requirement(d).name == "aiokafka"
    ]
    assert spec.specifier, "pyproject.toml must bound aiokafka to the tested range"
    assert AIOKAFKA in spec.specifier, (
        f"aiokafka {AIOKAFKA} is installed but pyproject.toml allows {spec.specifier}: the "
        "internals in service/aiokafka_internals.py were checked only in that range"
    )


def _require(obj: object, path: str) -> object:
    for name in path.split("."):
        assert hasattr(obj, name), f"{CHANGED}: no {name!r} on {type(obj).__name__} ({path})"
        obj = getattr(obj, name)
    return obj


def test_a_producer_has_the_sender_and_the_accumulator_we_reach_into(
    producer: AIOKafkaProducer,
) -> None:
    assert asyncio.iscoroutinefunction(_require(producer, "_sender.close")), CHANGED
    _require(producer, "_sender.sender_task")
    assert callable(_require(producer, "_message_accumulator.fail_all")), CHANGED
    _require(producer, "_message_accumulator._pending_batches")


async def test_stop_sender_ends_a_running_sender_task(producer: AIOKafkaProducer) -> None:
    # The sender alone (the producer's start() would bootstrap against a broker).
    await producer._sender.start()
    task = producer._sender.sender_task
    assert isinstance(task, asyncio.Task) and not task.done(), CHANGED
    await asyncio.wait_for(aiokafka_internals.stop_sender(producer), 5)
    assert task.done(), f"{CHANGED}: stop_sender left the sender task running"
    assert aiokafka_internals.sender_failure(producer) is None


async def test_fail_buffered_fails_every_buffered_send_and_nothing_is_sent_later(
    producer: AIOKafkaProducer,
) -> None:
    accumulator = producer._message_accumulator
    tp = TopicPartition("t", 0)
    futures = [await accumulator.add_message(tp, b"k", b"v", timeout=1) for _ in range(3)]
    batches = [batch.future for batch in accumulator._batches[tp]]
    assert not any(f.done() for f in futures)
    aiokafka_internals.fail_buffered(producer, ProducerClosed())
    for future in futures + batches:  # each read, so none is logged as unretrieved
        assert future.done(), f"{CHANGED}: fail_buffered left a send pending"
        assert isinstance(future.exception(), ProducerClosed), CHANGED


async def test_fail_buffered_leaves_no_batch_future_to_be_logged_unretrieved(
    producer: AIOKafkaProducer, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch filled by send() has nobody waiting on its own future: failed and then
    collected, asyncio would log it as "never retrieved" (a line per batch each time a
    producer is retired)."""
    accumulator = producer._message_accumulator
    tp = TopicPartition("t", 0)
    sent = await accumulator.add_message(tp, b"k", b"v", timeout=1)
    aiokafka_internals.fail_buffered(producer, ProducerClosed())
    assert isinstance(sent.exception(), ProducerClosed)  # the caller reads its own
    await asyncio.sleep(0)  # one loop pass: the done-callbacks scheduled above run
    accumulator._batches.clear()
    del sent
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_sender_failure_is_the_error_that_ended_the_sender_task(
    producer: AIOKafkaProducer,
) -> None:
    assert aiokafka_internals.sender_failure(producer) is None  # never started

    async def fenced() -> None:
        raise ProducerFenced()

    died = asyncio.ensure_future(fenced())
    await asyncio.wait((died,))
    producer._sender._sender_task = died  # what Sender.start() sets
    assert producer._sender.sender_task is died, f"{CHANGED}: sender_task is not the task"
    assert isinstance(aiokafka_internals.sender_failure(producer), ProducerFenced), CHANGED


def _with_partitions(producer: AIOKafkaProducer, topic: str, partitions: set[int]) -> None:
    # The metadata a started producer would have fetched for the topic.
    cluster = producer.client.cluster
    known = cluster.partitions_for_topic
    cluster.partitions_for_topic = lambda t: partitions if t == topic else known(t)


async def test_append_now_buffers_a_record_where_send_would(producer: AIOKafkaProducer) -> None:
    for path in ("client.cluster.partitions_for_topic", "_txn_manager", "_message_accumulator"):
        _require(producer, path)
    for name in ("_closed", "_exception", "_batches", "_append_batch", "create_builder"):
        _require(producer._message_accumulator, name)
    key = b"CA" + b"0123456789abcdef" * 2 + b"01234567"
    headers = [("ce_id", b"e-1")]
    # No metadata for the topic yet: left to send(), which waits for it.
    assert aiokafka_internals.append_now(producer, "t", key, b"v", headers, partition_for) is None
    _with_partitions(producer, "t", set(range(6)))
    first = aiokafka_internals.append_now(producer, "t", key, b"v1", headers, partition_for)
    second = aiokafka_internals.append_now(producer, "t", key, b"v2", headers, partition_for)
    assert first is not None and second is not None, CHANGED
    accumulator = producer._message_accumulator
    # Both get their batch's delivery future: one ack or one failure ends them together.
    [[batch]] = accumulator._batches.values()
    _require(batch, "_builder")
    assert first is second is batch.future, CHANGED
    # The partition send() picks for the key (test_producer pins it: 3), one batch for both.
    [(tp, batches)] = accumulator._batches.items()
    assert (
        tp == TopicPartition("t", partition_for(key, list(range(6)), [])) == TopicPartition("t", 3)
    )
    assert [batch.record_count for batch in batches] == [2], CHANGED
    assert not first.done() and not second.done()
    aiokafka_internals.fail_buffered(producer, ProducerClosed())
    for future in (first, second, batches[0].future):
        assert isinstance(future.exception(), ProducerClosed), CHANGED
    # A failed (or closed) buffer is left to send(), which raises its error.
    assert aiokafka_internals.append_now(producer, "t", key, b"v", headers, partition_for) is None


async def test_append_now_leaves_a_full_batch_to_send(producer: AIOKafkaProducer) -> None:
    _with_partitions(producer, "t", {0})
    big = b"x" * 10_000  # the default batch holds 16 KiB: the second one does not fit
    first = aiokafka_internals.append_now(producer, "t", b"k", big, [], partition_for)
    assert first is not None
    assert aiokafka_internals.append_now(producer, "t", b"k", big, [], partition_for) is None
    aiokafka_internals.fail_buffered(producer, ProducerClosed())
    assert isinstance(first.exception(), ProducerClosed)
