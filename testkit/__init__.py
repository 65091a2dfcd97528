"""The test-only kit shared by tests/ and bench/: private brokers and clusters
(launcher.py), ingest events in and committed outputs out (records.py), and
``callstatus serve`` as a child process (process.py). Not part of the runtime image.

The pieces ``callstatus simulate`` ships with live in the service package instead:
the traffic (service/traffic.py), the oracle (service/oracle.py) and the percentile
(service/stats.py).
"""

from testkit.launcher import (
    LAUNCHER,
    ROOT,
    Cluster,
    PartitionState,
    kafka,
    kafka_cluster,
    private_broker,
    private_cluster,
)
from testkit.process import (
    ServiceProcess,
    environment,
    free_port,
    settings_env,
    settings_for,
)
from testkit.records import (
    Event,
    Expected,
    by_call,
    create_topics,
    expected_outcomes,
    make_call,
    partitions_of,
    produce,
    read_committed,
    traceparent,
)

__all__ = [
    "LAUNCHER",
    "ROOT",
    "Cluster",
    "Event",
    "Expected",
    "PartitionState",
    "ServiceProcess",
    "by_call",
    "create_topics",
    "environment",
    "expected_outcomes",
    "free_port",
    "kafka",
    "kafka_cluster",
    "make_call",
    "partitions_of",
    "private_broker",
    "private_cluster",
    "produce",
    "read_committed",
    "settings_env",
    "settings_for",
    "traceparent",
]
