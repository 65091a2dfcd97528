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
"""

from __future__ import annotations

import json
import math
import re
from typing import Any


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


def parse(raw: bytes, max_depth: int) -> Any:
    """The JSON value of ``raw``; raises :class:`NotJson`, :class:`DuplicateKey` or
    :class:`TooDeep`."""
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
