"""Shared fixtures. Integration tests (marked ``kafka``) use the real local broker that
``deploy/local/kafka up`` started; its address comes from CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

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


def pytest_sessionfinish(session: pytest.Session) -> None:
    # In a pytest-xdist worker: hand this worker's counts to the controller, which prints.
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fuzz_cases"] = dict(FUZZ_CASES)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the controller, a worker done
def pytest_testnodedown(node: Any, error: object) -> None:
    FUZZ_CASES.update(getattr(node, "workeroutput", {}).get("fuzz_cases", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, count in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"fuzz: {name}: {count} cases tried")


# ``make test`` runs on pytest-xdist workers: most integration tests spend their time
# waiting (for a broker to start, an outage to pass, a timeout to fire), and one worker
# left the two cores idle for most of a run. The load modules keep the cores busy with
# clients sending without pause and assert recovery bounds under that load: they run one
# at a time, never against each other.
LOAD_MODULES = frozenset(
    {
        "tests/integration/test_bench_smoke.py",
        "tests/integration/test_broker_faults.py",
        "tests/integration/test_broker_load.py",
        "tests/integration/test_exactly_once.py",
    }
)


class TestScheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist has no types
    """What runs together on one worker, in order: the load modules, all of them; each
    other integration module, as its tests were written to run (a module-scoped fixture
    such as test_acls.py's broker on its fixed port starts once); each unit test alone."""

    __test__ = False  # not a test class, whatever pytest makes of its name

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.partition("::")[0]
        if module in LOAD_MODULES:
            return "load"
        return module if module.startswith("tests/integration/") else nodeid


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: ours for -n's default --dist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> TestScheduling | None:
    return TestScheduling(config, log) if config.getvalue("dist") == "load" else None


def _shared_ids(ids: list[str]) -> list[str]:
    return sorted(n for n, count in Counter(ids).items() if count > 1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Two tests with one id: pytest-xdist would run only one of them, and say nothing.
    # In a worker the controller checks (below): a worker's refusal would reach it only
    # as "no active workers", without this message.
    if not hasattr(config, "workerinput") and (twice := _shared_ids([i.nodeid for i in items])):
        raise pytest.UsageError(f"tests share an id: {twice[:5]}")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: the controller, a worker collected
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    if twice := _shared_ids(ids):
        pytest.exit(f"tests share an id: {twice[:5]}", returncode=pytest.ExitCode.USAGE_ERROR)


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
