"""``callstatus simulate`` against a real server process and the shared broker: every
accepted callback is accounted for, and a run whose accepted events never appear (no
processor running) exits non-zero and says so."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import httpx

from service.kafka import ensure_topics
from service.settings import Role
from testkit import ROOT, ServiceProcess, settings_env, settings_for
from tests.conftest import BOOTSTRAP, SECRET

SIMULATE = [str(ROOT / ".venv" / "bin" / "callstatus"), "simulate"]


def simulate(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIMULATE, *args],
        env=env,
        cwd=cwd,  # no .callstatus.env there: the environment alone configures it
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def count(summary: str, label: str) -> int:
    match = re.search(rf"^\s+{re.escape(label)}\s+(\d+)", summary, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{summary}"
    return int(match.group(1))


async def start(unique: str, tmp_path: Path, role: str) -> tuple[ServiceProcess, dict[str, str]]:
    """A server process, and the environment that points ``simulate`` at it."""
    settings = settings_for(
        BOOTSTRAP,
        unique,
        role=role,
        verify_signatures=True,
        signing_secrets=(SECRET,),
        topic_partitions=3,
    )
    # All four topics, as the processor creates them: an ingest-only node creates (and
    # may see) only its own, and simulate reads changes and rejected.
    await ensure_topics(settings.model_copy(update={"role": Role.ALL}))
    node = ServiceProcess(settings, tmp_path, role)
    return node, settings_env(settings, node.port)


async def test_every_accepted_callback_is_accounted_for(unique: str, tmp_path: Path) -> None:
    node, env = await start(unique, tmp_path, "all")
    try:
        await node.wait_ready()
        # Every fault at a high share, so each kind of outcome shows up in 60 calls.
        result = await asyncio.to_thread(
            simulate,
            env,
            tmp_path,
            *("--calls", "60", "--rate", "300", "--seed", "7", "--wait", "120"),
            *("--gaps", "0.3", "--reorder", "0.3", "--duplicates", "0.2"),
            *("--retries", "0.1", "--illegal", "0.2"),
        )
    finally:
        assert node.terminate()
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    accepted = count(out, "202 Accepted")
    assert re.search(rf"accounted for\s+{accepted}\s+of {accepted}$", out, re.MULTILINE), out
    changes, rejections = count(out, "changes"), count(out, "rejections")
    duplicates = count(out, "duplicates dropped")
    assert changes + rejections + duplicates == accepted
    assert count(out, "out_of_order") > 0
    assert count(out, "illegal_transition") > 0
    assert duplicates > 0
    assert "NEVER APPEARED" not in out
    assert "sending [" in result.stderr  # the progress bar


async def test_accepted_events_that_never_appear_fail_the_run(unique: str, tmp_path: Path) -> None:
    # Ingest only: callbacks get 202 and reach the ingest topic, but nothing processes
    # them, so no change or rejection ever appears.
    node, env = await start(unique, tmp_path, "ingest")
    try:
        await node.wait_ready()
        result = await asyncio.to_thread(
            simulate, env, tmp_path, "--calls", "5", "--rate", "100", "--wait", "2"
        )
    finally:
        assert node.terminate()
    assert result.returncode == 1, result.stdout + result.stderr
    assert count(result.stdout, "NEVER APPEARED") > 0
    assert count(result.stdout, "202 Accepted") > 0


async def test_a_wrong_secret_fails_the_run_with_its_401s(unique: str, tmp_path: Path) -> None:
    node, env = await start(unique, tmp_path, "ingest")
    env["CALLSTATUS_SIGNING_SECRETS"] = "sigsec_" + "6" * 40  # not the server's
    try:
        await node.wait_ready()
        result = await asyncio.to_thread(simulate, env, tmp_path, "--calls", "3", "--wait", "1")
    finally:
        assert node.terminate()
    assert result.returncode == 1, result.stdout + result.stderr
    assert count(result.stdout, "401 Unauthorized") > 0
    assert "NO CALLBACK WAS ACCEPTED" in result.stdout


async def test_simulate_sends_as_the_local_accounts_file_account(
    unique: str, tmp_path: Path
) -> None:
    # What `make run` sets up: `callstatus local-secret` makes a one-account file and
    # names it in .callstatus.env; the server and simulate both read it from there.
    made = await asyncio.to_thread(
        subprocess.run,
        [str(ROOT / ".venv" / "bin" / "callstatus"), "local-secret"],
        env={k: v for k, v in os.environ.items() if not k.startswith("CALLSTATUS_")},
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    assert b"created a one-account accounts file" in made.stderr
    settings = settings_for(
        BOOTSTRAP,
        unique,
        role="all",
        verify_signatures=True,
        accounts_file=tmp_path / ".callstatus-accounts.yaml",
        topic_partitions=3,
    )
    await ensure_topics(settings)
    node = ServiceProcess(settings, tmp_path, "all")
    env = settings_env(settings, node.port)
    del env["CALLSTATUS_ACCOUNTS_FILE"]  # simulate finds it through .callstatus.env
    del env["CALLSTATUS_SIGNING_SECRETS"]
    try:
        await node.wait_ready()
        result = await asyncio.to_thread(
            simulate, env, tmp_path, *("--calls", "20", "--rate", "200", "--wait", "120")
        )
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{node.port}/metrics")).text
    finally:
        assert node.terminate()
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    accepted = count(out, "202 Accepted")
    assert re.search(rf"accounted for\s+{accepted}\s+of {accepted}$", out, re.MULTILINE), out
    # Every request was for the file's account, on its path (a 202 is a store or the
    # answer to a replay of one).
    account = "AC1334ffb694cd8d969f51cddf5f7c9b478546d50c"
    by_outcome = {
        outcome: float(value)
        for outcome, value in re.findall(
            rf'^callstatus_account_requests_total{{account="{account}",outcome="(\w+)"}} (\S+)$',
            metrics,
            re.MULTILINE,
        )
    }
    assert by_outcome.get("accepted", 0) + by_outcome.get("replayed", 0) == accepted
    assert 'route="/v1/call-status/{accountId}"' in metrics
