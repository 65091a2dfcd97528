"""The FreeClimb REST API client's vocabulary: the identifiers it accepts, its typed errors,
what it returns (:class:`FetchedCall`, :class:`InvalidCall`), and what it is given
(:class:`Credentials`, :class:`ClientOptions`). Plain data, no I/O.

Every error's text names the account, the path and what went wrong; never a credential,
and never a query (a next-page URI's query holds the filters' phone numbers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import SecretStr

from schemas.call import ACCOUNT_ID, Call

DEFAULT_API_URL: Final = "https://www.freeclimb.com/apiserver"

# Identifiers go into the URL path with the account's credentials: anything but the
# documented shape ("../", "?", "/") could point those credentials somewhere else:
# checked with schemas.call's ACCOUNT_ID and CALL_ID.


def path_only(path: str) -> str:
    """``path`` without its query, for logs and error texts."""
    # A next-page URI carries the filters, phone numbers among them: keep them out of logs.
    return path.partition("?")[0]


# --- errors -------------------------------------------------------------------------


class FreeClimbError(Exception):
    """A request to FreeClimb's REST API that did not give what was asked. The text names
    the account, the path and what went wrong; never a credential."""

    def __init__(self, message: str, *, account_id: str, path: str, status: int | None) -> None:
        path = path_only(path)  # a next-page URI's query holds the filters' phone numbers
        super().__init__(f"{message} (account {account_id}, GET {path})")
        self.account_id = account_id
        self.path = path
        self.status = status


class NoCredentials(FreeClimbError):
    """No API key is configured for the account: nothing was sent."""


class Unauthorized(FreeClimbError):
    """401: the account id and API key were not accepted."""


class Forbidden(FreeClimbError):
    """403: the credentials are valid but may not read this."""


class CallNotFound(FreeClimbError):
    """404 for a call: FreeClimb has no such call in this account. Not retried."""


class RetriesExhausted(FreeClimbError):
    """429, 5xx, timeouts or transport errors, still there after the last retry; or a
    ``Retry-After`` longer than the client will wait (``retry_after`` says how long)."""

    def __init__(
        self,
        message: str,
        *,
        account_id: str,
        path: str,
        status: int | None,
        attempts: int,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, account_id=account_id, path=path, status=status)
        self.attempts = attempts
        self.retry_after = retry_after


class UnexpectedResponse(FreeClimbError):
    """Any other answer: another 4xx, a body that is not the JSON documented, a body too
    large, a ``nextPageUri`` off the API's origin, or a Call the model refuses."""


# --- results ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchedCall:
    """One Call resource: ``body`` is the response's bytes for ``get_call``, and for a
    listed call its JSON object re-encoded compactly (keys and values as received)."""

    body: bytes
    data: Mapping[str, Any]
    call: Call


@dataclass(frozen=True, slots=True)
class InvalidCall:
    """A listed resource the Call model refused, yielded rather than stopping the listing
    (one odd call must not hide the rest of a sweep). ``problem`` is pydantic's summary."""

    body: bytes
    data: Mapping[str, Any]
    problem: str


# --- what the client is given -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """An account id and its API key. The key shows as ``**********`` in any repr."""

    account_id: str
    api_key: SecretStr

    def __post_init__(self) -> None:
        if ACCOUNT_ID.fullmatch(self.account_id) is None:
            raise ValueError("an account id is AC followed by 40 hex digits")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How the client treats the API; defaults suit a background reconciler."""

    base_url: str = DEFAULT_API_URL
    timeout: float = 10.0  # seconds per attempt, connection to last byte
    max_concurrency: int = 4  # requests in flight per account
    max_retries: int = 4  # sends after the first; then RetriesExhausted
    backoff_first: float = 0.5
    backoff_cap: float = 30.0
    # A Retry-After beyond this is not waited for: the request fails at once with
    # RetriesExhausted(retry_after=...), and the caller's next round comes back later.
    max_retry_after: float = 120.0
    max_body_bytes: int = 8 * 1024 * 1024
