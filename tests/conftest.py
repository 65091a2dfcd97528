"""Shared fixtures. Integration tests (marked ``kafka``) use the real local broker that
``deploy/local/kafka up`` started; its address comes from CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from service.settings import Settings

BOOTSTRAP = os.environ.get("CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
SECRET = "sigsec_" + "5" * 40


def make_settings(**overrides: object) -> Settings:
    """Settings for a test, isolated from the environment and the local secret file."""
    values: dict[str, object] = {
        "kafka_bootstrap_servers": BOOTSTRAP,
        "signing_secrets": (SECRET,),
        "log_format": "console",
    }
    values.update(overrides)
    # model_validate skips the environment and .callstatus.env: tests see only these.
    return Settings.model_validate(values)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic and group names, so tests never share state."""
    return uuid.uuid4().hex[:10]


# How many cases each fuzzer tried in this run, printed at the end (pytest's summary).
FUZZ_CASES: Counter[str] = Counter()


def count_fuzz_case(name: str) -> None:
    FUZZ_CASES[name] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, count in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"fuzz: {name}: {count} cases tried")


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """``callstatus ARGS`` as a child process in ``cwd``, configured by ``env`` alone
    (the parent's ``CALLSTATUS_*`` variables are dropped)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTATUS_")}
    clean["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=cwd,
        env={**clean, **env},
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
