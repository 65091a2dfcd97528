"""What the FreeClimb REST API client puts on the wire and how it reads what comes back
(docs/freeclimb.md, section 5): a list request's query, the page object, a Call checked
against the model and its account, and where a ``nextPageUri`` may lead. No I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import pydantic

from schemas.call import Call, CallStatus
from service import strictjson
from service.freeclimbtypes import UnexpectedResponse

# Ingest's own nesting bound for a body (service/ingest.py): a listed call, re-encoded on
# its own, must fit it. A page holds its calls two levels deeper.
CALL_MAX_DEPTH: Final = 32
PAGE_MAX_DEPTH: Final = CALL_MAX_DEPTH + 2


# --- the request ----------------------------------------------------------------------


def format_filter_time(value: datetime) -> str:
    """A ``startTime``/``endTime`` filter value: FreeClimb's SDKs document
    ``YYYY-MM-DD hh:mm:ss``; sent in UTC (the API's dates are all GMT)."""
    if value.tzinfo is None:
        raise ValueError("filter times must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def call_filters(
    *,
    active: bool | None = None,
    status: CallStatus | None = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    to: str | None = None,
    from_: str | None = None,
    parent_call_id: str | None = None,
    application_ids: tuple[str, ...] = (),
) -> list[tuple[str, str]]:
    """The query of a Calls list request, in FreeClimb's parameter names (section 5):
    ``start_time`` keeps calls that started at or after it, ``end_time`` calls that ended
    at or before it."""
    query: list[tuple[str, str]] = []
    if active is not None:
        query.append(("active", "true" if active else "false"))
    if status is not None:
        query.append(("status", str(status)))
    if start_time is not None:
        query.append(("startTime", format_filter_time(start_time)))
    if end_time is not None:
        query.append(("endTime", format_filter_time(end_time)))
    if to is not None:
        query.append(("to", to))
    if from_ is not None:
        query.append(("from", from_))
    if parent_call_id is not None:
        query.append(("parentCallId", parent_call_id))
    query.extend(("applicationId", app) for app in application_ids)
    return query


# --- the answer -----------------------------------------------------------------------


class Page(pydantic.BaseModel):
    """The documented page object; only what paging needs is required."""

    model_config = pydantic.ConfigDict(extra="ignore")

    total: int | None = None
    start: int | None = None
    end: int | None = None
    page: int | None = None
    numPages: int | None = None
    pageSize: int | None = None
    nextPageUri: str | None = None
    calls: list[dict[str, Any]] = pydantic.Field(default_factory=list)


def parse_answer(body: bytes, depth: int, account_id: str, path: str) -> Any:
    """A 200's body as JSON, strictly (no duplicate keys, at most ``depth`` levels)."""
    try:
        return strictjson.parse(body, depth)
    except (strictjson.NotJson, strictjson.DuplicateKey, strictjson.TooDeep) as exc:
        raise UnexpectedResponse(
            f"the answer is not the JSON documented ({type(exc).__name__})",
            account_id=account_id,
            path=path,
            status=200,
        ) from None


def read_call_object(body: bytes, account_id: str, path: str) -> dict[str, Any]:
    """A Call resource's body as its JSON object, not yet checked against the model."""
    data = parse_answer(body, CALL_MAX_DEPTH, account_id, path)
    if not isinstance(data, dict):
        raise UnexpectedResponse(
            "the Call resource is not a JSON object",
            account_id=account_id,
            path=path,
            status=200,
        )
    return data


def read_page(body: bytes, account_id: str, path: str) -> Page:
    """A list answer's body as the page object; its calls are checked one by one later."""
    raw = parse_answer(body, PAGE_MAX_DEPTH, account_id, path)
    try:
        return Page.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise UnexpectedResponse(
            f"not a page of calls: {problem(exc)}",
            account_id=account_id,
            path=path,
            status=200,
        ) from None


def encode_call(data: Mapping[str, Any]) -> bytes:
    """A listed call's JSON object on its own, compactly, keys and values as received."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def validate_call(data: Mapping[str, Any], account_id: str) -> Call:
    """The Call model of ``data``; pydantic's ValidationError, or ValueError when the call
    is another account's."""
    call = Call.model_validate(data)
    # An account's credentials read only its own calls; anything else is not ours to post.
    if call.accountId is not None and call.accountId != account_id:
        raise ValueError("accountId: the call belongs to another account")
    return call


def problem(exc: pydantic.ValidationError | ValueError) -> str:
    """What is wrong with a refused call, without repeating its content."""
    if not isinstance(exc, pydantic.ValidationError):
        return str(exc)
    # Field locations and messages only: pydantic's default text repeats the input.
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'call'}: {err['msg']}" for err in exc.errors()
    )


def next_page_path(uri: str | None, base: str, account_id: str, path: str) -> str | None:
    """The path (relative to the base URL ``base``) of the next page, or None at the end.
    The documented form is relative to /apiserver; an absolute URL is followed only when
    it is on the base URL, so the account's credentials never go anywhere else."""
    if not uri:
        return None
    if uri.startswith(base + "/"):
        uri = uri[len(base) :]
    if not uri.startswith("/") or uri.startswith("//") or "\\" in uri:
        raise UnexpectedResponse(
            "nextPageUri does not point into the API",
            account_id=account_id,
            path=path,
            status=200,
        )
    return uri
