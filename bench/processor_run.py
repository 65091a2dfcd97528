"""The processor over a preloaded ingest topic: ``callstatus serve`` with
``ROLE=processor`` (exactly-once on: one transaction per partition batch), timed from
ready (partitions assigned and restored) until the group's committed offsets reach the
end of the ingest topic. Then the state topic's bytes per call."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.data import chunks, lifecycles
from bench.profile import Recording
from bench.servers import tree_cpu_seconds
from service.settings import Role, Settings
from testkit import (
    ServiceProcess,
    create_topics,
    expected_outcomes,
    partitions_of,
    produce,
    read_committed,
    settings_for,
)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _ends(bootstrap: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        return ends
    finally:
        await consumer.stop()


async def committed_total(
    admin: AIOKafkaAdminClient, group: str, ends: dict[TopicPartition, int]
) -> int:
    """How many of the records before ``ends`` the group has committed past."""
    committed = await admin.list_consumer_group_offsets(group)
    return sum(min(committed[tp].offset, end) for tp, end in ends.items() if tp in committed)


async def wait_caught_up(bootstrap: str, group: str, topic: str, deadline_s: float) -> None:
    """Until ``group`` has committed every record ``topic`` holds now."""
    partitions = await partitions_of(bootstrap, topic, asyncio.get_running_loop().time() + 30)
    ends = await _ends(bootstrap, partitions)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline_s
        while await committed_total(admin, group, ends) < sum(ends.values()):
            if loop.time() > give_up:
                raise TimeoutError(f"{group} did not catch up with {topic}")
            await asyncio.sleep(0.2)  # polling interval
    finally:
        await admin.close()


async def run(
    bootstrap: str,
    log_dir: Path,
    calls: int,
    progress: Callable[[str], None],
    profile_to: Path | None = None,
    restore: bool = True,
) -> dict[str, Any]:
    """One round over a topic of its own, preloaded with ``calls`` lifecycles; with
    ``restore``, a second processor then restores the state this one left."""
    unique = f"bench-proc-{uuid.uuid4().hex[:8]}"
    settings = settings_for(bootstrap, unique, role=Role.PROCESSOR)
    partitions = settings.topic_partitions
    await create_topics(bootstrap, [settings.topic_ingest], partitions)
    events = lifecycles(calls)
    expected = expected_outcomes(events)
    accepted = sum(len(v) for v in expected.changes.values())
    rejected = sum(len(v) for v in expected.rejected.values())
    progress(f"preloading {len(events):,} events of {calls:,} calls")
    for chunk in chunks(events, 20_000):
        await produce(bootstrap, settings.topic_ingest, chunk)
    tps = [TopicPartition(settings.topic_ingest, p) for p in range(partitions)]
    ends = await _ends(bootstrap, tps)

    proc = ServiceProcess(settings, log_dir, "processor")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    recording: Recording | None = None
    try:
        await proc.wait_ready(deadline_s=120)
        # The processor starts judging as soon as its partitions are restored, a poll of
        # /readyz before the harness hears of it: only what it commits from here on is
        # timed (and charged the CPU), or a fast processor's figures would be inflated.
        before = await committed_total(admin, settings.consumer_group, ends)
        ready = time.perf_counter()
        cpu = tree_cpu_seconds(proc.proc.pid)
        if profile_to is not None:
            recording = Recording(proc.proc.pid, profile_to)
        progress("processor ready; waiting for its committed offsets to reach the end")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(120.0, len(events) / 500)
        while True:
            done = await committed_total(admin, settings.consumer_group, ends)
            if done >= sum(ends.values()):
                break
            if loop.time() > give_up:
                raise TimeoutError(f"processor judged {done} of {len(events)} events in time")
            if not proc.alive():
                raise RuntimeError(f"processor exited: {proc.log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.1)  # polling interval
        elapsed = time.perf_counter() - ready
        cpu = tree_cpu_seconds(proc.proc.pid) - cpu
        timed = sum(ends.values()) - before
        if timed < len(events) // 2:
            raise RuntimeError(
                f"the processor judged {before:,} of {len(events):,} events before it "
                "reported ready: too few left to time; preload more calls"
            )
        load_average = os.getloadavg()[0]
        rss = _rss_bytes(proc.proc.pid)
    finally:
        if recording is not None:
            summary = recording.stop()
            (profile_to or Path()).with_suffix(".summary.txt").write_text("\n".join(summary))
        await admin.close()
        await asyncio.to_thread(proc.terminate, 60)

    progress("reading the committed changes and the state topic")
    changes = await read_committed(bootstrap, settings.topic_changes, accepted, settle_s=1.0)
    states = await read_committed(bootstrap, settings.topic_state, calls, settle_s=1.0)
    latest: dict[bytes, int] = {}
    for r in states:
        size = len(r.key or b"") + len(r.value or b"")
        size += sum(len(k) + len(v) for k, v in r.headers)
        latest[r.key or b""] = size if r.value is not None else 0
    live = [n for n in latest.values() if n]
    restored = await _restore(settings, log_dir, progress) if restore else {}
    return {
        "events": len(events),
        "calls": calls,
        "expected_changes": accepted,
        "expected_rejections": rejected,
        "changes": len(changes),
        "seconds": elapsed,
        "events_timed": timed,
        "events_per_s": timed / elapsed,
        "cpu_us_per_event": cpu / timed * 1e6,
        "load_average": load_average,
        "rss_bytes": rss,
        "state_calls": len(live),
        "state_bytes_per_call": sum(live) / len(live) if live else 0.0,
        **restored,
    }


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The processor's rounds as the table reads them: the median events/s and CPU per
    event with their spread (min-max); changes counted over all rounds (each must have
    written exactly the changes its events call for); the state and restore figures of
    the last round, which ran the restore."""
    med = statistics.median
    rate = [float(r["events_per_s"]) for r in rounds]
    cpu = [float(r["cpu_us_per_event"]) for r in rounds]
    keep = ("events_per_s", "cpu_us_per_event", "seconds", "changes", "expected_changes")
    return {
        **rounds[-1],
        "rounds": [{k: r[k] for k in (*keep, "load_average")} for r in rounds],
        "events_per_s": med(rate),
        "events_per_s_min": min(rate),
        "events_per_s_max": max(rate),
        "cpu_us_per_event": med(cpu),
        "cpu_us_per_event_min": min(cpu),
        "cpu_us_per_event_max": max(cpu),
        "load_average": med(float(r["load_average"]) for r in rounds),
        "changes": sum(int(r["changes"]) for r in rounds),
        "expected_changes": sum(int(r["expected_changes"]) for r in rounds),
    }


async def _restore(
    settings: Settings, log_dir: Path, progress: Callable[[str], None]
) -> dict[str, object]:
    """A second processor of the same group starts over the state the first one left:
    the time it takes to restore every call, as its "states restored" log lines say
    (whatever the state format is), and from start to ready (group join included)."""
    progress("restoring the processor's state in a new process")
    started = time.perf_counter()
    proc = ServiceProcess(settings, log_dir, "processor-restore")
    try:
        await proc.wait_ready(deadline_s=300)
        ready_s = time.perf_counter() - started
    finally:
        await asyncio.to_thread(proc.terminate, 60)
    calls, seconds = 0, 0.0
    for line in proc.log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "states restored":
                # One line per partition, restored concurrently as each worker opens:
                # the restore took as long as the longest of them, not their sum.
                calls += int(entry.get("calls", 0))
                seconds = max(seconds, float(entry.get("seconds", 0.0)))
    return {"restore_calls": calls, "restore_seconds": seconds, "restore_ready_seconds": ready_s}
