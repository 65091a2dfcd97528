"""Every use of aiokafka's private attributes, each behind one named function.

aiokafka offers no public way to stop a producer from sending without flushing it, to
drop what it still buffers, or to learn why its sender task died; the service needs all
three (:mod:`service.producer` retires a producer the broker refuses; :mod:`service.worker`
reports why a transaction failed). Nothing else in the service touches a private name of
aiokafka's, so a new aiokafka can break only this module, and
``tests/test_aiokafka_internals.py`` says so loudly, naming the attribute that changed.
pyproject.toml bounds aiokafka to the versions that test passed on.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer


async def stop_sender(producer: AIOKafkaProducer) -> None:
    """Stop ``producer``'s sender task (cancel it and wait for it), so nothing more of
    it goes on the wire, without the flush its ``stop()`` would wait for first. Raises
    the sender's own failure if it had one."""
    await producer._sender.close()


def fail_buffered(producer: AIOKafkaProducer, exc: BaseException) -> None:
    """Fail every batch ``producer`` still buffers with ``exc``: their delivery futures
    end now, and the records are never sent."""
    producer._message_accumulator.fail_all(exc)


def sender_failure(producer: AIOKafkaProducer) -> BaseException | None:
    """The error that ended the producer's sender task, if it ended with one. Never
    raises, even on an aiokafka without these attributes: it is asked while another
    error is being handled, which must not be masked."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if task is None or not task.done() or task.cancelled():
        return None
    exc: BaseException | None = task.exception()
    return exc
