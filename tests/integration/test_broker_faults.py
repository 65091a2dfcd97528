"""Chaos: the broker restarts twice and is SIGKILLed once while 12 clients send signed
callbacks without pause through real service processes, in two set-ups:

* one node running both stages (`make run`) with the spool off: each outage is seen
  as 503s, and 202s come back within 15 s of the broker serving clients again;
* separate ingest and processor nodes (the prod overlay) with the spool on, the first
  outage lasting 30 s (five of its producers' delivery timeouts): every request is
  answered 202, and the spool drains.

Both assert what an operator would check afterwards: every 202 is in the ingest topic;
every ingest record reaches `changes` or `rejected` exactly once and in the state
machine's order; no other 5xx; the ingest node's memory did not grow with the faults.
A further test SIGKILLs the ingest node while events sit in its spool; the last one
SIGKILLs the leader of an ingest partition on a 3-node cluster under load, and asserts
that the spool is empty again within a minute of the failover.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from schemas.messages import IngestEnvelope
from service import metrics
from service.kafka import ensure_topics
from service.producer import IngestProducer, Unavailable
from service.settings import Role, Settings
from service.signature import sign
from testkit import (
    Event,
    ServiceProcess,
    by_call,
    expected_outcomes,
    kafka,
    partitions_of,
    private_broker,
    private_cluster,
    read_committed,
    settings_for,
)
from tests.conftest import SECRET

CLIENTS = 12
RECOVERY_BOUND_S = 15.0
MEMORY_BOUND_BYTES = 50 * 1024 * 1024
LIFECYCLE = ("queued", "ringing", "inProgress", "completed")


@dataclass
class Traffic:
    """What the clients saw, in the order answers arrived."""

    accepted: list[str] = field(default_factory=list)  # eventIds answered 202
    answers: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, got, code)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def accepted_more(self, n: int) -> bool:
        return len(self.accepted) >= n

    def codes(self) -> Counter[int]:
        return Counter(code for _, _, code in self.answers)

    def seen_after(self, t: float, code: int) -> bool:
        return any(sent >= t and c == code for sent, _, c in self.answers)

    def first_after(self, t: float, code: int) -> float | None:
        return min((got for sent, got, c in self.answers if sent >= t and c == code), default=None)


def body(client: int, call: int, status: str) -> bytes:
    return json.dumps(
        {
            "requestType": "callStatus",
            "callId": f"CA{client:08x}{call:032x}",
            "accountId": "AC" + "1" * 40,
            "callStatus": status,
        },
        separators=(",", ":"),
    ).encode()


async def client_loop(n: int, base_url: str, traffic: Traffic) -> None:
    """Lifecycles without pause; a 503'd step is not retried (FreeClimb documents no
    retries), so later steps arrive with gaps, as they would in production."""
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        call = 0
        while not traffic.stop.is_set():
            call += 1
            for status in LIFECYCLE:
                raw = body(n, call, status)
                headers = {
                    "content-type": "application/json",
                    "FreeClimb-Signature": sign(SECRET, int(time.time()), raw),
                }
                sent = loop.time()
                try:
                    answer = await http.post("/v1/call-status", content=raw, headers=headers)
                except httpx.TransportError:
                    traffic.answers.append((sent, loop.time(), 0))
                    continue
                traffic.answers.append((sent, loop.time(), answer.status_code))
                if answer.status_code == 202:
                    traffic.accepted.append(answer.json()["eventId"])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def sigkill_broker(broker: dict[str, str]) -> None:
    pid = int(Path(broker["KAFKA_DATA_DIR"], "kafka.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists():  # reaped by init: poll until the pid is gone
        status = Path(f"/proc/{pid}/status")
        if status.exists() and "zombie" in status.read_text():
            break
        time.sleep(0.05)  # polling interval


async def read_all(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of ``topic`` now: read until the last stable offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = await partitions_of(bootstrap, topic, asyncio.get_running_loop().time() + 30)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=500)).values():
                out.extend(records)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        return out
    finally:
        await consumer.stop()


async def until(predicate: Callable[[], bool], deadline_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not predicate():
        assert loop.time() < give_up, what
        await asyncio.sleep(0.1)  # polling interval


@pytest.fixture
async def broker() -> AsyncIterator[dict[str, str]]:
    async with private_broker(20010) as b:
        yield b


async def metric(base: str, name: str) -> float:
    """An unlabelled sample from the node's /metrics."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def metric_at_least(base: str, name: str, value: float) -> bool:
    return await metric(base, name) >= value


async def until_async(probe: Callable[[], Awaitable[bool]], deadline_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not await probe():
        assert loop.time() < give_up, what
        await asyncio.sleep(0.2)  # polling interval


@dataclass
class Outputs:
    ingest_ids: list[str]
    changes: list[ConsumerRecord[bytes, bytes]]
    rejected: list[ConsumerRecord[bytes, bytes]]


async def collect(
    address: str,
    settings: Settings,
    accepted: list[str],
    processor: ServiceProcess | None = None,
) -> Outputs:
    """The ingest topic, then the outputs once the processor has accounted for every
    ingest record (or the deadline says it never will)."""
    loop = asyncio.get_running_loop()
    # Wait until every 202 can be there, then read all that is: a count alone stops
    # short when ingest holds a record twice (a write that timed out, then landed, and
    # was spooled again), leaving the newest events out of the oracle's input.
    await read_committed(address, settings.topic_ingest, len(accepted), settle_s=0)
    ingested = await read_all(address, settings.topic_ingest)
    envelopes = [IngestEnvelope.model_validate_json(r.value or b"") for r in ingested]
    distinct = len({e.eventId for e in envelopes})
    give_up = loop.time() + 120
    while True:
        changes = await read_all(address, settings.topic_changes)
        rejected = await read_all(address, settings.topic_rejected)
        if len(changes) + len(rejected) >= distinct or loop.time() > give_up:
            break
        await asyncio.sleep(1)  # polling interval while the processor catches up
    # Anything extra (a duplicate) would be committed by now; read once more to see it.
    changes = await read_all(address, settings.topic_changes)
    rejected = await read_all(address, settings.topic_rejected)
    ordered = sorted(
        zip(ingested, envelopes, strict=True), key=lambda p: (p[0].partition, p[0].offset)
    )
    expected = expected_outcomes([Event(e.eventId, e.call, e.source) for _, e in ordered])
    # Order and verdicts: the pure state machine over the ingest topic's order.
    seen = by_call(changes)
    if seen != expected.changes:
        lag = await group_lag(address, settings)
        raise AssertionError(
            mismatch_report(seen, expected.changes, len(changes) + len(rejected), distinct)
            + f"\nprocessor lag by partition (end - committed): {lag}"
            + (troubles(processor) if processor is not None else "")
        )
    return Outputs([e.eventId for _, e in ordered], changes, rejected)


def mismatch_report(
    seen: dict[str, list[str]], expected: dict[str, list[str]], outputs: int, distinct: int
) -> str:
    """What differs between the changes seen and the oracle's, in a few lines: a CI log
    shows only the end of a long diff, which cannot tell a stalled processor (whole
    calls missing, the newest ones) from a wrong verdict or order (calls that differ)."""
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    differ = sorted(c for c in set(seen) & set(expected) if seen[c] != expected[c])
    lines = [
        f"outputs {outputs} of {distinct} distinct ingest events; calls: {len(missing)}"
        f" missing from changes, {len(extra)} unexpected, {len(differ)} differ"
    ]
    lines += [f"  missing {c}: expected {expected[c]}" for c in missing[:3]]
    lines += [f"  unexpected {c}: seen {seen[c]}" for c in extra[:3]]
    lines += [f"  differs {c}: seen {seen[c]} expected {expected[c]}" for c in differ[:5]]
    return "\n".join(lines)


def troubles(process: ServiceProcess, last: int = 25) -> str:
    """The last warning and error lines of a service process's JSON log."""
    lines = [
        line
        for line in process.log_path.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("level") in ("warning", "error")
    ]
    return f"\n{process.log_path.name}, its last warnings and errors:\n" + "\n".join(lines[-last:])


async def group_lag(bootstrap: str, settings: Settings) -> dict[int, int]:
    """The processor group's committed offsets against the ingest topic's ends."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        tps = await partitions_of(
            bootstrap, settings.topic_ingest, asyncio.get_running_loop().time() + 30
        )
        ends = await consumer.end_offsets(tps)
        return {tp.partition: ends[tp] - (await consumer.committed(tp) or 0) for tp in tps}
    finally:
        await consumer.stop()


def check_exactly_once(out: Outputs, accepted: list[str]) -> dict[str, int]:
    output_ids = Counter(
        json.loads(r.value or b"")["eventId"] for r in [*out.changes, *out.rejected]
    )
    summary = {
        "ingested": len(out.ingest_ids),
        "ingested_twice": len(out.ingest_ids) - len(set(out.ingest_ids)),
        "outputs": sum(output_ids.values()),
        "lost_acked": len(set(accepted) - set(out.ingest_ids)),
        "unprocessed": len(set(out.ingest_ids) - set(output_ids)),
        "duplicated": sum(1 for n in output_ids.values() if n > 1),
    }
    assert not summary["lost_acked"], "a 202'd event is missing from the ingest topic"
    assert not summary["unprocessed"], "an ingested event never reached changes or rejected"
    assert not summary["duplicated"], "an event reached the outputs more than once"
    assert set(output_ids) <= set(out.ingest_ids)
    return summary


@pytest.mark.parametrize(("layout", "spool"), [("all", False), ("split", True)])
async def test_ingest_and_processor_ride_through_broker_restarts_and_a_crash(
    broker: dict[str, str], unique: str, tmp_path: Path, layout: str, spool: bool
) -> None:
    address = broker["address"]
    settings = settings_for(
        address,
        unique,
        verify_signatures=True,
        signing_secrets=(SECRET,),
        topic_partitions=3,
        produce_timeout_seconds=2.0,
        produce_delivery_timeout_seconds=4.0,
        spool_enabled=spool,
    )
    await ensure_topics(settings)
    # "all": one process runs both stages (`make run`); "split": the prod overlay's
    # separate ingest and processor deployments.
    if layout == "all":
        ingest = processor = ServiceProcess(
            settings.model_copy(update={"role": Role.ALL}), tmp_path, "node"
        )
    else:
        ingest = ServiceProcess(
            settings.model_copy(update={"role": Role.INGEST}), tmp_path, "ingest"
        )
        processor = ServiceProcess(settings, tmp_path, "processor")
    traffic = Traffic()
    loop = asyncio.get_running_loop()
    recoveries: list[float] = []
    try:
        await ingest.wait_ready()
        await processor.wait_ready(deadline_s=90)
        base = f"http://127.0.0.1:{ingest.port}"
        clients = [asyncio.create_task(client_loop(n, base, traffic)) for n in range(CLIENTS)]
        await until(lambda: len(traffic.accepted) >= 200, 60, "no steady 202s before the faults")
        memory_before = rss_bytes(ingest.proc.pid)

        for n, fault in enumerate(("restart", "sigkill", "restart")):
            began = loop.time()
            spooled = await metric(base, "callstatus_spool_appends_total") if spool else 0.0
            if fault == "sigkill":
                await asyncio.to_thread(sigkill_broker, broker)
            else:
                await asyncio.to_thread(kafka, "down", broker)
            if spool:
                # Kafka is away, so events now go to the spool, answered 202.
                await until_async(
                    partial(metric_at_least, base, "callstatus_spool_appends_total", spooled + 50),
                    60,
                    f"nothing spooled during {fault}",
                )
                if n == 0:
                    # The outage itself: 20 s without a broker, five times the delivery
                    # timeout (which retires the producer; its rebuild then fails until
                    # the broker is back), with the spool taking all.
                    await asyncio.sleep(20)
            else:
                await until(partial(traffic.seen_after, began, 503), 60, f"no 503 during {fault}")
            await asyncio.to_thread(kafka, "up", broker)  # returns once it serves clients
            serving = loop.time()
            if spool:
                # Recovery with a spool: it drains while new events queue behind it.
                await until_async(
                    partial(metric_is, base, "callstatus_spool_events", 0.0),
                    120,
                    f"the spool never drained after the {fault}",
                )
                recoveries.append(loop.time() - serving)
            else:
                await until(
                    partial(traffic.seen_after, serving, 202),
                    RECOVERY_BOUND_S + 30,
                    f"ingest never answered 202 again after the {fault}",
                )
                first = traffic.first_after(serving, 202)
                assert first is not None
                recoveries.append(first - serving)
            # Let traffic flow before the next fault, so each one hits a busy service.
            await until(partial(traffic.accepted_more, len(traffic.accepted) + 200), 60, "stall")

        traffic.stop.set()
        await asyncio.gather(*clients)
        memory_after = rss_bytes(ingest.proc.pid)
        if spool:  # what the spool still holds is on its way: wait for all of it
            await until_async(
                partial(metric_is, base, "callstatus_spool_events", 0.0),
                120,
                "the spool never drained after the load",
            )
        out = await collect(address, settings, traffic.accepted, processor)
        assert processor.alive() and ingest.alive(), "a service process died"
    finally:
        traffic.stop.set()
        for node in {ingest, processor}:
            node.kill()

    codes = traffic.codes()
    summary = check_exactly_once(out, traffic.accepted)
    print(
        f"\nbroker faults ({layout}, spool {'on' if spool else 'off'}): "
        f"requests={sum(codes.values())} codes={dict(sorted(codes.items()))} "
        + " ".join(f"{k}={v}" for k, v in summary.items())
        + f" recovery_s={[round(r, 1) for r in recoveries]}"
        f" ingest_rss_mb={memory_before / 2**20:.0f}->{memory_after / 2**20:.0f}"
    )
    if spool:
        assert set(codes) == {202}, "with the spool on, every request is answered 202"
    else:
        assert summary["ingested_twice"] == 0, "an event was written to ingest twice"
        assert set(codes) <= {202, 503}, "a 5xx other than 503, or a failed connection"
        assert all(r <= RECOVERY_BOUND_S for r in recoveries), recoveries
    assert memory_after - memory_before <= MEMORY_BOUND_BYTES


async def metric_is(base: str, name: str, value: float) -> bool:
    return await metric(base, name) == value


async def test_events_spooled_by_a_killed_node_are_drained_by_its_successor(
    broker: dict[str, str], unique: str, tmp_path: Path
) -> None:
    """SIGKILL the ingest node while its spool holds events Kafka never saw; the next
    node on the same volume starts while Kafka is still away, takes more webhooks into
    the spool, and drains them all once Kafka is back: none lost, none duplicated."""
    address = broker["address"]
    settings = settings_for(
        address,
        unique,
        role="ingest",
        verify_signatures=True,
        signing_secrets=(SECRET,),
        topic_partitions=3,
        produce_timeout_seconds=1.0,
        produce_delivery_timeout_seconds=3.0,
    )
    await ensure_topics(settings)
    processor = ServiceProcess(settings.model_copy(update={"role": Role.PROCESSOR}), tmp_path, "p")
    first = ServiceProcess(settings, tmp_path, "first")
    traffic, later = Traffic(), Traffic()
    try:
        await first.wait_ready()
        await processor.wait_ready(deadline_s=90)
        base = f"http://127.0.0.1:{first.port}"
        await asyncio.to_thread(kafka, "down", broker)
        clients = [asyncio.create_task(client_loop(n, base, traffic)) for n in range(CLIENTS)]
        await until(lambda: len(traffic.accepted) >= 300, 90, "nothing spooled")
        first.kill()  # mid-load: some requests are cut off with the process
        traffic.stop.set()
        await asyncio.gather(*clients)
        assert traffic.accepted, "no request was answered 202 while Kafka was away"
        # The successor starts while Kafka is still away (a pod rescheduled during an
        # outage): it must take webhooks into the spool at once, not wait for Kafka.
        second = ServiceProcess(settings, tmp_path, "second")  # same directory, same spool
        try:
            await second.wait_ready()
            assert second.logged(
                "kafka not reachable at start; webhooks go to the spool until it is"
            )
            base = f"http://127.0.0.1:{second.port}"
            clients = [
                asyncio.create_task(client_loop(n, base, later)) for n in range(100, 100 + CLIENTS)
            ]
            await until(lambda: len(later.accepted) >= 100, 60, "the successor spooled nothing")
            later.stop.set()
            await asyncio.gather(*clients)
            await asyncio.to_thread(kafka, "up", broker)
            await until_async(
                partial(
                    metric_is, f"http://127.0.0.1:{second.port}", "callstatus_spool_events", 0.0
                ),
                60,
                "the successor never drained the spool",
            )
            assert second.logged("spool holds undelivered events")
        finally:
            second.kill()
        accepted = traffic.accepted + later.accepted
        out = await collect(address, settings, accepted, processor)
    finally:
        traffic.stop.set()
        later.stop.set()
        processor.kill()
        first.kill()
    summary = check_exactly_once(out, accepted)
    print(
        f"\nspool after SIGKILL: accepted={len(traffic.accepted)}+{len(later.accepted)} {summary}"
    )
    assert set(traffic.codes()) <= {202, 0}  # 0: a connection the kill cut
    assert set(later.codes()) == {202}  # the successor, before Kafka was back: all spooled


async def test_an_event_answered_503_lands_within_the_delivery_bound_or_never(
    broker: dict[str, str], unique: str
) -> None:
    """Without the bound, aiokafka retries an idempotent batch for ever: events answered
    503 during an outage would all land whenever the broker came back."""
    address = broker["address"]
    settings = settings_for(
        address,
        unique,
        role="ingest",
        produce_timeout_seconds=1.0,
        produce_delivery_timeout_seconds=3.0,
    )
    await ensure_topics(settings)
    producer = IngestProducer(settings)
    await producer.start()
    rebuilds = metrics.PRODUCER_REBUILDS.labels("ingest", "delivery_timeout")
    rebuilt_before = rebuilds._value.get()
    try:
        await producer.publish(b"CAfirst", b'{"n":"acked"}', [])
        await asyncio.to_thread(kafka, "down", broker)
        refused = [f'{{"n":"refused-{i}"}}'.encode() for i in range(3)]
        reasons = []
        for value in refused:
            with pytest.raises(Unavailable) as exc:
                await producer.publish(b"CArefused", value, [])
            reasons.append(exc.value.reason)
        assert reasons[0] == "timeout"  # the first one waited its answer deadline out
        # Past the delivery deadline the producer is retired with what it still holds.
        await until(lambda: rebuilds._value.get() > rebuilt_before, 30, "never retired")
        await asyncio.to_thread(kafka, "up", broker)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60
        while True:  # a rebuilt producer takes writes again
            try:
                await producer.publish(b"CAlast", b'{"n":"after"}', [])
                break
            except Unavailable:
                assert loop.time() < give_up, "the producer was never rebuilt"
                await asyncio.sleep(0.2)  # polling interval
    finally:
        await producer.stop()
    values = [r.value for r in await read_all(address, settings.topic_ingest)]
    # Different keys, different partitions: compare as sets, not in order.
    assert {b'{"n":"acked"}', b'{"n":"after"}'} <= set(values)
    assert not set(refused) & set(values), "an event answered 503 landed after the bound"


# -------------------------------------------------------------- leader failover (issue 16)

CLUSTER_PORT = 20210  # this test's own 3-node cluster: ports 20210-20215
FAILOVER_DRAIN_BOUND_S = 60.0


async def metrics_now(base: str, *names: str) -> dict[str, float]:
    """Several unlabelled samples from one scrape of the node's /metrics."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        text = (await http.get("/metrics")).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value)
    assert set(found) == set(names), f"not exported: {set(names) - set(found)}"
    return found


@dataclass
class SpoolWatch:
    """The ingest node's spool as its /metrics showed it, scraped in the background
    from just before the fault to the end of the load."""

    base: str
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # t, events, appends
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            m = await metrics_now(
                self.base, "callstatus_spool_events", "callstatus_spool_appends_total"
            )
            self.samples.append(
                (loop.time(), m["callstatus_spool_events"], m["callstatus_spool_appends_total"])
            )
            await asyncio.sleep(0.2)  # scrape interval

    def empty_after(self, t: float) -> tuple[float, float] | None:
        """(time, appends so far) of the first scrape after ``t`` with an empty spool."""
        return next(((at, a) for at, events, a in self.samples if at > t and not events), None)

    def peak(self) -> float:
        return max((events for _, events, _ in self.samples), default=0.0)

    def last(self) -> tuple[float, float]:
        """(events, appends) at the latest scrape."""
        _, events, appends = self.samples[-1]
        return events, appends


async def test_the_spool_is_empty_within_a_minute_of_a_leader_failover(
    unique: str, tmp_path: Path
) -> None:
    """Issue 16, finding 3: on a 3-node cluster (topics with 3 replicas, 2 in sync for a
    write) under 12 sending clients, SIGKILL the leader of ingest partition 0. Until the
    controller declares it dead (Kafka's 9 s broker session timeout) writes to that
    partition time out and ingest spools them, answering 202. Once the partition has a
    new leader the spool must be empty again within a minute with the load still on,
    and every 202 must reach the outputs exactly once."""
    async with private_cluster(CLUSTER_PORT) as cluster:
        settings = settings_for(
            cluster.bootstrap,
            unique,
            role="ingest",
            verify_signatures=True,
            signing_secrets=(SECRET,),
            topic_partitions=3,
            topic_replication_factor=3,  # and so min.insync.replicas=2 (service.kafka)
            produce_timeout_seconds=2.0,
            produce_delivery_timeout_seconds=6.0,
            spool_enabled=True,
        )
        await ensure_topics(settings)
        ingest = ServiceProcess(settings, tmp_path, "ingest")
        processor = ServiceProcess(
            settings.model_copy(update={"role": Role.PROCESSOR}), tmp_path, "processor"
        )
        traffic = Traffic()
        loop = asyncio.get_running_loop()
        try:
            await ingest.wait_ready()
            await processor.wait_ready(deadline_s=90)
            base = f"http://127.0.0.1:{ingest.port}"
            partition0 = (await cluster.partitions(settings.topic_ingest))[0]
            # The fault must be one the cluster can ride: 3 replicas, all in sync.
            assert len(partition0.replicas) == 3 and len(partition0.isr) == 3, partition0
            clients = [asyncio.create_task(client_loop(n, base, traffic)) for n in range(CLIENTS)]
            await until(lambda: len(traffic.accepted) >= 200, 60, "no steady 202s before the fault")

            watch = SpoolWatch(base)
            watcher = asyncio.create_task(watch.run())
            await until(lambda: bool(watch.samples), 30, "no scrape of /metrics")
            _, appends_before = watch.last()
            killed = partition0.leader
            killed_at = loop.time()
            await cluster.kill(killed)
            # Kafka serves that partition again once the controller has moved its
            # leadership (metadata says so): the failover, from which the bound runs.
            new_leader = await cluster.new_leader(settings.topic_ingest, 0, killed, 60)
            failover_at = loop.time()
            while (empty := watch.empty_after(failover_at)) is None:
                if watcher.done() or loop.time() > failover_at + FAILOVER_DRAIN_BOUND_S:
                    break
                await asyncio.sleep(0.2)  # polling interval
            events_at_bound, _ = watch.last()
            if empty is not None:
                # The load goes on, now straight to Kafka on the new leader.
                await until(
                    partial(traffic.accepted_more, len(traffic.accepted) + 500), 60, "stall"
                )
            traffic.stop.set()
            await asyncio.gather(*clients)
            accepted_under_load = len(traffic.accepted)
            _, appends_end = watch.last()
            # Whatever the bound's verdict, everything spooled must still reach Kafka
            # (now without new arrivals), so the exactly-once check below covers it.
            stopped_at = loop.time()
            await until(
                lambda: watcher.done() or watch.empty_after(stopped_at) is not None,
                180,
                "the spool never drained after the load",
            )
            watch.stop.set()
            await watcher  # a scrape that failed fails the test here, with its error
            await cluster.start(killed)  # back in the cluster: it catches up as a follower
            out = await collect(cluster.bootstrap, settings, traffic.accepted, processor)
            assert processor.alive() and ingest.alive(), "a service process died"
        finally:
            traffic.stop.set()
            for node in (ingest, processor):
                node.kill()
            # (A node still killed here, after a failure, is simply left down: the
            # cluster's `down` stops the others.)

    codes = traffic.codes()
    summary = check_exactly_once(out, traffic.accepted)
    recovery_s = empty[0] - failover_at if empty is not None else None
    outcome = (
        f"empty {recovery_s:.1f}s after the failover"
        f" ({appends_end - empty[1]:.0f} spooled after that)"
        if empty is not None and recovery_s is not None
        else f"still held {events_at_bound:.0f} events {FAILOVER_DRAIN_BOUND_S:.0f}s after it"
    )
    report = (
        f"leader failover (3 nodes, RF 3, min ISR 2, {CLIENTS} clients): killed node"
        f" {killed}, new leader {new_leader} after {failover_at - killed_at:.1f}s; spool"
        f" {outcome}; peak {watch.peak():.0f} events; spooled {appends_end - appends_before:.0f}"
        f" of {accepted_under_load} accepted; requests={sum(codes.values())}"
        f" codes={dict(sorted(codes.items()))} " + " ".join(f"{k}={v}" for k, v in summary.items())
    )
    print("\n" + report)
    assert set(codes) == {202}, "with the spool on, every request is answered 202"
    assert recovery_s is not None and recovery_s <= FAILOVER_DRAIN_BOUND_S, report
