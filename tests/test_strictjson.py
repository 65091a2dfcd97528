"""The jiter path of service/strictjson.py held to the strict parse: whatever it takes, it
must read as the strict parse does, and everything the strict parse refuses it must leave
to it (so every refusal keeps its words)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import strictjson

DEPTH = 32
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
# Bytes that change what a flat object means: JSON's syntax, escapes, the strict
# parse's refusals (NaN, out of range, duplicate-making quotes and colons), non-ASCII.
_SPLICES = st.sampled_from(
    [b"{", b"}", b"[", b"]", b":", b",", b'"', b"\\", b"\\u", b"\\ud800", b"NaN", b"1e400",
     b"-", b"0", b"01", b".", b"e", b"\x00", b"\x1f", b" ", b"\t", b"\x0c", b"\xc3\xa9",
     b"\xff", b"true", b"nul", b'"a":1,', b'"a":', b"Infinity"]
)  # fmt: skip


def _outcome(parse: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "value", parse(raw, DEPTH)
    except (strictjson.NotJson, strictjson.DuplicateKey, strictjson.TooDeep) as exc:
        return type(exc).__name__, str(exc)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    obj = draw(st.dictionaries(st.text(max_size=8), _SCALARS, max_size=8))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :")]))
    raw = json.dumps(obj, separators=separators, ensure_ascii=draw(st.booleans())).encode()
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(_SPLICES) + raw[at + draw(st.integers(0, 2)) :]
    return raw


@given(bodies())
def test_the_jiter_path_reads_what_the_strict_parse_reads(raw: bytes) -> None:
    flat = strictjson.flat_object(raw, DEPTH)
    strict = _outcome(strictjson.strict_parse, raw)
    if flat is not None:
        assert strict == ("value", flat)
        assert list(flat) == list(strict[1])  # the keys' order too
    assert _outcome(strictjson.parse, raw) == strict


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":2}',  # the duplicate jiter would take (the last wins)
        b'{"a":1, "b":2,"a" :3}',
        b'{"a":1e400}',  # inf to jiter
        b'{"a":NaN}',
        b'{"a":"\\ud800"}',
        b'{"a":"\xff"}',
        b'{"a":' + b"1" * 5000 + b"}",  # past json's integer digits
    ],
)
def test_what_the_strict_parse_refuses_is_left_to_it(raw: bytes) -> None:
    assert strictjson.flat_object(raw, DEPTH) is None
    with pytest.raises(ValueError):
        strictjson.parse(raw, DEPTH)


def test_an_ordinary_webhook_takes_the_jiter_path() -> None:
    # Without this, a gate that always says no would pass every test above.
    raw = b'{"requestType":"callStatus","callId":"CA1","to":"+1 (312) x","n":5,"p":null}'
    assert strictjson.flat_object(raw, DEPTH) == json.loads(raw)
    # A ':' inside a string only sends the body the strict way.
    assert strictjson.flat_object(b'{"uri":"https://x"}', DEPTH) is None
    assert strictjson.parse(b'{"uri":"https://x"}', DEPTH) == {"uri": "https://x"}
