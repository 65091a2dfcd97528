"""Prometheus metrics, each defined once. The README lists them with what to alert on.

The four updated for every ingest request are :mod:`service.hotmetrics`' plain-number
families (cheaper per update; the same exposition); the rest are prometheus_client's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from service.hotmetrics import CounterFamily, HistogramFamily

if TYPE_CHECKING:  # service.accounts imports this module
    from service.accountbook import Account

HTTP_REQUESTS = CounterFamily(
    "callstatus_http_requests_total", "HTTP requests by route and status code", ["route", "code"]
)
HTTP_LATENCY = HistogramFamily(
    "callstatus_http_request_duration_seconds",
    "HTTP request latency by route",
    ["route"],
    (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_CONNECTIONS_CLOSED = Counter(
    "callstatus_http_connections_closed_total",
    "Connections the front door closed before a request head was complete, by reason "
    "(head_timeout, shed, over_capacity, head_too_large)",
    ["reason"],
)
INGEST_OUTCOMES = CounterFamily(
    "callstatus_ingest_total",
    "Ingest requests by outcome (accepted, or why they were refused)",
    ["outcome"],
)
PRODUCE_ERRORS = Counter(
    "callstatus_produce_errors_total", "Ingest writes Kafka did not acknowledge", ["reason"]
)

PROCESSOR_EVENTS = Counter(
    "callstatus_processor_events_total",
    "Events the state machine judged, by source (webhook, resource, api; empty for a "
    "record that is no event), outcome and reject reason. For source api, the "
    "reconciler's fetches: accepted changed the call, duplicate or rejected did not",
    ["source", "outcome", "reason"],
)
PROCESSOR_TRANSITIONS = Counter(
    "callstatus_processor_transitions_total",
    "Accepted status changes by previous and new status",
    ["from_status", "to_status"],
)
PROCESSOR_BATCH_SECONDS = Histogram(
    "callstatus_processor_batch_seconds", "Time to process one batch, transaction included"
)
PROCESSOR_COMMIT_SECONDS = Histogram(
    "callstatus_processor_commit_seconds", "Time to commit one Kafka transaction"
)
PROCESSOR_RESTORE_SECONDS = Histogram(
    "callstatus_processor_restore_seconds", "Time to restore one partition's states"
)
PROCESSOR_LAG = Gauge(
    "callstatus_processor_lag", "Ingest records not yet processed, per partition", ["partition"]
)
PROCESSOR_CALLS = Gauge("callstatus_processor_calls", "Call states held in memory")
PROCESSOR_RESTARTS = Counter(
    "callstatus_processor_restarts_total", "Processor restarts after a Kafka failure", ["reason"]
)
PROCESSOR_AHEAD_OF_CLOCK = Counter(
    "callstatus_processor_events_ahead_of_clock_total",
    "Ingest events whose receivedAt was more than MAX_CLOCK_SKEW_SECONDS ahead of the "
    "processor's clock: judged, but they did not move the partition's watermark",
)
PROCESSOR_UNREADABLE = Counter(
    "callstatus_processor_unreadable_total",
    "Ingest fetches that failed because records could not be read (codec, corruption)",
    ["error"],
)

PRODUCER_REBUILDS = Counter(
    "callstatus_producer_rebuilds_total",
    "Kafka producers replaced after an error they cannot recover from, by role and cause",
    ["role", "cause"],
)
PRODUCER_LAST_ACK_AGE = Gauge(
    "callstatus_producer_seconds_since_last_ack",
    "Seconds since the ingest producer last had a write acknowledged",
)
PRODUCER_USABLE = Gauge(
    "callstatus_producer_usable", "1 while the ingest producer can take writes, else 0"
)

SPOOL_EVENTS = Gauge("callstatus_spool_events", "Events in the local spool, not yet in Kafka")
SPOOL_BYTES = Gauge("callstatus_spool_bytes", "Bytes the spool's undelivered events take on disk")
SPOOL_OLDEST_AGE = Gauge(
    "callstatus_spool_oldest_age_seconds", "Age of the oldest event still in the spool (0: empty)"
)
SPOOL_APPENDS = Counter(
    "callstatus_spool_appends_total",
    "Events made durable in the spool because Kafka could not take them",
)
SPOOL_DRAINED = Counter(
    "callstatus_spool_drained_total", "Spooled events delivered to Kafka (rate: the drain rate)"
)
SPOOL_CORRUPT_BYTES = Counter(
    "callstatus_spool_corrupt_bytes_total", "Bytes of torn or corrupt spool tail cut off at start"
)
SPOOL_DISK_ERRORS = Counter(
    "callstatus_spool_disk_errors_total",
    "Spool disk operations that failed, by stage (write, fsync, truncate, rotate, close, "
    "checkpoint, sending, recover) and errno name (ENOSPC: the volume is full; EIO: it is failing)",
    ["stage", "error"],
)
SPOOL_RESENDS_AVOIDED = Counter(
    "callstatus_spool_resends_avoided_total",
    "Spooled events found in Kafka at start after a crash between a drained batch's ack "
    "and its checkpoint, and so released instead of sent again",
)
SPOOL_DRAIN_ERRORS = Counter(
    "callstatus_spool_drain_errors_total",
    "Failed spool drain steps, retried with backoff, by stage (read, send, release, "
    "dead_letter, unlink)",
    ["stage"],
)
SPOOL_DRAINER_RESTARTS = Counter(
    "callstatus_spool_drainer_restarts_total",
    "Times the spool drainer ended with an unexpected error and was restarted",
)
SPOOL_DRAIN_STALLED = Gauge(
    "callstatus_spool_drain_stalled",
    "1 while the spool holds events, the producer takes writes, and the drain has made "
    "no progress for the stall threshold (~30 s); /readyz then answers 503",
)
SPOOL_DEAD_LETTERS = Counter(
    "callstatus_spool_dead_letters_total",
    "Spooled events Kafka refused for good, moved to the spool's dead-letter directory, "
    "by Kafka error",
    ["reason"],
)

# The accounts (service/accounts.py): the book in use and the accounts file's reloads.
ACCOUNTS_CONFIGURED = Gauge(
    "callstatus_accounts", "Accounts in the book in use (1 for the SIGNING_SECRETS shorthand)"
)
ACCOUNTS_FILE_STALE = Gauge(
    "callstatus_accounts_file_stale",
    "1 while the accounts file on disk is not the one in use (unreadable or invalid: the "
    "last good version keeps serving), else 0",
)
ACCOUNTS_RELOAD_FAILURES = Counter(
    "callstatus_accounts_reload_failures_total",
    "Versions of the accounts file (or read errors) that could not be loaded; each is "
    "counted once, and the last good accounts stay in use",
)
ACCOUNT_REQUESTS = CounterFamily(
    "callstatus_account_requests_total",
    "Ingest requests by account (configured ones only; `unknown` for any other, `default` "
    "for the SIGNING_SECRETS shorthand bound to no account) and outcome",
    ["account", "outcome"],
)
UNKNOWN_ACCOUNT = "unknown"


def count_account_request(account: Account | None, outcome: str) -> None:
    """Count one request for ``account`` (what ``AccountBook.lookup`` answered): labelled
    with configured accounts only, so a request cannot mint a series by naming an id."""
    label = account.metric_label if account is not None else UNKNOWN_ACCOUNT
    ACCOUNT_REQUESTS.labels(label, outcome).inc()


# --- FreeClimb REST API client (service/freeclimb.py) ---
FREECLIMB_API_REQUESTS = Counter(
    "callstatus_freeclimb_api_requests_total",
    "Requests to FreeClimb's REST API, by operation (get_call, list_calls), HTTP code "
    "(or timeout, transport) and outcome (ok, retried, not_found, failed)",
    ["operation", "code", "outcome"],
)
FREECLIMB_API_RETRIES = Counter(
    "callstatus_freeclimb_api_retries_total",
    "FreeClimb REST API requests sent again after a 429, a 5xx, a timeout or a transport "
    "error, by operation and reason (rate_limited, server_error, timeout, transport)",
    ["operation", "reason"],
)
FREECLIMB_API_SECONDS = Histogram(
    "callstatus_freeclimb_api_request_duration_seconds",
    "Latency of one FreeClimb REST API request (one attempt), by operation",
    ["operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FREECLIMB_API_INVALID_CALLS = Counter(
    "callstatus_freeclimb_api_invalid_calls_total",
    "Call resources from FreeClimb's REST API that the Call model refused",
)

# --- Reconciliation (service/reconciler.py) ---
RECONCILE_FETCHES = Counter(
    "callstatus_reconcile_fetches_total",
    "Call resources the reconciler asked FreeClimb's REST API for, by trigger (held: a "
    "call held non-terminal too long; sweep: recently ended calls listed; backfill) and "
    "outcome (published to ingest; not_found; failed: the API did not answer it; "
    "unpublished: Kafka did not take it now; unwritable: Kafka refuses it for good; "
    "too_large: over MAX_INGEST_VALUE_BYTES; invalid: the Call model refused it)",
    ["trigger", "outcome"],
)
RECONCILE_GIVEN_UP = Counter(
    "callstatus_reconcile_given_up_total",
    "Held calls the reconciler stopped fetching because the API does not know them (404)",
)
RECONCILE_SWEEPS = Counter(
    "callstatus_reconcile_sweeps_total",
    "Sweeps of an account's recently ended calls, by outcome (ok, failed)",
    ["outcome"],
)
RECONCILE_HELD = Gauge(
    "callstatus_reconcile_held_calls",
    "Calls of this node's partitions held non-terminal with an account (what trigger 1 "
    "watches), as of the last reconcile round",
)
