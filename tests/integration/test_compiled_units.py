"""The compiled build (setup.py's list, testkit.compiled) passes the unit tests of what
it compiles, run against its C extensions rather than the dev venv's plain modules: the
signature check, the strict JSON reader, the account book and binding, through the
HTTP suites that drive them. Here, not in the unit run: it needs the build (a minute,
once per change of the sources).

Left out: tests that patch a compiled instance's method or pass a value against its
annotation (compiled code refuses both), namely most of tests/test_lane.py, and one
test each of tests/test_logs.py and tests/test_hotmetrics.py; the integration tests
run the lane compiled through the service processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testkit import ROOT, compiled

UNIT_TESTS = (
    "tests/test_signature.py",
    "tests/test_strictjson.py",
    "tests/test_http.py",
    "tests/test_http_accounts.py",
)


def test_the_compiled_modules_pass_their_unit_tests() -> None:
    folder = compiled.build()
    # The venv's pytest script, not `python -m pytest`, which puts the checkout's plain
    # sources first on sys.path; importlib mode, which leaves sys.path alone, so
    # PYTHONPATH's compiled modules are the ones imported (conftest.py checks it).
    pytest_script = Path(sys.executable).parent / "pytest"
    run = subprocess.run(
        [
            str(pytest_script),
            "-q",
            "-p",
            "no:cacheprovider",
            "--import-mode=importlib",
            *UNIT_TESTS,
        ],
        env={**os.environ, **compiled.environ(folder), "TESTKIT_EXPECT_COMPILED": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    summary = run.stdout.strip().splitlines()[-1:] or [run.stderr[-2000:]]
    assert run.returncode == 0, f"{run.stdout[-6000:]}{run.stderr[-2000:]}"
    assert " passed" in summary[0] and "failed" not in summary[0], summary
