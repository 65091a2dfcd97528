"""The reconciler: fetches Call resources from FreeClimb's REST API and publishes each to
the ingest topic as an ``api`` event, for the calls of the partitions this node's
processor owns (held too long non-terminal) and for its accounts' recently ended calls
(the sweep); and ``callstatus backfill``'s listing (docs/architecture.md, section 12).

It runs beside the processor, in the processor's process, and takes its calls from the
processor's workers, so a call is fetched only by the node that owns its partition; the
events it publishes go through the same FSM and exactly-once path as callbacks.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Literal, Protocol

import httpx
import structlog
from pydantic import SecretStr

from schemas.messages import RecordTooLarge
from service import metrics
from service.accountbook import AccountBook, api_keys, canonical_id
from service.accounts import load
from service.backoff import Backoff
from service.freeclimb import (
    CallNotFound,
    ClientOptions,
    FetchedCall,
    FreeClimbClient,
    FreeClimbError,
    InvalidCall,
)
from service.kafka import retry_at_start
from service.partitioner import partition_for
from service.producer import IngestProducer, Unavailable, Unwritable
from service.reconcile import Attempt, api_record, due_calls, next_attempt, sweep_window
from service.settings import Settings
from service.statecodec import account_id, account_of

if TYPE_CHECKING:
    from service.processor import Processor
    from service.publisher import SpoolingPublisher

log = structlog.get_logger(logger_name="callstatus.reconciler")

Headers = list[tuple[str, bytes]]
Publish = Callable[[bytes, bytes, Headers], Awaitable[None]]

# What became of a fetched resource sent to the ingest topic (publish_fetched).
Outcome = Literal["published", "too_large", "unpublished", "unwritable"]

# Fetches started per round at most: the client's per-account gate bounds how many are in
# flight; this bounds what one round holds in memory after an outage left many due.
ROUND_LIMIT = 200


class Worker(Protocol):
    """What the reconciler reads of a partition worker (service/worker.py)."""

    @property
    def held(self) -> Mapping[str, float]: ...
    @property
    def states(self) -> Mapping[str, bytes]: ...


class Owner(Protocol):
    """The processor, as the reconciler sees it: the workers it owns now."""

    def owned(self) -> Mapping[int, Worker]: ...
    def ingest_partitions(self) -> list[int] | None: ...


class Books(Protocol):
    """Where the accounts in use come from: the node's accounts watcher
    (service/accounts.py), read once per round."""

    @property
    def book(self) -> AccountBook: ...


# The accounts the reconciler may ask about, as of now: account id -> API key.
Keys = Callable[[], Mapping[str, SecretStr]]


class BookKeys:
    """The API keys of the node's accounts book in use: a reloaded accounts file (a
    rotated ``apiKey``, an account added or removed) counts from the next round. Derived
    again only when the watcher swapped the book, so an unchanged round costs a read."""

    def __init__(self, books: Books) -> None:
        self._books = books
        self._book: AccountBook | None = None
        self._keys: Mapping[str, SecretStr] = {}

    def __call__(self) -> Mapping[str, SecretStr]:
        book = self._books.book
        if book is not self._book:
            self._book, self._keys = book, api_keys(book)
        return self._keys


def shorthand_keys(settings: Settings) -> dict[str, SecretStr]:
    """FREECLIMB_ACCOUNT_ID and FREECLIMB_API_KEY, the one account without a file."""
    if settings.freeclimb_account_id is not None and settings.freeclimb_api_key is not None:
        return {canonical_id(settings.freeclimb_account_id): settings.freeclimb_api_key}
    return {}


def api_credentials(settings: Settings) -> dict[str, SecretStr]:
    """The accounts with an API key now: the shorthand's, or each account of the
    accounts file that has an ``apiKey``, read from the file once (for ``callstatus
    backfill``, a one-off; the node's reconciler follows the watched book instead)."""
    if (keys := shorthand_keys(settings)) or settings.accounts_file is None:
        return keys
    book, _ = load(settings.accounts_file)
    return api_keys(book)


def client_for(
    settings: Settings,
    credentials: Mapping[str, SecretStr],
    transport: httpx.AsyncBaseTransport | None = None,
) -> FreeClimbClient:
    return FreeClimbClient(
        dict(credentials), ClientOptions(base_url=settings.freeclimb_api_url), transport=transport
    )


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did: ``done`` (every owned account listed), ``failed`` (an
    account's listing did not finish) or ``skipped`` (the partitions are not known now:
    mid-rebalance); and how many calls it published."""

    outcome: Literal["done", "failed", "skipped"]
    published: int = 0
    # The accounts whose listing did not finish (or, Kafka taking no writes, was not
    # begun): only they are listed again at the backed-off retry.
    failed: frozenset[str] = frozenset()


class Reconciler:
    """Trigger 1 (held calls) and trigger 2 (the sweep), in one task beside the
    processor; it runs until cancelled (service/server.py cancels it at stop)."""

    def __init__(
        self,
        settings: Settings,
        owner: Owner,
        keys: Keys | Mapping[str, SecretStr],
        publish: Publish | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.owner = owner
        if callable(keys):
            self._keys: Keys = keys
        else:
            fixed = dict(keys)
            self._keys = lambda: fixed
        # The keys the client was last given, and that client: a round hands the client
        # new keys only when the book changed.
        self._given: tuple[FreeClimbClient, Mapping[str, SecretStr]] | None = None
        self.clock = clock
        self.after = settings.reconcile_after_seconds
        # A scan of the held index is cheap (non-terminal calls only), so a few seconds;
        # never more than a quarter of RECONCILE_AFTER, so a due call waits little.
        self.tick = max(0.2, min(5.0, self.after / 4))
        self._publish = publish
        self._producer: IngestProducer | None = None
        self._attempts: dict[str, Attempt] = {}
        self._given_up: set[str] = set()
        # Calls the sweep published, with the revision, until they leave the window: a
        # sweep lists each ended call for the whole window, and one record each suffices.
        self._swept: dict[str, tuple[int | None, float]] = {}
        # Accounts whose last sweep failed: the warning is logged when a sweep starts
        # failing and an info line when it works again, not at every retry (an API
        # away for an hour, or `make run` with no simulate serving the stand-in, would
        # otherwise write the same warning every few seconds; the metrics count each).
        self._sweep_failing: set[str] = set()
        self._next_sweep = 0.0  # the next sweep, full or a retry
        self._next_full = 0.0  # the next sweep of every owned account
        # After a failed sweep, the accounts that failed are listed again sooner than a
        # whole sweep period (the calls they missed are still missing), but backed off:
        # an API that is down is not asked every round. Only those: one account's
        # rotated key must not have every other account re-listed every few seconds.
        self._retry: frozenset[str] | None = None
        self._sweep_backoff = Backoff(first=min(5.0, self.tick * 2), cap=30.0)

    @property
    def credentials(self) -> Mapping[str, SecretStr]:
        """The accounts asked about now, and their keys."""
        return self._keys()

    async def run(self) -> None:
        """Rounds until cancelled; a failing round is logged and the next one tries
        again: the reconciler must never take the processor or ingest down with it."""
        self._say(self.credentials)
        try:
            if self._publish is None:
                # A processor-only node has no ingest producer: one of its own (with
                # ingest in the process, the node's publisher is shared: one producer's
                # metrics). Started for as long as Kafka takes: the processor waits too.
                producer = self._producer = IngestProducer(self.settings)
                await retry_at_start(producer.start, "reconciler producer", math.inf)
                self._publish = producer.publish
            self._next_sweep = self._next_full = (
                self.clock() + self.settings.reconcile_sweep_seconds
            )
            await self._rounds()
        except Exception:
            log.exception("reconciler stopped")
            raise
        finally:
            if self._producer is not None:
                await self._producer.stop()

    async def _rounds(self) -> None:
        async with client_for(self.settings, self.credentials) as client:
            while True:
                try:
                    await self.round(client)
                except Exception:
                    log.exception("reconcile round failed")
                await asyncio.sleep(self.tick)

    async def round(self, client: FreeClimbClient) -> None:
        now = self.clock()
        await self.held_round(client, now)
        sweep = self.settings.reconcile_sweep_seconds
        if not sweep or now < self._next_sweep:
            return
        full = now >= self._next_full
        result = await self.sweep_round(client, now, None if full else self._retry)
        if result.outcome == "skipped":
            return  # nothing is known to be ours now; due again at the next round
        if full:
            self._next_full = now + sweep
        self._retry = result.failed or None
        if self._retry is None:
            self._sweep_backoff.reset()
            self._next_sweep = self._next_full
        else:
            self._next_sweep = min(self._next_full, now + self._sweep_backoff.next_delay())

    def _keys_for(self, client: FreeClimbClient) -> Mapping[str, SecretStr]:
        """The keys in use now, handed to ``client`` when they changed (a reload)."""
        keys = self._keys()
        given = self._given
        if given is None or given[0] is not client or given[1] is not keys:
            if given is not None and bool(given[1]) != bool(keys):
                self._say(keys)  # the first key added, or the last one removed
            if given is not None and given[1] is not keys:
                # A reload: calls backed off after 401s with the old key would wait out
                # up to an hour of backoff with the new one; start every count over.
                self._attempts.clear()
            client.use(keys)
            self._given = (client, keys)
        return keys

    def _say(self, keys: Mapping[str, SecretStr]) -> None:
        """Whether reconciliation is on: at start, and when a reload turns it on or off
        (an accounts file without any apiKey keeps the reconciler waiting for one)."""
        s = self.settings
        if keys:
            log.info(
                "reconciliation on",
                accounts=len(keys),
                after_s=s.reconcile_after_seconds,
                sweep_s=s.reconcile_sweep_seconds,
            )
            if (problem := s.sweep_window_problem()) is not None:
                # Keys from an accounts file: settings could not refuse it at start.
                log.warning("the sweep looks back less far than configured: " + problem)
        else:
            say_off(waiting=True)

    # -- trigger 1: calls held non-terminal too long ---------------------------------

    async def held_round(self, client: FreeClimbClient, now: float) -> int:
        """Fetch and publish the owned calls that are due; returns how many were tried."""
        credentials = self._keys_for(client)
        workers = self.owner.owned()
        if not workers:
            # Mid-rebalance (or nothing assigned): the calls are not known now, which is
            # not the same as not held. Keep the backoffs and the given-up calls, or every
            # rebalance would fetch them all again from the first attempt.
            return 0
        held: dict[str, float] = {}
        where: dict[str, Worker] = {}
        for worker in workers.values():
            held.update(worker.held)
            where.update(dict.fromkeys(worker.held, worker))
        metrics.RECONCILE_HELD.set(len(held))
        # Forget what is about calls no longer held (ended, retired, not ours any more).
        self._attempts = {c: a for c, a in self._attempts.items() if c in held}
        self._given_up &= held.keys()
        due = due_calls(
            held, self._attempts, self._given_up, now=now, after=self.after, limit=ROUND_LIMIT
        )
        jobs = []
        for call_id in due:
            account = account_id(account_of(where[call_id].states[call_id]))
            self._attempts[call_id] = next_attempt(
                self._attempts.get(call_id), held[call_id], now=now, after=self.after
            )
            if account is None or account not in credentials:
                continue  # an account without an API key: nothing we can ask
            jobs.append(self._fetch_held(client, account, call_id))
        if jobs:
            # Each fetch answers for its own errors (the expected ones are counted in
            # _fetch_held); an unexpected one is logged here, and never leaves the
            # other fetches of the round running unwatched.
            for result in await asyncio.gather(*jobs, return_exceptions=True):
                if isinstance(result, Exception):
                    metrics.RECONCILE_FETCHES.labels("held", "failed").inc()
                    log.error("reconcile fetch failed", error=repr(result))
        return len(jobs)

    async def _fetch_held(self, client: FreeClimbClient, account: str, call_id: str) -> None:
        try:
            fetched = await client.get_call(account, call_id)
        except CallNotFound:
            self._given_up.add(call_id)
            metrics.RECONCILE_FETCHES.labels("held", "not_found").inc()
            metrics.RECONCILE_GIVEN_UP.inc()
            log.info("call unknown to the API; not fetched again", callId=call_id)
            return
        except FreeClimbError as exc:
            metrics.RECONCILE_FETCHES.labels("held", "failed").inc()
            log.warning("call fetch failed", callId=call_id, error=str(exc), status=exc.status)
            return
        await self._send("held", fetched)

    async def _send(self, trigger: str, fetched: FetchedCall) -> Outcome:
        """Publish one fetched resource (its failures counted and logged)."""
        assert self._publish is not None
        return await publish_fetched(
            self._publish, trigger, fetched, self.settings.max_ingest_value_bytes
        )

    # -- trigger 2: the sweep of recently ended calls --------------------------------

    async def sweep_round(
        self, client: FreeClimbClient, now: float, only: frozenset[str] | None = None
    ) -> Sweep:
        """List each owned account's calls ended within the window (of the accounts in
        ``only``, when given: a retry) and publish those not published since they
        entered it. Skipped while the partitions are not known (a rebalance): which
        accounts are ours cannot be told, and "none" would be wrong."""
        credentials = self._keys_for(client)
        partitions = self.owner.ingest_partitions()
        owned = self.owner.owned()
        if not partitions or not owned:
            return Sweep("skipped")
        s = self.settings
        start, end = sweep_window(
            datetime.fromtimestamp(now, UTC),
            sweep=s.reconcile_sweep_seconds,
            lookback=s.reconcile_sweep_lookback_seconds,
            terminal_retention=s.state_terminal_retention_seconds,
            max_clock_skew=s.max_clock_skew_seconds,
        )
        horizon = start.timestamp()
        self._swept = {c: seen for c, seen in self._swept.items() if seen[1] >= horizon}
        published = 0
        failed: set[str] = set()
        ours = [
            account
            for account in sorted(credentials)
            if (only is None or account in only)
            # Another node's account, else.
            and partition_for(account.encode(), partitions, partitions) in owned
        ]
        for i, account in enumerate(ours):
            try:
                async for item in client.list_calls(account, start_time=start, end_time=end):
                    if isinstance(item, InvalidCall):
                        metrics.RECONCILE_FETCHES.labels("sweep", "invalid").inc()
                        continue
                    call = item.call
                    seen = self._swept.get(call.callId)
                    if seen is not None and seen[0] == call.revision:
                        continue  # published by an earlier sweep, unchanged since
                    sent = await self._send("sweep", item)
                    if sent == "unpublished":
                        # Kafka cannot take writes now: each further call would wait
                        # out the produce timeout too. Stop; this account and those not
                        # yet listed are due again soon.
                        metrics.RECONCILE_SWEEPS.labels("failed").inc()
                        return Sweep("failed", published, frozenset(failed | set(ours[i:])))
                    # Published, or never publishable (too large, refused for good:
                    # counted and logged once): not sent again while in the window.
                    self._swept[call.callId] = (call.revision, now)
                    if sent == "published":
                        published += 1
            except FreeClimbError as exc:
                # Failure: the listing broke off (the client's retries are spent). The
                # other accounts are still listed; this one is due again soon.
                failed.add(account)
                metrics.RECONCILE_SWEEPS.labels("failed").inc()
                metrics.RECONCILE_FETCHES.labels("sweep", "failed").inc()
                if account not in self._sweep_failing:
                    self._sweep_failing.add(account)
                    log.warning(
                        "sweep failed; retried backed off, logged again once it works",
                        account=account,
                        error=str(exc),
                        status=exc.status,
                    )
                continue
            metrics.RECONCILE_SWEEPS.labels("ok").inc()
            if account in self._sweep_failing:
                self._sweep_failing.discard(account)
                log.info("sweep works again", account=account)
        return Sweep("failed" if failed else "done", published, frozenset(failed))


async def publish_fetched(
    publish: Publish, trigger: str, fetched: FetchedCall, max_bytes: int
) -> Outcome:
    """One fetched resource to the ingest topic, its outcome counted and returned:
    ``published``; ``too_large`` (its record would exceed MAX_INGEST_VALUE_BYTES, so no
    send could take it); ``unwritable`` (Kafka refuses it for good: the topic's
    max.message.bytes, a policy); ``unpublished`` (Kafka, and the spool if any, could not
    take it now). Never raises for these: a failed publish must not end the round. What
    was not published is tried again: a held call at its next fetch (its backoff doubles
    to an hour while nothing changes), a swept call by the next sweep, which lists it
    again (it is remembered as published only once it was)."""
    call_id = fetched.call.callId
    try:
        key, value, headers = api_record(fetched.body, fetched.call, datetime.now(UTC), max_bytes)
    except RecordTooLarge as exc:
        # Failure, not retried: FreeClimb's resource is larger than ingest accepts.
        metrics.RECONCILE_FETCHES.labels(trigger, "too_large").inc()
        log.warning("fetched call too large to publish", callId=call_id, error=str(exc))
        return "too_large"
    try:
        await publish(key, value, headers)
    except Unwritable as exc:
        # Failure, not retried: Kafka refuses this record for good; an operator must
        # fix the topic (the CallstatusReconcileFailing alert counts it).
        metrics.RECONCILE_FETCHES.labels(trigger, "unwritable").inc()
        log.error("kafka refuses the fetched call for good", callId=call_id, error=exc.cause)
        return "unwritable"
    except Unavailable as exc:
        # Failure, retried later: Kafka (and the spool, if any) could not take it now.
        metrics.RECONCILE_FETCHES.labels(trigger, "unpublished").inc()
        log.warning("fetched call not published", callId=call_id, error=repr(exc))
        return "unpublished"
    metrics.RECONCILE_FETCHES.labels(trigger, "published").inc()
    return "published"


def reconciler_for(
    settings: Settings,
    processor: Processor | None,
    publisher: IngestProducer | SpoolingPublisher | None,
    books: Books | None,
) -> Reconciler | None:
    """The node's reconciler, or None when it has no processor or no API key can be
    configured: no FREECLIMB_API_KEY and no accounts file (:func:`say_off` logs that, at
    start: building a node logs nothing). With an accounts file, it follows ``books``
    (the node's one watcher), so a key added or rotated later is used without a restart."""
    if processor is None:
        return None
    keys: Keys | dict[str, SecretStr]
    if shorthand := shorthand_keys(settings):
        keys = shorthand
    elif settings.accounts_file is not None and books is not None:
        keys = BookKeys(books)
    else:
        return None
    publish = publisher.publish if publisher is not None else None
    return Reconciler(settings, processor, keys, publish)


def say_off(*, waiting: bool = False) -> None:
    """The one line a processor node without an API key logs at start; ``waiting`` when
    it follows an accounts file, where a key added later turns reconciliation on."""
    log.info(
        "reconciliation off: no FreeClimb API key configured "
        "(CALLSTATUS_FREECLIMB_API_KEY, or apiKey in the accounts file)",
        **({"until": "an apiKey is added to the accounts file"} if waiting else {}),
    )


# -- callstatus backfill ---------------------------------------------------------------


@dataclass(slots=True)
class BackfillSummary:
    fetched: int = 0
    published: int = 0
    pages: int = 0
    invalid: int = 0
    unpublished: int = 0
    refused: int = 0  # too large for ingest, or refused by Kafka for good


class _PageCounter(httpx.AsyncBaseTransport):
    """Counts the list pages the API answered (the client pages on its own)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.pages = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if response.status_code == 200 and request.url.path.endswith("/Calls"):
            self.pages += 1
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def backfill(
    settings: Settings,
    account: str,
    since: datetime,
    until: datetime,
    *,
    publish: Publish | None = None,
    out: IO[str] = sys.stderr,
) -> BackfillSummary:
    """List ``account``'s calls that started at or after ``since`` and ended by
    ``until``, and publish each as an ``api`` event; a progress line per page and the
    summary. The processor judges them like any event: identical ones are duplicates."""
    account = canonical_id(account)
    credentials = api_credentials(settings)
    if account not in credentials:
        raise LookupError(f"no API key for account {account}")
    summary = BackfillSummary()
    counter = _PageCounter()
    producer: IngestProducer | None = None
    if publish is None:
        producer = IngestProducer(settings)
        await producer.start()
        publish = producer.publish
    try:
        async with client_for(settings, {account: credentials[account]}, counter) as client:
            async for item in client.list_calls(account, start_time=since, end_time=until):
                summary.fetched += 1
                if isinstance(item, InvalidCall):
                    summary.invalid += 1
                    metrics.RECONCILE_FETCHES.labels("backfill", "invalid").inc()
                else:
                    outcome = await publish_fetched(
                        publish, "backfill", item, settings.max_ingest_value_bytes
                    )
                    if outcome == "published":
                        summary.published += 1
                    elif outcome == "unpublished":
                        summary.unpublished += 1
                    else:
                        summary.refused += 1
                if counter.pages != summary.pages:
                    summary.pages = counter.pages
                    print(
                        f"backfill {account}: page {summary.pages}, {summary.fetched} calls",
                        file=out,
                        flush=True,
                    )
        summary.pages = counter.pages
    finally:
        if producer is not None:
            await producer.stop()
    print(
        f"backfill done: {summary.fetched} fetched, {summary.published} published, "
        f"{summary.pages} pages, {summary.invalid} invalid, {summary.unpublished} unpublished, "
        f"{summary.refused} refused",
        file=out,
        flush=True,
    )
    return summary


__all__ = [
    "BackfillSummary",
    "BookKeys",
    "Books",
    "Owner",
    "Reconciler",
    "Sweep",
    "api_credentials",
    "backfill",
    "reconciler_for",
    "say_off",
    "shorthand_keys",
]
