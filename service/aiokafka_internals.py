"""Every use of aiokafka's private attributes, each behind one named function.

aiokafka offers no public way to stop a producer from sending without flushing it, to
drop what it still buffers, or to learn why its sender task died; the service needs all
three (:mod:`service.producer` retires a producer the broker refuses; :mod:`service.worker`
reports why a transaction failed). Nor a way to add a record without ``send()``'s three
coroutines, which every ingest request paid (:func:`append_now`). Nothing else in the
service touches a private name of aiokafka's, so a new aiokafka can break only this
module, and
``tests/test_aiokafka_internals.py`` says so loudly, naming the attribute that changed.
pyproject.toml bounds aiokafka to the versions that test passed on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from service.kafkaerrors import retrieve


async def stop_sender(producer: AIOKafkaProducer) -> None:
    """Stop ``producer``'s sender task (cancel it and wait for it), so nothing more of
    it goes on the wire, without the flush its ``stop()`` would wait for first. Raises
    the sender's own failure if it had one."""
    await producer._sender.close()


def fail_buffered(producer: AIOKafkaProducer, exc: BaseException) -> None:
    """Fail every batch ``producer`` still buffers with ``exc``: their delivery futures
    end now, and the records are never sent. The futures nobody may be waiting on are
    marked read, or asyncio would log each as an unretrieved error when it is collected
    (lines at every producer retirement): a batch's drain waiter, which aiokafka fails
    for a batch never sent, and the batch's own future, which :func:`append_now` hands
    out and whose request may have stopped waiting."""
    accumulator = producer._message_accumulator
    unsent = [b for batches in accumulator._batches.values() for b in batches]
    for batch in (*unsent, *accumulator._pending_batches):
        batch.future.add_done_callback(retrieve)
        batch._drain_waiter.add_done_callback(retrieve)
    accumulator.fail_all(exc)


def sender_failure(producer: AIOKafkaProducer) -> BaseException | None:
    """The error that ended the producer's sender task, if it ended with one. Never
    raises, even on an aiokafka without these attributes: it is asked while another
    error is being handled, which must not be masked."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if task is None or not task.done() or task.cancelled():
        return None
    exc: BaseException | None = task.exception()
    return exc


def append_now(
    producer: AIOKafkaProducer,
    topic: str,
    key: bytes,
    value: bytes,
    headers: Sequence[tuple[str, bytes]],
    partitioner: Callable[[bytes, list[int], list[int]], int],
) -> asyncio.Future[Any] | None:
    """Add a record to ``producer``'s buffer the way ``send()`` does when it has no
    reason to wait, and return its batch's delivery future (which ends as the record's
    would: one ack or one failure for the whole batch); or None, adding nothing, when
    ``send()`` would wait or raise (no metadata for the topic yet, a transaction, a
    closed or failed buffer, a full batch): the caller then calls ``send()``, which
    does all of that as it always did.

    ``partitioner`` must be the one ``producer`` was built with (it picks the partition
    ``send()`` would), and the caller checks the record's size against
    ``max_request_size``, as ``send()`` would. The record goes to the partition's last
    batch, or to a new batch when it has none, as in ``send()``: same batches, same
    order, same acknowledgement. What it saves is ``send()``'s coroutines
    (``send``, ``_wait_on_metadata``, ``add_message``) and its lists of partitions.

    Never raises for want of an attribute: a producer without these internals (a test's
    stand-in, an aiokafka that moved them) is simply left to ``send()``, and
    ``tests/test_aiokafka_internals.py`` names whatever moved."""
    try:
        partitions = producer.client.cluster.partitions_for_topic(topic)
        txn = producer._txn_manager
        accumulator = producer._message_accumulator
        if (
            not partitions
            or (txn is not None and txn.transactional_id is not None)
            or accumulator._closed
            or accumulator._exception is not None
        ):
            return None
        tp = TopicPartition(topic, partitioner(key, list(partitions), []))
        pending = accumulator._batches.get(tp)
        if pending:
            batch = pending[-1]
        else:
            batch = accumulator._append_batch(accumulator.create_builder(), tp)
    except AttributeError:
        return None
    # The C record builder takes headers as a list only (a tuple raises TypeError).
    if not isinstance(headers, list):
        headers = list(headers)
    # Into the batch's builder, as MessageBatch.append does, but without its future per
    # record: the batch's own delivery future ends with the same ack or the same failure
    # at the same moment (done() and failure() set it first), and one future shared by
    # the batch's requests spares each a future and, at the ack, a RecordMetadata.
    if batch._builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
        return None  # the batch is full: send() then waits for it to drain, as it must
    future: asyncio.Future[Any] = batch.future
    return future
