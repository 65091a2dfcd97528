"""The accounts in use, kept current while the service runs: :class:`AccountsWatcher` polls
the accounts file and swaps the book reference when a new, valid version appears
(Kubernetes updates a mounted Secret by swapping a ``..data`` symlink);
:class:`StaticAccounts` is the shorthand's book, which never changes.

A request reads :attr:`AccountsWatcher.book` once and is judged by that snapshot to its
end, so a swap never refuses a request in flight. A malformed new version keeps the
last good book (logged and counted once, ``callstatus_accounts_file_stale`` set); at
start a malformed file stops the service (:class:`~service.accountsfile.AccountsFileError`,
a settings error). The book itself is ``service.accountbook``; the file's format and
parse are ``service.accountsfile``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import structlog
from pydantic import SecretStr

from service import metrics
from service.accountbook import AccountBook, shorthand_book
from service.accountsfile import MAX_FILE_BYTES, AccountsFileError, parse

log = structlog.get_logger(logger_name="callstatus.accounts")


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
