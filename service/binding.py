"""Which account a webhook is judged by, found at the cost of that one account: the
path's (``/v1/call-status/{accountId}``, known before the body is read), else the
account the raw body claims (one scan, no parse); and, after the strict parse, the
body's own ``accountId`` bound to the account whose secret verified it
(docs/architecture.md, section 11).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import Scope

from schemas.call import ACCOUNT_ID, ACCOUNT_ID_PATTERN
from schemas.messages import INGEST_PATH
from service import problems
from service.accountbook import Account, AccountBook, canonical_id
from service.problems import Refused

# The path users put in their statusCallbackUrl: the account is known before the body.
ACCOUNT_PATH_PREFIX = INGEST_PATH + "/"
ACCOUNT_PATH = ACCOUNT_PATH_PREFIX + "{accountId}"
# The raw-bytes scan for the claimed account (claimed_account).
_ACCOUNT_KEY = b'"accountId"'
_JSON_SPACE = b" \t\r\n"
_ACCOUNT_VALUE = re.compile(b'"(' + ACCOUNT_ID_PATTERN.encode() + b')"')
# Where the handler keeps the account a request is judged for, for its metrics: in the
# scope, which exists per request anyway.
SCOPE_KEY = "callstatus.account"


def claimed_account(raw: bytes) -> str | None:
    """The account id the body claims, found in its raw bytes without parsing them: the
    value of the first ``"accountId"`` that is a key, when it is an account id. Only a
    hint of whose secrets to try: the strict parse after the signature check decides
    what the body says, and the handler refuses it when that differs (a nested or
    escaped accountId cannot pass for another account)."""
    at = raw.find(_ACCOUNT_KEY)
    while at >= 0:
        start = at + len(_ACCOUNT_KEY)
        rest = raw[start : start + 256].lstrip(_JSON_SPACE)
        if rest[:1] == b":":  # a key (the same text as a value is followed by , ] or })
            match = _ACCOUNT_VALUE.match(rest[1:].lstrip(_JSON_SPACE))
            return match.group(1).decode("ascii") if match is not None else None
        at = raw.find(_ACCOUNT_KEY, start)
    return None


def body_account(scope: Scope, book: AccountBook, raw: bytes, fields: dict[str, Any]) -> Account:
    """The account whose secrets to try for a body on the plain path: the claim in the
    raw bytes says which; the parse, once the signature is verified, says whether the
    body is really that account's."""
    claimed = claimed_account(raw)
    if claimed is None:
        raise no_account_refused()
    fields["account"] = claimed
    account = book.lookup(claimed)
    if account is None:
        raise unknown_account(claimed)
    scope[SCOPE_KEY] = account
    return account


def path_account(
    scope: Scope, book: AccountBook, fields: dict[str, Any]
) -> tuple[str | None, Account | None]:
    """The account id the path names (or None on the plain path) and the account to
    verify with when it is known before the body: the path's, or the unbound
    shorthand's. None means: find it in the body."""
    path: str = scope["path"]
    if len(path) == len(INGEST_PATH):  # the app sends only the two ingest paths here
        if book.binds_accounts:
            return None, None
        # The shorthand bound to no account: its secrets for any body, no claim to
        # find (what the service did before accounts existed).
        account = scope[SCOPE_KEY] = book.lookup(None)
        return None, account
    path_id = path[len(ACCOUNT_PATH_PREFIX) :]
    if ACCOUNT_ID.fullmatch(path_id) is None:
        raise Refused(
            problems.NOT_AN_ACCOUNT_ID,
            "post to /v1/call-status/{accountId}, with the FreeClimb account id "
            "(AC followed by 40 hex digits), or to /v1/call-status",
        )
    fields["account"] = path_id
    account = book.lookup(path_id)
    if account is None:
        raise unknown_account(path_id)  # before a body byte is read
    scope[SCOPE_KEY] = account
    return path_id, account


def no_account_refused() -> Refused:
    return Refused(
        problems.SIGNATURE,
        "FreeClimb-Signature check failed: no_account (the body names no accountId, so no "
        "account's secret can verify it; send it to /v1/call-status/{accountId})",
        outcome=f"{problems.SIGNATURE.outcome}_no_account",
        headers={"WWW-Authenticate": "FreeClimb-Signature"},
    )


def unknown_account(account_id: str) -> Refused:
    # The claimed id only (the requester's own words): never the configured ones.
    return Refused(
        problems.UNKNOWN_ACCOUNT, f"account {account_id} is not configured on this service"
    )


def check_binding(body_account: str | None, bound: str, path_id: str | None) -> None:
    """The parsed body's accountId against the account the request is for (``bound``,
    canonical). A body naming none is accepted on the account path (the path names it,
    and the body claims no other); on /v1/call-status the claim found in the raw bytes
    was then not the body's own (nested in another object), so it is refused."""
    if body_account is not None and canonical_id(body_account) == bound:
        return
    if body_account is None and path_id is not None:
        return
    claim = f"the body's accountId {body_account}" if body_account else "the body (no accountId)"
    whose = "the path's account" if path_id is not None else "the account whose secret verified it"
    raise Refused(problems.ACCOUNT_MISMATCH, f"{claim} is not {whose} ({bound})")
