"""Which errors finish an ingest producer (pure classification, no broker)."""

from __future__ import annotations

import pytest
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownProducerId,
)

from service.producer import is_fatal


@pytest.mark.parametrize(
    "error",
    [
        OutOfOrderSequenceNumber(),
        UnknownProducerId(),
        InvalidProducerEpoch(),
        ProducerFenced(),
        TopicAuthorizationFailedError(),  # non-retriable: another producer may do better
    ],
)
def test_sequence_identity_and_other_permanent_errors_finish_the_producer(
    error: KafkaError,
) -> None:
    assert is_fatal(error)


@pytest.mark.parametrize(
    "error",
    [
        KafkaConnectionError(),
        KafkaTimeoutError(),
        NotLeaderForPartitionError(),
        # One record refused: a new producer would be refused the same.
        MessageSizeTooLargeError(),
        RecordTooLargeError(),
    ],
)
def test_transient_and_per_record_errors_keep_the_producer(error: KafkaError) -> None:
    assert not is_fatal(error)
