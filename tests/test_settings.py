"""Settings: defaults, contradictions refused at start, and the Kafka client options."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import structlog
from pydantic import ValidationError
from structlog.testing import capture_logs

from service.cli import main
from service.frontdoor import GuardedProtocol
from service.kafka import STATE_RECORD_MAX_BYTES, client_options, record_sizes, topic_specs
from service.server import build
from service.settings import Role, Settings, SettingsError, load_settings
from tests.conftest import SECRET, make_settings


def _secrets(settings: Settings) -> tuple[str, ...]:
    return tuple(s.get_secret_value() for s in settings.signing_secrets)


def test_defaults_follow_the_contract() -> None:
    s = make_settings()
    assert s.topic_names == (
        "freeclimb.call-status.ingest",
        "freeclimb.call-status.changes",
        "freeclimb.call-status.rejected",
        "freeclimb.call-status.state",
    )
    assert (s.signature_tolerance_seconds, s.max_body_bytes, s.port) == (300, 65536, 8080)
    assert s.role is Role.ALL and s.verify_signatures
    assert (s.body_read_timeout_seconds, s.max_connections) == (10.0, 1000)


def test_secrets_are_read_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .callstatus.env here
    monkeypatch.setenv("CALLSTATUS_SIGNING_SECRETS", " sigsec_new , sigsec_old ,")
    assert _secrets(Settings()) == ("sigsec_new", "sigsec_old")


def test_environment_wins_over_the_local_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".callstatus.env").write_text("CALLSTATUS_SIGNING_SECRETS=from-file\n")
    assert _secrets(Settings()) == ("from-file",)
    monkeypatch.setenv("CALLSTATUS_SIGNING_SECRETS", "from-env")
    assert _secrets(Settings()) == ("from-env",)


def test_plaintext_options_are_just_the_address() -> None:
    assert client_options(make_settings(kafka_bootstrap_servers="k:9092")) == {
        "bootstrap_servers": "k:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_options_carry_the_credentials() -> None:
    s = make_settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password="pw",
    )
    options = client_options(s)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("svc", "pw")
    assert "pw" not in repr(s)  # a logged or printed Settings never shows the password


def test_ssl_options_build_a_context(tmp_path: Path) -> None:
    s = make_settings(kafka_security_protocol="SSL")
    assert isinstance(client_options(s)["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs CALLSTATUS_KAFKA_SASL_USERNAME"),
        ({"kafka_sasl_username": "svc", "kafka_sasl_password": "pw"}, "use SASL_SSL"),
        ({"kafka_ssl_cafile": "/nonexistent/ca.pem"}, "kafka_ssl_cafile"),
        ({"signing_secrets": (), "role": "ingest"}, "SIGNING_SECRETS is empty"),
        ({"topic_changes": "freeclimb.call-status.ingest"}, "must be distinct"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
    ],
)
def test_contradictions_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(**overrides)


async def test_a_producer_that_never_started_refuses_instead_of_crashing() -> None:
    from service.producer import IngestProducer, Unavailable

    producer = IngestProducer(make_settings())
    assert await producer.ready() is False
    with pytest.raises(Unavailable) as exc:
        await producer.publish(b"k", b"{}", [])
    assert exc.value.reason == "no_producer"
    await producer.stop()  # stopping what never started is harmless


def test_signing_secrets_never_show_in_repr_errors_or_logs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    s = make_settings(signing_secrets=(SECRET, "sigsec_other"))
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert SECRET not in s.model_dump_json()
    # A start-up refusal names the variable, never the secret's value.
    monkeypatch.setenv("CALLSTATUS_SIGNING_SECRETS", SECRET)
    monkeypatch.setenv("CALLSTATUS_TOPIC_CHANGES", "freeclimb.call-status.ingest")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert "must be distinct" in str(exc.value) and SECRET not in str(exc.value)
    with pytest.raises(ValidationError) as raw:
        Settings()
    assert SECRET not in str(raw.value)  # what a traceback would print
    with capture_logs() as logs:
        structlog.get_logger().info("settings", settings=s)
    assert SECRET not in repr(logs)


def test_settings_hold_secrets_as_secret_strings() -> None:
    s = make_settings(signing_secrets="sigsec_a, sigsec_b")
    assert [v.get_secret_value() for v in s.signing_secrets] == ["sigsec_a", "sigsec_b"]


@pytest.mark.parametrize("body", [1024, 65536, 1024 * 1024, 16 * 1024 * 1024])
def test_producer_takes_the_largest_record_a_body_can_make(body: int) -> None:
    # The ingest record holds the body twice at most (raw, and its fields again) plus the
    # envelope; the producer and the topics must take it, or it would get 503 forever.
    s = make_settings(max_body_bytes=body)
    assert s.producer_max_request_bytes >= 2 * body + 4096
    for spec in topic_specs(s):
        assert int(spec.configs["max.message.bytes"]) == s.producer_max_request_bytes


@pytest.mark.parametrize(("replication", "min_isr"), [(1, "1"), (2, "2"), (3, "2"), (5, "2")])
def test_created_topics_require_in_sync_replicas(replication: int, min_isr: str) -> None:
    s = make_settings(topic_replication_factor=replication)
    assert {spec.configs["min.insync.replicas"] for spec in topic_specs(s)} == {min_isr}


def test_the_front_door_limits_are_what_the_server_gets() -> None:
    settings = make_settings(
        max_connections=77, header_timeout_seconds=3.5, max_header_bytes=4096, max_header_fields=20
    )
    server = build(settings)
    door = server.door
    assert (door.max_connections, door.header_timeout) == (77, 3.5)
    assert (door.max_header_bytes, door.max_header_fields) == (4096, 20)
    # uvicorn's own cap would count idle sockets as busy: the front door replaces it.
    assert server.config.limit_concurrency is None
    assert server.config.http.func is GuardedProtocol  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_body_bytes": 17 * 1024 * 1024}, "max_body_bytes"),
        ({"body_read_timeout_seconds": 0}, "body_read_timeout_seconds"),
        ({"max_connections": 0}, "max_connections"),
        ({"header_timeout_seconds": 0}, "header_timeout_seconds"),
        ({"max_header_bytes": 100}, "max_header_bytes"),
        ({"max_header_fields": 0}, "max_header_fields"),
        ({"replay_cache_entries": -1}, "replay_cache_entries"),
    ],
)
def test_new_limits_are_bounded(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(**overrides)


def test_a_terminal_retention_shorter_than_the_signature_tolerance_is_refused() -> None:
    # A signed request is valid up to the tolerance either side of our clock: an original
    # and its replay can arrive twice the tolerance apart.
    with pytest.raises(ValidationError, match="must be at least twice"):
        make_settings(state_terminal_retention_seconds=599, signature_tolerance_seconds=300)
    ok = make_settings(state_terminal_retention_seconds=600, signature_tolerance_seconds=300)
    assert ok.state_terminal_retention_seconds == 600


@pytest.mark.parametrize(
    "retention", ["state_terminal_retention_seconds", "state_idle_retention_seconds"]
)
def test_every_retention_that_forgets_a_call_keeps_the_replay_window(retention: str) -> None:
    # Either retention forgets a call; forgotten within the replay window (twice the
    # tolerance), a replay of its last event would be a new first event: a second change.
    others = {
        "state_terminal_retention_seconds": 600,
        "state_idle_retention_seconds": 600,
        "signature_tolerance_seconds": 300,
    }
    with pytest.raises(ValidationError, match=f"CALLSTATUS_{retention.upper()} \\(599\\)"):
        make_settings(**{**others, retention: 599})
    assert getattr(make_settings(**{**others, retention: 600}), retention) == 600


def test_the_clock_skew_bound_has_a_default_and_is_bounded() -> None:
    assert make_settings().max_clock_skew_seconds == 300
    with pytest.raises(ValidationError, match="max_clock_skew_seconds"):
        make_settings(max_clock_skew_seconds=0)


def _sasl(**overrides: object) -> Settings:
    return make_settings(kafka_security_protocol="SASL_SSL", **overrides)


def test_kafka_credentials_are_read_from_files(tmp_path: Path) -> None:
    # A Secret's keys mounted as files; `kubectl create secret --from-file` may leave a
    # line end, which is not part of the value.
    (tmp_path / "username").write_text("callstatus-ingest\n")
    (tmp_path / "password").write_text("s3cr3t pw\r\n")
    s = _sasl(
        kafka_sasl_username_file=tmp_path / "username",
        kafka_sasl_password_file=str(tmp_path / "password"),
    )
    assert s.kafka_sasl_username == "callstatus-ingest"
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == "s3cr3t pw"
    options = client_options(s)
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "callstatus-ingest",
        "s3cr3t pw",
    )
    assert "s3cr3t" not in repr(s)


def test_kafka_credentials_from_the_environment_and_a_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("from-file")
    with pytest.raises(ValidationError, match="CALLSTATUS_KAFKA_SASL_PASSWORD or") as exc:
        _sasl(
            kafka_sasl_username="u",
            kafka_sasl_password="from-env",
            kafka_sasl_password_file=tmp_path / "password",
        )
    assert "from-file" not in str(exc.value) and "from-env" not in str(exc.value)


@pytest.mark.parametrize("problem", ["missing", "empty", "directory", "unreadable"])
def test_a_credential_file_that_cannot_be_used_is_named(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "password"
    if problem == "empty":
        path.write_text("\n")
    elif problem == "directory":
        path.mkdir()
    elif problem == "unreadable":
        path.write_text("pw")
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: nothing to prove here
            pytest.skip("running as root")
    with pytest.raises(ValidationError, match="CALLSTATUS_KAFKA_SASL_PASSWORD_FILE") as exc:
        _sasl(kafka_sasl_username="u", kafka_sasl_password_file=path)
    assert str(path) in str(exc.value)


def test_serve_with_an_unreadable_credential_file_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .callstatus.env here
    for name in list(os.environ):
        if name.startswith("CALLSTATUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CALLSTATUS_ROLE", "processor")
    monkeypatch.setenv("CALLSTATUS_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CALLSTATUS_KAFKA_SASL_USERNAME", "callstatus-processor")
    monkeypatch.setenv("CALLSTATUS_KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "absent"))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "CALLSTATUS_KAFKA_SASL_PASSWORD_FILE" in err and str(tmp_path / "absent") in err
    assert "Traceback" not in err


def test_the_readme_lists_every_setting() -> None:
    """The README's configuration table is how users learn a setting exists: each one
    is in it, by its name or as a variant sharing a row (`CALLSTATUS_KAFKA_SASL_USERNAME`
    / `_PASSWORD`: the suffix stands in for the name's last words)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    named: set[str] = set()
    for row in (line for line in readme.splitlines() if line.startswith("| `CALLSTATUS_")):
        first = row.split("`")[1]
        named.add(first)
        for token in row.split("`")[3::2]:
            if token.startswith("CALLSTATUS_"):
                named.add(token)
            elif token.startswith("_") and token[1:].replace("_", "").isalnum():
                words = first.split("_")
                for k in range(1, 4):
                    named.add("_".join(words[:-k]) + token)
    missing = [
        f"CALLSTATUS_{name.upper()}"
        for name in Settings.model_fields
        if f"CALLSTATUS_{name.upper()}" not in named
    ]
    assert not missing, f"add these to the README's configuration table: {missing}"


def test_the_reconcile_sweep_window_must_stay_within_the_terminal_retention() -> None:
    # A call the sweep lists whose state was already retired is a first event again: a
    # second change on changes for a call that ended long ago.
    key = {"freeclimb_account_id": "AC" + "1" * 40, "freeclimb_api_key": "k"}
    # The defaults fit exactly: 2400 + 2 x 300 = 3000 = 3600 - 300 - 300.
    assert make_settings(**key).reconcile_sweep_lookback_seconds == 2400
    with pytest.raises(ValidationError) as raised:
        make_settings(**key, reconcile_sweep_lookback_seconds=2401)
    text = str(raised.value)
    assert "CALLSTATUS_RECONCILE_SWEEP_LOOKBACK_SECONDS (2401)" in text
    assert "= 3001 s must be at most" in text and "= 3000 s" in text
    with pytest.raises(ValidationError, match="reaches past the calls' retention"):
        make_settings(**key, state_terminal_retention_seconds=3000)
    with pytest.raises(ValidationError, match="reaches past the calls' retention"):
        make_settings(**key, reconcile_sweep_seconds=400)
    # The sweep off, or no reconciler possible (ingest only, no key or accounts file):
    # nothing to check.
    make_settings(**key, reconcile_sweep_seconds=0, state_terminal_retention_seconds=900)
    make_settings(state_terminal_retention_seconds=900)
    make_settings(**key, role="ingest", state_terminal_retention_seconds=900)
    # Only an accounts file, which may hold no apiKey at all (an upgrade that kept a
    # short retention): the node starts, and its reconciler warns once a key turns it on.
    short = make_settings(
        accounts_file="accounts.yaml", signing_secrets=(), state_terminal_retention_seconds=900
    )
    problem = short.sweep_window_problem()
    assert problem is not None and "reaches past the calls' retention" in problem


def test_the_state_topic_must_take_a_whole_batch_of_states() -> None:
    """The processor writes states in batches of up to processor_batch_bytes that barely
    compress, and Kafka refuses an oversized batch whole: a state topic that only takes
    one state (4 KiB) would refuse every full batch, so the start asks for a batch."""
    settings = make_settings()
    sizes = record_sizes(settings)
    assert settings.processor_batch_bytes == settings.producer_max_request_bytes // 2
    assert sizes[settings.topic_state] == settings.processor_batch_bytes > STATE_RECORD_MAX_BYTES
    assert sizes[settings.topic_changes] == settings.producer_max_request_bytes
