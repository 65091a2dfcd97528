"""Schemathesis against ``/openapi.json``, with all its checks: the published schema and
the service agree (valid bodies accepted, invalid ones refused with a documented 4xx,
never a 5xx, responses as documented).

Generated requests carry a real signature: when the generated ``FreeClimb-Signature``
fits the published grammar, it is replaced by a current HMAC of the exact body bytes, so
the body is judged; otherwise it is sent as generated and must be refused with 401.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation

from service.app import create_app
from service.openapi import ACCOUNT_ID_PATTERN, SIGNATURE_PATTERN
from service.signature import HEADER, sign
from tests.conftest import SECRET, count_fuzz_case, make_settings


class Acknowledge:
    async def publish(self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        pass

    async def ready(self) -> bool:
        return True


class Signer(requests.auth.AuthBase):
    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        header = request.headers.get(HEADER)
        if isinstance(header, str) and re.fullmatch(SIGNATURE_PATTERN, header):
            body = request.body or b""
            raw = body.encode() if isinstance(body, str) else body
            assert isinstance(raw, bytes)
            request.headers[HEADER] = sign(SECRET, int(time.time()), raw)
        return request


APP = create_app(make_settings(), Acknowledge())
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
SESSION = requests.Session()
SESSION.auth = Signer()


def _obeys_cross_field_rules(body: Any) -> bool:
    """The rules JSON Schema cannot state, which the schema names in prose
    (service.openapi.CROSS_FIELD_RULES): valid data breaking them is refused with 422."""
    if not isinstance(body, dict) or "requestType" in body or "callStatus" in body:
        return True
    duration, connect = body.get("duration"), body.get("connectDuration")
    if (
        isinstance(duration, int | float)
        and isinstance(connect, int | float)
        and not isinstance(duration, bool)
        and connect > duration
    ):
        return False
    times: list[datetime] = []
    for name in ("startTime", "connectTime", "endTime"):
        text = body.get(name)
        if not isinstance(text, str):
            continue
        try:
            times.append(parsedate_to_datetime(text))
        except (TypeError, ValueError, IndexError):  # not a date at all
            continue
    return times == sorted(times)


@SCHEMA.hook
def filter_body(context: Any, body: Any) -> bool:
    return _obeys_cross_field_rules(body)


def _same_account(case: schemathesis.Case[Any]) -> None:
    """On the account path, the body's accountId must be the path's (the rule the
    schema names in prose, service.openapi.ACCOUNT_RULE): a generated body that names
    an account is sent to that account's path, so valid data is judged as such."""
    params = case.path_parameters
    body = case.body
    if params and "accountId" in params and isinstance(body, dict):
        claimed = body.get("accountId")
        if isinstance(claimed, str) and re.fullmatch(ACCOUNT_ID_PATTERN, claimed):
            params["accountId"] = claimed


@SCHEMA.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_matches_its_schema(case: schemathesis.Case[Any]) -> None:
    body_mode = "-"
    if case.meta is not None:
        body = case.meta.components.get(ParameterLocation.BODY)
        if body is not None:
            body_mode = body.mode.value
            if body.mode.is_negative and case.headers is not None:
                # Schemathesis spoils the header too; sign anyway, so the invalid body
                # itself must be refused (with an invalid header it would be a 401).
                case.headers[HEADER] = "t=0,v1=" + "0" * 64
    _same_account(case)
    response = case.call_and_validate(session=SESSION)
    count_fuzz_case(f"schemathesis {case.operation.label} body {body_mode} {response.status_code}")
