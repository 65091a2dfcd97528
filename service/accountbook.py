"""The accounts as the handler uses them: an immutable :class:`AccountBook`, account id ->
:class:`Account` (its signing secrets, first = current, and its FreeClimb API key),
looked up in O(1) whatever the number of accounts, so a request costs the HMACs of one
account's secrets only. Without an accounts file, ``CALLSTATUS_SIGNING_SECRETS`` is the
one-account shorthand (:func:`shorthand_book`): bound to ``CALLSTATUS_SIGNING_ACCOUNT_ID``
when that is set, else standing for any account (what the service did before accounts
existed, so an upgrade changes nothing).

Secrets are :class:`~pydantic.SecretStr`: no repr shows one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from pydantic import SecretStr

from service.signature import HmacKey, key_bytes

# The metric label of the shorthand's account when it is bound to no account id.
ANY_ACCOUNT_LABEL = "default"


@dataclass(frozen=True, slots=True)
class Account:
    """One account as the handler needs it. ``id`` is None for the shorthand bound to
    no account: it stands for whatever account a body names."""

    id: str | None
    secrets: tuple[SecretStr, ...]
    api_key: SecretStr | None = None
    name: str | None = None
    # The secrets as HMAC keys, encoded and padded once here rather than on every
    # request. Never in a repr, and not compared: they are the secrets again.
    keys: tuple[HmacKey, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = tuple(HmacKey(key_bytes(s)) for s in self.secrets)
        object.__setattr__(self, "keys", keys)

    @property
    def current_secret(self) -> SecretStr:
        """The one to sign with: the first (docs of the file's signingSecrets)."""
        return self.secrets[0]

    @property
    def metric_label(self) -> str:
        """Its ``account`` label: only configured accounts ever have one, so the metric's
        series are bounded by the file, never by what requests claim."""
        return self.id if self.id is not None else ANY_ACCOUNT_LABEL


def canonical_id(account_id: str) -> str:
    """The key an account id is filed and looked up under: the hex part in lower case,
    as FreeClimb writes it (the Call model accepts either case)."""
    return account_id[:2] + account_id[2:].lower()


class AccountBook:
    """An immutable snapshot of the accounts, looked up by id in O(1).

    Never changed once built: a reload builds a new book and swaps the reference, so a
    request holding this one finishes with it.
    """

    __slots__ = ("_accounts", "_any")

    def __init__(self, accounts: Sequence[Account] = (), *, any_account: Account | None = None):
        by_id: dict[str, Account] = {}
        for account in accounts:
            if account.id is None:
                raise ValueError("an account of a book needs an id; use any_account")
            key = canonical_id(account.id)
            if key in by_id:
                raise ValueError(f"account {key} is listed twice")
            by_id[key] = account
        if any_account is not None and (by_id or any_account.id is not None):
            raise ValueError("any_account stands alone, and has no id")
        self._accounts: Mapping[str, Account] = MappingProxyType(by_id)
        self._any = any_account

    def lookup(self, account_id: str | None) -> Account | None:
        """The account to verify a request for ``account_id`` with (from the path or the
        body; None when neither names one), or None: unknown, refuse it."""
        if self._any is not None:
            return self._any
        if account_id is None:
            return None
        return self._accounts.get(canonical_id(account_id))

    @property
    def binds_accounts(self) -> bool:
        """False only for the shorthand bound to no account id: then every account id
        gets the same secrets, as before accounts existed."""
        return self._any is None

    def __len__(self) -> int:
        return 1 if self._any is not None else len(self._accounts)

    def __iter__(self) -> Iterator[Account]:
        if self._any is not None:
            return iter((self._any,))
        return iter(self._accounts.values())

    def __repr__(self) -> str:  # never the secrets: the accounts by id only
        if self._any is not None:
            return "AccountBook(any account)"
        return f"AccountBook({len(self._accounts)} accounts)"


def api_keys(book: AccountBook) -> dict[str, SecretStr]:
    """The accounts of ``book`` that have a FreeClimb API key: id -> key (what the
    reconciler may ask the REST API about; the shorthand never has one)."""
    return {a.id: a.api_key for a in book if a.id is not None and a.api_key is not None}


def shorthand_book(secrets: Sequence[SecretStr], account_id: str | None) -> AccountBook:
    """``CALLSTATUS_SIGNING_SECRETS`` as a book of one account (empty without secrets)."""
    if not secrets:
        return AccountBook()
    if account_id is None:
        return AccountBook(any_account=Account(None, tuple(secrets)))
    return AccountBook([Account(canonical_id(account_id), tuple(secrets))])
