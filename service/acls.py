"""Who may do what on Kafka: each principal of the service and its ACLs, defined once.

Two places grant them, both rendered from :func:`principals`:

- the prod overlay's Strimzi ``KafkaUser`` resources
  (``deploy/k8s/overlays/prod/kafkausers.yaml``, written by ``python -m service.acls``;
  ``tests/test_deploy.py`` fails when the file and this module disagree), and
- the local launcher's authorizer mode (``deploy/local/kafka acl ...`` with the argument
  lists of :func:`acl_command_args`), which ``tests/integration/test_acls.py`` runs the
  service against.

Least privilege, derived from what each stage's code does (README "Security"):

- ingest writes the ingest topic with an idempotent producer. Since Kafka 3.0 (KIP-679)
  Write on a topic is enough for that; no cluster-wide IdempotentWrite. It also reads
  its own topic, once, after an unclean stop mid-drain: which of the spool's head Kafka
  has already (service/drainer.py ``_already_in_kafka``); without Read that
  check fails for ever and the spool never drains. It reads nothing it did not write.
- the processor reads ingest in its consumer group, restores from and writes the state
  topic, writes changes and rejected, all in transactions whose ids start with
  ``<consumer_group>.`` (service/worker.py ``transactional_id``).
- the example ``consumer`` reads changes and rejected, in groups named with its prefix.

Every stage's start (service/kafka.py ``ensure_topics``) reads the partition counts
(Describe) and ``max.message.bytes`` (DescribeConfigs) of the topics it uses; with
``CALLSTATUS_CREATE_TOPICS=false``, as in prod, no one needs Create.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from service.settings import Role, Settings

# The Kafka user names (KafkaUser names in prod: Strimzi makes each one's Secret under
# the same name).
INGEST_USER = "callstatus-ingest"
PROCESSOR_USER = "callstatus-processor"
CONSUMER_USER = "callstatus-consumer"
# The example consumer may use any consumer group whose id starts with this.
CONSUMER_GROUP_PREFIX = "callstatus-consumer"
# The Strimzi Kafka cluster the users belong to (as the KafkaTopics' label).
STRIMZI_CLUSTER = "my-cluster"


class Resource(StrEnum):
    """Resource types, spelt as Strimzi's ``KafkaUser`` spells them."""

    TOPIC = "topic"
    GROUP = "group"
    TRANSACTIONAL_ID = "transactionalId"


class Pattern(StrEnum):
    """How a resource name matches, spelt as Strimzi spells it."""

    LITERAL = "literal"
    PREFIX = "prefix"


@dataclass(frozen=True, slots=True)
class Acl:
    """Allow ``operations`` (Kafka's names, e.g. ``DescribeConfigs``) on one resource."""

    resource: Resource
    name: str
    operations: tuple[str, ...]
    pattern: Pattern = Pattern.LITERAL


def principals(settings: Settings) -> dict[str, tuple[Acl, ...]]:
    """Each user and everything it is allowed, for these topic names and group."""
    s = settings
    # Partition counts and max.message.bytes, read by every stage's start checks.
    inspect = ("Describe", "DescribeConfigs")
    return {
        # Read: the spool's check after an unclean stop (module docstring).
        INGEST_USER: (Acl(Resource.TOPIC, s.topic_ingest, ("Write", "Read", *inspect)),),
        PROCESSOR_USER: (
            Acl(Resource.TOPIC, s.topic_ingest, ("Read", *inspect)),
            Acl(Resource.TOPIC, s.topic_changes, ("Write", *inspect)),
            Acl(Resource.TOPIC, s.topic_rejected, ("Write", *inspect)),
            # Read: the restore on every partition assignment.
            Acl(Resource.TOPIC, s.topic_state, ("Read", "Write", *inspect)),
            # Its one group, literally: the consumer's offsets, committed inside each
            # transaction (which is why the transaction needs Read on the group too).
            Acl(Resource.GROUP, s.consumer_group, ("Read",)),
            # One transactional id per ingest partition, all under this prefix.
            Acl(
                Resource.TRANSACTIONAL_ID,
                f"{s.consumer_group}.",
                ("Write", "Describe"),
                Pattern.PREFIX,
            ),
        ),
        CONSUMER_USER: (
            Acl(Resource.TOPIC, s.topic_changes, ("Read", "Describe")),
            Acl(Resource.TOPIC, s.topic_rejected, ("Read", "Describe")),
            Acl(Resource.GROUP, CONSUMER_GROUP_PREFIX, ("Read",), Pattern.PREFIX),
        ),
    }


def user_for(role: Role) -> str:
    """The user a workload of this role logs in as. ``all`` (dev) has none of its own:
    one process running both stages would need both users' ACLs."""
    if role is Role.INGEST:
        return INGEST_USER
    if role is Role.PROCESSOR:
        return PROCESSOR_USER
    raise ValueError("role all runs both stages; give it ingest's and the processor's ACLs")


def acl_command_args(user: str, acl: Acl) -> list[str]:
    """The arguments of Kafka's ACL tool (``kafka-acls``, ``deploy/local/kafka acl``)
    that grant ``acl`` to ``user``."""
    option = {
        Resource.TOPIC: "--topic",
        Resource.GROUP: "--group",
        Resource.TRANSACTIONAL_ID: "--transactional-id",
    }[acl.resource]
    pattern = {Pattern.LITERAL: "literal", Pattern.PREFIX: "prefixed"}[acl.pattern]
    operations = [arg for op in acl.operations for arg in ("--operation", op)]
    return [
        "--add",
        "--allow-principal",
        f"User:{user}",
        *operations,
        option,
        acl.name,
        "--resource-pattern-type",
        pattern,
    ]


def kafka_users(settings: Settings, cluster: str = STRIMZI_CLUSTER) -> list[dict[str, Any]]:
    """One Strimzi ``KafkaUser`` per principal: SCRAM-SHA-512, exactly its ACLs."""
    return [
        {
            "apiVersion": "kafka.strimzi.io/v1beta2",
            "kind": "KafkaUser",
            "metadata": {"name": user, "labels": {"strimzi.io/cluster": cluster}},
            "spec": {
                "authentication": {"type": "scram-sha-512"},
                "authorization": {
                    "type": "simple",
                    "acls": [
                        {
                            "resource": {
                                "type": str(acl.resource),
                                "name": acl.name,
                                "patternType": str(acl.pattern),
                            },
                            "operations": list(acl.operations),
                            "host": "*",
                        }
                        for acl in acls
                    ],
                },
            },
        }
        for user, acls in principals(settings).items()
    ]


HEADER = """\
# GENERATED by `python -m service.acls` from service/acls.py, the one definition of who
# may do what on Kafka (the local authorizer tests apply the same list). Do not edit:
# change service/acls.py and regenerate; tests/test_deploy.py fails while they differ.
#
# One Strimzi KafkaUser per principal (SCRAM-SHA-512, simple authorization). The User
# Operator creates a Secret of the same name holding its `password`; the workloads mount
# it (deploy/README.md, "Kafka users"). Apply in the namespace the User Operator watches.
"""


def main() -> int:
    """Print the prod overlay's KafkaUsers for the settings in the environment (the
    topic names and consumer group; defaults are prod's). Needs the dev extra pyyaml."""
    import yaml

    settings = Settings(role=Role.PROCESSOR, _env_file=None)
    docs = yaml.safe_dump_all(kafka_users(settings), sort_keys=False, width=100)
    sys.stdout.write(HEADER + "---\n" + docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CONSUMER_USER",
    "INGEST_USER",
    "PROCESSOR_USER",
    "Acl",
    "Pattern",
    "Resource",
    "acl_command_args",
    "kafka_users",
    "principals",
    "user_for",
]
