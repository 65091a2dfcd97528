"""One strict parse of a request body: RFC 8259 JSON that every downstream reader agrees on.

Python's ``json`` module is lenient where the processor's decoder (pydantic's jiter) and
other strict consumers are not, so a body it accepts could be answered 202 and then fail
downstream. This parse refuses, in one pass over the bytes:

- anything that is not UTF-8 (``json.loads`` on bytes would guess UTF-16 or UTF-32);
- ``NaN``, ``Infinity``, ``-Infinity``, and numbers too large for a finite double;
- duplicate keys in any object: readers disagree on which one wins, and the record key
  (``callId``) must never disagree with the body;
- escaped lone surrogates (``"\\ud800"``), which jiter refuses;
- nesting deeper than ``max_depth``: the processor reads the body one level deeper
  (inside its envelope), and its decoder stops at a fixed recursion limit.

The checks cost nothing on an ordinary webhook: duplicate detection is one ``len`` per
object, the surrogate and depth checks only run when a cheap byte count says they could
matter.

An ordinary webhook (one flat object in ASCII) is parsed by jiter instead, at a quarter of
the cost, but only when a few byte counts prove this parse would give the same value:
anything else, and anything jiter refuses, goes through the parse above, so every
refusal and its message stay this module's (see :func:`flat_object`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pydantic_core


class NotJson(ValueError):
    """Not RFC 8259 JSON, or JSON that a strict reader would refuse."""


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class TooDeep(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


def _constant(name: str) -> Any:
    raise NotJson(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NotJson(f"number {text[:20]} is out of range")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_constant, parse_float=_finite
)
# An escaped UTF-16 surrogate; only then can a decoded string hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# The longest body the jiter path takes: shorter than Python's default limit on an
# integer's digits (4,300), which json enforces and jiter does not.
_FLAT_MAX_BYTES = 4096


def flat_object(raw: bytes, max_depth: int) -> dict[str, Any] | None:
    """``raw``'s value when it is one flat object (no nested object or array) in ASCII
    without escapes, parsed by jiter; None when it is anything else, or when
    this could not prove the strict parse would give the same value. The proof, by
    what it rules out:

    - not UTF-8, lone surrogates: ASCII only, and no escape at all (a backslash is
      one byte to look for, ``\\u`` two: three times the cost);
    - NaN and Infinity: jiter refuses them (``allow_inf_nan=False``); a float at all
      (one out of range reads as inf): left to the strict parse;
    - too deep: one ``{`` and no ``[`` in the bytes is one object of depth 1;
    - duplicate keys: every key is followed by one ``:`` outside strings, and with one
      object no other ``:`` is outside a string; so as many ``:`` in the bytes as keys
      in the parsed object means no key was read twice (a ``:`` inside a string only
      makes the count larger, and the body goes the strict way);
    - integers past json's digit limit: the length cap.
    """
    if (
        max_depth < 1
        or len(raw) > _FLAT_MAX_BYTES
        or not raw.isascii()
        or raw.count(b"{") != 1
        or b"[" in raw
        or b"\\" in raw
    ):
        return None
    try:
        # Keys only in jiter's string cache: values (callIds) are new every time.
        value = pydantic_core.from_json(raw, allow_inf_nan=False, cache_strings="keys")
    except ValueError:
        return None  # the strict parse says why, in its own words
    if (
        type(value) is not dict
        or raw.count(b":") != len(value)
        or float in map(type, value.values())
    ):
        return None
    return value


def parse(raw: bytes, max_depth: int) -> Any:
    """The JSON value of ``raw``; raises :class:`NotJson`, :class:`DuplicateKey` or
    :class:`TooDeep`."""
    flat = flat_object(raw, max_depth)
    return flat if flat is not None else strict_parse(raw, max_depth)


def strict_parse(raw: bytes, max_depth: int) -> Any:
    """:func:`parse` without the jiter path: what decides every body that path does not
    take, and what it is tested against."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotJson("the body is not UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise TooDeep from None
    except (DuplicateKey, NotJson):
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
        raise NotJson(str(exc)) from None
    # Depth cannot exceed the number of opening brackets: skip the walk when it is small.
    if raw.count(b"[") + raw.count(b"{") > max_depth or _SURROGATE_ESCAPE.search(raw):
        _walk(value, max_depth)
    return value


def _walk(value: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= max_depth:
                raise TooDeep
            for key, child in item.items():
                _check_string(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth >= max_depth:
                raise TooDeep
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_string(item)


def _check_string(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise NotJson("a string holds a lone UTF-16 surrogate") from None
