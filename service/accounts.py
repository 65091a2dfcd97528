"""The accounts configuration: which FreeClimb accounts this service takes webhooks for,
each with its signing secrets and API key, kept current while the service runs.

- The accounts file (``CALLSTATUS_ACCOUNTS_FILE``, YAML or JSON, schema in
  ``schemas/config/accounts.schema.json``) is parsed into an :class:`AccountBook`: an
  immutable snapshot, account id -> :class:`Account`, looked up in O(1) whatever the
  number of accounts, so a request costs the HMACs of one account's secrets only.
- Without a file, ``CALLSTATUS_SIGNING_SECRETS`` is the one-account shorthand: bound to
  ``CALLSTATUS_SIGNING_ACCOUNT_ID`` when that is set, else to any account (what the
  service did before accounts existed, so an upgrade changes nothing).
- :class:`AccountsWatcher` polls the file and swaps the book reference when a new, valid
  version appears (Kubernetes updates a mounted Secret by swapping a ``..data`` symlink).
  A request reads :attr:`AccountsWatcher.book` once and is judged by that snapshot to its
  end, so a swap never refuses a request in flight. A malformed new version keeps the last
  good book; at start a malformed file stops the service (:class:`AccountsFileError`).

Secrets are :class:`~pydantic.SecretStr` throughout: no repr, log line or error message
of this module shows one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Protocol

import structlog
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from schemas.call import AccountId
from service import metrics
from service.settings import SettingsError

log = structlog.get_logger(logger_name="callstatus.accounts")

# Where the published JSON Schema of the file lives; `make schemas` rewrites it and
# tests/test_accounts.py fails while it and the model disagree. Not next to the message
# schemas in schemas/: the file is configuration, not a message on a topic.
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config" / "accounts.schema.json"

# Each secret costs one HMAC per request (signature.check_body), so this bounds the cost
# of a request; a rotation needs two, three while one overlaps a late revert.
MAX_SECRETS_PER_ACCOUNT = 8
MAX_SECRET_CHARS = 1024
# Far above 1,000 accounts (~250 bytes each); a bigger file is a mistake, not a
# configuration, and must not be read into memory every poll.
MAX_FILE_BYTES = 16 * 1024 * 1024
# The metric label of the shorthand's account when it is bound to no account id.
ANY_ACCOUNT_LABEL = "default"


# ----------------------------------------------------------------------- the file

# A signing secret: checked by AccountEntry's validator (clearer messages than the
# constraint errors), published with the same bounds for editors and linters.
Secret = Annotated[
    SecretStr,
    WithJsonSchema(
        {
            "type": "string",
            "format": "password",
            "writeOnly": True,
            "minLength": 1,
            "maxLength": MAX_SECRET_CHARS,
        }
    ),
]


class AccountEntry(BaseModel):
    """One account of the file."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    signing_secrets: tuple[Secret, ...] = Field(
        alias="signingSecrets",
        title="Signing secrets",
        min_length=1,
        max_length=MAX_SECRETS_PER_ACCOUNT,
        description="The account's webhook signing secrets. Several only during a "
        "rotation: the first is the current one (`callstatus sign` uses it); a request "
        "signed with any of them is accepted.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        alias="apiKey",
        title="API key",
        min_length=1,
        description="The account's FreeClimb API key, for the reconciler's API calls.",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="A human-readable name (brand, region, customer), for people only: "
        "metrics and logs name the account by its id.",
    )

    @field_validator("signing_secrets")
    @classmethod
    def _no_padding(cls, secrets: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # A secret pasted with a space or a line end never matches FreeClimb's HMAC;
        # refusing it here names the account, where a silent mismatch would not.
        for secret in secrets:
            value = secret.get_secret_value()
            if not value:
                raise ValueError("a secret is empty")
            if len(value) > MAX_SECRET_CHARS:
                raise ValueError(f"a secret is longer than {MAX_SECRET_CHARS} characters")
            if value != value.strip():
                raise ValueError("a secret has leading or trailing whitespace")
        return secrets


class AccountsFile(BaseModel):
    """The accounts file: per FreeClimb account id, its signing secrets and API key."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
        title="callstatus accounts file",
    )

    accounts: dict[AccountId, AccountEntry] = Field(
        min_length=1,
        description="Keyed by FreeClimb account id (AC followed by 40 hex digits).",
        # patternProperties alone would let a key that is no account id through.
        json_schema_extra={"additionalProperties": False},
    )


def schema_text() -> str:
    """The published JSON Schema of the file (validation mode: it describes input)."""
    schema: dict[str, Any] = AccountsFile.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------- the book


@dataclass(frozen=True, slots=True)
class Account:
    """One account as the handler needs it. ``id`` is None for the shorthand bound to
    no account: it stands for whatever account a body names."""

    id: str | None
    secrets: tuple[SecretStr, ...]
    api_key: SecretStr | None = None
    name: str | None = None

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


def shorthand_book(secrets: Sequence[SecretStr], account_id: str | None) -> AccountBook:
    """``CALLSTATUS_SIGNING_SECRETS`` as a book of one account (empty without secrets)."""
    if not secrets:
        return AccountBook()
    if account_id is None:
        return AccountBook(any_account=Account(None, tuple(secrets)))
    return AccountBook([Account(canonical_id(account_id), tuple(secrets))])


def book_of(model: AccountsFile) -> AccountBook:
    return AccountBook(
        [
            Account(canonical_id(account_id), entry.signing_secrets, entry.api_key, entry.name)
            for account_id, entry in model.accounts.items()
        ]
    )


# ---------------------------------------------------------------------- parsing


class AccountsFileError(SettingsError):
    """The accounts file cannot be read or is not a valid accounts file. One readable
    line naming the file and the problem, never a secret. A SettingsError: at start it
    stops the service like any bad setting (exit 2)."""


# libyaml's parser where PyYAML was built with it (the wheels are): 1,000 accounts parse
# in ~40 ms instead of ~175 ms, in the watcher's thread but holding the GIL.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """PyYAML's safe loader, refusing a mapping with the same key twice: by default the
    last one silently wins, which would drop an account's secrets without a word."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice (line {line})", None
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _unique_mapping,
)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _is_json(data: bytes, source: Path) -> bool:
    if source.suffix.lower() == ".json":
        return True
    if source.suffix.lower() in (".yaml", ".yml"):
        return False
    # A Secret's key mounted as a file may have any name: judge by the content.
    return data.lstrip()[:1] == b"{"


def _decode(data: bytes, source: Path) -> object:
    """The file's document. Errors say where, never what: the text around a syntax
    error may be a secret."""
    if _is_json(data, source):
        try:
            return json.loads(data, object_pairs_hook=_unique_object)
        except json.JSONDecodeError as exc:
            raise AccountsFileError(
                f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise AccountsFileError(f"{source}: not valid JSON: {exc}") from None
    try:
        return yaml.load(data, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except yaml.MarkedYAMLError as exc:
        where = ""
        if exc.problem_mark is not None:
            where = f" (line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1})"
        raise AccountsFileError(f"{source}: not valid YAML: {exc.problem}{where}") from None
    except yaml.YAMLError as exc:
        raise AccountsFileError(f"{source}: not valid YAML: {type(exc).__name__}") from None


def _message(error: Any) -> str:
    """pydantic's message, in the file's terms where its own would puzzle an operator
    (a secret's length is not "items"; YAML turns an unquoted 12345 into a number)."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        return "not a known field"
    if kind == "too_short":
        return "is empty" if ctx.get("min_length") == 1 else error["msg"]
    if kind == "too_long":
        return f"has more than {ctx.get('max_length')} entries"
    if kind == "string_type":
        return "must be a string (in YAML, quote it)"
    return str(error["msg"]).removeprefix("Value error, ")


def _describe(exc: ValidationError) -> str:
    problems = []
    errors = exc.errors()
    for error in errors:
        loc = error["loc"]
        if error["type"] == "too_short" and any(
            other["loc"][: len(loc)] == loc and len(other["loc"]) > len(loc) for other in errors
        ):
            continue  # a list "empty" only because its items failed: they say why
        parts = [str(part) for part in loc]
        if parts and parts[-1] == "[key]":
            # An account id that is not one: the key itself is the location.
            problems.append(f"{'.'.join(parts[:-1])}: not an account id (AC + 40 hex digits)")
            continue
        problems.append(f"{'.'.join(parts) or 'the file'}: {_message(error)}")
    return "; ".join(problems)


def parse(data: bytes, source: Path) -> AccountBook:
    """An accounts file's bytes as a book; :class:`AccountsFileError` if it is not one.
    ``source`` names the file in errors, and its suffix chooses JSON or YAML."""
    if not data.strip():
        raise AccountsFileError(f"{source}: the accounts file is empty")
    document = _decode(data, source)
    if not isinstance(document, dict):
        raise AccountsFileError(f"{source}: expected a mapping with `accounts` at the top")
    try:
        model = AccountsFile.model_validate(document)
    except ValidationError as exc:
        raise AccountsFileError(f"{source}: {_describe(exc)}") from None
    try:
        return book_of(model)
    except ValueError as exc:  # two ids that differ in case only
        raise AccountsFileError(f"{source}: {exc}") from None


# ---------------------------------------------------------------------- watching


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What says the file may have changed, from a stat that follows symlinks: a
    Kubernetes Secret update swaps ``..data`` to a new directory, so the path resolves
    to a new inode (mtime and size may well be the same)."""

    device: int
    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> Fingerprint:
        st = os.stat(path)  # follows symlinks, on purpose
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class Reload(StrEnum):
    """What one poll found."""

    UNCHANGED = "unchanged"
    RELOADED = "reloaded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class _Version:
    fingerprint: Fingerprint
    digest: bytes
    data: bytes


def _read(path: Path) -> _Version:
    """The file's bytes and fingerprint; OSError or AccountsFileError. One retry when
    the file vanishes between stat and open: the kubelet deletes the old ``..2026_…``
    directory right after the swap, and a poll that resolved the old one must not count
    that as a failure."""
    for attempt in (1, 2):
        fingerprint = Fingerprint.of(path)
        if fingerprint.size > MAX_FILE_BYTES:
            raise AccountsFileError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if attempt == 2:
                raise
            continue
        return _Version(fingerprint, hashlib.sha256(data).digest(), data)
    raise AssertionError("unreachable")  # pragma: no cover


def load(path: Path) -> tuple[AccountBook, _Version]:
    """The file's book at start; :class:`AccountsFileError` (a settings error) when it
    cannot be read or is not valid: the service then refuses to start."""
    try:
        version = _read(path)
    except OSError as exc:
        raise AccountsFileError(f"{path}: cannot read the accounts file: {_reason(exc)}") from None
    return parse(version.data, path), version


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class AccountSource(Protocol):
    """Where the handler gets the book in use: read ``book`` once per request."""

    @property
    def book(self) -> AccountBook: ...

    async def run(self) -> None: ...


class StaticAccounts:
    """The shorthand (or no accounts at all): a book that never changes."""

    def __init__(self, book: AccountBook) -> None:
        self._book = book
        metrics.ACCOUNTS_CONFIGURED.set(len(book))

    @property
    def book(self) -> AccountBook:
        return self._book

    async def run(self) -> None:
        """Nothing to watch."""


class AccountsWatcher:
    """The accounts file's current good book, kept current by polling.

    ``poll()`` is one step (tests call it directly); ``run()`` polls every ``interval``
    seconds until cancelled. A good new version replaces the book reference in one
    assignment; a bad one keeps the last good book, is logged once and counted once, and
    sets ``callstatus_accounts_file_stale`` to 1 until a good version replaces it.
    """

    def __init__(self, path: Path, interval: float, book: AccountBook, version: _Version):
        self.path = path
        self.interval = interval
        self._book = book
        self._loaded = version
        # The last version seen on disk (good or bad), and the last failure reported:
        # each bad version or read error is logged and counted once, not every poll.
        self._seen: Fingerprint | None = version.fingerprint
        self._failure: str | None = None
        metrics.ACCOUNTS_CONFIGURED.set(len(book))
        metrics.ACCOUNTS_FILE_STALE.set(0)

    @classmethod
    def open(cls, path: Path, interval: float) -> AccountsWatcher:
        book, version = load(path)
        log.info("accounts loaded", path=str(path), accounts=len(book))
        return cls(path, interval, book, version)

    @property
    def book(self) -> AccountBook:
        return self._book

    def poll(self) -> Reload:
        try:
            fingerprint = Fingerprint.of(self.path)
            if fingerprint == self._seen:
                return Reload.FAILED if self._failure is not None else Reload.UNCHANGED
            version = _read(self.path)
        except OSError as exc:
            # Unreadable (deleted, permissions): seen as nothing, so the first good read
            # after it is compared with what is loaded.
            self._seen = None
            return self._failed(f"cannot read the accounts file: {_reason(exc)}")
        except AccountsFileError as exc:
            self._seen = None
            return self._failed(str(exc))
        self._seen = version.fingerprint
        if version.digest == self._loaded.digest:
            # Same content under a new inode (a Secret re-synced unchanged), or the good
            # version back after a bad one: nothing to swap.
            self._loaded = version
            self._recovered()
            return Reload.UNCHANGED
        try:
            book = parse(version.data, self.path)
        except AccountsFileError as exc:
            # Keyed by content: two different bad versions are two failures, even when
            # their messages read the same.
            return self._failed(str(exc), key=version.digest.hex())
        # The swap: one reference assignment. A request that read the old book goes on
        # with it; the next one reads this one.
        self._book = book
        self._loaded = version
        self._recovered()
        metrics.ACCOUNTS_CONFIGURED.set(len(book))
        log.info("accounts reloaded", path=str(self.path), accounts=len(book))
        return Reload.RELOADED

    def _failed(self, problem: str, key: str | None = None) -> Reload:
        metrics.ACCOUNTS_FILE_STALE.set(1)
        key = key if key is not None else problem
        if key != self._failure:
            self._failure = key
            metrics.ACCOUNTS_RELOAD_FAILURES.inc()
            log.error(
                "accounts file not reloaded; the last good one stays in use",
                path=str(self.path),
                problem=problem,
                accounts=len(self._book),
            )
        return Reload.FAILED

    def _recovered(self) -> None:
        self._failure = None
        metrics.ACCOUNTS_FILE_STALE.set(0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                # In a thread: a stat and a read of a small file, but a stuck volume
                # must not stop the event loop. The swap inside is a single assignment,
                # atomic for the loop's readers.
                await asyncio.to_thread(self.poll)
            except Exception:
                # A bug here must not end the watching for the process's life: the
                # book in use stays, and the next poll tries again.
                log.exception("accounts poll failed", path=str(self.path))


class _AccountSettings(Protocol):
    @property
    def accounts_file(self) -> Path | None: ...
    @property
    def accounts_reload_seconds(self) -> float: ...
    @property
    def signing_secrets(self) -> tuple[SecretStr, ...]: ...
    @property
    def signing_account_id(self) -> str | None: ...


def open_source(settings: _AccountSettings) -> StaticAccounts | AccountsWatcher:
    """The accounts the settings configure: the file, watched, or the shorthand.
    Raises :class:`AccountsFileError` when the file cannot be loaded."""
    if settings.accounts_file is not None:
        return AccountsWatcher.open(settings.accounts_file, settings.accounts_reload_seconds)
    return StaticAccounts(shorthand_book(settings.signing_secrets, settings.signing_account_id))


def main() -> None:
    """``python -m service.accounts``: rewrite the published JSON Schema."""
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH.relative_to(SCHEMA_PATH.parents[2])}")


if __name__ == "__main__":
    main()
