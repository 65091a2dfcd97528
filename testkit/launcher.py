"""Brokers and clusters of a test's own, started and stopped through the project's
launcher (``deploy/local/kafka``), and ways to crash, restart and question their nodes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "deploy" / "local" / "kafka"


def _launch(args: list[str], env: dict[str, str] | None) -> str:
    """Run the launcher; returns its last stdout line. Exit 3 ("stopped", "degraded",
    no leader) is an answer, not a failure."""
    result = subprocess.run(
        [str(LAUNCHER), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode not in (0, 3):
        raise RuntimeError(f"kafka {' '.join(args)} failed: {result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def kafka(command: str, env: dict[str, str] | None = None) -> str:
    """Run the project's own launcher; returns its last stdout line."""
    return _launch([command], env)


def kafka_cluster(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the launcher's cluster mode (``deploy/local/kafka cluster ARGS``); returns
    its last stdout line. Exit 3 ("stopped", "degraded", no leader) is an answer."""
    return _launch(["cluster", *args], env)


@asynccontextmanager
async def private_broker(port: int, **extra_env: str) -> AsyncIterator[dict[str, str]]:
    """A broker of a test's own, started by the project's launcher on ``port`` with a
    throw-away data dir, so the test may stop and restart it without disturbing others.
    Yields the launcher environment plus ``address``."""
    with tempfile.TemporaryDirectory(prefix="callstatus-kafka-") as data:
        env = {
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(port + 1),
            "KAFKA_DATA_DIR": str(Path(data) / "kafka"),
            **extra_env,
        }
        address = await asyncio.to_thread(kafka, "up", env)
        try:
            yield {**env, "address": address}
        finally:
            await asyncio.to_thread(kafka, "down", env)


@dataclass(frozen=True)
class PartitionState:
    leader: int  # node id, -1 while there is none
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class Cluster:
    """A multi-node cluster started by the launcher: its environment (ports, data
    folder), the bootstrap list, and ways to crash, restart and question its nodes."""

    env: dict[str, str]
    bootstrap: str
    nodes: int

    def pid(self, node: int) -> int | None:
        """Node ``node``'s broker pid as the launcher recorded it (None: not running)."""
        pid_file = Path(self.env["KAFKA_CLUSTER_DATA_DIR"], f"node-{node}", "kafka.pid")
        try:
            return int(pid_file.read_text().strip())
        except FileNotFoundError:
            return None

    async def kill(self, node: int) -> None:
        """SIGKILL the node (the launcher returns once the process is gone)."""
        await asyncio.to_thread(kafka_cluster, "kill", str(node), env=self.env)

    async def start(self, node: int) -> None:
        """Start the node again; returns once the cluster lists it as a live broker."""
        await asyncio.to_thread(kafka_cluster, "start", str(node), env=self.env)

    async def leader(self, topic: str, partition: int) -> int:
        """The id of the partition's leader in the cluster's metadata now (-1: none)."""
        state = (await self.partitions(topic)).get(partition)
        return state.leader if state else -1

    async def partitions(self, topic: str) -> dict[int, PartitionState]:
        """Leader, replicas and in-sync replicas of each partition of ``topic``, asked
        through aiokafka's admin client (a metadata request to a live node)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            described = await admin.describe_topics([topic])
        finally:
            await admin.close()
        return {
            p["partition"]: PartitionState(p["leader"], tuple(p["replicas"]), tuple(p["isr"]))
            for t in described
            if t["topic"] == topic and t["error_code"] == 0
            for p in t["partitions"]
        }

    async def new_leader(self, topic: str, partition: int, old: int, deadline_s: float) -> int:
        """Poll until the partition is led by a node other than ``old`` (the controller
        moves leadership once it has declared ``old`` dead); returns the new leader."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        while True:
            try:
                leader = await self.leader(topic, partition)
            except KafkaError:
                leader = -1  # the admin client reached no node this time: ask again
            if leader not in (-1, old):
                return leader
            if loop.time() > give_up:
                raise TimeoutError(f"{topic}-{partition} still led by {leader} (old {old})")
            await asyncio.sleep(0.2)  # polling interval, not synchronisation


@asynccontextmanager
async def private_cluster(
    base_port: int, brokers: int = 3, **extra_env: str
) -> AsyncIterator[Cluster]:
    """A cluster of a test's own, started by the project's launcher (``kafka cluster
    up``) with node N on ports ``base_port + 2(N-1)`` (client) and the one above
    (controller), in a throw-away data dir; stopped again at the end, whatever state
    the test left its nodes in."""
    with tempfile.TemporaryDirectory(prefix="callstatus-kafka-cluster-") as data:
        env = {
            "KAFKA_CLUSTER_PORT": str(base_port),
            "KAFKA_CLUSTER_NODES": str(brokers),
            "KAFKA_CLUSTER_DATA_DIR": str(Path(data) / "cluster"),
            **extra_env,
        }
        try:
            bootstrap = await asyncio.to_thread(kafka_cluster, "up", env=env)
            yield Cluster(env, bootstrap, brokers)
        finally:
            # Also after a failed `up`: it stops what it started, but a node that had
            # started and then timed out elsewhere must not outlive the test.
            await asyncio.to_thread(kafka_cluster, "down", env=env)
