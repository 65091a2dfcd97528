"""The FreeClimb-Signature check: every verdict, rotation, tolerance edges, fuzzing."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from service.signature import (
    HmacKey,
    MalformedSignature,
    ParsedSignature,
    Verdict,
    check_body,
    check_header,
    compute,
    parse_header,
    sign,
    verify,
)

SECRET = "sigsec_" + "a" * 40
OTHER = "sigsec_" + "b" * 40
BODY = b'{"callId":"CA' + b"1" * 40 + b'","callStatus":"ringing"}'
NOW = 1_700_000_000
TOL = 300


def test_compute_matches_the_documented_scheme() -> None:
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert compute(SECRET, NOW, BODY) == expected
    assert sign(SECRET, NOW, BODY) == f"t={NOW},v1={expected}"


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_a_padded_key_digests_as_hmac_does(key: bytes, message: bytes) -> None:
    """Keys shorter than, as long as and longer than SHA-256's 64-byte block."""
    padded = HmacKey(key)
    expected = hmac.new(key, message, hashlib.sha256).hexdigest()
    assert padded.hexdigest(message) == expected
    assert padded.hexdigest(message) == expected  # its hash states are not used up


def test_a_padded_key_verifies_and_never_shows_its_secret() -> None:
    key = HmacKey(SECRET.encode())
    # An Account holding it can still be copied: the key is never changed once made.
    assert copy.deepcopy(key) is key and copy.copy(key) is key
    assert verify(sign(SECRET, NOW, BODY), BODY, (key,), NOW, TOL) is Verdict.VALID
    assert verify(sign(OTHER, NOW, BODY), BODY, (key,), NOW, TOL) is Verdict.MISMATCH
    assert SECRET not in repr(key) and "a" * 8 not in repr(key)


def test_valid_signature_is_accepted() -> None:
    assert verify(sign(SECRET, NOW, BODY), BODY, (SECRET,), NOW, TOL) is Verdict.VALID


def test_raw_bytes_matter_reserialised_json_fails() -> None:
    reserialised = BODY.replace(b":", b": ")
    assert verify(sign(SECRET, NOW, BODY), reserialised, (SECRET,), NOW, TOL) is Verdict.MISMATCH


def test_wrong_secret_is_a_mismatch() -> None:
    assert verify(sign(OTHER, NOW, BODY), BODY, (SECRET,), NOW, TOL) is Verdict.MISMATCH


def test_timestamp_is_part_of_the_signed_message() -> None:
    forged = sign(SECRET, NOW, BODY).replace(f"t={NOW}", f"t={NOW + 1}")
    assert verify(forged, BODY, (SECRET,), NOW, TOL) is Verdict.MISMATCH


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header(header: str | None) -> None:
    assert verify(header, BODY, (SECRET,), NOW, TOL) is Verdict.MISSING


def test_any_v1_under_any_secret_rotation() -> None:
    old, new = compute(OTHER, NOW, BODY), compute(SECRET, NOW, BODY)
    header = f"t={NOW},v1={old},v1={new}"
    # We hold only the new secret: the second v1 matches.
    assert verify(header, BODY, (SECRET,), NOW, TOL) is Verdict.VALID
    # We hold both, FreeClimb signs only with the old one.
    assert verify(sign(OTHER, NOW, BODY), BODY, (SECRET, OTHER), NOW, TOL) is Verdict.VALID
    # Neither matches.
    third = "sigsec_" + "c" * 40
    assert verify(header, BODY, (third,), NOW, TOL) is Verdict.MISMATCH


def test_no_secrets_never_validates() -> None:
    assert verify(sign(SECRET, NOW, BODY), BODY, (), NOW, TOL) is Verdict.MISMATCH


@pytest.mark.parametrize(
    ("offset", "verdict"),
    [
        (0, Verdict.VALID),
        (TOL, Verdict.VALID),  # exactly at the edge, in the past
        (TOL + 1, Verdict.TOO_OLD),
        (-TOL, Verdict.VALID),  # exactly at the edge, in the future
        (-TOL - 1, Verdict.TOO_NEW),
        (3 * 24 * 3600, Verdict.TOO_OLD),  # the SDK's ms/s mix-up would accept this
        (-10 * 24 * 3600, Verdict.TOO_NEW),  # the SDK never rejects the future
    ],
)
def test_tolerance_in_seconds_both_directions(offset: int, verdict: Verdict) -> None:
    stamp = NOW - offset
    assert verify(sign(SECRET, stamp, BODY), BODY, (SECRET,), NOW, TOL) is verdict


def test_fractional_now_edges() -> None:
    header = sign(SECRET, NOW, BODY)
    assert verify(header, BODY, (SECRET,), NOW + TOL + 0.5, TOL) is Verdict.TOO_OLD
    assert verify(header, BODY, (SECRET,), NOW + TOL - 0.5, TOL) is Verdict.VALID


GOOD = compute(SECRET, NOW, BODY)


@pytest.mark.parametrize(
    "header",
    [
        "garbage",  # the SDK's parser raises on a value without '='
        f"t={NOW}",  # no v1
        f"v1={GOOD}",  # no t
        f"t={NOW},t={NOW},v1={GOOD}",  # two t
        f"t=abc,v1={GOOD}",
        f"t=-5,v1={GOOD}",
        f"t=1e9,v1={GOOD}",
        f"t=\u0661\u0662,v1={GOOD}",  # non-ASCII digits
        f"t={'9' * 40},v1={GOOD}",  # absurd timestamp
        f"t={NOW},v1={GOOD.upper()}",  # must be lowercase hex
        f"t={NOW},v1={GOOD[:-1]}",  # short
        f"t={NOW},v1={GOOD}0",  # long
        f"t={NOW},v1={'z' * 64}",
        f"t={NOW},v1={GOOD},",  # trailing empty element
        f"t={NOW},,v1={GOOD}",
        f"t={NOW},v1={GOOD}" + f",v1={GOOD}" * 20,  # too many signatures
        "t=" + "1" * 5000,  # too long
    ],
)
def test_malformed_headers_are_a_verdict_not_an_exception(header: str) -> None:
    assert verify(header, BODY, (SECRET,), NOW, TOL) is Verdict.MALFORMED


def test_parser_tolerates_spaces_and_unknown_schemes() -> None:
    parsed = parse_header(f" t = {NOW} , v0=whatever , v1={GOOD} ")
    assert parsed.timestamp == NOW
    assert parsed.signatures == (GOOD,)
    assert verify(f"t={NOW}, v0=x, v1={GOOD}", BODY, (SECRET,), NOW, TOL) is Verdict.VALID


def test_parser_keeps_nothing_between_calls() -> None:
    # The SDK kept signatures in a class-level list: a second header inherited the first's.
    parse_header(f"t={NOW},v1={GOOD}")
    other = "0" * 64
    assert parse_header(f"t={NOW},v1={other}").signatures == (other,)
    assert verify(f"t={NOW},v1={other}", BODY, (SECRET,), NOW, TOL) is Verdict.MISMATCH


@given(st.text(max_size=300))
def test_fuzz_any_text_gets_a_verdict(header: str) -> None:
    with contextlib.suppress(MalformedSignature):
        parse_header(header)
    assert verify(header, BODY, (SECRET,), NOW, TOL) in set(Verdict)


_parts = st.one_of(
    st.builds(lambda n: f"t={n}", st.integers(min_value=-(10**15), max_value=10**15)),
    st.builds(lambda h: f"v1={h}", st.text(alphabet="0123456789abcdefABCDEF", max_size=70)),
    st.text(alphabet="tv1=,; \t0123456789abcdef", max_size=20),
)


@given(st.lists(_parts, max_size=8), st.sampled_from([",", ", ", ";", ",,"]))
def test_fuzz_structured_headers_get_a_verdict(parts: list[str], sep: str) -> None:
    header = sep.join(parts)
    verdict = verify(header, BODY, (SECRET,), NOW, TOL)
    assert verdict in set(Verdict)
    # Only a header carrying the right digest can ever be VALID.
    if verdict is Verdict.VALID:
        assert GOOD in header


def test_header_is_judged_without_the_body() -> None:
    # What the HTTP shell checks before reading a body byte: no body argument at all.
    assert check_header(None, NOW, TOL) is Verdict.MISSING
    assert check_header("t=1", NOW, TOL) is Verdict.MALFORMED
    assert check_header(sign(SECRET, NOW - TOL - 1, BODY), NOW, TOL) is Verdict.TOO_OLD
    assert check_header(sign(SECRET, NOW + TOL + 1, BODY), NOW, TOL) is Verdict.TOO_NEW
    parsed = check_header(sign(SECRET, NOW, BODY), NOW, TOL)
    assert isinstance(parsed, ParsedSignature)
    assert check_body(parsed, BODY, (OTHER, SECRET)) is Verdict.VALID
    assert check_body(parsed, BODY + b" ", (SECRET,)) is Verdict.MISMATCH


def test_secrets_may_be_secret_strings() -> None:
    header = sign(SecretStr(SECRET), NOW, BODY)
    assert header == sign(SECRET, NOW, BODY)
    assert verify(header, BODY, (SecretStr(OTHER), SecretStr(SECRET)), NOW, TOL) is Verdict.VALID
