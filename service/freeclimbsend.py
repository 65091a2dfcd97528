"""One send to FreeClimb's REST API: a GET with the account's ``Authorization``, read up
to the byte cap within the per-attempt timeout; its answer, or what to retry after a
timeout or a transport error. Retries, gates and the meaning of a status are the
client's (service/freeclimb.py)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import structlog
from pydantic import SecretStr

from service import metrics
from service.freeclimbtypes import Credentials, UnexpectedResponse, path_only

# The client's logger: one name for every line about the API, whichever module writes it.
log = structlog.get_logger(logger_name="callstatus.freeclimb")


def authorization(credentials: Credentials) -> SecretStr:
    """The ``Authorization`` value of an account: HTTP Basic, account id and API key."""
    # Built once per account, and kept secret: the header is the key in base64.
    raw = f"{credentials.account_id}:{credentials.api_key.get_secret_value()}".encode()
    return SecretStr("Basic " + base64.b64encode(raw).decode("ascii"))


@dataclass(frozen=True, slots=True)
class Answer:
    """What the API answered: any status, its body, and its ``Retry-After`` as sent."""

    status: int
    body: bytes
    retry_after: str | None


@dataclass(slots=True)
class Retry:
    """Why to send again: ``code`` for the metrics and logs, ``reason`` for the retry
    metric, the HTTP status if there was one, and the seconds ``Retry-After`` asked."""

    code: str
    reason: str
    status: int | None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """One GET: the operation (a metric label), whose it is, and where it goes."""

    operation: str
    account_id: str
    path: str
    url: str
    authorization: SecretStr


async def send(
    http: httpx.AsyncClient,
    request: Request,
    *,
    seconds: float,
    max_body_bytes: int,
    clock: Callable[[], float],
) -> Answer | Retry:
    """One request: its answer, or what to retry after a timeout or transport error."""
    started = clock()
    try:
        async with asyncio.timeout(seconds):
            async with http.stream(
                "GET",
                request.url,
                headers={"Authorization": request.authorization.get_secret_value()},
            ) as response:
                body = await _read(response, max_body_bytes, request)
                return Answer(response.status_code, body, response.headers.get("retry-after"))
    except (TimeoutError, httpx.TimeoutException):
        return Retry("timeout", "timeout", None)
    except httpx.TransportError as exc:
        # Debug: the attempt is retried, and a request that fails for good is logged
        # by the client (freeclimb_api_gave_up) and by its caller.
        log.debug(
            "freeclimb_api_transport_error",
            account_id=request.account_id,
            path=path_only(request.path),
            error=type(exc).__name__,
        )
        return Retry("transport", "transport", None)
    finally:
        metrics.FREECLIMB_API_SECONDS.labels(request.operation).observe(clock() - started)


async def _read(response: httpx.Response, limit: int, request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            # Failure, not retried: a body this large is not the resource documented.
            raise UnexpectedResponse(
                f"the answer is larger than {limit} bytes",
                account_id=request.account_id,
                path=request.path,
                status=response.status_code,
            )
        chunks.append(chunk)
    return b"".join(chunks)
