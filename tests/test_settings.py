"""Settings: defaults, contradictions refused at start, and the Kafka client options."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.kafka import client_options
from service.settings import Role, Settings
from tests.conftest import make_settings


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


def test_secrets_are_read_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .callstatus.env here
    monkeypatch.setenv("CALLSTATUS_SIGNING_SECRETS", " sigsec_new , sigsec_old ,")
    assert Settings().signing_secrets == ("sigsec_new", "sigsec_old")


def test_environment_wins_over_the_local_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".callstatus.env").write_text("CALLSTATUS_SIGNING_SECRETS=from-file\n")
    assert Settings().signing_secrets == ("from-file",)
    monkeypatch.setenv("CALLSTATUS_SIGNING_SECRETS", "from-env")
    assert Settings().signing_secrets == ("from-env",)


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
    from service.kafka import IngestProducer, Unavailable

    producer = IngestProducer(make_settings())
    assert await producer.ready() is False
    with pytest.raises(Unavailable) as exc:
        await producer.publish(b"k", b"{}", [])
    assert exc.value.reason == "not_started"
    await producer.stop()  # stopping what never started is harmless


def test_a_terminal_retention_shorter_than_the_signature_tolerance_is_refused() -> None:
    # A signed redelivery is valid for the tolerance; a finished call forgotten sooner
    # would take it as a new first event.
    with pytest.raises(ValidationError, match="must be at least"):
        make_settings(state_terminal_retention_seconds=299, signature_tolerance_seconds=300)
    ok = make_settings(state_terminal_retention_seconds=300, signature_tolerance_seconds=300)
    assert ok.state_terminal_retention_seconds == 300
