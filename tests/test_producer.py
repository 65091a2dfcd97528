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
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from service import producer
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


@given(st.binary(max_size=200))
def test_our_murmur2_is_aiokafkas(data: bytes) -> None:
    assert producer.murmur2(data) == murmur2(data)


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_a_key_lands_where_aiokafkas_default_partitioner_puts_it(
    key: bytes, partitions: int
) -> None:
    # A call's events must keep their partition across versions (and the processor's
    # state partition follows the ingest one).
    everything = list(range(partitions))
    expected = DefaultPartitioner()(key, everything, everything)
    assert producer.partition_for(key, everything, everything) == expected


def test_a_call_id_key_lands_where_it_always_did() -> None:
    # Pinned (computed with aiokafka 0.14's own partitioner): the hash may not drift
    # even if the library's did.
    key = b"CA" + b"0123456789abcdef" * 2 + b"01234567"
    assert producer.murmur2(key) == 50342049
    assert producer.partition_for(key, list(range(6)), []) == 3
