"""The start-up check of the topics' record limits against a broker that does not know a
just-created topic yet (a stand-in admin client: the race is a moment long on a real
cluster, and the integration tests meet it only by chance)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError

from service.kafka import record_limits_once_known

UNKNOWN = UnknownTopicOrPartitionError.errno


class Admin:
    """Answers DescribeConfigs with "unknown topic" ``unknown`` times, then the limit."""

    def __init__(self, unknown: int) -> None:
        self.unknown = unknown
        self.asked = 0

    async def describe_configs(self, resources: list[Any]) -> list[Any]:
        self.asked += 1
        code = UNKNOWN if self.asked <= self.unknown else 0
        entries = [("max.message.bytes", "2000000", False, 1)]
        return [SimpleNamespace(resources=[(code, None, 2, "t.ingest", entries)])]


async def test_a_topic_unknown_to_the_broker_asked_is_asked_again() -> None:
    admin = Admin(unknown=3)
    limits = await record_limits_once_known(cast(AIOKafkaAdminClient, admin), ["t.ingest"])
    assert limits == {"t.ingest": (2000000, "its max.message.bytes")}
    assert admin.asked == 4


async def test_a_topic_that_stays_unknown_still_fails_the_start() -> None:
    admin = Admin(unknown=10**6)
    with pytest.raises(UnknownTopicOrPartitionError):
        await record_limits_once_known(cast(AIOKafkaAdminClient, admin), ["t.ingest"], 0.3)
    assert admin.asked >= 2
