"""RFC 9457 problem+json responses: every refusal the API gives, defined in one place.

Each :class:`Refusal` carries its HTTP status, problem type, title, the ``outcome`` label
it counts under in ``callstatus_ingest_total``, and the cause the OpenAPI document and the
README give for it. The ingest handler raises :class:`Refused` with one of them; the
metrics, the access log and ``/openapi.json`` all read the same entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:callstatus:problem:"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    slug: str
    title: str
    # Label of callstatus_ingest_total; a signature refusal appends the verdict to it.
    outcome: str
    # When it happens, for /openapi.json and the README.
    cause: str
    # False for answers no client reads (it hung up before we could send one).
    public: bool = True
    # True for answers the HTTP server gives before any route sees a request
    # (service/frontdoor.py): counted in callstatus_http_connections_closed_total.
    connection: bool = False
    # True for answers only ``POST /v1/call-status/{accountId}`` gives (its path segment).
    account_path_only: bool = False

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug

    def response(
        self, detail: str, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> Response:
        return problem(self.status, self.slug, self.title, detail, headers, **extra)


class Refused(Exception):
    """Raised by a step of the ingest handler; the handler turns it into the answer."""

    def __init__(
        self,
        refusal: Refusal,
        detail: str,
        *,
        outcome: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.refusal = refusal
        self.detail = detail
        self.outcome = outcome or refusal.outcome
        self.headers = headers
        self.extra = extra

    def response(self) -> Response:
        return self.refusal.response(self.detail, self.headers, **self.extra)


NOT_JSON = Refusal(
    400,
    "not-json",
    "Body is not JSON",
    "not_json",
    "not RFC 8259 JSON in UTF-8 (NaN, Infinity and out-of-range numbers included)",
)
NOT_OBJECT = Refusal(
    400, "not-object", "Body is not a JSON object", "not_object", "JSON, but not one object"
)
TOO_DEEP = Refusal(
    400, "too-deep", "Body nested too deeply", "too_deep", "objects or arrays nested too deeply"
)
DUPLICATE_KEY = Refusal(
    400,
    "duplicate-key",
    "Duplicate key",
    "duplicate_key",
    "an object names the same key twice",
)
SIGNATURE = Refusal(
    401,
    "invalid-signature",
    "Invalid signature",
    "signature",
    "FreeClimb-Signature missing, malformed, wrong, or its t outside the tolerance "
    "(judged before the body is read, except the digest); also a body that names no "
    "accountId on /v1/call-status while accounts are bound, as no account's secret can "
    "then verify it",
)
UNKNOWN_ACCOUNT = Refusal(
    403,
    "unknown-account",
    "Unknown account",
    "unknown_account",
    "the account the path or the body's accountId names is not configured here (judged "
    "before the body is read when the path names it)",
)
ACCOUNT_MISMATCH = Refusal(
    403,
    "account-mismatch",
    "Account mismatch",
    "account_mismatch",
    "the body's accountId is not the path's account, or not the account whose signing "
    "secret verified the request (one account's secret never vouches for another's body)",
)
NOT_AN_ACCOUNT_ID = Refusal(
    404,
    "not-an-account-id",
    "No such endpoint",
    "not_an_account_id",
    "the path's segment after /v1/call-status/ is not a FreeClimb account id (AC followed "
    "by 40 hex digits)",
    account_path_only=True,
)
TOO_SLOW = Refusal(
    408, "body-timeout", "Body not received in time", "too_slow", "the body took too long"
)
TOO_LARGE = Refusal(
    413,
    "body-too-large",
    "Body too large",
    "too_large",
    "body larger than the configured limit, or an event too large to store",
)
HEAD_TOO_LARGE = Refusal(
    431,
    "head-too-large",
    "Request header fields too large",
    "head_too_large",
    "the request head is larger than MAX_HEADER_BYTES or has more than MAX_HEADER_FIELDS "
    "fields; the connection is closed",
    connection=True,
)
UNSUPPORTED_MEDIA_TYPE = Refusal(
    415,
    "unsupported-media-type",
    "Unsupported media type",
    "unsupported_media_type",
    "content type is not JSON",
)
INVALID = Refusal(
    422,
    "invalid-call-status",
    "Invalid call-status event",
    "invalid",
    "not a valid call-status event; errors lists each field and what is wrong",
)
UNWRITABLE = Refusal(
    500,
    "event-unwritable",
    "Event refused by Kafka",
    "unwritable",
    "Kafka refuses this event for good (larger than the ingest topic's max.message.bytes, "
    "a policy): not stored, and a retry cannot help",
)
UNAVAILABLE = Refusal(
    503,
    "kafka-unavailable",
    "Event not stored",
    "unavailable",
    "Kafka did not acknowledge in time, or the server is shutting down; see Retry-After",
)
# Nobody reads these two answers; they exist so the access log and the metrics name what
# happened instead of counting it as a 500.
CLIENT_CLOSED = Refusal(
    499,
    "client-closed-request",
    "Client closed the request",
    "client_disconnected",
    "the client hung up before the body was read",
    public=False,
)
CANCELLED = Refusal(
    503,
    "shutting-down",
    "Server shutting down",
    "cancelled",
    "the server stopped the request at shutdown; the event may or may not be stored",
    public=False,
)

CATALOGUE: tuple[Refusal, ...] = (
    NOT_JSON,
    NOT_OBJECT,
    TOO_DEEP,
    DUPLICATE_KEY,
    SIGNATURE,
    UNKNOWN_ACCOUNT,
    ACCOUNT_MISMATCH,
    NOT_AN_ACCOUNT_ID,
    TOO_SLOW,
    TOO_LARGE,
    HEAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    INVALID,
    UNWRITABLE,
    UNAVAILABLE,
    CLIENT_CLOSED,
    CANCELLED,
)


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    """A problem+json response; for refusals outside the ingest handler (404, 405, 500)."""
    body = {"type": TYPE_PREFIX + slug, "title": title, "status": status, "detail": detail, **extra}
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )
