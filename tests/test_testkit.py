"""testkit's settings_env carries every setting to a child process: Settings -> the
environment -> Settings gives the same settings back, for settings with every field
away from its default (a new setting must be given a value here, and then needs no
edit in testkit)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import Settings
from testkit import environment, settings_env, settings_for

ACCOUNT = "AC" + "3" * 40


def every_field_set(folder: Path, accounts_file: bool = False) -> Settings:
    """Settings with no field at its default, but one of two exclusive ways to give the
    signing secrets: inline (and bound to an account), or an accounts file."""
    files = {}
    for name, content in (
        ("user", "callstatus-user"),
        ("password", "pa,ss word"),
        ("ca.pem", "ca"),
        ("cert.pem", "cert"),
        ("key.pem", "key"),
        ("api-key", "fc-api-key"),
    ):
        files[name] = folder / name
        files[name].write_text(content + "\n")
    return Settings.model_validate(
        {
            "kafka_bootstrap_servers": "broker-1:9093,broker-2:9093",
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            # The username and password themselves: read from these files.
            "kafka_sasl_username_file": files["user"],
            "kafka_sasl_password_file": files["password"],
            "kafka_ssl_cafile": files["ca.pem"],
            "kafka_ssl_certfile": files["cert.pem"],
            "kafka_ssl_keyfile": files["key.pem"],
            **(
                {"accounts_file": write_accounts(folder)}
                if accounts_file
                else {
                    "signing_secrets": ("sigsec_" + "1" * 40, "sigsec_" + "2" * 40),
                    "signing_account_id": ACCOUNT,
                    # One account's API key without an accounts file: from its file.
                    "freeclimb_account_id": ACCOUNT,
                    "freeclimb_api_key_file": files["api-key"],
                }
            ),
            "freeclimb_api_url": "http://127.0.0.1:1/apiserver",
            "reconcile_after_seconds": 30.0,
            "reconcile_sweep_seconds": 0.0,
            "reconcile_sweep_lookback_seconds": 600.0,
            "accounts_reload_seconds": 2.5,
            "verify_signatures": False,
            "signature_tolerance_seconds": 30,
            "max_body_bytes": 32768,
            "body_read_timeout_seconds": 2.5,
            "max_connections": 50,
            "header_timeout_seconds": 1.5,
            "max_header_bytes": 4096,
            "max_header_fields": 20,
            "replay_cache_entries": 0,
            "role": "ingest",
            "host": "0.0.0.0",  # a value to carry: nothing listens here
            "port": 9999,
            "topic_ingest": "t.ingest",
            "topic_changes": "t.changes",
            "topic_rejected": "t.rejected",
            "topic_state": "t.state",
            "create_topics": False,
            "topic_partitions": 3,
            "topic_replication_factor": 3,
            "produce_timeout_seconds": 2.0,
            "produce_delivery_timeout_seconds": 7.5,
            "max_inflight_produces": 10,
            "spool_enabled": False,
            "spool_dir": folder / "spool",
            "spool_max_bytes": 2 * 1024 * 1024,
            "consumer_group": "g-parity",
            "state_terminal_retention_seconds": 120,
            "state_idle_retention_seconds": 240,
            "max_clock_skew_seconds": 60,
            "processor_batch_max": 10,
            "processor_compression": "zstd",
            "drain_delay_seconds": 1.5,
            "shutdown_grace_seconds": 3.0,
            "log_level": "DEBUG",
            "log_format": "console",
        }
    )


def write_accounts(folder: Path) -> Path:
    path = folder / "accounts.yaml"
    path.write_text(f"accounts:\n  {ACCOUNT}:\n    signingSecrets: [sigsec_{'4' * 40}]\n")
    return path


def test_every_setting_is_off_its_default_in_one_of_the_two(tmp_path: Path) -> None:
    both = (every_field_set(tmp_path), every_field_set(tmp_path, accounts_file=True))
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        assert any(getattr(s, name) != default for s in both), f"give {name} a value"


@pytest.mark.parametrize("accounts_file", [False, True])
def test_every_setting_survives_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accounts_file: bool
) -> None:
    settings = every_field_set(tmp_path, accounts_file)
    for key in os.environ:
        if key.startswith("CALLSTATUS_"):
            monkeypatch.delenv(key)
    for key, value in environment(settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no .callstatus.env here: the environment alone
    assert Settings() == settings


def test_the_child_listens_on_loopback_logs_json_and_ignores_the_parents_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSTATUS_TOPIC_STATE", "the-parents")
    monkeypatch.setenv("CALLSTATUS_NOT_A_SETTING", "x")
    env = settings_env(settings_for("127.0.0.1:9092", "u1"), 4321)
    assert (env["CALLSTATUS_HOST"], env["CALLSTATUS_PORT"]) == ("127.0.0.1", "4321")
    assert env["CALLSTATUS_LOG_FORMAT"] == "json"
    assert env["CALLSTATUS_TOPIC_STATE"] == "t-u1.state"
    assert "CALLSTATUS_NOT_A_SETTING" not in env
    assert env["PATH"] == os.environ["PATH"]
