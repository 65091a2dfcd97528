"""Which kind of Kafka error is which: the one classification every writer uses.

Two questions, each a named predicate, asked by the ingest producer
(:mod:`service.producer`), the spool drainer (:mod:`service.drainer`) and the
processor's transactional shell (:mod:`service.worker`):

* :func:`is_refused_for_good`: Kafka will never take this record, whoever sends it and
  however often. The processor answers such an output with an ``unwritable`` rejection;
  ingest refuses such an event instead of spooling it; the spool drainer moves such a
  record to its dead-letter directory, so that one record never blocks those behind it.
* :func:`is_fatal`: the producer that raised it is finished (its sequence numbers or its
  identity are worthless) and must be replaced; anything else it will manage itself.

Plus :func:`retrieve`, for a delivery future whose error nobody will read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    InvalidTimestampError,
    InvalidTxnState,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    PolicyViolationError,
    ProducerClosed,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownProducerId,
)

# Kafka will never take the record: too large for the topic or the request, a timestamp
# or a policy it refuses. A tuple, for ``except`` clauses; elsewhere ask the predicate.
REFUSED_FOR_GOOD: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    InvalidTimestampError,
    PolicyViolationError,
)

# Errors after which this producer's sequence numbers or identity are worthless.
FATAL: tuple[type[BaseException], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    InvalidTxnState,
    ProducerFenced,
    ProducerClosed,
)
# Not the producer's fault: one record refused (another producer would be refused too),
# or send() waiting too long for room in a full buffer (the ingest producer's watchdog
# judges the sends). A record the *broker* refused does leave this producer's sequence
# numbers one batch ahead of the partition's (every later send there fails
# OutOfOrderSequenceNumber), so after one the ingest producer is retired all the same
# (``IngestProducer._refused``).
NOT_FATAL: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    KafkaTimeoutError,
)


def is_refused_for_good(exc: BaseException | None) -> bool:
    """Whether Kafka refuses the record ``exc`` answers for good (no retry, no other
    producer, no spool can ever deliver it)."""
    return isinstance(exc, REFUSED_FOR_GOOD)


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` from a send means the producer that raised it is finished."""
    if isinstance(exc, FATAL):
        return True
    if isinstance(exc, NOT_FATAL):
        return False
    return isinstance(exc, KafkaError) and not exc.retriable


def retrieve(future: asyncio.Future[Any]) -> None:
    """A done-callback for a delivery future whose outcome no one awaits any more: reads
    its error, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
