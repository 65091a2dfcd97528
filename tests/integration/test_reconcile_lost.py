"""Issue 19's done-when, for real: ``callstatus simulate --lost 0.1`` (its FreeClimb API
stand-in on loopback) against a ``callstatus serve`` process (ROLE=all) on the shared
broker, the service stopped for 30 s mid-run (SIGTERM) and started again. Every call
ends at its true final status on ``changes``, each change exactly once, within
RECONCILE_AFTER_SECONDS + one sweep (+ a margin) after the traffic ended, and some calls
got there only through reconciliation (a last change of source ``api``).

The truth is checked twice: by simulate's own report, and here, from the changes topic
read from its start against the plans the same seed gives (service/traffic.py)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
from aiokafka import ConsumerRecord

from schemas.messages import ChangeMessage, Source
from service.kafka import ensure_topics
from service.standin import local_url
from service.traffic import Shares, generate_plans
from testkit import ROOT, ServiceProcess, free_port, read_committed, settings_env, settings_for
from tests.conftest import BOOTSTRAP

ACCOUNT = "AC" + "7d" * 20
SECRET = "sigsec_" + "4" * 40
API_KEY = "lost-test-api-key"
CALLS, RATE, SEED, LOST = 250, 25, 19, 0.1
AFTER_S, SWEEP_S = 3, 3
MARGIN_S = 20  # a round's tick, the fetch, a batch, the read back: on a shared 2-core box
OUTAGE_S = 30  # the "service stopped for 30 s mid-run"
STOP_AFTER_ACCEPTED = 200  # callbacks accepted before the service is stopped


def accounts_file(tmp_path: Path) -> Path:
    path = tmp_path / "accounts.yaml"
    path.write_text(
        f'accounts:\n  {ACCOUNT}:\n    signingSecrets: ["{SECRET}"]\n    apiKey: "{API_KEY}"\n'
    )
    return path


async def accepted(port: int) -> int:
    """Callbacks the node answered 202 so far (its requests metric), 0 while it is not
    listening."""
    try:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.TransportError:
        return 0
    found = re.findall(
        r'^callstatus_account_requests_total\{[^}]*outcome="accepted"[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return int(sum(float(v) for v in found))


def count(summary: str, label: str) -> int:
    match = re.search(rf"^\s+{re.escape(label)}\s+(\d+)", summary, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{summary}"
    return int(match.group(1))


async def test_lost_callbacks_and_an_outage_end_every_call_at_its_true_status_once(
    unique: str, tmp_path: Path
) -> None:
    standin_port = free_port()
    settings = settings_for(
        BOOTSTRAP,
        unique,
        role="all",
        verify_signatures=True,
        accounts_file=accounts_file(tmp_path),
        topic_partitions=3,
        freeclimb_api_url=local_url(standin_port),
        reconcile_after_seconds=AFTER_S,
        reconcile_sweep_seconds=SWEEP_S,
    )
    await ensure_topics(settings)
    node = ServiceProcess(settings, tmp_path, "first")
    env = settings_env(settings, node.port)
    wait_s = AFTER_S + SWEEP_S + MARGIN_S
    started = time.monotonic()
    sim: asyncio.subprocess.Process | None = None
    try:
        await node.wait_ready()
        sim = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv" / "bin" / "callstatus"),
            "simulate",
            *("--calls", str(CALLS), "--rate", str(RATE), "--seed", str(SEED)),
            *("--lost", str(LOST), "--standin-port", str(standin_port)),
            *("--wait", str(wait_s), "--settle", str(SWEEP_S + 1)),
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        communicating = asyncio.ensure_future(sim.communicate())
        # Mid-run: once a good part of the traffic is in (polled, with a deadline).
        give_up = time.monotonic() + 60
        while await accepted(node.port) < STOP_AFTER_ACCEPTED:
            assert not communicating.done(), "simulate ended before the outage"
            assert time.monotonic() < give_up, "the traffic never got going"
            await asyncio.sleep(0.2)  # polling interval
        assert await asyncio.to_thread(node.terminate)
        await asyncio.sleep(OUTAGE_S)  # the outage itself, not a synchronisation
        assert not communicating.done(), "the traffic ended during the outage: too short"
        node = ServiceProcess(settings, tmp_path, "again", port=node.port)
        await node.wait_ready()
        out_b, err_b = await asyncio.wait_for(communicating, timeout=240)
    finally:
        if sim is not None and sim.returncode is None:
            sim.kill()
            await sim.wait()
        assert node.terminate()
    out, err = out_b.decode(), err_b.decode()
    print(f"simulate: {time.monotonic() - started:.0f}s in all\n{out}")
    assert sim.returncode == 0, f"{out}\n{err}"

    # Simulate's report: all calls at their true final status, some only through
    # reconciliation, callbacks withheld and lost in the outage, none published twice.
    assert count(out, "reached their true final status") == CALLS
    assert count(out, "of those through reconciliation") > 0
    assert count(out, "callbacks withheld at the source") > 0
    assert count(out, "callbacks lost at the source") > 0  # the outage's
    for failure in ("DID NOT REACH IT", "A CHANGE TWICE", "NEVER APPEARED", "PUBLISHED TWICE"):
        assert failure not in out
    settled = re.search(r"all in ([\d.]+)s after the traffic ended", out)
    assert settled and float(settled.group(1)) <= wait_s, out

    # The same, read here from the changes topic against the seed's plans.
    plans = generate_plans(CALLS, Shares(), SEED, ACCOUNT)
    ids = {plan.call_id for plan in plans}

    def complete(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
        last = {}
        for r in records:
            message = ChangeMessage.model_validate_json(r.value or b"")
            last[message.callId] = message.status
        return all(last.get(plan.call_id) is plan.final for plan in plans)

    records = await read_committed(BOOTSTRAP, settings.topic_changes, complete, deadline_s=30)
    changes: dict[str, list[ChangeMessage]] = {}
    for r in records:
        message = ChangeMessage.model_validate_json(r.value or b"")
        assert message.callId in ids  # only this run's calls on this run's topic
        changes.setdefault(message.callId, []).append(message)
    through_api = 0
    for plan in plans:
        statuses = [m.status for m in changes[plan.call_id]]
        assert len(statuses) == len(set(statuses)), (plan.call_id, statuses)
        assert statuses[-1] is plan.final, (plan.call_id, statuses, plan.truth)
        through_api += changes[plan.call_id][-1].source is Source.API
    assert through_api == count(out, "of those through reconciliation")
