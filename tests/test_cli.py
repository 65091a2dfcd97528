"""The callstatus command and start-up behaviour that needs no broker: settings errors,
the local secret, signing, and what the request log line holds."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import structlog

from service import logs
from service.accountsfile import parse
from service.app import create_app
from service.signature import Verdict, sign, verify
from tests.conftest import SECRET, make_settings, run_cli
from tests.test_http import WEBHOOK, MustNotPublish


def run(
    args: list[str], cwd: Path, env: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return run_cli(args, cwd, env, stdin)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"CALLSTATUS_PORT": "eighty"}, "CALLSTATUS_PORT"),
        ({"CALLSTATUS_ROLE": "everything", "CALLSTATUS_SIGNING_SECRETS": "s"}, "CALLSTATUS_ROLE"),
        ({}, "CALLSTATUS_SIGNING_SECRETS"),  # ingest without a secret
        (
            {
                "CALLSTATUS_SIGNING_SECRETS": "s",
                "CALLSTATUS_TOPIC_STATE": "freeclimb.call-status.ingest",
            },
            "CALLSTATUS_TOPIC",
        ),
        (  # an idle retention inside the replay window (twice the signature tolerance)
            {"CALLSTATUS_SIGNING_SECRETS": "s", "CALLSTATUS_STATE_IDLE_RETENTION_SECONDS": "60"},
            "CALLSTATUS_STATE_IDLE_RETENTION_SECONDS (60) must be at least twice",
        ),
    ],
)
def test_bad_settings_stop_with_one_readable_line(
    tmp_path: Path, env: dict[str, str], names: str
) -> None:
    result = run(["serve"], tmp_path, env)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("callstatus: invalid configuration:")
    assert names in lines[0]
    assert "Traceback" not in lines[0]


def test_processor_role_needs_no_secret(tmp_path: Path) -> None:
    from service.settings import Role

    settings = make_settings(role=Role.PROCESSOR, signing_secrets=())
    assert settings.role is Role.PROCESSOR


def test_local_secret_is_made_once_and_sign_uses_it(tmp_path: Path) -> None:
    # What `make run` does on a fresh checkout: a one-account accounts file, named in
    # .callstatus.env so that sign and simulate find it (issue 18; before, the file
    # held the SIGNING_SECRETS shorthand's secret itself).
    first = run(["local-secret"], tmp_path, {})
    assert first.returncode == 0
    assert b"created a one-account accounts file .callstatus-accounts.yaml" in first.stderr
    env_file = tmp_path / ".callstatus.env"
    # The file, and reconciliation against the stand-in `callstatus simulate` runs.
    assert env_file.read_text().splitlines() == [
        "CALLSTATUS_ACCOUNTS_FILE=.callstatus-accounts.yaml",
        "# Reconciliation against the FreeClimb API stand-in of `callstatus simulate`",
        "CALLSTATUS_FREECLIMB_API_URL=http://127.0.0.1:8082/apiserver",
        "CALLSTATUS_RECONCILE_AFTER_SECONDS=20",
        "CALLSTATUS_RECONCILE_SWEEP_SECONDS=15",
    ]
    assert env_file.stat().st_mode & 0o077 == 0  # not readable by others
    accounts_file = tmp_path / ".callstatus-accounts.yaml"
    assert accounts_file.stat().st_mode & 0o077 == 0
    [account] = parse(accounts_file.read_bytes(), accounts_file)
    assert account.id == "AC1334ffb694cd8d969f51cddf5f7c9b478546d50c"  # the README's
    secret = account.current_secret.get_secret_value()
    assert secret.startswith("sigsec_") and len(secret) == 47
    assert account.api_key is not None  # what the stand-in and the reconciler share
    made = accounts_file.read_text()

    again = run(["local-secret"], tmp_path, {})
    assert b"using the local settings in .callstatus.env" in again.stderr
    assert accounts_file.read_text() == made  # kept, not replaced

    body = json.dumps(WEBHOOK).encode()
    signed = run(["sign"], tmp_path, {}, stdin=body)
    header = signed.stdout.decode().strip()
    assert verify(header, body, (secret,), time.time(), 300) is Verdict.VALID

    # The environment wins over the file, variable by variable: the shorthand instead
    # of the file takes both (the settings refuse a file and secrets together).
    other = "sigsec_" + "e" * 40
    shorthand = {"CALLSTATUS_SIGNING_SECRETS": other, "CALLSTATUS_ACCOUNTS_FILE": ""}
    from_env = run(["sign"], tmp_path, shorthand, stdin=body)
    assert (
        verify(from_env.stdout.decode().strip(), body, (other,), time.time(), 300) is Verdict.VALID
    )


def test_an_older_local_secret_file_is_kept(tmp_path: Path) -> None:
    # A checkout set up before accounts files: its shorthand secret keeps working.
    env_file = tmp_path / ".callstatus.env"
    env_file.write_text(f"CALLSTATUS_SIGNING_SECRETS={SECRET}\n")
    result = run(["local-secret"], tmp_path, {})
    assert result.returncode == 0
    assert env_file.read_text() == f"CALLSTATUS_SIGNING_SECRETS={SECRET}\n"
    assert not (tmp_path / ".callstatus-accounts.yaml").exists()
    signed = run(["sign", "--timestamp", "7"], tmp_path, {}, stdin=b"{}")
    assert signed.stdout.decode().strip() == sign(SECRET, 7, b"{}")


def test_sign_with_explicit_secret_and_timestamp(tmp_path: Path) -> None:
    result = run(
        ["sign", "--secret", SECRET, "--timestamp", "1700000000"], tmp_path, {}, stdin=b"{}"
    )
    assert result.stdout.decode().strip() == sign(SECRET, 1700000000, b"{}")


async def test_request_log_line_has_ids_and_no_secret(capfd: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", "json")
    try:
        app = create_app(make_settings(), MustNotPublish())
        body = json.dumps({**WEBHOOK, "callStatus": "bogus"}).encode()
        header = sign(SECRET, int(time.time()), body)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            await c.post(
                "/v1/call-status",
                content=body,
                headers={
                    "content-type": "application/json",
                    "FreeClimb-Signature": header,
                    "X-Request-ID": "req-42",
                },
            )
    finally:
        # The configured stream is this test's captured stderr, closed after it.
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    request_lines = [line for line in lines if line.get("event") == "request"]
    assert len(request_lines) == 1
    line = request_lines[0]
    assert line["outcome"] == "invalid"
    assert line["status"] == 422
    assert line["request_id"] == "req-42"
    assert isinstance(line["latency_ms"], float)
    assert SECRET not in err
    assert header.split("v1=")[1] not in err


def test_sign_without_any_secret_says_so(tmp_path: Path) -> None:
    result = run(["sign"], tmp_path, {"CALLSTATUS_VERIFY_SIGNATURES": "false"}, stdin=b"{}")
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"no secret: pass --secret or set CALLSTATUS_SIGNING_SECRETS" in result.stderr


def test_local_secret_defers_to_the_environment(tmp_path: Path) -> None:
    result = run(["local-secret"], tmp_path, {"CALLSTATUS_SIGNING_SECRETS": "sigsec_x"})
    assert result.returncode == 0
    assert b"from the environment" in result.stderr
    assert not (tmp_path / ".callstatus.env").exists()


def test_serve_with_a_malformed_accounts_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "accounts.yaml"
    path.write_text("accounts:\n  - [not closed\n")
    result = run(
        ["serve"],
        tmp_path,
        {"CALLSTATUS_ACCOUNTS_FILE": str(path), "CALLSTATUS_ROLE": "ingest"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"callstatus: {path}: not valid YAML")
